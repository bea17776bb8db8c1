// Gated DeltaNet ops (causal conv with carried state, gated delta rule recurrent and chunkwise,
// gated RMSNorm) against float64 references written from the recurrence, on both SIMD levels and
// thread counts; split prompts vs whole, batched vs alone (bit for bit), strided q/k/v, and
// argument errors (E_INVALID_ARG, never an abort).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import type { DeltaRuleOptions } from '../src/native/types.js';
import { refConv, refDelta, refGatedRmsNorm, type DeltaShape } from './helpers/deltanet-ref.js';
import {
  assertClose, bothSimd, bothThreadCounts, nanF32, native, rng, uniform,
} from './helpers/ops-ref.js';

// Errors are relative to the largest |reference| value. The delta rule's measured worst cases
// (both SIMD levels, seed base 0; printed as diagnostics): recurrent 2.4e-7 relL2 / 3.3e-7 max,
// chunkwise 2.9e-6 / 3.9e-6 (f32 forward substitution over 64-token chunks), so the bound leaves
// ~4x. Conv and norm are a few roundings each.
const CONV_TOL = { maxAbs: 1e-6, relL2: 4e-7 };
const DELTA_TOL = { maxAbs: 2e-5, relL2: 1e-5 };
const NORM_TOL = { maxAbs: 1e-6, relL2: 5e-7 };

function maxAbsOf(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m || 1;
}

function close(got: ArrayLike<number>, ref: ArrayLike<number>, tol: { maxAbs: number; relL2: number },
  label: string) {
  const m = maxAbsOf(ref);
  const e = assertClose(got, ref, { maxAbs: tol.maxAbs * m, relL2: tol.relL2 }, label);
  return { maxAbs: e.maxAbs / m, relL2: e.relL2 };  // maxAbs relative to max |ref|
}

// ---- causal conv

test('causalConv1d: one call vs float64, and split calls carrying the state equal one call exactly', () => {
  let seed = 1300;
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const [T, C, K, withBias, silu] of [
        [1, 5, 4, true, true], [9, 17, 4, false, true], [130, 40, 4, true, false],
        [70, 33, 2, true, true], [12, 8, 1, false, false], [200, 600, 4, false, true],
      ] as const) {
        const r = rng(seed++);
        const label = `${level}/${threads} T${T} C${C} K${K} bias ${withBias} silu ${silu}`;
        const x = uniform(T * C, r, 2);
        const w = uniform(C * K, r, 1);
        const bias = withBias ? uniform(C, r, 0.5) : null;
        const state0 = uniform(C * (K - 1), r, 2);

        const state = Float32Array.from(state0);
        const out = nanF32(T * C);
        native.causalConv1d(x, T, C, w, bias, K, state, silu, out);
        const ref = refConv(x, T, C, w, bias, K, state0, silu);
        close(out, ref.out, CONV_TOL, `${label} out`);
        assert.deepEqual(state, Float32Array.from(ref.state), `${label} state (a copy of inputs)`);

        for (const piece of [1, 7, 64, 100]) {
          const st = Float32Array.from(state0);
          const o = nanF32(T * C);
          for (let t0 = 0; t0 < T; t0 += piece) {
            const n = Math.min(piece, T - t0);
            native.causalConv1d(x.subarray(t0 * C, (t0 + n) * C), n, C, w, bias, K, st, silu,
              o.subarray(t0 * C, (t0 + n) * C));
          }
          assert.deepEqual(o, out, `${label} pieces of ${piece}: out`);
          assert.deepEqual(st, state, `${label} pieces of ${piece}: state`);
        }

        // in place (out === x) gives the same bits
        const xin = Float32Array.from(x);
        const st2 = Float32Array.from(state0);
        native.causalConv1d(xin, T, C, w, bias, K, st2, silu, xin);
        assert.deepEqual(xin, out, `${label} in place`);
      }
    });
  });
});

