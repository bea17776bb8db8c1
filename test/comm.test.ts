// Loopback comm groups across worker_threads: structured all2allv data (every received row says
// its source rank and index), the counts exchange, uneven and zero sizes, timeouts, peers that
// leave, size mismatches and argument errors, without ever hanging the process.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';

import { loadNative, nativePath } from '../src/native/index.js';

const native = loadNative();
let groupSeq = 0;
const uniqueGroup = (tag: string) => `${tag}-${process.pid}-${groupSeq++}`;

interface RankResult { ok: boolean; rank: number; error?: { name: string; message: string; code?: string }; log?: unknown }

/**
 * Runs `body` (the source of a function (addon, group, rank, worldSize, helpers) => log) on
 * worldSize worker threads, each joined to the same loopback group. The workers are CommonJS
 * eval workers so that dist/test holds no extra file for the test runner to pick up.
 */
function runRanks(worldSize: number, body: string, timeoutMs = 10_000, extra: unknown = null): Promise<RankResult[]> {
  const group = uniqueGroup('g');
  const source = `
    const { workerData, parentPort } = require('node:worker_threads');
    const addon = require(workerData.addonPath);
    const { rank, worldSize, group, timeoutMs, extra } = workerData;
    const sleep = (ms) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
    let comm;
    try {
      comm = addon.loopbackJoin(group, worldSize, rank, timeoutMs);
      const log = (${body})(addon, comm, rank, worldSize, { sleep, extra });
      parentPort.postMessage({ ok: true, rank, log });
    } catch (e) {
      parentPort.postMessage({ ok: false, rank, error: { name: e.name, message: e.message, code: e.code } });
    } finally {
      if (comm) comm.dispose();
    }`;
  const addonPath = nativePath();
  return Promise.all([...Array(worldSize).keys()].map((rank) => new Promise<RankResult>((resolve, reject) => {
    const w = new Worker(source, { eval: true, workerData: { addonPath, rank, worldSize, group, timeoutMs, extra } });
    let result: RankResult | undefined;
    w.on('message', (m: RankResult) => { result = m; });
    w.on('error', reject);
    w.on('exit', (code) => (result ? resolve(result) : reject(new Error(`rank ${rank} exited ${code} without a result`))));
  })));
}

function assertAllOk(results: RankResult[]): void {
  for (const r of results) assert.ok(r.ok, `rank ${r.rank}: ${JSON.stringify(r.error)}`);
}

// Rank s sends rowsFor(s, d, round) rows to rank d: uneven, zero for some pairs.
const ROWS_FOR = '(s, d, round) => (s * 7 + d * 3 + round * 5) % 6';

const EXCHANGE_BODY = `(addon, comm, rank, world) => {
  const rowsFor = ${ROWS_FOR};
  if (comm.rank !== rank || comm.worldSize !== world || comm.backend !== 'loopback') throw new Error('bad group fields');
  const ROW = 16;  // bytes: int32 [source rank, dest rank, index, round]
  let rowsReceived = 0;
  for (let round = 0; round < 25; round++) {
    const sendCounts = new Float64Array(world);
    for (let d = 0; d < world; d++) sendCounts[d] = rowsFor(rank, d, round);
    const recvCounts = new Float64Array(world).fill(-1);
    comm.all2allCounts(sendCounts, recvCounts);
    for (let s = 0; s < world; s++)
      if (recvCounts[s] !== rowsFor(s, rank, round)) throw new Error('round ' + round + ': count from ' + s + ' is ' + recvCounts[s]);
    const totalSend = sendCounts.reduce((a, b) => a + b, 0);
    const totalRecv = recvCounts.reduce((a, b) => a + b, 0);
    const send = new Int32Array(totalSend * 4);
    let row = 0;
    for (let d = 0; d < world; d++)
      for (let i = 0; i < sendCounts[d]; i++, row++) send.set([rank, d, i, round], row * 4);
    const recv = new Int32Array(totalRecv * 4 + 4).fill(-7);  // one guard row after the data
    comm.all2allv(new Uint8Array(send.buffer), sendCounts.map((c) => c * ROW),
                  new Uint8Array(recv.buffer), recvCounts.map((c) => c * ROW));
    row = 0;
    for (let s = 0; s < world; s++)
      for (let i = 0; i < recvCounts[s]; i++, row++) {
        const got = Array.from(recv.subarray(row * 4, row * 4 + 4));
        if (got.join() !== [s, rank, i, round].join()) throw new Error('round ' + round + ' row ' + row + ': ' + got.join());
      }
    if (recv.subarray(totalRecv * 4).some((x) => x !== -7)) throw new Error('wrote past the received rows');
    rowsReceived += totalRecv;
  }
  comm.barrier();
  return rowsReceived;
}`;

