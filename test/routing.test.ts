// Router (softmax/sigmoid, bias, group-limited top-k), permutation and weighted combine against
// float64 references written out below, with HF transformers' rules: choose by biased scores,
// weigh by unbiased ones, ties to the lower expert, masked groups never chosen.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import type { RouteOptions } from '../src/native/index.js';
import {
  assertClose, bothSimd, bothThreadCounts, grid, nanF32, native, poisonI32, rng, uniform,
} from './helpers/ops-ref.js';

// ---- float64 reference router

interface RefRoute { ids: number[][]; choice: number[][]; score: number[][] }

/** Indices of the n best of vals among allowed, best first, ties to the lower index. */
function topIdx(vals: number[], n: number, allowed?: (i: number) => boolean): number[] {
  const idx = vals.map((_, i) => i).filter((i) => !allowed || allowed(i));
  idx.sort((a, b) => (vals[b]! - vals[a]!) || (a - b));
  return idx.slice(0, n);
}

function refRoute(logits: Float32Array, t: number, e: number, k: number, o: RouteOptions): RefRoute {
  const out: RefRoute = { ids: [], choice: [], score: [] };
  const nGroup = o.nGroup ?? 1;
  const topkGroup = o.topkGroup ?? nGroup;
  for (let tok = 0; tok < t; tok++) {
    const l = Array.from(logits.subarray(tok * e, (tok + 1) * e));
    let score: number[];
    if (o.scoring === 'softmax') {
      const mx = Math.max(...l);
      const ex = l.map((v) => Math.exp(v - mx));
      const sum = ex.reduce((a, b) => a + b, 0);
      score = ex.map((v) => v / sum);
    } else {
      score = l.map((v) => 1 / (1 + Math.exp(-v)));
    }
    const choice = score.map((v, i) => v + (o.bias ? o.bias[i]! : 0));
    let allowed: ((i: number) => boolean) | undefined;
    if (nGroup > 1) {
      const gs = e / nGroup;
      const gScore: number[] = [];
      for (let g = 0; g < nGroup; g++) {
        const members = choice.slice(g * gs, (g + 1) * gs).sort((a, b) => b - a);
        gScore.push(o.groupScore === 'top2sum' ? members[0]! + members[1]! : members[0]!);
      }
      const keep = new Set(topIdx(gScore, topkGroup));
      allowed = (i) => keep.has(Math.floor(i / gs));
    }
    out.ids.push(topIdx(choice, k, allowed));
    out.choice.push(choice);
    out.score.push(score);
  }
  return out;
}

function refWeights(score: number[], ids: ArrayLike<number>, o: RouteOptions): number[] {
  let w = Array.from(ids, (i) => score[i]!);
  if (o.renormalize) {
    const s = w.reduce((a, b) => a + b, 0) + 1e-20;
    w = w.map((v) => v / s);
  }
  return w.map((v) => v * (o.scale ?? 1));
}

interface RouteCase { t: number; e: number; k: number; opts: RouteOptions; gridLogits: boolean }

/** Runs the native router and checks it against the reference. With grid logits the choice is
 * exact; otherwise a differing id is accepted only at a rounding-level near-tie of choice scores. */