test('causalConv1dBatch: each sequence equals its call alone, bit for bit', () => {
  const r = rng(1350);
  const C = 24;
  const K = 4;
  const lens = [3, 0, 1, 70, 1];
  const slots = Int32Array.from([4, 0, 2, 1, 5]);
  const T = lens.reduce((a, b) => a + b, 0);
  const starts = new Int32Array(lens.length + 1);
  lens.forEach((n, b) => { starts[b + 1] = starts[b]! + n; });
  const x = uniform(T * C, r, 2);
  const w = uniform(C * K, r);
  const bias = uniform(C, r, 0.5);
  const per = C * (K - 1);
  const pool0 = uniform(6 * per, r, 2);
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      const pool = Float32Array.from(pool0);
      const out = nanF32(T * C);
      native.causalConv1dBatch(x, T, C, w, bias, K, pool, slots, starts, true, out);
      for (let b = 0; b < lens.length; b++) {
        const st = pool0.slice(slots[b]! * per, (slots[b]! + 1) * per);
        const o = nanF32(lens[b]! * C);
        native.causalConv1d(x.subarray(starts[b]! * C, starts[b + 1]! * C), lens[b]!, C, w, bias, K,
          st, true, o);
        assert.deepEqual(out.subarray(starts[b]! * C, starts[b + 1]! * C), o, `${level}/${threads} seq ${b} out`);
        assert.deepEqual(pool.subarray(slots[b]! * per, (slots[b]! + 1) * per), st, `${level}/${threads} seq ${b} state`);
      }
      assert.deepEqual(pool.subarray(3 * per, 4 * per), pool0.subarray(3 * per, 4 * per), 'unused slot untouched');
    });
  });
});

// ---- gated delta rule

interface DeltaInputs { q: Float32Array; k: Float32Array; v: Float32Array; g: Float32Array; beta: Float32Array; state0: Float32Array }

function deltaInputs(s: DeltaShape, seed: number, l2: boolean): DeltaInputs {
  const r = rng(seed);
  const { T, Hk, Hv, Dk, Dv } = s;
  // Without the l2norm, keys of norm ~1 keep the delta rule contractive (beta |k|^2 < 2).
  const kAmp = l2 ? 1 : Math.sqrt(3 / Dk);
  const q = uniform(T * Hk * Dk, r, l2 ? 1 : 2 * kAmp);
  const k = uniform(T * Hk * Dk, r, kAmp);
  const v = uniform(T * Hv * Dv, r, 1);
  const g = new Float32Array(T * Hv);
  const beta = new Float32Array(T * Hv);
  for (let i = 0; i < T * Hv; i++) {
    // log decays as Qwen3-Next makes them (-A * softplus(.)): mostly mild, some strong
    const u = r();
    g[i] = u < 0.1 ? -(4 + 6 * r()) : -(u * u * 1.5);
    beta[i] = 1 / (1 + Math.exp(-(r() * 6 - 3)));
  }
  const state0 = uniform(Hv * Dk * Dv, r, 0.5);
  return { q, k, v, g, beta, state0 };
}

function opts(s: DeltaShape, l2: boolean, chunk = 64): DeltaRuleOptions {
  return { T: s.T, Hk: s.Hk, Hv: s.Hv, Dk: s.Dk, Dv: s.Dv, l2normQk: l2, chunk };
}

// Rows [t0, t0+n) of a [T, H, D] tensor, as its own array.
function rows(a: Float32Array, t0: number, n: number, width: number): Float32Array {
  return a.subarray(t0 * width, (t0 + n) * width);
}

const worst = { recurrent: 0, chunk: 0, recurrentMax: 0, chunkMax: 0 };

