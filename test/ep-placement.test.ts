// Expert placement as a table (issue 11): any placement of the routed experts over the ranks
// (round-robin, a seeded random permutation with uneven counts per rank, a rank with none) gives the
// single-rank model's outputs bit for bit with in-process expert ranks, with and without the EPS
// pipeline (PN > 1), on the host and on emulated devices; invalid tables are exact RangeErrors.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { Worker } from 'node:worker_threads';

import { mulberry32 } from '../src/engine/rng.js';
import { loadCudaModel, loadModel } from '../src/model/load.js';
import { expertPlacement } from '../src/cli/resolve.js';
import { contiguousPlacement, epPlan, expertSlice, parsePlacement, placementFromExperts, placementFromOwners,
  type ExpertPlacement } from '../src/moe/ep-comm.js';
import { startDeviceExpertRanks, startExpertRanks } from '../src/dist/expert-ranks.js';
import { packageRoot } from '../src/native/index.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { startDaemon, stopDaemon } from './helpers/daemon.js';
import { runAll } from './helpers/model-runner.js';
import { testSeed } from './helpers/seed.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');

function roundRobin(E: number, W: number): ExpertPlacement {
  return placementFromOwners(Array.from({ length: E }, (_, e) => e % W), W);
}

/**
 * A random permutation of the experts cut into W runs of random (uneven, non-empty) sizes; never
 * the contiguous table (a draw that happens to be it, e.g. seed 817496050 for 8 experts over 2
 * ranks, is drawn again from the next stream).
 */
function randomPlacement(E: number, W: number, seed: number): ExpertPlacement {
  for (let s = seed; ; s = (s + 0x9e3779b9) >>> 0) {
    const p = drawPlacement(E, W, s);
    if (!p.contiguous) return p;
  }
}

function drawPlacement(E: number, W: number, seed: number): ExpertPlacement {
  const rand = mulberry32(seed);
  const perm = Array.from({ length: E }, (_, e) => e);
  for (let i = E - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [perm[i], perm[j]] = [perm[j]!, perm[i]!];
  }
  const cuts = new Set<number>();
  while (cuts.size < W - 1) cuts.add(1 + Math.floor(rand() * (E - 1)));
  const bounds = [0, ...[...cuts].sort((a, b) => a - b), E];
  return placementFromExperts(bounds.slice(0, -1).map((a, r) => perm.slice(a, bounds[r + 1])), E);
}

test('contiguousPlacement is expertSlice as a table; round-robin has each rank\'s experts ascending with local indices', () => {
  for (const [E, W] of [[8, 3], [60, 2], [4, 4], [7, 1]]) {
    const p = contiguousPlacement(E, W);
    assert.ok(p.contiguous);
    for (let r = 0; r < W; r++) {
      const [a, b] = expertSlice(E, W, r);
      assert.deepEqual(Array.from(p.experts[r]!), Array.from({ length: b - a }, (_, i) => a + i));
      for (let e = a; e < b; e++) assert.equal(p.owner[e], r);
    }
  }
  const rr = roundRobin(8, 3);
  assert.equal(rr.contiguous, false);
  assert.deepEqual(rr.experts.map((l) => Array.from(l)), [[0, 3, 6], [1, 4, 7], [2, 5]]);
  assert.deepEqual(Array.from(rr.localIndex), [0, 0, 0, 1, 1, 1, 2, 2]);
  // Listing order does not matter: a rank's local order is ascending ids.
  const listed = placementFromExperts([[7, 1, 4], [5, 0, 2, 6, 3]], 8);
  assert.deepEqual(listed.experts.map((l) => Array.from(l)), [[1, 4, 7], [0, 2, 3, 5, 6]]);
});

