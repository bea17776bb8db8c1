// The per-group comm thread (native/comm/comm_queue.cc) behind CommGroup.all2allvAsync: queued
// collectives run in order with the blocking ones, structured data arrives intact while the caller
// goes on, a simulated link takes at least bytes / bandwidth, waits time out, and a peer that
// leaves fails the op instead of hanging it.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';

import { loadNative, nativePath } from '../src/native/index.js';

let groupSeq = 0;
const uniqueGroup = (tag: string) => `${tag}-${process.pid}-${groupSeq++}`;

interface RankResult { ok: boolean; rank: number; error?: { name: string; message: string; code?: string }; log?: unknown }

/** Runs `body` ((addon, group, rank, worldSize, helpers) => log, as source) on worldSize eval workers. */
function runRanks(worldSize: number, body: string, timeoutMs = 10_000): Promise<RankResult[]> {
  const group = uniqueGroup('q');
  const source = `
    const { workerData, parentPort } = require('node:worker_threads');
    const addon = require(workerData.addonPath);
    const { rank, worldSize, group, timeoutMs } = workerData;
    const sleep = (ms) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
    let comm;
    try {
      comm = addon.loopbackJoin(group, worldSize, rank, timeoutMs);
      const log = (${body})(addon, comm, rank, worldSize, { sleep });
      parentPort.postMessage({ ok: true, rank, log });
    } catch (e) {
      parentPort.postMessage({ ok: false, rank, error: { name: e.name, message: e.message, code: e.code } });
    } finally {
      if (comm) comm.dispose();
    }`;
  return Promise.all([...Array(worldSize).keys()].map((rank) => new Promise<RankResult>((resolve, reject) => {
    const w = new Worker(source, { eval: true, workerData: { addonPath: nativePath(), rank, worldSize, group, timeoutMs } });
    let result: RankResult | undefined;
    w.on('message', (m: RankResult) => { result = m; });
    w.on('error', reject);
    w.on('exit', (code) => (result ? resolve(result) : reject(new Error(`rank ${rank} exited ${code} without a result`))));
  })));
}

// Each rank queues `ops` async all2allvs (rows = [source, dest, op, index] int32), a blocking counts
// exchange between them, and waits for them in reverse order; every row must say where it came from.
const QUEUED_BODY = `(addon, comm, rank, world, { sleep }) => {
  const rowsFor = (s, d, op) => (s * 5 + d * 3 + op * 7) % 5;
  const ops = [];
  for (let op = 0; op < 6; op++) {
    const sendCounts = new Float64Array(world), recvCounts = new Float64Array(world);
    for (let d = 0; d < world; d++) sendCounts[d] = rowsFor(rank, d, op);
    for (let s = 0; s < world; s++) recvCounts[s] = rowsFor(s, rank, op);
    const send = new Int32Array(sendCounts.reduce((a, b) => a + b, 0) * 4);
    let row = 0;
    for (let d = 0; d < world; d++) for (let i = 0; i < sendCounts[d]; i++, row++) send.set([rank, d, op, i], row * 4);
    const recv = new Int32Array(recvCounts.reduce((a, b) => a + b, 0) * 4 + 4).fill(-7);
    const h = comm.all2allvAsync(new Uint8Array(send.buffer), sendCounts.map((c) => c * 16), new Uint8Array(recv.buffer), recvCounts.map((c) => c * 16));
    ops.push({ h, recv, recvCounts, op });
    if (op === 2) {
      // A blocking collective queued behind the async ones runs after them, in order on every rank.
      const got = new Float64Array(world);
      comm.all2allCounts(new Float64Array(world).fill(rank + 100), got);
      for (let s = 0; s < world; s++) if (got[s] !== s + 100) throw new Error('counts from ' + s + ': ' + got[s]);
      if (!ops.every((o) => o.h.done())) throw new Error('a blocking collective overtook queued ops');
    }
    sleep(rank);  // ranks reach each op at different times
  }
  let checked = 0;
  for (const { h, recv, recvCounts, op } of ops.reverse()) {
    const seconds = h.wait(5000);
    if (!(seconds >= 0)) throw new Error('seconds ' + seconds);
    let row = 0;
    for (let s = 0; s < world; s++)
      for (let i = 0; i < recvCounts[s]; i++, row++) {
        const got = Array.from(recv.subarray(row * 4, row * 4 + 4)).join();
        if (got !== [s, rank, op, i].join()) throw new Error('op ' + op + ' row ' + row + ': ' + got);
        checked++;
      }
    if (recv.subarray(row * 4).some((x) => x !== -7)) throw new Error('wrote past the received rows');
    if (!h.done()) throw new Error('done() false after wait');
  }
  return checked;
}`;