test('gatedDeltaRule: decode steps (T = 1, recurrent) vs float64, state and output', () => {
  let seed = 1400;
  bothSimd((level) => {
    for (const [Hk, Hv, Dk, Dv, l2] of [
      [1, 1, 16, 16, true], [2, 4, 16, 24, true], [2, 6, 13, 7, false], [1, 2, 128, 128, true],
    ] as const) {
      const steps = 12;
      const s: DeltaShape = { T: steps, Hk, Hv, Dk, Dv };
      const inp = deltaInputs(s, seed++, l2);
      const state = Float32Array.from(inp.state0);
      const out = nanF32(steps * Hv * Dv);
      const one = { ...s, T: 1 };
      for (let t = 0; t < steps; t++) {
        native.gatedDeltaRule(rows(inp.q, t, 1, Hk * Dk), rows(inp.k, t, 1, Hk * Dk),
          rows(inp.v, t, 1, Hv * Dv), rows(inp.g, t, 1, Hv), rows(inp.beta, t, 1, Hv), state,
          rows(out, t, 1, Hv * Dv), opts(one, l2));
      }
      const refState = Float64Array.from(inp.state0);
      const ref = refDelta(inp.q, inp.k, inp.v, inp.g, inp.beta, refState, s, l2);
      const label = `${level} Hk${Hk} Hv${Hv} Dk${Dk} Dv${Dv} l2 ${l2}`;
      const e1 = close(out, ref, DELTA_TOL, `${label} out`);
      const e2 = close(state, refState, DELTA_TOL, `${label} state`);
      worst.recurrent = Math.max(worst.recurrent, e1.relL2, e2.relL2);
      worst.recurrentMax = Math.max(worst.recurrentMax, e1.maxAbs, e2.maxAbs);
    }
  });
});

test('gatedDeltaRule: chunkwise (T > 1) vs float64, T around the chunk, Hv > Hk, l2norm on/off', (t) => {
  let seed = 1500;
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const [T, Hk, Hv, Dk, Dv, l2, chunk] of [
        [2, 1, 1, 16, 16, true, 64], [63, 2, 4, 16, 24, true, 64], [64, 2, 4, 16, 24, true, 64],
        [65, 2, 4, 16, 24, false, 64], [200, 1, 3, 20, 9, true, 64], [150, 2, 2, 32, 32, true, 16],
        [130, 1, 2, 128, 128, true, 64], [40, 3, 3, 8, 8, false, 1], [70, 1, 2, 13, 7, true, 64],
      ] as const) {
        const s: DeltaShape = { T, Hk, Hv, Dk, Dv };
        const inp = deltaInputs(s, seed++, l2);
        const state = Float32Array.from(inp.state0);
        const out = nanF32(T * Hv * Dv);
        native.gatedDeltaRule(inp.q, inp.k, inp.v, inp.g, inp.beta, state, out, opts(s, l2, chunk));
        const refState = Float64Array.from(inp.state0);
        const ref = refDelta(inp.q, inp.k, inp.v, inp.g, inp.beta, refState, s, l2);
        const label = `${level}/${threads} T${T} Hk${Hk} Hv${Hv} Dk${Dk} Dv${Dv} l2 ${l2} chunk ${chunk}`;
        const e1 = close(out, ref, DELTA_TOL, `${label} out`);
        const e2 = close(state, refState, DELTA_TOL, `${label} state`);
        worst.chunk = Math.max(worst.chunk, e1.relL2, e2.relL2);
        worst.chunkMax = Math.max(worst.chunkMax, e1.maxAbs, e2.maxAbs);
      }
    });
  });
  t.diagnostic(`worst vs float64 (relL2 / maxAbs over max|ref|): recurrent ${worst.recurrent.toExponential(2)} / ${worst.recurrentMax.toExponential(2)}, ` +
    `chunkwise ${worst.chunk.toExponential(2)} / ${worst.chunkMax.toExponential(2)}`);
});

