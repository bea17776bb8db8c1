// EPS-MoE planner: the per-expert DenseGemm path agrees with GroupGemm, the kernel choice follows the
// calibrated cost model, pipeline chunking responds to communication cost, and the calibration is
// cached on disk.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadModel } from '../src/model/load.js';
import { ChunkOverheadEstimator, EpsPlanner, calibrate, denseExpertsFfn, loadOrCalibrate, type CostTable } from '../src/moe/eps-planner.js';
import { loadNative, packageRoot } from '../src/native/index.js';
import { DirectRunner } from './helpers/model-runner.js';
import { fileSeed } from './helpers/seed.js';

const seedBase = fileSeed(0, 'base added to each case seed');
function rand(len: number, seed: number): Float32Array {
  const a = new Float32Array(len);
  let s = (seedBase + seed) >>> 0;
  for (let i = 0; i < len; i++) { s = (s * 1664525 + 1013904223) >>> 0; a[i] = (s / 2 ** 32 - 0.5) * 0.5; }
  return a;
}

test('per-expert DenseGemm path equals the fused GroupGemm (zero, one and skewed loads)', () => {
  const n = loadNative();
  const E = 6, H = 48, I = 40;
  // bf16 experts, and int8 ones (fast mode: int8 activations, which an AVX-512 CPU without VNNI runs
  // on the AVX2 kernel; the 'avx512' level is such a CPU), at every dispatch level.
  const tables = (['bf16', 'int8'] as const).map((kind) => {
    const t = new n.ExpertTable(E, H, I);
    for (let e = 0; e < E; e++) {
      const toBf16 = (a: Float32Array) => { const u = new Uint16Array(a.length); n.convert(a, 'f32', u, 'bf16'); return u; };
      const gu = kind === 'bf16' ? n.packGateUp(toBf16(rand(I * H, e + 1)), toBf16(rand(I * H, e + 11)), 'bf16', I, H)
        : n.packGateUp(rand(I * H, e + 1), rand(I * H, e + 11), 'f32', I, H, 'int8', 0);
      const dn = kind === 'bf16' ? n.packWeight(toBf16(rand(H * I, e + 21)), 'bf16', H, I)
        : n.packWeight(rand(H * I, e + 21), 'f32', H, I, 'int8', 0);
      t.set(e, gu, dn);
      gu.dispose();
      dn.dispose();
    }
    return { kind, t };
  });
  const counts = [0, 1, 37, 0, 2, 5];
  const offsets = new Int32Array(E + 1);
  counts.forEach((c, e) => { offsets[e + 1] = offsets[e]! + c; });
  const rows = offsets[E]!;
  const x = rand(rows * H, 99);
  for (const { kind, t: tbl } of tables) for (const level of ['auto', 'avx512', 'avx2', 'scalar'] as const) for (const fast of [false, true]) {
    n.setSimdLevel(level);
    const yg = new Float32Array(rows * H).fill(NaN);
    const yd = new Float32Array(rows * H).fill(NaN);
    try {
      n.groupGemmFfn(x, offsets, tbl, yg, fast);
      denseExpertsFfn(x, offsets, tbl, H, I, yd, fast);
    } finally {
      n.setSimdLevel('auto');
    }
    let worst = 0;
    let scale = 0;
    for (let i = 0; i < rows * H; i++) {
      assert.ok(Number.isFinite(yd[i]!), `dense output ${i} not written`);
      worst = Math.max(worst, Math.abs(yd[i]! - yg[i]!));
      scale = Math.max(scale, Math.abs(yg[i]!));
    }
    // Both run the same tile kernels over the same packed weights (each element one accumulator
    // over k in order) and the same SiLU(gate)*up arithmetic (native/cpu/activation.cc NOTE), and
    // the down GEMM rounds h to bf16 in fast mode as the fused pass stores it: the same bits, so the
    // EPS planner's kernel choice never changes an output.
    assert.equal(worst, 0, `${kind} ${level} ${fast ? 'fast' : 'ref'}: max diff ${worst} (scale ${scale})`);
  }
  assert.throws(() => denseExpertsFfn(x, Int32Array.from([0, 0, 0, 0, 0, 0, 0]).map((_, i) => (i >= 1 ? 1 : 0)),
    new n.ExpertTable(E, H, I), H, I, new Float32Array(H), false), /expert 0 has 1 rows but no weights/);
  for (const { t } of tables) t.dispose();
});