test('invalid placements are exact RangeErrors', () => {
  assert.throws(() => placementFromExperts([[0, 1], [1, 2, 3]], 4), { name: 'RangeError', message: 'placement: expert 1 is owned by ranks 0 and 1' });
  assert.throws(() => placementFromExperts([[0, 1], [3]], 4), { name: 'RangeError', message: 'placement: expert 2 is owned by no rank' });
  assert.throws(() => placementFromExperts([[0, 1], [2, 4]], 4), { name: 'RangeError', message: 'placement: rank 1 lists expert 4, expected 0..3' });
  assert.throws(() => placementFromOwners([0, 2, 1], 2), { name: 'RangeError', message: 'placement: expert 1 is owned by rank 2, expected 0..1' });
  assert.throws(() => placementFromOwners([0, -1], 2), { name: 'RangeError', message: 'placement: expert 1 is owned by rank -1, expected 0..1' });
  assert.throws(() => placementFromOwners([0], 0), { name: 'RangeError', message: 'placement: worldSize is 0, expected an integer >= 1' });
  assert.throws(() => startExpertRanks(path.join(fixturesDir, 'mixtral'), 2, false, 60_000, roundRobin(8, 3)),
    { name: 'RangeError', message: 'placement: places 8 experts over 3 ranks, expected 8 over 2' });
  assert.throws(() => startExpertRanks(path.join(fixturesDir, 'mixtral'), 2, false, 60_000, roundRobin(6, 2)),
    { name: 'RangeError', message: 'placement: places 6 experts over 2 ranks, expected 8 over 2' });
});

test('epPlan over a non-contiguous placement: each source\'s rows of this rank\'s experts, expert-major', () => {
  // 5 experts; rank 1 owns 1, 3 and 4 (local order). Counts each source sent rank 1, in that order.
  const p = placementFromOwners([0, 1, 0, 1, 1], 2);
  const plan = epPlan([Int32Array.from([2, 0, 1]), Int32Array.from([1, 3, 2])], p, 1);
  assert.deepEqual(plan.fromRank, [3, 6]);
  assert.equal(plan.received, 9);
  // Expert 1: 2 rows from source 0 (inbox 0), 1 from source 1 (inbox 3); expert 3: 3 from source 1
  // (inbox 4); expert 4: 1 from source 0 (inbox 2), 2 from source 1 (inbox 7).
  assert.deepEqual(Array.from(plan.local), [0, 0, 3, 3, 6, 9]);
  assert.deepEqual(plan.blocks, [
    { inbox: 0, local: 0, rows: 2 }, { inbox: 3, local: 2, rows: 1 }, { inbox: 4, local: 3, rows: 3 },
    { inbox: 2, local: 6, rows: 1 }, { inbox: 7, local: 7, rows: 2 },
  ]);
});

test('GroupExpertComm and DeviceExpertComm over non-contiguous placements: every row comes back in place', async (t) => {
  const seed = testSeed(t, undefined, 'placement and routing');
  const E = 7;
  const cases: [string, number[], number, boolean][] = [
    ['round-robin', Array.from({ length: E }, (_, e) => e % 3), 3, false],
    ['rank 1 owns none', [2, 0, 2, 0, 2, 2, 0], 3, false],
    ['random', Array.from(randomPlacement(E, 3, seed).owner), 3, false],
    ['round-robin (device)', Array.from({ length: E }, (_, e) => e % 2), 2, true],
    ['random (device)', Array.from(randomPlacement(E, 3, seed + 1).owner), 3, true],
  ];
  for (const [what, owner, world, device] of cases) {
    const group = `ep-placement-test-${process.pid}-${what.replace(/\W/g, '')}`;
    const ncclId = device ? createCudaEmulator().cudaNcclUniqueId() : undefined;
    const results = await Promise.all(Array.from({ length: world }, (_, rank) => new Promise<{ ok: boolean; checked?: number; error?: string }>((resolve, reject) => {
      const w = new Worker(new URL('./helpers/ep-rank-worker.js', import.meta.url), {
        workerData: { group, world, rank, E, Z: device ? 0 : 2, H: device ? 8 : 5, steps: 6, seed, owner, ...(ncclId ? { ncclId } : {}) },
      });
      w.once('message', resolve);
      w.once('error', reject);
    })));
    results.forEach((r, rank) => assert.ok(r.ok, `${what} (owners ${owner}) rank ${rank}: ${r.error}`));
    assert.ok(results.every((r) => (r.checked ?? 0) > 0));
  }
});