test('gatedDeltaRule: a prompt split into calls of 1/7/64/100 tokens matches the whole prompt', (t) => {
  const s: DeltaShape = { T: 230, Hk: 2, Hv: 4, Dk: 32, Dv: 16 };
  const inp = deltaInputs(s, 1600, true);
  const { Hk, Hv, Dk, Dv } = s;
  let worstSplit = 0;
  let worstSplitMax = 0;
  bothSimd((level) => {
    const whole = nanF32(s.T * Hv * Dv);
    const wholeState = Float32Array.from(inp.state0);
    native.gatedDeltaRule(inp.q, inp.k, inp.v, inp.g, inp.beta, wholeState, whole, opts(s, true));
    for (const piece of [1, 7, 64, 100]) {
      const st = Float32Array.from(inp.state0);
      const out = nanF32(s.T * Hv * Dv);
      for (let t0 = 0; t0 < s.T; t0 += piece) {
        const n = Math.min(piece, s.T - t0);
        native.gatedDeltaRule(rows(inp.q, t0, n, Hk * Dk), rows(inp.k, t0, n, Hk * Dk),
          rows(inp.v, t0, n, Hv * Dv), rows(inp.g, t0, n, Hv), rows(inp.beta, t0, n, Hv), st,
          rows(out, t0, n, Hv * Dv), opts({ ...s, T: n }, true));
      }
      // The split changes the chunk boundaries (and piece 1 is the recurrent step), so it agrees
      // to f32 rounding, not bit for bit.
      const e1 = close(out, whole, DELTA_TOL, `${level} pieces of ${piece}: out vs whole`);
      const e2 = close(st, wholeState, DELTA_TOL, `${level} pieces of ${piece}: state vs whole`);
      worstSplit = Math.max(worstSplit, e1.relL2, e2.relL2);
      worstSplitMax = Math.max(worstSplitMax, e1.maxAbs, e2.maxAbs);
    }
  });
  t.diagnostic(`worst split vs whole (relL2 / maxAbs over max|ref|): ${worstSplit.toExponential(2)} / ${worstSplitMax.toExponential(2)}`);
});

test('gatedDeltaRuleBatch: every sequence equals its call alone, bit for bit (decode and mixed)', () => {
  const Hk = 2, Hv = 4, Dk = 16, Dv = 24;
  const per = Hv * Dk * Dv;
  for (const lens of [[1, 1, 1, 1, 1], [5, 0, 1, 70, 1]]) {
    const B = lens.length;
    const T = lens.reduce((a, b) => a + b, 0);
    const s: DeltaShape = { T, Hk, Hv, Dk, Dv };
    const inp = deltaInputs(s, 1700 + T, true);
    const pool0 = uniform((B + 2) * per, rng(1800 + T), 0.5);
    const slots = Int32Array.from([3, 0, 6, 1, 4]);
    const starts = new Int32Array(B + 1);
    lens.forEach((n, b) => { starts[b + 1] = starts[b]! + n; });
    bothSimd((level) => {
      bothThreadCounts((threads) => {
        const pool = Float32Array.from(pool0);
        const out = nanF32(T * Hv * Dv);
        native.gatedDeltaRuleBatch(inp.q, inp.k, inp.v, inp.g, inp.beta, pool, slots, starts, out, opts(s, true));
        for (let b = 0; b < B; b++) {
          const t0 = starts[b]!;
          const n = lens[b]!;
          const st = pool0.slice(slots[b]! * per, (slots[b]! + 1) * per);
          const o = nanF32(n * Hv * Dv);
          native.gatedDeltaRule(rows(inp.q, t0, n, Hk * Dk), rows(inp.k, t0, n, Hk * Dk),
            rows(inp.v, t0, n, Hv * Dv), rows(inp.g, t0, n, Hv), rows(inp.beta, t0, n, Hv), st, o,
            opts({ ...s, T: n }, true));
          const label = `${level}/${threads} lens ${lens.join(',')} seq ${b}`;
          assert.deepEqual(rows(out, t0, n, Hv * Dv), o, `${label} out`);
          assert.deepEqual(pool.subarray(slots[b]! * per, (slots[b]! + 1) * per), st, `${label} state`);
        }
        for (const unused of [2, 5])
          assert.deepEqual(pool.subarray(unused * per, (unused + 1) * per), pool0.subarray(unused * per, (unused + 1) * per), `slot ${unused} untouched`);
      });
    });
  }
});

