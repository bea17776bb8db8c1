// Gloo comm groups across processes: 2 and 3 rank processes (test/helpers/gloo-rank.ts) rendezvous
// through a StoreServer in this process; structured all2allv data (every received row says where it
// came from), uneven and zero counts, the i64 counts exchange, barrier; GroupExpertComm over Gloo
// equals it over loopback; a rank may join from a worker thread while its main thread serves the
// store; a rank that never joins and a rank killed mid-collective end the others'
// calls with E_COMM within the timeout, and no process is left behind.
import assert from 'node:assert/strict';
import { fork, type ChildProcess } from 'node:child_process';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';

import { StoreServer } from '../src/dist/store.js';
import { loadNative } from '../src/native/index.js';
import { countValue, EP, ROUNDS, ROW_INTS, structuredRows, type RankConfig } from './helpers/gloo-rank.js';

const native = loadNative();
const skip = native.capabilities().gloo ? false
  : 'this build has no Gloo (apt-get install libgloo-dev and rebuild; CI installs it)';
const HOST = '127.0.0.1';
const helper = new URL('./helpers/gloo-rank.js', import.meta.url);
let prefixSeq = 0;

interface Rank { child: ChildProcess; messages: any[]; exited: Promise<number | null>; waitFor(kind: string): Promise<any> }