function checkRoute(c: RouteCase, seed: number, label: string): { ids: Int32Array; weights: Float32Array } {
  const r = rng(seed);
  const { t, e, k, opts } = c;
  const logits = c.gridLogits ? grid(t * e, r, 4) : uniform(t * e, r, 4);
  const ids = poisonI32(t * k);
  const weights = nanF32(t * k);
  const counts = poisonI32(e);
  native.route(logits, t, e, k, opts, ids, weights, counts);
  const ref = refRoute(logits, t, e, k, opts);
  const expCounts = new Int32Array(e);
  let nearTies = 0;
  for (let tok = 0; tok < t; tok++) {
    const got = Array.from(ids.subarray(tok * k, (tok + 1) * k));
    const want = ref.ids[tok]!;
    assert.equal(new Set(got).size, k, `${label}: token ${tok} ids not distinct: ${got}`);
    for (let j = 0; j < k; j++) {
      assert.ok(got[j]! >= 0 && got[j]! < e, `${label}: token ${tok} id ${got[j]}`);
      expCounts[got[j]!]!++;
      if (got[j] === want[j]) continue;
      const ch = ref.choice[tok]!;
      const gap = Math.abs(ch[got[j]!]! - ch[want[j]!]!);
      assert.ok(!c.gridLogits && gap <= 1e-6 * Math.max(1, Math.abs(ch[want[j]!]!)),
        `${label}: token ${tok} slot ${j}: got expert ${got[j]}, expected ${want[j]} (got ${got}, expected ${want})`);
      nearTies++;
    }
    assertClose(weights.subarray(tok * k, (tok + 1) * k), refWeights(ref.score[tok]!, got, opts),
      { maxAbs: 2e-6 * (opts.scale ?? 1), relL2: 2e-6 }, `${label}: token ${tok} weights`);
  }
  assert.ok(nearTies <= Math.max(1, t * k / 100), `${label}: ${nearTies} near-tie differences`);
  assert.deepEqual(counts, expCounts, `${label}: counts`);
  return { ids, weights };
}

// Mixtral / Qwen / OLMoE: softmax over all experts, top-k, optional renormalisation.
test('route: softmax top-k sweep matches the reference exactly, both SIMD levels', () => {
  let seed = 1;
  bothSimd((level) => {
    for (const e of [8, 64, 160]) {
      for (const k of [1, 2, 6, 8]) {
        for (let t = 1; t <= 33; t += 4) {
          for (const renormalize of [false, true]) {
            const opts: RouteOptions = { scoring: 'softmax', renormalize, scale: renormalize ? 1 : 2.5 };
            checkRoute({ t, e, k, opts, gridLogits: true }, seed++, `${level} e${e} k${k} t${t} renorm ${renormalize}`);
          }
        }
      }
    }
  });
});

// DeepSeek-V3 noaux_tc: sigmoid, bias for choosing only, top-2-sum groups, routed scaling.
test('route: sigmoid + bias + top2sum groups (DeepSeek-V3)', () => {
  let seed = 100;
  bothSimd((level) => {
    for (const [e, nGroup, topkGroup, k] of [[256, 8, 4, 8], [64, 8, 3, 6], [160, 4, 2, 8], [8, 4, 1, 2]] as const) {
      for (const t of [1, 5, 33]) {
        const r = rng(seed);
        const bias = uniform(e, r, 0.5);
        const opts: RouteOptions = {
          scoring: 'sigmoid', bias, nGroup, topkGroup, groupScore: 'top2sum', renormalize: true, scale: 2.5,
        };
        checkRoute({ t, e, k, opts, gridLogits: false }, seed++, `${level} v3 e${e} g${nGroup}/${topkGroup} k${k} t${t}`);
      }
    }
  });
});

// DeepSeek-V2 group_limited_greedy: softmax, max per group, no renormalisation.
test('route: softmax + max-score groups (DeepSeek-V2), and sigmoid without groups', () => {
  let seed = 200;
  bothSimd((level) => {
    for (const [e, nGroup, topkGroup, k] of [[160, 8, 3, 6], [64, 8, 1, 2], [64, 4, 4, 8]] as const) {
      for (const t of [1, 7, 33]) {
        const opts: RouteOptions = { scoring: 'softmax', nGroup, topkGroup, groupScore: 'max', scale: 16 };
        checkRoute({ t, e, k, opts, gridLogits: true }, seed++, `${level} v2 e${e} g${nGroup}/${topkGroup} k${k} t${t}`);
      }
    }
    for (const t of [1, 33]) {
      checkRoute({ t, e: 64, k: 8, opts: { scoring: 'sigmoid', renormalize: true }, gridLogits: true }, seed++,
        `${level} sigmoid t${t}`);
    }
  });
});