test('gatedDeltaRule: q/k/v as column slices of one mixed_qkv buffer (strides) give the same bits', () => {
  const s: DeltaShape = { T: 70, Hk: 2, Hv: 4, Dk: 16, Dv: 8 };
  const inp = deltaInputs(s, 1900, true);
  const qk = s.Hk * s.Dk;
  const vw = s.Hv * s.Dv;
  const W = 2 * qk + vw;
  for (const T of [1, s.T]) {
    const mixed = new Float32Array(T * W);
    for (let t = 0; t < T; t++) {
      mixed.set(rows(inp.q, t, 1, qk), t * W);
      mixed.set(rows(inp.k, t, 1, qk), t * W + qk);
      mixed.set(rows(inp.v, t, 1, vw), t * W + 2 * qk);
    }
    const o = { ...opts({ ...s, T }, true) };
    const st1 = Float32Array.from(inp.state0);
    const out1 = nanF32(T * vw);
    native.gatedDeltaRule(inp.q, inp.k, inp.v, inp.g, inp.beta, st1, out1, o);
    const st2 = Float32Array.from(inp.state0);
    const out2 = nanF32(T * vw);
    native.gatedDeltaRule(mixed, mixed.subarray(qk), mixed.subarray(2 * qk), inp.g, inp.beta, st2, out2,
      { ...o, qStride: W, kStride: W, vStride: W });
    assert.deepEqual(out2, out1, `T${T} out`);
    assert.deepEqual(st2, st1, `T${T} state`);
  }
});

test('gatedDeltaRuleBatch and causalConv1dBatch: the same bits at 1, 2 and 3 threads (prefill-sized chunks beside decode tokens)', () => {
  // Outputs and states must not depend on how (sequence, head) work is spread over threads. Hv 5
  // and Dv 40 / Dk 36 leave ragged tiles of the chunk kernels; 130 tokens span three chunks.
  const Hk = 1, Hv = 5, Dk = 36, Dv = 40, K = 4;
  const lens = [130, 1, 64, 0, 3];
  const B = lens.length;
  const T = lens.reduce((a, b) => a + b, 0);
  const s: DeltaShape = { T, Hk, Hv, Dk, Dv };
  const inp = deltaInputs(s, 2100, true);
  const per = Hv * Dk * Dv;
  const pool0 = uniform(B * per, rng(2101), 0.5);
  const slots = Int32Array.from([4, 0, 2, 1, 3]);
  const starts = new Int32Array(B + 1);
  lens.forEach((n, b) => { starts[b + 1] = starts[b]! + n; });
  const C = 2 * Hk * Dk + Hv * Dv;
  const r = rng(2102);
  const x = uniform(T * C, r, 1);
  const w = uniform(C * K, r, 0.5);
  const convPool0 = uniform(B * C * (K - 1), r, 1);
  bothSimd((level) => {
    const before = native.capabilities().threads;
    let first: { out: Float32Array; pool: Float32Array; conv: Float32Array; convPool: Float32Array } | null = null;
    try {
      for (const threads of [1, 2, 3]) {
        native.setNumThreads(threads);
        const pool = Float32Array.from(pool0);
        const out = nanF32(T * Hv * Dv);
        native.gatedDeltaRuleBatch(inp.q, inp.k, inp.v, inp.g, inp.beta, pool, slots, starts, out, opts(s, true));
        const convPool = Float32Array.from(convPool0);
        const conv = nanF32(T * C);
        native.causalConv1dBatch(x, T, C, w, null, K, convPool, slots, starts, true, conv);
        if (!first) {
          first = { out, pool, conv, convPool };
          continue;
        }
        assert.deepEqual(out, first.out, `${level} delta out at ${threads} threads vs 1`);
        assert.deepEqual(pool, first.pool, `${level} delta state at ${threads} threads vs 1`);
        assert.deepEqual(conv, first.conv, `${level} conv out at ${threads} threads vs 1`);
        assert.deepEqual(convPool, first.convPool, `${level} conv state at ${threads} threads vs 1`);
      }
    } finally {
      native.setNumThreads(before);
    }
  });
});