const synthetic: CostTable = {
  key: 'synthetic', rows: [1, 8, 64, 512],
  // GroupGemm cheaper for few rows per expert, DenseGemm from 512 (like the paper's H800 crossover).
  groupMs: [0.1, 0.2, 1.0, 8.0],
  denseMs: [0.3, 0.5, 1.2, 6.0],
};

test('the kernel choice follows the cost model and its crossover', () => {
  const p = new EpsPlanner(synthetic);
  assert.equal(p.crossoverRows(), 512);
  assert.equal(new EpsPlanner({ ...synthetic, denseMs: [0.05, 0.5, 1.2, 9.0] }).crossoverRows(), Infinity,
    'a dense win at one row only is not a crossover');
  assert.equal(p.plan([1, 2, 0, 3], 4096).kernel, 'group');
  assert.equal(p.plan([900, 1000, 800, 0], 4096).kernel, 'dense');
  const mixed = p.plan([600, 1, 1, 1], 4096);
  assert.equal(mixed.kernel, mixed.denseMs < mixed.groupMs ? 'dense' : 'group');
  assert.equal(new EpsPlanner(synthetic, null, 'dense').plan([1, 1], 4096).kernel, 'dense');
  assert.equal(p.plan([5, 5], 4096).chunks, 1, 'one rank: nothing to overlap, one chunk');
});

test('pipeline chunks grow when all2all dominates and shrink when latency does', () => {
  const counts = [512, 512, 512, 512];
  const fastLink = new EpsPlanner(synthetic, { bytesPerMs: 1e12, latencyMs: 0 }).plan(counts, 4096);
  const slowLink = new EpsPlanner(synthetic, { bytesPerMs: 2e5, latencyMs: 0.01 }).plan(counts, 4096);
  const laggy = new EpsPlanner(synthetic, { bytesPerMs: 2e5, latencyMs: 50 }).plan(counts, 4096);
  assert.ok(slowLink.chunks > 1, `comm-bound load should pipeline, got ${slowLink.chunks} chunk(s)`);
  assert.ok(laggy.chunks < slowLink.chunks, 'per-call latency should cost chunks');
  assert.ok(fastLink.totalMs <= slowLink.totalMs);
  // Pipelining never predicts worse than running the chunks back to back.
  const one = new EpsPlanner(synthetic, { bytesPerMs: 2e5, latencyMs: 0.01, }, null, 1).plan(counts, 4096);
  assert.ok(slowLink.totalMs <= one.totalMs);
});

test('calibration measures both kernels and is cached on disk', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'expertd-eps-'));
  const prev = process.env.EXPERTD_CACHE_DIR;
  process.env.EXPERTD_CACHE_DIR = dir;
  try {
    const shape = { numExperts: 8, hidden: 64, inter: 32, dtype: 'bf16' as const, fast: false };
    const t = calibrate(shape, { rows: [1, 8], reps: 1 });
    assert.equal(t.groupMs.length, 2);
    assert.ok(t.groupMs.every((v) => v > 0) && t.denseMs.every((v) => v > 0));
    const a = loadOrCalibrate(shape);
    const file = path.join(dir, 'eps-cost.json');
    assert.ok(existsSync(file));
    const b = loadOrCalibrate(shape);
    assert.deepEqual(b, a, 'the second load must come from the cache');
    assert.ok(JSON.parse(readFileSync(file, 'utf8'))[a.key]);
  } finally {
    if (prev === undefined) delete process.env.EXPERTD_CACHE_DIR; else process.env.EXPERTD_CACHE_DIR = prev;
  }
});

test('a model run with DenseGemm experts matches GroupGemm experts (f32) and routes identically', () => {
  const dir = path.join(packageRoot(), 'test', 'fixtures', 'qwen2_moe');
  const prompt = [1, 400, 401, 402, 300, 310, 320, 330];
  const run = (kernel: 'group' | 'dense') => {
    const { model, spec } = loadModel(dir, { fast: false });
    try {
      model.setExpertKernel(kernel);
      const r = new DirectRunner(model);
      const res = r.step([r.newSeq()], [prompt], true);
      assert.deepEqual(model.kernelChoices(), { [kernel]: model.moeLayers.length });
      return { logits: res.logits.slice(), ids: res.routedIds.map((x) => Array.from(x)), V: spec.vocabSize };
    } finally {
      model.dispose();
    }
  };
  const g = run('group');
  const d = run('dense');
  assert.deepEqual(d.ids, g.ids);
  let worst = 0;
  for (let i = 0; i < g.logits.length; i++) worst = Math.max(worst, Math.abs(g.logits[i]! - d.logits[i]!));
  assert.ok(worst < 1e-4, `logits differ by ${worst}`);
});