test('route: large batches take the threaded path and agree with one thread bit for bit', () => {
  const t = 512;
  const e = 64;
  const k = 6;
  const opts: RouteOptions = { scoring: 'sigmoid', bias: uniform(e, rng(9), 0.3), nGroup: 8, topkGroup: 4, groupScore: 'top2sum', renormalize: true };
  const results: { ids: Int32Array; weights: Float32Array }[] = [];
  bothThreadCounts((threads) => {
    results.push(checkRoute({ t, e, k, opts, gridLogits: false }, 77, `threads ${threads}`));
  });
  assert.deepEqual(results[0]!.ids, results.at(-1)!.ids);
  assert.deepEqual(results[0]!.weights, results.at(-1)!.weights);
});

test('route: ties go to the lower expert index', () => {
  // all equal: experts 0..k-1, in order
  const e = 16;
  const ids = poisonI32(4);
  const w = nanF32(4);
  const counts = poisonI32(e);
  native.route(new Float32Array(e), 1, e, 4, { scoring: 'softmax' }, ids, w, counts);
  assert.deepEqual([...ids], [0, 1, 2, 3]);
  for (const v of w) assert.equal(v, Math.fround(1 / 16));
  // a tie across the top: 5 and 9 equal best, then 2 and 3 equal
  const l = new Float32Array(e);
  l[9] = 2; l[5] = 2; l[3] = 1; l[2] = 1;
  native.route(l, 1, e, 3, { scoring: 'sigmoid' }, ids.subarray(0, 3), w.subarray(0, 3), counts);
  assert.deepEqual([...ids.subarray(0, 3)], [5, 9, 2]);
});

test('route: bias chooses but does not weigh; a masked group is never chosen', () => {
  const e = 8;
  const logits = new Float32Array([0, 0, 0, 0, 0, 0, 3, 0]);
  const bias = new Float32Array([0, 0, 0, 0, 0, 1, 0, 0]);
  const ids = poisonI32(1);
  const w = nanF32(1);
  const counts = poisonI32(e);
  native.route(logits, 1, e, 1, { scoring: 'sigmoid', bias }, ids, w, counts);
  assert.equal(ids[0], 5);  // sigmoid(0) + 1 = 1.5 beats sigmoid(3) = 0.95
  assert.equal(w[0], 0.5);  // the unbiased sigmoid(0)
  assert.deepEqual([...counts], [0, 0, 0, 0, 0, 1, 0, 0]);
  // 4 groups of 2; group 3 (experts 6, 7) has the single best expert, but groups 0 and 1 win
  // on top-2 sums; with k = 4 every kept expert is used and 6 must not appear.
  const l2 = new Float32Array([1, 1, 0.9, 0.9, -5, -5, 4, -8]);
  const ids4 = poisonI32(4);
  native.route(l2, 1, e, 4, { scoring: 'sigmoid', nGroup: 4, topkGroup: 2, groupScore: 'top2sum' }, ids4, nanF32(4), counts);
  assert.deepEqual([...ids4], [0, 1, 2, 3]);
  // the same with 'max' group scores keeps group 3 and group 0
  native.route(l2, 1, e, 4, { scoring: 'sigmoid', nGroup: 4, topkGroup: 2, groupScore: 'max' }, ids4, nanF32(4), counts);
  assert.deepEqual([...ids4], [6, 0, 1, 7]);
});

test('route: NaN logits still give valid, distinct ids', () => {
  const e = 8;
  const ids = poisonI32(2);
  const counts = poisonI32(e);
  native.route(nanF32(e), 1, e, 2, { scoring: 'softmax' }, ids, nanF32(2), counts);
  assert.deepEqual([...ids], [0, 1]);
  const l = new Float32Array(e).fill(NaN);
  l[4] = 1;
  native.route(l, 1, e, 2, { scoring: 'sigmoid' }, ids, nanF32(2), counts);
  assert.deepEqual([...ids], [4, 0]);
  assert.equal(counts.reduce((a, b) => a + b, 0), 2);
});