test('gatedDeltaRule: decays through the subnormal range cost about what mild ones do (flushed to zero)', (t) => {
  // A head that decays by ~3 per token puts e^(G_i - G_j) of a 64-token chunk into the subnormal
  // range (e^-87 .. e^-103) a few columns per row; unflushed, every FMA that meets one takes a
  // microcode assist (10-15x slower). CPU time of this process at one thread, the least of 5
  // alternating calls each, so a busy machine moves both sides alike.
  const s: DeltaShape = { T: 256, Hk: 1, Hv: 4, Dk: 128, Dv: 128 };
  const inp = deltaInputs(s, 2200, true);
  const r = rng(2201);
  const mild = new Float32Array(s.T * s.Hv).map(() => -0.05 * r());
  const strong = new Float32Array(s.T * s.Hv).map(() => -6 * r());
  const before = native.capabilities().threads;
  const cpuMs = (g: Float32Array): number => {
    const state = Float32Array.from(inp.state0);
    const out = new Float32Array(s.T * s.Hv * s.Dv);
    const c0 = process.cpuUsage();
    native.gatedDeltaRule(inp.q, inp.k, inp.v, g, inp.beta, state, out, opts(s, true));
    const c = process.cpuUsage(c0);
    assert.ok(out.every(Number.isFinite), 'finite outputs');
    return (c.user + c.system) / 1e3;
  };
  try {
    native.setNumThreads(1);
    let mildMs = Infinity, strongMs = Infinity;
    cpuMs(mild);
    cpuMs(strong);
    for (let rep = 0; rep < 5; rep++) {
      mildMs = Math.min(mildMs, cpuMs(mild));
      strongMs = Math.min(strongMs, cpuMs(strong));
    }
    t.diagnostic(`least CPU ms of 5: mild decays ${mildMs.toFixed(2)}, strong decays ${strongMs.toFixed(2)}`);
    assert.ok(strongMs < 3 * mildMs + 0.5,
      `strong decays took ${strongMs.toFixed(2)} CPU ms vs ${mildMs.toFixed(2)} for mild ones: subnormals not flushed?`);
  } finally {
    native.setNumThreads(before);
  }
});

// ---- gated RMSNorm

test('gatedRmsNorm: vs float64 (weight as is), out aliasing x', () => {
  let seed = 2000;
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const [rows_, D] of [[1, 1], [3, 16], [7, 128], [64, 100], [300, 128]] as const) {
        const r = rng(seed++);
        const x = uniform(rows_ * D, r, 2);
        const z = uniform(rows_ * D, r, 4);
        const w = uniform(D, r, 1.5);
        const out = nanF32(rows_ * D);
        native.gatedRmsNorm(x, z, w, 1e-6, rows_, D, out);
        close(out, refGatedRmsNorm(x, z, w, 1e-6, rows_, D), NORM_TOL, `${level}/${threads} ${rows_}x${D}`);
        const xin = Float32Array.from(x);
        native.gatedRmsNorm(xin, z, w, 1e-6, rows_, D, xin);
        assert.deepEqual(xin, out, `${level}/${threads} ${rows_}x${D} in place`);
      }
    });
  });
});

// ---- against transformers itself