/** One fixture over `world` ranks with `placement`: PN 1 and 3 equal the single-rank model bit for bit. */
async function checkModel(name: string, world: number, placement: ExpertPlacement, fast: boolean,
                          want: ReturnType<typeof runAll>, what: string): Promise<void> {
  const dir = path.join(fixturesDir, name);
  const ranks = startExpertRanks(dir, world, fast, 60_000, placement);
  try {
    await ranks.ready;
    const loaded = loadModel(dir, { fast, comm: ranks.comm, loadExpert: (_l, e) => placement.owner[e] === 0 });
    try {
      for (const pn of [1, 3]) {
        loaded.model.setPipelineChunks(pn);
        const before = ranks.comm.bytesSent;
        const got = runAll(loaded.model, null);
        assert.deepEqual(got.tokens, want.tokens, `${what} PN ${pn}: greedy tokens`);
        got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${what} PN ${pn}: logits of step ${i}`));
        assert.ok(ranks.comm.bytesSent > before, 'rows went to the other ranks');
      }
    } finally {
      loaded.model.dispose();
    }
  } finally {
    await ranks.stop();
  }
}

for (const name of ['mixtral', 'deepseek_v3', 'longcat_flash']) {
  test(`${name}: round-robin and random placements over 2 and 3 ranks equal one rank, bit for bit (PN 1 and 3)`, async (t: TestContext) => {
    const seed = testSeed(t, undefined, 'random placement');
    const dir = path.join(fixturesDir, name);
    const single = loadModel(dir, { fast: false });
    const want = runAll(single.model, null);
    const E = single.model.spec.moe.numExperts;
    single.model.dispose();
    for (const world of [2, 3]) {
      for (const [kind, p] of [['round-robin', roundRobin(E, world)], ['random', randomPlacement(E, world, seed + world)]] as const) {
        assert.equal(p.contiguous, false, `${kind} x${world} must not be the contiguous placement`);
        await checkModel(name, world, p, false, want, `${name} x${world} ${kind} (${p.experts.map((l) => `[${Array.from(l)}]`).join(' ')})`);
      }
    }
  });
}

test('bf16: a random placement over 3 ranks equals one rank in bf16, bit for bit (deepseek_v3)', async (t) => {
  const seed = testSeed(t, undefined, 'random placement');
  const dir = path.join(fixturesDir, 'deepseek_v3');
  const single = loadModel(dir, { fast: true });
  const want = runAll(single.model, null);
  single.model.dispose();
  await checkModel('deepseek_v3', 3, randomPlacement(16, 3, seed), true, want, 'deepseek_v3 bf16 x3 random');
});

for (const name of ['qwen2_moe', 'longcat_flash']) {
  test(`${name} on devices (emulated): a round-robin placement over 2 ranks equals one device, bit for bit (PN 1 and 3)`, async () => {
    const dir = path.join(fixturesDir, name);
    const single = loadCudaModel(dir, { device: 0, cuda: createCudaEmulator() });
    const want = runAll(single.model, null);
    single.model.dispose();
    const cuda = createCudaEmulator();
    const placement = roundRobin(8, 2);
    const ranks = startDeviceExpertRanks(dir, 2, cuda, path.join(packageRoot(), 'dist', 'test', 'helpers', 'cuda-emu.js'), 60_000, placement);
    try {
      await ranks.ready;
      const loaded = loadCudaModel(dir, { device: 0, cuda, ep: ranks.comm });
      try {
        for (const pn of [1, 3]) {
          loaded.model.setPipelineChunks(pn);
          const got = runAll(loaded.model, null);
          assert.deepEqual(got.tokens, want.tokens, `${name} PN ${pn}: greedy tokens`);
          got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${name} PN ${pn}: logits of step ${i}`));
        }
        assert.ok(ranks.comm.bytesSent > 0, 'rows went to the other rank');
      } finally {
        loaded.model.dispose();
      }
    } finally {
      await ranks.stop();
    }
  });
}