test('route: zero tokens clears counts', () => {
  const counts = poisonI32(8);
  native.route(new Float32Array(0), 0, 8, 2, { scoring: 'softmax' }, new Int32Array(0), new Float32Array(0), counts);
  assert.deepEqual([...counts], [0, 0, 0, 0, 0, 0, 0, 0]);
});

test('route: bad arguments raise exact TypeError/RangeError', () => {
  const l = new Float32Array(16);
  const ids = new Int32Array(4);
  const w = new Float32Array(4);
  const c = new Int32Array(8);
  const call = (opts: unknown, k = 2, e = 8, t = 2) =>
    () => native.route(l, t, e, k, opts as RouteOptions, ids, w, c);
  const cases: [() => void, string, string][] = [
    [call({ scoring: 'softmax' }, 9), 'RangeError', 'k is 9, expected 1..8'],
    [call({ scoring: 'softmax' }, 0), 'RangeError', 'k is 0, expected 1..8'],
    [call(null), 'TypeError', 'opts must be an object'],
    [call({}), 'TypeError', "opts.scoring must be 'softmax' or 'sigmoid'"],
    [call({ scoring: 'relu' }), 'TypeError', "opts.scoring is 'relu', expected 'softmax' or 'sigmoid'"],
    [call({ scoring: 'sigmoid', bias: [1, 2] }), 'TypeError', 'opts.bias must be a Float32Array'],
    [call({ scoring: 'sigmoid', bias: new Float32Array(7) }), 'RangeError', 'opts.bias.length is 7, expected 8'],
    [call({ scoring: 'sigmoid', nGroup: 3 }), 'RangeError', 'e is 8, expected a multiple of opts.nGroup (3)'],
    [call({ scoring: 'sigmoid', nGroup: 16 }), 'RangeError', 'opts.nGroup is 16, expected 1..8'],
    [call({ scoring: 'sigmoid', nGroup: 1.5 }), 'TypeError', 'opts.nGroup must be an integer'],
    [call({ scoring: 'sigmoid', nGroup: 4, topkGroup: 5 }), 'RangeError', 'opts.topkGroup is 5, expected 1..4'],
    [call({ scoring: 'sigmoid', nGroup: 4, topkGroup: 1 }, 3), 'RangeError',
      'k is 3, expected at most 2 (opts.topkGroup 1 * e 8 / opts.nGroup 4)'],
    [call({ scoring: 'sigmoid', nGroup: 8, topkGroup: 4, groupScore: 'top2sum' }), 'RangeError',
      "opts.groupScore 'top2sum' needs at least 2 experts per group, got 1 (e 8 / opts.nGroup 8)"],
    [call({ scoring: 'sigmoid', nGroup: 2, groupScore: 'mean' }), 'TypeError',
      "opts.groupScore is 'mean', expected 'max' or 'top2sum'"],
    [call({ scoring: 'sigmoid', renormalize: 1 }), 'TypeError', 'opts.renormalize must be a boolean'],
    [call({ scoring: 'sigmoid', scale: NaN }), 'TypeError', 'opts.scale must be a finite number'],
    [call({ scoring: 'softmax' }, 2, 8, 3), 'RangeError', 'logits.length is 16, expected at least 24'],
    [() => native.route(l, 2, 8, 2, { scoring: 'softmax' }, ids, w, new Int32Array(7)), 'RangeError',
      'counts.length is 7, expected at least 8'],
    [() => native.route(l, 2, 8, 2, { scoring: 'softmax' }, new Int32Array(3), w, c), 'RangeError',
      'ids.length is 3, expected at least 4'],
    [() => native.route(l, 2, 8, 2, { scoring: 'softmax' }, ids, new Int32Array(4) as never, c), 'TypeError',
      'weights must be a Float32Array'],
    [() => (native.route as (...a: unknown[]) => void)(l, 2, 8), 'TypeError', 'route expects 8 arguments, got 3'],
  ];
  for (const [fn, name, message] of cases) assert.throws(fn, { name, message, code: 'E_INVALID_ARG' } as never);
});