function spawnRank(cfg: RankConfig): Rank {
  const child = fork(helper, [], { env: { ...process.env, EXPERTD_GLOO_RANK: JSON.stringify(cfg) }, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const messages: any[] = [];
  const waiters: { kind: string; resolve: (m: any) => void }[] = [];
  child.on('message', (m: any) => {
    messages.push(m);
    for (const w of waiters.filter((x) => x.kind === m.kind)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(m); }
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    child, messages, exited,
    waitFor: (kind) => {
      const seen = messages.find((m) => m.kind === kind);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        waiters.push({ kind, resolve });
        void exited.then((code) => reject(new Error(`rank ${cfg.rank} exited (${code}) before '${kind}': ${JSON.stringify(messages)}`)));
      });
    },
  };
}

/** Starts a store and world ranks (or only `ranks` of them), runs body, and always reaps every child. */
async function withGroup(worldSize: number, scenario: RankConfig['scenario'], timeoutMs: number,
                         body: (ranks: Rank[]) => Promise<void>, only?: number[]) {
  const server = await StoreServer.listen(HOST, 0);
  const prefix = `gloo-test-${process.pid}-${prefixSeq++}`;
  const ranks = (only ?? [...Array(worldSize).keys()]).map((rank) =>
    spawnRank({ host: HOST, port: server.port, prefix, rank, worldSize, timeoutMs, scenario }));
  try {
    await body(ranks);
  } finally {
    for (const r of ranks) if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill('SIGKILL');
    await Promise.all(ranks.map((r) => r.exited));
    await server.close();
  }
}

for (const W of [2, 3]) {
  test(`gloo: ${W} rank processes: structured all2allv (uneven and zero counts), all2all_i64, barrier`, { skip }, async () => {
    await withGroup(W, 'structured', 10_000, async (ranks) => {
      const results = await Promise.all(ranks.map((r) => r.waitFor('result')));
      for (const r of ranks) assert.equal((await r.waitFor('joined')).backend, 'gloo');
      results.forEach(({ result }, me) => {
        for (let round = 0; round < ROUNDS; round++) {
          const got: number[] = result.rounds[round];
          let at = 0;
          for (let s = 0; s < W; s++)
            for (let row = 0; row < structuredRows(round, s, me); row++, at += ROW_INTS)
              assert.deepEqual(got.slice(at, at + ROW_INTS), [s, me, row, round], `rank ${me} round ${round} row ${at / ROW_INTS}`);
          assert.equal(at, got.length);
        }
        assert.deepEqual(result.counts, [...Array(W).keys()].map((s) => countValue(s, me)));
      });
      assert.deepEqual(await Promise.all(ranks.map((r) => r.exited)), Array(W).fill(0));
    });
  });
}

test('gloo: rank 0 in a worker thread of the process whose main thread serves the store, rank 1 a process', { skip }, async () => {
  const server = await StoreServer.listen(HOST, 0);
  const cfg = { host: HOST, port: server.port, prefix: `gloo-test-${process.pid}-${prefixSeq++}`, worldSize: 2, timeoutMs: 10_000, scenario: 'structured' as const };
  const other = spawnRank({ ...cfg, rank: 1 });
  try {
    // This rank names its listening address (listenHost); the process rank takes the default.
    const w = new Worker(helper, { workerData: { glooRank: { ...cfg, rank: 0, listenHost: '127.0.0.1' } } });
    const m = await new Promise<any>((resolve, reject) => { w.once('message', resolve); w.once('error', reject); });
    assert.equal(m.ok, true, JSON.stringify(m.error));
    assert.deepEqual(m.result.counts, [countValue(0, 0), countValue(1, 0)]);
    assert.equal((await other.waitFor('result')).result.counts[0], countValue(0, 1));
    assert.equal(await other.exited, 0);
  } finally {
    if (other.child.exitCode === null) other.child.kill('SIGKILL');
    await other.exited;
    await server.close();
  }
});

/** The EP scenario over a loopback group in worker threads (the reference). */
async function loopbackEp(W: number): Promise<number[][][]> {
  const group = `gloo-ref-${process.pid}-${prefixSeq++}`;
  return Promise.all([...Array(W).keys()].map((rank) => new Promise<number[][]>((resolve, reject) => {
    const w = new Worker(helper, { workerData: { loopbackGroup: group, rank, worldSize: W } });
    w.once('message', (m) => (m.ok ? resolve(m.result) : reject(new Error(m.error.message))));
    w.once('error', reject);
  })));
}

test('gloo: GroupExpertComm over Gloo (3 processes) gives what it gives over loopback, and what the experts computed', { skip }, async () => {
  const W = 3;
  const reference = await loopbackEp(W);
  await withGroup(W, 'ep', 10_000, async (ranks) => {
    const results = (await Promise.all(ranks.map((r) => r.waitFor('result')))).map((m) => m.result as number[][]);
    assert.deepEqual(results, reference);
    // And independently: row i routed to expert e comes back as x_i * (e + 1) (identity experts: x_i).
    let checked = 0;
    for (const steps of results)
      for (let s = 0; s < EP.steps; s++) {
        const [offsets, x, y] = [steps[3 * s]!, steps[3 * s + 1]!, steps[3 * s + 2]!];
        for (let e = 0; e < EP.E + EP.Z; e++)
          for (let r = offsets[e]!; r < offsets[e + 1]!; r++)
            for (let j = 0; j < EP.H; j++, checked++)
              assert.equal(y[r * EP.H + j], Math.fround(x[r * EP.H + j]! * (e < EP.E ? e + 1 : 1)));
      }
    assert.ok(checked > 0);
  });
});

test('gloo: a rank that never joins makes the others\' join fail with E_COMM within the timeout', { skip }, async () => {
  const timeoutMs = 1500;
  await withGroup(3, 'join-only', timeoutMs, async (ranks) => {
    const failures = await Promise.all(ranks.map((r) => r.waitFor('join-failed')));
    for (const f of failures) {
      assert.equal(f.error.code, 'E_COMM');
      assert.match(f.error.message, /gloo group 'gloo-test-\d+-\d+' rank [01]\/3: waited \d+ ms for rank 2 to join/);
      assert.ok(f.elapsedMs >= timeoutMs - 100 && f.elapsedMs < timeoutMs + 3000, `failed after ${f.elapsedMs} ms`);
    }
    assert.deepEqual(await Promise.all(ranks.map((r) => r.exited)), [0, 0]);
  }, [0, 1]);
});

test('gloo: a rank killed mid-collective makes the others\' collective fail with E_COMM within the timeout; no process left', { skip }, async () => {
  const timeoutMs = 3000;
  await withGroup(3, 'lose-peer', timeoutMs, async (ranks) => {
    await Promise.all(ranks.map((r) => r.waitFor('joined')));
    const [r0, r1, victim] = ranks as [Rank, Rank, Rank];
    r0.child.send('go');
    r1.child.send('go');
    // Ranks 0 and 1 are now inside an all2allv that rank 2 never enters; kill it while they wait.
    await new Promise((r) => setTimeout(r, 300));
    victim.child.kill('SIGKILL');
    const results = await Promise.all([r0, r1].map((r) => r.waitFor('result')));
    for (const { result } of results) {
      const [a2a, barrier] = result;
      assert.equal(a2a.error?.code, 'E_COMM', JSON.stringify(a2a));
      // Gloo names the peer's address (closed or reset); we add the rank when it is the address that peer published.
      assert.match(a2a.error.message, /gloo group '.*' rank [01]\/3: all2allv failed: .*\[127\.0\.0\.1\]:\d+.*; the group is broken/);
      assert.ok(a2a.elapsedMs < timeoutMs + 2000, `all2allv failed after ${a2a.elapsedMs} ms`);
      // The group stays broken: the next call fails at once, naming the first failure.
      assert.equal(barrier.error?.code, 'E_COMM');
      assert.match(barrier.error.message, /the group is broken/);
      assert.ok(barrier.elapsedMs < 500);
    }
    assert.deepEqual(await Promise.all([r0, r1].map((r) => r.exited)), [0, 0]);
    assert.equal(await victim.exited, null);   // killed by the signal
  });
});

test('gloo: all2allv sizes that do not match are a RangeError on the rank that sees it and E_COMM on the others, not a crash', { skip }, async () => {
  const timeoutMs = 3000;
  await withGroup(2, 'mismatch', timeoutMs, async (ranks) => {
    const [r0, r1] = (await Promise.all(ranks.map((r) => r.waitFor('result')))).map((m) => m.result);
    assert.equal(r1.error?.name, 'RangeError', JSON.stringify(r1));
    assert.match(r1.error.message, /rank 1\/2: all2allv: rank 0 sends 8 bytes to rank 1, which expects 16; the group is broken/);
    assert.equal(r0.error?.code, 'E_COMM', JSON.stringify(r0));
    assert.ok(r0.elapsedMs < timeoutMs + 2000, `rank 0 failed after ${r0.elapsedMs} ms`);
    assert.deepEqual(await Promise.all(ranks.map((r) => r.exited)), [0, 0]);
  });
});

test('gloo: glooJoin argument errors are exact (checked before Gloo is needed)', () => {
  assert.throws(() => native.glooJoin({ host: HOST, port: 70000, prefix: 'p', rank: 0, worldSize: 2, timeoutMs: 100 }),
    { name: 'RangeError', message: 'options.port is 70000, expected 1..65535' });
  assert.throws(() => native.glooJoin({ host: HOST, port: 1, prefix: 'p', rank: 2, worldSize: 2, timeoutMs: 100 }),
    { name: 'RangeError', message: 'options.rank is 2, expected 0..1' });
  assert.throws(() => native.glooJoin({ host: HOST, port: 1, prefix: '', rank: 0, worldSize: 2, timeoutMs: 100 }),
    { name: 'RangeError', message: 'options.prefix must not be empty' });
  assert.throws(() => native.glooJoin(null as never), { name: 'TypeError', message: 'glooJoin options must be an object' });
});

test('gloo: without Gloo in the build, glooJoin says what to do', { skip: native.capabilities().gloo ? 'this build has Gloo' : false }, () => {
  assert.throws(() => native.glooJoin({ host: HOST, port: 1, prefix: 'p', rank: 0, worldSize: 1, timeoutMs: 100 }),
    { code: 'E_UNSUPPORTED', message: 'multi-process CPU ranks are unavailable: this build has no Gloo; apt-get install libgloo-dev and rebuild' });
});