for (const world of [1, 2, 3]) {
  test(`async all2allv: queued ops across ${world} rank(s) deliver every row, in order with blocking collectives`, async () => {
    const results = await runRanks(world, QUEUED_BODY);
    for (const r of results) assert.ok(r.ok, `rank ${r.rank}: ${JSON.stringify(r.error)}`);
    if (world > 1) assert.ok(results.every((r) => (r.log as number) > 0));
  });
}

test('a simulated link: each all2allv takes at least max(bytes out, bytes in) / bandwidth, while the caller goes on', async () => {
  const results = await runRanks(2, `(addon, comm, rank) => {
    comm.setSimulatedLink(50e6);  // 50 MB/s: 1 MB to the peer takes >= 20 ms
    const n = 1 << 20;
    const send = new Uint8Array(2 * n).fill(rank + 1), recv = new Uint8Array(2 * n);
    const t0 = performance.now();
    const h = comm.all2allvAsync(send, Float64Array.from([n, n]), recv, Float64Array.from([n, n]));
    const queuedMs = performance.now() - t0;
    const seconds = h.wait(10000);
    if (recv[0] !== 1 || recv[n] !== 2) throw new Error('data ' + recv[0] + ',' + recv[n]);
    comm.setSimulatedLink(0);
    const h2 = comm.all2allvAsync(send, Float64Array.from([0, 0]), recv, Float64Array.from([0, 0]));
    return { seconds, queuedMs, off: h2.wait(10000) };
  }`);
  for (const r of results) {
    assert.ok(r.ok, `rank ${r.rank}: ${JSON.stringify(r.error)}`);
    const log = r.log as { seconds: number; queuedMs: number; off: number };
    assert.ok(log.seconds >= 0.02, `modelled 20 ms, took ${log.seconds * 1000} ms`);
    assert.ok(log.off < log.seconds, 'an empty exchange without the link is quicker');
  }
  const solo = loadNative().loopbackJoin(uniqueGroup('link'), 1, 0, 1000);
  try {
    assert.throws(() => solo.setSimulatedLink(-1), { name: 'RangeError', message: /bytesPerSecond is -1.0+, expected a finite number >= 0/ });
    assert.throws(() => solo.all2allvAsync(new Uint8Array(4), Float64Array.from([8]), new Uint8Array(8), Float64Array.from([8])),
      { name: 'RangeError', message: 'send.length is 4, expected at least 8 (the sum of sendBytes)' });
  } finally {
    solo.dispose();
  }
  assert.throws(() => solo.all2allvAsync(new Uint8Array(0), Float64Array.from([0]), new Uint8Array(0), Float64Array.from([0])),
    { code: 'E_DISPOSED' });
});

test('a wait times out while the peer is late, and fails (no hang) when the peer leaves', async () => {
  const results = await runRanks(2, `(addon, comm, rank, world, { sleep }) => {
    if (rank === 1) { sleep(400); return 'left'; }  // leaves without joining the collective
    const h = comm.all2allvAsync(new Uint8Array(0), Float64Array.from([0, 0]), new Uint8Array(0), Float64Array.from([0, 0]));
    let first = '';
    try { h.wait(50); } catch (e) { first = e.message; }
    let second = '';
    try { h.wait(20000); } catch (e) { second = e.message; }
    return { first, second, done: h.done() };
  }`, 20_000);
  const r0 = results[0]!;
  assert.ok(r0.ok, JSON.stringify(r0.error));
  const log = r0.log as { first: string; second: string; done: boolean };
  assert.match(log.first, /all2allv did not finish within 50 ms/);
  assert.match(log.second, /rank 1 has left the group/);
  assert.equal(log.done, true);
});