for (const world of [1, 2, 4]) {
  test(`loopback all2allv and counts exchange across ${world} worker rank(s)`, async () => {
    const results = await runRanks(world, EXCHANGE_BODY);
    assertAllOk(results);
    // Every rank received exactly what the others meant to send it.
    const rowsFor = (s: number, d: number, round: number) => (s * 7 + d * 3 + round * 5) % 6;
    for (const r of results) {
      let expected = 0;
      for (let round = 0; round < 25; round++) for (let s = 0; s < world; s++) expected += rowsFor(s, r.rank, round);
      assert.equal(r.log, expected);
    }
  });
}

test('a world of one works on the calling thread (all2allv is a copy, counts echo)', () => {
  const g = native.loopbackJoin(uniqueGroup('solo'), 1, 0, 1000);
  try {
    assert.equal(g.rank, 0);
    assert.equal(g.worldSize, 1);
    assert.equal(g.backend, 'loopback');
    const recvCounts = new Float64Array(1);
    g.all2allCounts(Float64Array.from([5]), recvCounts);
    assert.deepEqual([...recvCounts], [5]);
    const send = Uint8Array.from([1, 2, 3, 4, 5]);
    const recv = new Uint8Array(6).fill(9);
    g.all2allv(send, Float64Array.from([5]), recv, Float64Array.from([5]));
    assert.deepEqual([...recv], [1, 2, 3, 4, 5, 9]);
    g.all2allv(new Uint8Array(0), Float64Array.from([0]), new Uint8Array(0), Float64Array.from([0]));
    g.barrier();
  } finally {
    g.dispose();
  }
  g.dispose();  // idempotent
  assert.throws(() => g.barrier(), { name: 'Error', code: 'E_DISPOSED', message: /has been disposed/ });
});

test('a join that does not complete in time fails (and the name can be joined again)', () => {
  const name = uniqueGroup('late');
  const t0 = Date.now();
  assert.throws(() => native.loopbackJoin(name, 2, 0, 150), {
    name: 'Error', code: 'E_INVALID_ARG', message: `loopback group '${name}': 1 of 2 ranks joined within 150 ms`,
  });
  assert.ok(Date.now() - t0 >= 140);
  // The timed-out rank withdrew: a fresh world of one under the same name forms at once.
  native.loopbackJoin(name, 1, 0, 100).dispose();
});

test('a rank that never arrives at a collective times out its peers, which then fail fast', async () => {
  const results = await runRanks(2, `(addon, comm, rank, world, { sleep }) => {
    if (rank === 0) {
      const t0 = Date.now();
      try { comm.barrier(); } catch (e) { return { first: e.message, code: e.code, ms: Date.now() - t0 }; }
      throw new Error('barrier returned');
    }
    sleep(600);  // misses the barrier; by now the group is broken
    try { comm.barrier(); } catch (e) { return { later: e.message }; }
    throw new Error('barrier returned');
  }`, 300);
  assertAllOk(results);
  const [r0, r1] = results.map((r) => r.log as Record<string, unknown>);
  assert.match(String(r0!.first), /: rank 0 waited 300 ms in barrier for 1 of 2 ranks; the group is broken$/);
  assert.equal(r0!.code, 'E_INTERNAL');
  assert.ok((r0!.ms as number) >= 290 && (r0!.ms as number) < 5000);
  assert.equal(r1!.later, r0!.first);
});

test('a peer that leaves (dispose) releases a rank waiting in a collective at once', async () => {
  const results = await runRanks(2, `(addon, comm, rank, world, { sleep }) => {
    if (rank === 1) { sleep(100); comm.dispose(); return 'left'; }
    const t0 = Date.now();
    try { comm.all2allCounts(new Float64Array(2), new Float64Array(2)); } catch (e) { return { message: e.message, ms: Date.now() - t0 }; }
    throw new Error('collective returned');
  }`, 20_000);
  assertAllOk(results);
  const r0 = results[0]!.log as { message: string; ms: number };
  assert.match(r0.message, /: rank 1 has left the group$/);
  assert.ok(r0.ms < 10_000, `released after ${r0.ms} ms`);
});