test('matches transformers\' own functions: prefill 70 tokens (chunkwise) then 3 decode steps (test/fixtures/deltanet-golden.json)', () => {
  const gold = JSON.parse(readFileSync(path.join(import.meta.dirname, '..', '..', 'test', 'fixtures', 'deltanet-golden.json'), 'utf8')) as
    Record<string, string> & { shape: { T: number; steps: number; Hk: number; Hv: number; Dk: number; Dv: number; K: number; C: number } };
  const f32 = (key: string) => {
    const b = Buffer.from(gold[key]!, 'base64');
    return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
  };
  const { T, steps, Hk, Hv, Dk, Dv, K, C } = gold.shape;
  const N = T + steps;
  const x = f32('x'), w = f32('w'), g = f32('g'), beta = f32('beta');
  const qk = Hk * Dk, vw = Hv * Dv;
  bothSimd((level) => {
    // conv: the prefill in one call, then one call per decode token, carrying the state
    const convState = new Float32Array(C * (K - 1));
    const conv = nanF32(N * C);
    native.causalConv1d(x.subarray(0, T * C), T, C, w, null, K, convState, true, conv.subarray(0, T * C));
    for (let t = T; t < N; t++)
      native.causalConv1d(x.subarray(t * C, (t + 1) * C), 1, C, w, null, K, convState, true, conv.subarray(t * C, (t + 1) * C));
    close(conv, f32('conv'), CONV_TOL, `${level} conv vs HF`);
    assert.deepEqual(convState, f32('convState'), `${level} conv state vs HF's cache`);
    // delta rule on HF's conv output (q/k/v read in place), the same split
    const mixed = f32('conv');
    const state = f32('s0');
    const out = nanF32(N * vw);
    const o = { Hk, Hv, Dk, Dv, l2normQk: true, qStride: C, kStride: C, vStride: C };
    native.gatedDeltaRule(mixed, mixed.subarray(qk), mixed.subarray(2 * qk), g, beta, state, out.subarray(0, T * vw), { ...o, T });
    for (let t = T; t < N; t++) {
      const row = mixed.subarray(t * C);
      native.gatedDeltaRule(row, row.subarray(qk), row.subarray(2 * qk), g.subarray(t * Hv), beta.subarray(t * Hv), state,
        out.subarray(t * vw, (t + 1) * vw), { ...o, T: 1 });
    }
    close(out, f32('out'), DELTA_TOL, `${level} delta out vs HF`);
    close(state, f32('state'), DELTA_TOL, `${level} delta state vs HF`);
    const normed = nanF32(N * vw);
    native.gatedRmsNorm(f32('out'), f32('z'), f32('normWeight'), 1e-6, N * Hv, Dv, normed);
    close(normed, f32('normed'), NORM_TOL, `${level} gated norm vs HF`);
  });
});

// ---- argument errors

function throwsInvalid(fn: () => void, message: RegExp, label: string) {
  assert.throws(fn, (e: Error & { code?: string }) => {
    assert.equal(e.code, 'E_INVALID_ARG', `${label}: code`);
    assert.match(e.message, message, label);
    return true;
  }, label);
}