test('a measured per-chunk overhead makes fewer chunks win where it outweighs the overlap, and only there', () => {
  const counts = [512, 512, 512, 512];
  const link = { bytesPerMs: 2e5, latencyMs: 0.01 };
  const free = new EpsPlanner(synthetic, link).plan(counts, 4096);
  assert.ok(free.chunks >= 4, `comm-bound load without overhead: ${free.chunks} chunk(s)`);
  // All2all ~42 ms, experts ~24 ms at PN 1; an overhead of 4 ms per chunk: the deep pipelines lose.
  const costly = new EpsPlanner(synthetic, { ...link, chunkOverheadMs: 4 }).plan(counts, 4096);
  assert.ok(costly.chunks < free.chunks, `overhead 4 ms/chunk: ${costly.chunks} chunk(s) vs ${free.chunks}`);
  assert.ok(costly.chunks > 1, 'pipelining still pays for its overhead here');
  // Its prediction is the overhead-free schedule plus the overhead of its extra chunks.
  const p = new EpsPlanner(synthetic, link);
  assert.ok(Math.abs(costly.totalMs - (p.scheduleMs(counts, 4096, costly.chunks) + (costly.chunks - 1) * 4)) < 1e-9);
  // An overhead far below the overlap gained changes nothing; a huge one means one chunk.
  assert.equal(new EpsPlanner(synthetic, { ...link, chunkOverheadMs: 0.01 }).plan(counts, 4096).chunks, free.chunks);
  assert.equal(new EpsPlanner(synthetic, { ...link, chunkOverheadMs: 1e6 }).plan(counts, 4096).chunks, 1);
});

test('the per-chunk overhead estimator: alternates PN 1 and the wish until measured, then fits the per-chunk slope', () => {
  const est = new ChunkOverheadEstimator(3, 9);
  assert.equal(est.overheadMs(), 0, 'nothing measured yet');
  assert.equal(est.schedule(1), 1, 'no pipelining wished: nothing to measure');
  // Residual = 5 ms every layer pays + 1.5 ms per chunk, with a slow outlier now and then.
  const residual = (pn: number, i: number) => 5 + 1.5 * pn + (i % 4 === 3 ? 40 : 0);
  const ran: number[] = [];
  for (let i = 0; i < 6; i++) {
    const pn = est.schedule(8);
    ran.push(pn);
    est.record(pn, 100 + residual(pn, i), 100);
  }
  assert.deepEqual(ran, [1, 8, 1, 8, 1, 8]);
  assert.ok(est.calibrated());
  assert.equal(est.schedule(8), 8, 'measured: the wish runs');
  assert.equal(est.schedule(3), 3);
  assert.ok(Math.abs(est.overheadMs() - 1.5) < 1e-9, `slope ${est.overheadMs()}`);
  // A flat residual (the fixed costs only): no per-chunk overhead, nothing changes.
  const flat = new ChunkOverheadEstimator(2);
  for (const pn of [1, 6, 1, 6]) flat.record(pn, 20 + 3, 20);
  assert.equal(flat.overheadMs(), 0);
  // Faster than predicted with more chunks: clamped at 0, never a reward per chunk.
  const neg = new ChunkOverheadEstimator(1);
  neg.record(1, 10, 0);
  neg.record(4, 4, 0);
  assert.equal(neg.overheadMs(), 0);
  // A new link starts over.
  est.useLink(1e3);
  est.useLink(1e3);
  assert.ok(!est.calibrated() && est.overheadMs() === 0);
  // Fed to the planner, the fitted overhead moves a comm-bound load to fewer chunks.
  const fit = new ChunkOverheadEstimator(1);
  fit.record(1, 30, 0);
  fit.record(8, 30 + 7 * 8, 0);
  const link = { bytesPerMs: 2e5, latencyMs: 0.01 };
  const counts = [512, 512, 512, 512];
  assert.ok(new EpsPlanner(synthetic, { ...link, chunkOverheadMs: fit.overheadMs() }).plan(counts, 4096).chunks <
    new EpsPlanner(synthetic, link).plan(counts, 4096).chunks);
});