test('mismatched all2allv sizes raise on the receiving rank only, and the group stays usable', async () => {
  const results = await runRanks(2, `(addon, comm, rank) => {
    // Rank 0 sends 4 bytes to rank 1, which expects 8.
    const sendBytes = Float64Array.from(rank === 0 ? [0, 4] : [0, 0]);
    const recvBytes = Float64Array.from(rank === 1 ? [8, 0] : [0, 0]);
    let err = null;
    try { comm.all2allv(new Uint8Array(8), sendBytes, new Uint8Array(8), recvBytes); }
    catch (e) { err = { name: e.name, message: e.message }; }
    comm.barrier();
    return err;
  }`);
  assertAllOk(results);
  assert.equal(results[0]!.log, null);
  assert.deepEqual(results[1]!.log, { name: 'RangeError', message: 'all2allv: rank 0 sends 4 bytes to rank 1, which expects 8' });
});

test('loopback arguments are checked with exact messages', async () => {
  assert.throws(() => native.loopbackJoin('x', 2, 2, 10), { name: 'RangeError', message: 'rank is 2, expected 0..1' });
  assert.throws(() => native.loopbackJoin('x', 0, 0, 10), { name: 'RangeError', message: 'worldSize is 0, expected 1..4096' });
  assert.throws(() => native.loopbackJoin(3 as never, 1, 0, 10), { name: 'TypeError', message: 'group must be a string' });
  assert.throws(() => native.loopbackJoin('x', 1, 0, -1), { name: 'RangeError', message: 'timeoutMs is -1, expected 0..2147483647' });
  const g = native.loopbackJoin(uniqueGroup('args'), 1, 0, 100);
  try {
    const u8 = new Uint8Array(4);
    assert.throws(() => g.all2allv(u8, new Float64Array(0), u8, Float64Array.from([0])),
      { name: 'RangeError', message: 'sendBytes.length is 0, expected at least 1' });
    assert.throws(() => g.all2allv(u8, Float64Array.from([-1]), u8, Float64Array.from([0])),
      { name: 'RangeError', message: 'sendBytes[0] is -1.000000, expected a non-negative integer' });
    assert.throws(() => g.all2allv(u8, Float64Array.from([5]), u8, Float64Array.from([5])),
      { name: 'RangeError', message: 'send.length is 4, expected at least 5 (the sum of sendBytes)' });
    assert.throws(() => g.all2allv(u8, Float64Array.from([4]), new Uint8Array(3), Float64Array.from([4])),
      { name: 'RangeError', message: 'recv.length is 3, expected at least 4 (the sum of recvBytes)' });
    assert.throws(() => g.all2allv(u8, new Int32Array(1) as never, u8, Float64Array.from([0])),
      { name: 'TypeError', message: 'sendBytes must be a Float64Array' });
    assert.throws(() => g.all2allCounts(Float64Array.from([0.5]), new Float64Array(1)),
      { name: 'RangeError', message: 'send[0] is 0.500000, expected an integer' });
    // Nothing above entered the collective: the group still works.
    g.barrier();
  } finally {
    g.dispose();
  }
  // A rank taken twice, or a different world size, while the group is forming.
  const name = uniqueGroup('forming');
  const waiter = new Worker(`
    const { workerData, parentPort } = require('node:worker_threads');
    const addon = require(workerData.addonPath);
    try { addon.loopbackJoin(workerData.name, 2, 0, 3000); parentPort.postMessage('joined'); }
    catch (e) { parentPort.postMessage(e.message); }`, { eval: true, workerData: { addonPath: nativePath(), name } });
  const waiterDone = new Promise<string>((resolve) => waiter.on('message', resolve));
  const waiterExit = new Promise<void>((resolve) => waiter.on('exit', () => resolve()));
  await new Promise((r) => setTimeout(r, 300));
  assert.throws(() => native.loopbackJoin(name, 2, 0, 100),
    { name: 'RangeError', message: `rank 0 has already joined loopback group '${name}'` });
  assert.throws(() => native.loopbackJoin(name, 3, 1, 100),
    { name: 'RangeError', message: `loopback group '${name}' is forming with worldSize 2, got 3` });
  const mine = native.loopbackJoin(name, 2, 1, 3000);
  assert.equal(await waiterDone, 'joined');
  mine.dispose();
  await waiterExit;
});