// ---- permute and combine

function refPermute(ids: Int32Array, t: number, k: number, e: number) {
  const order: number[] = [];  // positions t*k+j sorted by (expert, token, slot)
  for (let i = 0; i < t * k; i++) order.push(i);
  order.sort((a, b) => (ids[a]! - ids[b]!) || (a - b));
  const permIndex = new Int32Array(t * k);
  order.forEach((pos, row) => { permIndex[pos] = row; });
  const offsets = new Int32Array(e + 1);
  for (const id of ids) offsets[id + 1]!++;
  for (let i = 0; i < e; i++) offsets[i + 1]! += offsets[i]!;
  return { permIndex, offsets };
}

/** ids with every expert distinct per token, skewed toward low experts (zero-row experts left). */
function drawIds(t: number, k: number, e: number, r: () => number): Int32Array {
  const ids = new Int32Array(t * k);
  for (let tok = 0; tok < t; tok++) {
    const used = new Set<number>();
    for (let j = 0; j < k; j++) {
      let id: number;
      do id = Math.floor(r() ** 2 * e); while (used.has(id));
      used.add(id);
      ids[tok * k + j] = id;
    }
  }
  return ids;
}

test('permute: stable expert-contiguous rows, exact offsets, zero-row experts', () => {
  let seed = 300;
  bothThreadCounts(() => {
    for (const [t, h, k, e] of [[1, 16, 1, 8], [3, 7, 2, 8], [33, 64, 6, 64], [17, 33, 8, 160], [300, 256, 8, 64]] as const) {
      const r = rng(seed++);
      const x = uniform(t * h, r);
      const ids = drawIds(t, k, e, r);
      const xPerm = nanF32(t * k * h);
      const permIndex = poisonI32(t * k);
      const offsets = poisonI32(e + 1);
      native.permute(x, t, h, ids, k, e, xPerm, permIndex, offsets);
      const ref = refPermute(ids, t, k, e);
      assert.deepEqual(permIndex, ref.permIndex, `t${t} k${k} e${e} permIndex`);
      assert.deepEqual(offsets, ref.offsets, `t${t} k${k} e${e} offsets`);
      for (let i = 0; i < t * k; i++) {
        const row = ref.permIndex[i]!;
        const tok = Math.floor(i / k);
        assert.deepEqual(xPerm.subarray(row * h, (row + 1) * h), x.subarray(tok * h, (tok + 1) * h));
      }
      if (e > t * k) assert.ok(offsets.some((v, i) => i < e && offsets[i + 1] === v), 'expected a zero-row expert');
    }
  });
  // repeated expert within a token keeps slot order
  const ids = new Int32Array([1, 1, 0, 1]);
  const permIndex = poisonI32(4);
  const offsets = poisonI32(3);
  native.permute(new Float32Array([10, 20]), 2, 1, ids, 2, 2, nanF32(4), permIndex, offsets);
  assert.deepEqual([...permIndex], [1, 2, 0, 3]);
  assert.deepEqual([...offsets], [0, 1, 4]);
});