test('bad arguments throw E_INVALID_ARG with the value named', () => {
  const s: DeltaShape = { T: 3, Hk: 2, Hv: 4, Dk: 8, Dv: 8 };
  const inp = deltaInputs(s, 2100, true);
  const state = new Float32Array(s.Hv * s.Dk * s.Dv);
  const out = new Float32Array(s.T * s.Hv * s.Dv);
  const o = opts(s, true);
  const call = (over: Partial<DeltaRuleOptions>, patch: Partial<DeltaInputs & { state: Float32Array; out: Float32Array }> = {}) =>
    () => native.gatedDeltaRule(patch.q ?? inp.q, patch.k ?? inp.k, patch.v ?? inp.v, patch.g ?? inp.g,
      patch.beta ?? inp.beta, patch.state ?? state, patch.out ?? out, { ...o, ...over });
  throwsInvalid(call({ Hv: 3 }), /opts\.Hv is 3, expected a multiple of opts\.Hk \(2\)/, 'Hv % Hk');
  throwsInvalid(call({ chunk: 0 }), /opts\.chunk is 0, expected 1\.\.256/, 'chunk 0');
  throwsInvalid(call({ T: 4 }), /q\.length is 48, expected at least 64/, 'q too short');
  throwsInvalid(call({}, { v: inp.v.subarray(1) }), /v\.length is 95, expected at least 96/, 'v too short');
  throwsInvalid(call({}, { state: new Float32Array(10) }), /state\.length is 10, expected 256/, 'state');
  throwsInvalid(call({}, { out: new Float32Array(5) }), /out\.length is 5, expected at least 96/, 'out');
  throwsInvalid(call({ qStride: 15 }), /opts\.qStride is 15, expected 16\.\./, 'qStride');
  throwsInvalid(call({ Dk: 1.5 }), /opts\.Dk must be an integer/, 'Dk');
  throwsInvalid(() => native.gatedDeltaRule(inp.q, inp.k, inp.v, inp.g, inp.beta, state, out,
    { T: 3, Hk: 2, Hv: 4, Dk: 8, Dv: 8 } as DeltaRuleOptions), /opts\.l2normQk must be a boolean/, 'l2normQk');

  const pool = new Float32Array(3 * s.Hv * s.Dk * s.Dv);
  const batch = (slots: number[], starts: number[], p: Float32Array = pool) => () =>
    native.gatedDeltaRuleBatch(inp.q, inp.k, inp.v, inp.g, inp.beta, p, Int32Array.from(slots),
      Int32Array.from(starts), out, o);
  throwsInvalid(batch([0, 0], [0, 1, 3]), /slots\[1\] is 0, the same as slots\[0\]/, 'duplicate slot');
  throwsInvalid(batch([0, 3], [0, 1, 3]), /slots\[1\] is 3, expected 0\.\.2/, 'slot out of range');
  throwsInvalid(batch([0, 1], [0, 2, 2]), /seqStarts\[2\] is 2, expected t \(3\)/, 'starts end');
  throwsInvalid(batch([0, 1], [0, 2, 1]), /seqStarts\[2\] is 1, expected at least seqStarts\[1\]/, 'starts order');
  throwsInvalid(batch([0, 1], [0, 3]), /seqStarts\.length is 2, expected 3/, 'starts length');
  throwsInvalid(batch([0], [0, 3], pool.subarray(1)), /statePool\.length is 767, expected a multiple of Hv \* Dk \* Dv \(256\)/, 'pool');

  const x = new Float32Array(12);
  throwsInvalid(() => native.causalConv1d(x, 3, 4, new Float32Array(16), null, 4, new Float32Array(11), true, x),
    /convState\.length is 11, expected 12/, 'conv state');
  throwsInvalid(() => native.causalConv1d(x, 3, 4, new Float32Array(15), null, 4, new Float32Array(12), true, x),
    /weight\.length is 15, expected 16/, 'conv weight');
  throwsInvalid(() => native.causalConv1d(x, 3, 4, new Float32Array(4 * 65), null, 65, new Float32Array(4 * 64), true, x),
    /k is 65, expected 1\.\.64/, 'conv k');
  throwsInvalid(() => native.causalConv1dBatch(x, 3, 4, new Float32Array(16), null, 4, new Float32Array(24),
    Int32Array.from([1, 1]), Int32Array.from([0, 1, 3]), true, x), /slots\[1\] is 1, the same as slots\[0\]/, 'conv dup slot');
  throwsInvalid(() => native.gatedRmsNorm(x, x, new Float32Array(3), 1e-6, 3, 4, x), /weight\.length is 3, expected 4/, 'norm weight');
  throwsInvalid(() => native.gatedRmsNorm(x, x.subarray(1), new Float32Array(4), 1e-6, 3, 4, x), /z\.length is 11, expected at least 12/, 'norm z');
  throwsInvalid(() => native.gatedRmsNorm(x, x, new Float32Array(4), -1, 3, 4, x), /eps is -1/, 'norm eps');

  // Nothing was written by a rejected call.
  assert.ok(out.every((v) => v === 0) && state.every((v) => v === 0), 'rejected calls wrote nothing');
});