test('--expert-placement FILE: parsed and checked before any worker starts, exact errors', () => {
  assert.deepEqual(Array.from(parsePlacement('[[0, 2], [1, 3]]', 4, 2).owner), [0, 1, 0, 1]);
  assert.throws(() => parsePlacement('[[0, 2], [1, 3]]', 4, 3), { name: 'RangeError', message: 'placement: lists 2 ranks, expected 3' });
  assert.throws(() => parsePlacement('{"0": [0]}', 4, 2),
    { name: 'RangeError', message: 'placement: expected an array of each rank\'s expert ids, e.g. [[0, 2], [1, 3]]' });
  assert.throws(() => parsePlacement('[[0, 2], [1, "3"]]', 4, 2),
    { name: 'RangeError', message: 'placement: expected an array of each rank\'s expert ids, e.g. [[0, 2], [1, 3]]' });
  assert.throws(() => parsePlacement('[[0, 2], [1, 3', 4, 2), (e: Error) => e instanceof RangeError && e.message.startsWith('placement: not JSON ('));
  const dir = mkdtempSync(path.join(tmpdir(), 'expertd-placement-'));
  try {
    const file = path.join(dir, 'p.json');
    writeFileSync(file, '[[0, 1, 2], [2, 3]]');
    assert.throws(() => expertPlacement(file, 4, 2), { name: 'UsageError', message: `--expert-placement ${file}: placement: expert 2 is owned by ranks 0 and 1` });
    writeFileSync(file, '[[3, 1], [0, 2]]');
    assert.deepEqual(expertPlacement(file, 4, 2), [1, 0, 1, 0]);
    assert.throws(() => expertPlacement(path.join(dir, 'missing.json'), 4, 2), (e: Error) =>
      e.name === 'UsageError' && e.message.startsWith(`--expert-placement ${path.join(dir, 'missing.json')}: ENOENT`));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('expertd serve --expert-parallel 2 --expert-placement FILE (round-robin) answers as one rank', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'expertd-placement-'));
  const file = path.join(dir, 'p.json');
  writeFileSync(file, JSON.stringify([[0, 2, 4, 6], [1, 3, 5, 7]])); // the demo model has 8 experts
  const run = async (extra: string[]) => {
    const d = await startDaemon(extra);
    try {
      const texts = await Promise.all(['The weather today', 'Once upon a time', 'Hello'].map((prompt) =>
        d.client.completions.create({ model: 'expertd-demo', prompt, max_tokens: 8, temperature: 0 }).then((c) => c.choices[0]!.text)));
      const metrics = await (await fetch(`${d.base}/metrics`)).text();
      return { texts, metrics, logs: d.logs.join(''), exit: await stopDaemon(d) };
    } catch (e) {
      d.proc.kill('SIGKILL');
      throw e;
    }
  };
  try {
    const ep = await run(['--expert-parallel', '2', '--expert-placement', file]);
    const one = await run([]);
    assert.deepEqual(ep.texts, one.texts);
    assert.equal(ep.exit, 0);
    assert.match(ep.logs, /expert placement rank 0 \[0,2,4,6\], rank 1 \[1,3,5,7\]/);
    assert.doesNotMatch(one.logs, /expert placement/);
    const bytes = /^expertd_all2all_bytes_total (\S+)$/m.exec(ep.metrics);
    assert.ok(bytes && Number(bytes[1]) > 0, 'all2all bytes counted');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