test('permute: ids out of range and short buffers are rejected', () => {
  const ids = new Int32Array([0, 1, 2, 3, 4, 5, 6, 9]);
  const x = new Float32Array(8);
  assert.throws(() => native.permute(x, 4, 2, ids, 2, 8, new Float32Array(16), new Int32Array(8), new Int32Array(9)),
    { name: 'RangeError', message: 'ids[7] is 9, expected 0..7' });
  ids[7] = -1;
  assert.throws(() => native.permute(x, 4, 2, ids, 2, 8, new Float32Array(16), new Int32Array(8), new Int32Array(9)),
    { name: 'RangeError', message: 'ids[7] is -1, expected 0..7' });
  ids[7] = 7;
  assert.throws(() => native.permute(x, 4, 2, ids, 2, 8, new Float32Array(15), new Int32Array(8), new Int32Array(9)),
    { name: 'RangeError', message: 'xPerm.length is 15, expected at least 16' });
  assert.throws(() => native.permute(x, 4, 2, ids, 2, 8, new Float32Array(16), new Int32Array(8), new Int32Array(8)),
    { name: 'RangeError', message: 'offsets.length is 8, expected at least 9' });
  assert.throws(() => native.permute(x, 4, 0, ids, 2, 8, new Float32Array(16), new Int32Array(8), new Int32Array(9)),
    { name: 'RangeError', message: 'h is 0, expected 1..2147483647' });
});

test('unpermuteCombine: weighted sum in slot order vs float64, accumulate, SIMD == scalar bitwise', () => {
  let seed = 400;
  for (const [t, h, k] of [[1, 1, 1], [1, 7168, 8], [5, 17, 2], [33, 100, 6], [64, 2048, 8], [3, 4100, 4]] as const) {
    const r = rng(seed++);
    const e = 16;
    const x = uniform(t * h, r);
    const ids = drawIds(t, k, e, r);
    const xPerm = new Float32Array(t * k * h);
    const permIndex = new Int32Array(t * k);
    native.permute(x, t, h, ids, k, e, xPerm, permIndex, new Int32Array(e + 1));
    const yPerm = uniform(t * k * h, r, 3);
    const w = uniform(t * k, r);
    const base = uniform(t * h, r);
    const ref = new Float64Array(t * h);
    const refAcc = new Float64Array(t * h);
    for (let tok = 0; tok < t; tok++) {
      for (let c = 0; c < h; c++) {
        let s = 0;
        for (let j = 0; j < k; j++) s += w[tok * k + j]! * yPerm[permIndex[tok * k + j]! * h + c]!;
        ref[tok * h + c] = s;
        refAcc[tok * h + c] = s + base[tok * h + c]!;
      }
    }
    const results: Float32Array[] = [];
    bothSimd((level) => {
      bothThreadCounts((threads) => {
        const out = nanF32(t * h);
        native.unpermuteCombine(yPerm, permIndex, w, t, k, h, out, false);
        assertClose(out, ref, { maxAbs: 3e-6 * k, relL2: 1e-6 }, `${level}/${threads} t${t} h${h} k${k}`);
        const acc = Float32Array.from(base);
        native.unpermuteCombine(yPerm, permIndex, w, t, k, h, acc, true);
        assertClose(acc, refAcc, { maxAbs: 3e-6 * k, relL2: 1e-6 }, `${level}/${threads} accumulate`);
        results.push(out, acc);
      });
    });
    for (let i = 2; i < results.length; i++) assert.deepEqual(results[i], results[i % 2], 'paths differ bitwise');
  }
});

test('unpermuteCombine: bad permIndex and buffers are rejected', () => {
  const y = new Float32Array(12);
  const w = new Float32Array(4);
  assert.throws(() => native.unpermuteCombine(y, new Int32Array([0, 1, 2, 4]), w, 2, 2, 3, new Float32Array(6), false),
    { name: 'RangeError', message: 'permIndex[3] is 4, expected 0..3' });
  assert.throws(() => native.unpermuteCombine(y, new Int32Array([0, 1, 2, 3]), w, 2, 2, 3, new Float32Array(5), false),
    { name: 'RangeError', message: 'out.length is 5, expected at least 6' });
  assert.throws(() => native.unpermuteCombine(y, new Int32Array([0, 1, 2, 3]), w, 2, 2, 3, new Float32Array(6), 1 as never),
    { name: 'TypeError', message: 'accumulate must be a boolean' });
});
