// Weight packing, DenseGemm and the fused GroupGemm expert FFN against float64 references:
// shape sweeps over M/N/K (odd and non-multiple-of-16 sizes), bf16/f16/f32 weights, reference and
// fast mode, the portable path, bit-exact determinism, and argument errors.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import type { DType, ExpertTable, NativeAddon, PackedWeight } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import { fileSeed } from './helpers/seed.js';
import { bitsEqual, compare, refGemm, silu, uniform } from './helpers/gemm-ref.js';

const native: NativeAddon = loadNative();

// Tolerances (normalised L2 error, and max-abs error relative to max |reference|):
// - exact: the kernel sees exactly the operands of the reference (weights widened exactly, x in
//   f32, or x rounded to bf16 in the reference too); only f32 accumulation error remains,
//   ~sqrt(K) * 2^-24 relative, far below 1e-5 for K <= 1024.
const TOL_EXACT = 1e-5;
// - fastVsF32: fast mode against the unrounded reference. Rounding x (and h) to bf16 perturbs
//   each operand by at most 2^-9 relative, with random signs, so outputs move by ~1e-3 relative.
const TOL_FAST_VS_F32 = 1e-2;
// - group fast vs emulated: the reference rounds h (computed in f64) to bf16 while the kernel
//   rounds its f32 h; the two differ only where h lies within ~1e-6 of a rounding boundary
//   (a fraction ~1e-3 of elements, each off by one bf16 ulp = 2^-8): ~1e-5 in L2 expected.
const TOL_GROUP_FAST_EMULATED = 1e-4;

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers (a fresh seed per case, printed in failure labels).
let seedCounter = fileSeed(1234, 'first case seed');
function freshRng(): { rand: () => number; seed: number } {
  const seed = seedCounter++;
  return { rand: mulberry32(seed), seed };
}

// ---------------------------------------------------------------------------------------------
// bf16 / f16 encodings (round to nearest even), and their exact values.
const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

function f32ToBf16Bits(v: number): number {
  f32buf[0] = v;
  const u = u32buf[0]!;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}
function bf16BitsToF32(b: number): number {
  u32buf[0] = (b << 16) >>> 0;
  return f32buf[0]!;
}
function roundBf16(v: number): number {
  return bf16BitsToF32(f32ToBf16Bits(v));
}
/** Random weight [n, k] in `dtype`: the source array to pack and its exact values. */
function randomWeight(rand: () => number, dtype: DType, n: number, k: number, scale = 1) {
  const values = new Float64Array(n * k);
  if (dtype === 'f32') {
    const src = uniform(rand, n * k, scale);
    values.set(src);
    return { src, values };
  }
  const src = new Uint16Array(n * k);
  // f16: random normal numbers of magnitude [scale / 64, 2 * scale), drawn as bit patterns.
  const topExp = 15 + Math.round(Math.log2(scale));
  for (let i = 0; i < n * k; i++) {
    if (dtype === 'bf16') {
      src[i] = f32ToBf16Bits((rand() * 2 - 1) * scale);
      values[i] = bf16BitsToF32(src[i]!);
    } else {
      const sign = rand() < 0.5 ? 1 : -1;
      const exp = topExp - Math.floor(rand() * 6);
      const mant = Math.floor(rand() * 1024);
      src[i] = (sign < 0 ? 0x8000 : 0) | (exp << 10) | mant;
      values[i] = sign * (1 + mant / 1024) * 2 ** (exp - 15);
    }
  }
  return { src, values };
}

// ---------------------------------------------------------------------------------------------
// References and comparison.
interface Expert { gate: Float64Array; up: Float64Array; down: Float64Array; dtype: DType }

function refFfn(x: Float32Array, offsets: Int32Array, experts: (Expert | null)[], h: number,
                inter: number, fast: boolean): Float64Array {
  const rows = offsets[offsets.length - 1]!;
  const y = new Float64Array(rows * h);
  for (let e = 0; e < experts.length; e++) {
    const r0 = offsets[e]!, r1 = offsets[e + 1]!;
    if (r1 === r0) continue;
    const ex = experts[e]!;
    const round = fast && ex.dtype === 'bf16';  // fast mode rounds activations of bf16 weights
    const xs = x.subarray(r0 * h, r1 * h);
    const g = refGemm(xs, r1 - r0, ex.gate, inter, h, round);
    const u = refGemm(xs, r1 - r0, ex.up, inter, h, round);
    const hh = new Float64Array(g.length);
    for (let i = 0; i < g.length; i++) {
      const v = silu(g[i]!) * u[i]!;
      hh[i] = round ? roundBf16(v) : v;
    }
    const out = refGemm(hh, r1 - r0, ex.down, h, inter, false);
    y.set(out, r0 * h);
  }
  return y;
}

function poisoned(n: number, extra = 5): Float32Array {
  return new Float32Array(n + extra).fill(NaN);
}

function assertTailPoisoned(y: Float32Array, used: number, label: string): void {
  for (let i = used; i < y.length; i++) assert.ok(Number.isNaN(y[i]!), `${label}: wrote past the end at ${i}`);
}

function withLevel<T>(level: 'scalar' | 'avx2' | 'avx512' | 'auto', fn: () => T): T {
  native.setSimdLevel(level);
  try {
    return fn();
  } finally {
    native.setSimdLevel('auto');
  }
}
/** The levels whose kernels the bit-identity tests run (AVX2 where the CPU has it). */
const LEVELS_BITS = ['auto', 'avx2', 'scalar'] as const;
const withScalar = <T>(fn: () => T): T => withLevel('scalar', fn);
/** The AVX2 kernels (CPUs without AVX-512) run where the CPU has AVX2 + FMA, whatever else it has. */
const NO_AVX2 = withLevel('avx2', () => native.capabilities().simd) === 'avx2' ? false
  : `this CPU has no AVX2 + FMA (simd ${native.capabilities().simd}): the AVX2 kernels cannot run here`;

function withThreads<T>(n: number, fn: () => T): T {
  const before = native.capabilities().threads;
  native.setNumThreads(n);
  try {
    return fn();
  } finally {
    native.setNumThreads(before);
  }
}

const DTYPES: DType[] = ['bf16', 'f16', 'f32'];

// ---------------------------------------------------------------------------------------------
// Packing.

test('packWeight keeps every element exactly, pads, and reports its geometry', () => {
  for (const dtype of DTYPES) {
    for (const [n, k] of [[1, 1], [17, 31], [32, 64], [5, 2]] as const) {
      const { rand } = freshRng();
      const { src, values } = randomWeight(rand, dtype, n, k);
      const w = native.packWeight(src, dtype, n, k);
      assert.equal(w.n, n);
      assert.equal(w.k, k);
      assert.equal(w.dtype, dtype);
      assert.equal(w.kind, 'plain');
      const np = Math.ceil(n / 16) * 16, kp = Math.ceil(k / 2) * 2;
      assert.equal(w.sizeBytes, np * kp * (dtype === 'f32' ? 4 : 2));
      for (let r = 0; r < n; r++)
        for (let c = 0; c < k; c++)
          assert.equal(native.packedWeightAt(w, r, c), values[r * k + c], `${dtype} [${r},${c}]`);
      w.dispose();
      assert.equal(w.disposed, true);
    }
  }
});

test('packGateUp maps rows [0, I) to gate and [I, 2I) to up', () => {
  for (const dtype of DTYPES) {
    const { rand } = freshRng();
    const inter = 20, h = 7;
    const gate = randomWeight(rand, dtype, inter, h);
    const up = randomWeight(rand, dtype, inter, h);
    const w = native.packGateUp(gate.src, up.src, dtype, inter, h);
    assert.equal(w.kind, 'gate_up');
    assert.equal(w.n, 2 * inter);
    assert.equal(w.k, h);
    assert.equal(w.sizeBytes, 2 * 32 * 8 * (dtype === 'f32' ? 4 : 2));  // I padded to 32, K to 8
    for (let r = 0; r < inter; r++)
      for (let c = 0; c < h; c++) {
        assert.equal(native.packedWeightAt(w, r, c), gate.values[r * h + c]);
        assert.equal(native.packedWeightAt(w, inter + r, c), up.values[r * h + c]);
      }
  }
});

test('repackInto replaces contents in place, converting the source dtype', () => {
  const { rand } = freshRng();
  const a = randomWeight(rand, 'bf16', 18, 9);
  const w = native.packWeight(a.src, 'bf16', 18, 9);
  const f = uniform(rand, 18 * 9);
  native.repackInto(w, f, 'f32');
  for (let i = 0; i < 18 * 9; i++)
    assert.equal(native.packedWeightAt(w, Math.floor(i / 9), i % 9), roundBf16(f[i]!));
  // A gate_up weight needs both halves.
  const g = randomWeight(rand, 'f16', 16, 4), u = randomWeight(rand, 'f16', 16, 4);
  const gu = native.packGateUp(g.src, u.src, 'f16', 16, 4);
  native.repackInto(gu, u.src, 'f16', g.src);
  assert.equal(native.packedWeightAt(gu, 3, 2), u.values[3 * 4 + 2]);
  assert.equal(native.packedWeightAt(gu, 16 + 3, 2), g.values[3 * 4 + 2]);
});

// ---------------------------------------------------------------------------------------------
// DenseGemm.

interface DenseCase { m: number; n: number; k: number; dtype: DType; fast: boolean; bias: boolean; accumulate: boolean }

function runDense(c: DenseCase, label: string): void {
  const { rand, seed } = freshRng();
  const tag = `${label} m=${c.m} n=${c.n} k=${c.k} ${c.dtype} fast=${c.fast} bias=${c.bias} acc=${c.accumulate} seed=${seed}`;
  const { src, values } = randomWeight(rand, c.dtype, c.n, c.k);
  const w = native.packWeight(src, c.dtype, c.n, c.k);
  const x = uniform(rand, c.m * c.k);
  const bias = c.bias ? uniform(rand, c.n) : null;
  const y = poisoned(c.m * c.n);
  const y0 = uniform(rand, c.m * c.n);
  if (c.accumulate) y.set(y0);
  native.denseGemm(x, c.m, w, y, bias, c.accumulate, c.fast);
  const roundX = c.fast && c.dtype === 'bf16';
  const add = (r: Float64Array) => {
    for (let i = 0; i < c.m * c.n; i++) {
      if (bias) r[i]! += bias[i % c.n]!;
      if (c.accumulate) r[i]! += y0[i]!;
    }
    return r;
  };
  compare(y, add(refGemm(x, c.m, values, c.n, c.k, roundX)), TOL_EXACT, tag);
  if (roundX) {
    compare(y, add(refGemm(x, c.m, values, c.n, c.k, false)), TOL_FAST_VS_F32, `${tag} vs f32`);
  }
  assertTailPoisoned(y, c.m * c.n, tag);
  w.dispose();
}

test('denseGemm matches float64 over M, N, K, dtypes and both modes', () => {
  for (const m of [1, 2, 3, 8, 17, 64, 130])
    for (const dtype of DTYPES)
      for (const fast of [false, true])
        runDense({ m, n: 40, k: 37, dtype, fast, bias: m % 2 === 1, accumulate: m % 3 === 2 }, 'sweep-m');
  for (const [n, k] of [[1, 1], [16, 2], [17, 33], [64, 64], [100, 257], [48, 1024]] as const)
    for (const dtype of DTYPES)
      for (const fast of [false, true])
        for (const m of [3, 17])
          runDense({ m, n, k, dtype, fast, bias: true, accumulate: false }, 'sweep-nk');
  for (const accumulate of [false, true])
    for (const bias of [false, true])
      runDense({ m: 5, n: 33, k: 65, dtype: 'bf16', fast: true, bias, accumulate }, 'epilogue');
});

test('denseGemm fast mode really rounds x to bf16 (differs from reference mode)', () => {
  const { rand } = freshRng();
  const { src } = randomWeight(rand, 'bf16', 32, 64);
  const w = native.packWeight(src, 'bf16', 32, 64);
  const x = uniform(rand, 4 * 64);
  const a = poisoned(4 * 32, 0), b = poisoned(4 * 32, 0);
  native.denseGemm(x, 4, w, a, null, false, false);
  native.denseGemm(x, 4, w, b, null, false, true);
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff = Math.max(diff, Math.abs(a[i]! - b[i]!));
  assert.ok(diff > 1e-4, `fast and reference mode agree to ${diff}: x was not rounded`);
});

test('denseGemm on a gate_up weight writes gate columns then up columns', () => {
  const { rand } = freshRng();
  const inter = 24, h = 19, m = 3;
  const g = randomWeight(rand, 'bf16', inter, h), u = randomWeight(rand, 'bf16', inter, h);
  const w = native.packGateUp(g.src, u.src, 'bf16', inter, h);
  const x = uniform(rand, m * h);
  const y = poisoned(m * 2 * inter);
  native.denseGemm(x, m, w, y, null, false, false);
  const both = new Float64Array(2 * inter * h);
  both.set(g.values);
  both.set(u.values, inter * h);
  compare(y, refGemm(x, m, both, 2 * inter, h, false), TOL_EXACT, 'gate_up dense');
  assertTailPoisoned(y, m * 2 * inter, 'gate_up dense');
});

test('denseGemm AVX2 path (setSimdLevel avx2) matches float64', { skip: NO_AVX2 }, () => {
  withLevel('avx2', () => {
    for (const dtype of DTYPES)
      for (const fast of [false, true])
        for (const [m, n, k] of [[1, 17, 33], [1, 64, 1024], [8, 40, 64], [17, 33, 31], [130, 20, 9], [7, 100, 257]] as const)
          runDense({ m, n, k, dtype, fast, bias: m > 1, accumulate: m === 8 }, 'avx2');
  });
});

test('denseGemm portable path (setSimdLevel scalar) matches float64', () => {
  withScalar(() => {
    assert.equal(native.capabilities().simd === 'scalar' || native.capabilities().simd === 'neon', true);
    for (const dtype of DTYPES)
      for (const fast of [false, true])
        for (const [m, n, k] of [[1, 17, 33], [8, 40, 64], [17, 33, 31], [130, 20, 9]] as const)
          runDense({ m, n, k, dtype, fast, bias: m > 1, accumulate: m === 8 }, 'scalar');
  });
});

test('denseGemm is bit-identical alone, in a batch, and on 1 or 2 threads', () => {
  for (const level of LEVELS_BITS) {
    if (level === 'avx2' && NO_AVX2) continue;
    const run = () => {
      for (const [dtype, fast] of [['bf16', true], ['bf16', false], ['f16', false], ['f32', true]] as const) {
        const { rand } = freshRng();
        const n = 72, k = 129, m = 130;
        const { src } = randomWeight(rand, dtype, n, k);
        const w = native.packWeight(src, dtype, n, k);
        const bias = uniform(rand, n);
        const x = uniform(rand, m * k);
        const full2 = new Float32Array(m * n), full1 = new Float32Array(m * n);
        withThreads(2, () => native.denseGemm(x, m, w, full2, bias, false, fast));
        withThreads(1, () => native.denseGemm(x, m, w, full1, bias, false, fast));
        bitsEqual(full1, full2, `${dtype} fast=${fast} threads`);
        for (const r of [0, 5, 77, 129]) {
          const one = new Float32Array(n);
          native.denseGemm(x.subarray(r * k, (r + 1) * k), 1, w, one, bias, false, fast);
          bitsEqual(one, full2.subarray(r * n, (r + 1) * n), `${dtype} fast=${fast} row ${r} alone`);
        }
        const seven = new Float32Array(7 * n);  // rows 60..66: crosses register-tile boundaries
        native.denseGemm(x.subarray(60 * k, 67 * k), 7, w, seven, bias, false, fast);
        bitsEqual(seven, full2.subarray(60 * n, 67 * n), `${dtype} fast=${fast} rows 60..66`);
      }
    };
    withLevel(level, run);
  }
});

// ---------------------------------------------------------------------------------------------
// GroupGemm.

interface FfnSetup {
  table: ExpertTable;
  experts: (Expert | null)[];
  weights: PackedWeight[];
}

function makeExperts(rand: () => number, e: number, h: number, inter: number,
                     dtypeOf: DType | ((i: number) => DType), present: (i: number) => boolean): FfnSetup {
  const table = new native.ExpertTable(e, h, inter);
  const experts: (Expert | null)[] = [];
  const weights: PackedWeight[] = [];
  // Scales keep h and y of order 1 (x ~ U(-1, 1)).
  const s1 = 2 / Math.sqrt(h), s2 = 2 / Math.sqrt(inter);
  for (let i = 0; i < e; i++) {
    if (!present(i)) {
      experts.push(null);
      continue;
    }
    const dtype = typeof dtypeOf === 'string' ? dtypeOf : dtypeOf(i);
    const g = randomWeight(rand, dtype, inter, h, s1);
    const u = randomWeight(rand, dtype, inter, h, s1);
    const d = randomWeight(rand, dtype, h, inter, s2);
    const gu = native.packGateUp(g.src, u.src, dtype, inter, h);
    const dn = native.packWeight(d.src, dtype, h, inter);
    table.set(i, gu, dn);
    weights.push(gu, dn);
    experts.push({ gate: g.values, up: u.values, down: d.values, dtype });
  }
  return { table, experts, weights };
}

function offsetsFrom(counts: number[]): Int32Array {
  const o = new Int32Array(counts.length + 1);
  for (let i = 0; i < counts.length; i++) o[i + 1] = o[i]! + counts[i]!;
  return o;
}

interface FfnCase { e: number; h: number; inter: number; counts: number[]; dtype: DType; fast: boolean }

function runFfn(c: FfnCase, label: string): void {
  const { rand, seed } = freshRng();
  const tag = `${label} E=${c.e} H=${c.h} I=${c.inter} ${c.dtype} fast=${c.fast} seed=${seed}`;
  // Experts with no rows get no weights half of the time (the kernel must not touch them); at
  // large sizes only experts with rows get weights (keeps the test fast).
  const small = c.h * c.inter <= 1 << 16;
  const setup = makeExperts(rand, c.e, c.h, c.inter, c.dtype,
    (i) => c.counts[i]! > 0 || (small && i % 2 === 0));
  const offsets = offsetsFrom(c.counts);
  const rows = offsets[c.e]!;
  const x = uniform(rand, rows * c.h);
  const y = poisoned(rows * c.h, 3 * c.h);  // extra rows beyond offsets[E] must stay untouched
  native.groupGemmFfn(x, offsets, setup.table, y, c.fast);
  const round = c.fast && c.dtype === 'bf16';
  compare(y, refFfn(x, offsets, setup.experts, c.h, c.inter, round),
    round ? TOL_GROUP_FAST_EMULATED : TOL_EXACT, tag);
  if (round) compare(y, refFfn(x, offsets, setup.experts, c.h, c.inter, false), TOL_FAST_VS_F32, `${tag} vs f32`);
  assertTailPoisoned(y, rows * c.h, tag);
  setup.table.dispose();
  for (const w of setup.weights) w.dispose();
}

function skewed(e: number, total: number): number[] {
  const c = new Array<number>(e).fill(0);
  c[e - 1] = total - Math.min(e - 1, 3);
  for (let i = 0; i < Math.min(e - 1, 3); i++) c[i * 2 % (e - 1)]! += 1;
  return c;
}

test('groupGemmFfn matches float64 for E in {1, 8, 64}, empty, single-row and skewed experts', () => {
  for (const dtype of DTYPES)
    for (const fast of [false, true]) {
      runFfn({ e: 1, h: 64, inter: 32, counts: [5], dtype, fast }, 'one expert');
      runFfn({ e: 1, h: 64, inter: 32, counts: [1], dtype, fast }, 'one row');
      runFfn({ e: 8, h: 64, inter: 32, counts: [3, 0, 1, 0, 0, 17, 2, 1], dtype, fast }, 'mixed');
      runFfn({ e: 8, h: 64, inter: 32, counts: skewed(8, 70), dtype, fast }, 'skewed');
      const c64 = Array.from({ length: 64 }, (_, i) => (i % 3 === 0 ? 0 : i % 5));
      runFfn({ e: 64, h: 64, inter: 32, counts: c64, dtype, fast }, 'E=64');
      runFfn({ e: 8, h: 64, inter: 32, counts: new Array<number>(8).fill(0), dtype, fast }, 'no rows');
    }
  // Odd and non-multiple-of-16 sizes (padding of I, K pairs and the last output block).
  for (const fast of [false, true]) {
    runFfn({ e: 3, h: 37, inter: 21, counts: [2, 0, 9], dtype: 'bf16', fast }, 'odd sizes');
    runFfn({ e: 2, h: 50, inter: 17, counts: [1, 130], dtype: 'f16', fast }, 'odd sizes');
  }
});

test('groupGemmFfn with experts of different dtypes in one table (odd and even H)', () => {
  for (const h of [33, 48])
    for (const fast of [false, true]) {
      const { rand, seed } = freshRng();
      const tag = `mixed dtypes H=${h} fast=${fast} seed=${seed}`;
      const dtypes: DType[] = ['bf16', 'f16', 'f32', 'bf16'];
      const setup = makeExperts(rand, 4, h, 24, (i) => dtypes[i]!, () => true);
      const offsets = offsetsFrom([3, 2, 7, 1]);
      const x = uniform(rand, 13 * h);
      const y = poisoned(13 * h);
      native.groupGemmFfn(x, offsets, setup.table, y, fast);
      compare(y, refFfn(x, offsets, setup.experts, h, 24, fast),
        fast ? TOL_GROUP_FAST_EMULATED : TOL_EXACT, tag);
      assertTailPoisoned(y, 13 * h, tag);
    }
});

test('groupGemmFfn at model-like sizes (H=1024, I=256) with decode-sized loads', () => {
  for (const dtype of ['bf16', 'f16'] as const)
    for (const fast of [false, true]) {
      runFfn({ e: 8, h: 1024, inter: 256, counts: [1, 0, 0, 1, 0, 0, 0, 0], dtype, fast }, 'decode');
      runFfn({ e: 4, h: 1024, inter: 256, counts: [3, 8, 0, 2], dtype, fast }, 'small batch');
    }
});

test('groupGemmFfn AVX2 path (setSimdLevel avx2) matches float64', { skip: NO_AVX2 }, () => {
  withLevel('avx2', () => {
    for (const dtype of DTYPES)
      for (const fast of [false, true]) {
        runFfn({ e: 8, h: 64, inter: 32, counts: [3, 0, 1, 0, 0, 17, 2, 1], dtype, fast }, 'avx2');
        runFfn({ e: 2, h: 37, inter: 21, counts: [1, 8], dtype, fast }, 'avx2 odd');
        runFfn({ e: 4, h: 1024, inter: 256, counts: [1, 0, 7, 0], dtype, fast }, 'avx2 model-like');
      }
  });
});

test('groupGemmFfn portable path (setSimdLevel scalar) matches float64', () => {
  withScalar(() => {
    for (const dtype of DTYPES)
      for (const fast of [false, true]) {
        runFfn({ e: 8, h: 64, inter: 32, counts: [3, 0, 1, 0, 0, 17, 2, 1], dtype, fast }, 'scalar');
        runFfn({ e: 2, h: 37, inter: 21, counts: [1, 8], dtype, fast }, 'scalar odd');
      }
  });
});

test('groupGemmFfn is bit-identical alone, in a batch, and on 1 or 2 threads', () => {
  for (const level of LEVELS_BITS) {
    if (level === 'avx2' && NO_AVX2) continue;
    const run = () => {
      for (const [dtype, fast] of [['bf16', true], ['bf16', false], ['f16', true]] as const) {
        const { rand } = freshRng();
        const e = 8, h = 96, inter = 80;
        const setup = makeExperts(rand, e, h, inter, dtype, () => true);
        const counts = [13, 0, 1, 40, 2, 0, 7, 60];
        const offsets = offsetsFrom(counts);
        const rows = offsets[e]!;
        const x = uniform(rand, rows * h);
        const y2 = new Float32Array(rows * h), y1 = new Float32Array(rows * h);
        withThreads(2, () => native.groupGemmFfn(x, offsets, setup.table, y2, fast));
        withThreads(1, () => native.groupGemmFfn(x, offsets, setup.table, y1, fast));
        bitsEqual(y1, y2, `${dtype} fast=${fast} threads`);
        // Every row alone (as a decode step would send it) equals its row in the big batch.
        for (const r of [0, 12, 13, 14, 50, 60, 123 - 1]) {
          let ex = 0;
          while (offsets[ex + 1]! <= r) ex++;
          const one = new Int32Array(e + 1);
          for (let i = ex + 1; i <= e; i++) one[i] = 1;
          const y = new Float32Array(h);
          native.groupGemmFfn(x.subarray(r * h, (r + 1) * h), one, setup.table, y, fast);
          bitsEqual(y, y2.subarray(r * h, (r + 1) * h), `${dtype} fast=${fast} row ${r} alone`);
        }
        setup.table.dispose();
      }
    };
    withLevel(level, run);
  }
});

test('groupGemmFfn keeps weights alive after their handles are disposed (the table holds them)', () => {
  const { rand } = freshRng();
  const setup = makeExperts(rand, 2, 32, 16, 'bf16', () => true);
  for (const w of setup.weights) w.dispose();
  const offsets = offsetsFrom([2, 3]);
  const x = uniform(rand, 5 * 32);
  const y = poisoned(5 * 32);
  native.groupGemmFfn(x, offsets, setup.table, y, false);
  compare(y, refFfn(x, offsets, setup.experts, 32, 16, false), TOL_EXACT, 'disposed handles');
});

// ---------------------------------------------------------------------------------------------
// Errors.

test('packing rejects bad arguments with exact messages', () => {
  const src = new Uint16Array(6);
  assert.throws(() => native.packWeight(new Float32Array(6), 'bf16', 2, 3),
    { name: 'TypeError', message: 'src must be a Uint16Array' });
  assert.throws(() => native.packWeight(src, 'bf16', 2, 4),
    { name: 'RangeError', message: 'src.length is 6, expected at least 8' });
  assert.throws(() => native.packWeight(src, 'f64' as DType, 2, 3),
    { name: 'TypeError', message: "dtype is 'f64', expected 'f32', 'bf16' or 'f16'" });
  assert.throws(() => native.packWeight(src, 'bf16', 0, 3),
    { name: 'RangeError', message: 'n is 0, expected 1..16777216' });
  assert.throws(() => native.packGateUp(src, new Uint16Array(2), 'f16', 2, 3),
    { name: 'RangeError', message: 'up.length is 2, expected at least 6' });
  const w = native.packWeight(src, 'bf16', 2, 3);
  assert.throws(() => native.packedWeightAt(w, 2, 0), { name: 'RangeError', message: 'row is 2, expected 0..1' });
  assert.throws(() => native.repackInto(w, src, 'bf16', src),
    { name: 'TypeError', message: 'up must be null or absent for a plain weight' });
  const gu = native.packGateUp(src, src, 'bf16', 2, 3);
  assert.throws(() => native.repackInto(gu, src, 'bf16'),
    { name: 'TypeError', message: 'up is required to repack a gate_up weight' });
  assert.throws(() => native.repackInto(gu, new Float32Array(5), 'f32', new Float32Array(6)),
    { name: 'RangeError', message: 'src.length is 5, expected at least 6' });
});

test('denseGemm rejects bad arguments and disposed weights', () => {
  const w = native.packWeight(new Float32Array(4 * 3), 'f32', 4, 3);
  const x = new Float32Array(6), y = new Float32Array(8);
  assert.throws(() => native.denseGemm(new Float32Array(5), 2, w, y, null, false, false),
    { name: 'RangeError', message: 'x.length is 5, expected at least 6' });
  assert.throws(() => native.denseGemm(x, 2, w, new Float32Array(7), null, false, false),
    { name: 'RangeError', message: 'y.length is 7, expected at least 8' });
  assert.throws(() => native.denseGemm(x, 2, w, y, new Float32Array(3), false, false),
    { name: 'RangeError', message: 'bias.length is 3, expected at least 4' });
  assert.throws(() => native.denseGemm(x, 2, {} as PackedWeight, y, null, false, false),
    { name: 'TypeError', message: 'w must be a PackedWeight' });
  // The handles are told apart by type tags: another handle, or an object with the class's
  // prototype, is not a weight (unwrapping either as one would read the wrong native object).
  const table = new native.ExpertTable(1, 3, 2);
  assert.throws(() => native.denseGemm(x, 2, table as unknown as PackedWeight, y, null, false, false),
    { name: 'TypeError', message: 'w must be a PackedWeight' });
  assert.throws(() => native.denseGemm(x, 2, Object.create(Object.getPrototypeOf(w)) as PackedWeight, y, null, false, false),
    { name: 'TypeError', message: 'w must be a PackedWeight' });
  assert.throws(() => native.groupGemmFfn(x, new Int32Array([0, 0]), w as never, y, false),
    { name: 'TypeError', message: 'experts must be an ExpertTable' });
  table.dispose();
  assert.throws(() => native.denseGemm(x, -1, w, y, null, false, false),
    { name: 'RangeError', message: 'm is -1, expected 0..1073741824' });
  native.denseGemm(x, 2, w, y, null, false, false);
  w.dispose();
  assert.throws(() => native.denseGemm(x, 2, w, y, null, false, false),
    (err: Error & { code?: string }) => err.code === 'E_DISPOSED' && /w has been disposed/.test(err.message));
  assert.throws(() => native.packedWeightAt(w, 0, 0), { code: 'E_DISPOSED' });
});

test('groupGemmFfn validates offsets, lengths and missing experts', () => {
  const { rand } = freshRng();
  const setup = makeExperts(rand, 8, 16, 16, 'bf16', (i) => i !== 5);
  const x = new Float32Array(10 * 16), y = new Float32Array(10 * 16);
  const t = setup.table;
  assert.throws(() => native.groupGemmFfn(x, new Int32Array(3), t, y, false),
    { name: 'RangeError', message: 'offsets.length is 3, expected 9' });
  assert.throws(() => native.groupGemmFfn(x, new Int32Array([1, 1, 1, 1, 1, 1, 1, 1, 1]), t, y, false),
    { name: 'RangeError', message: 'offsets[0] is 1, expected 0' });
  assert.throws(() => native.groupGemmFfn(x, new Int32Array([0, 2, 1, 1, 1, 1, 1, 1, 1]), t, y, false),
    { name: 'RangeError', message: 'offsets[2] is 1, expected at least offsets[1] = 2 (offsets must be non-decreasing)' });
  assert.throws(() => native.groupGemmFfn(x, offsetsFrom([0, 0, 0, 0, 0, 0, 0, 11]), t, y, false),
    { name: 'RangeError', message: 'x.length is 160, expected at least 176 (offsets[8] = 11 rows of hidden 16)' });
  assert.throws(() => native.groupGemmFfn(x, offsetsFrom([0, 0, 0, 0, 0, 0, 0, 10]), t, new Float32Array(100), false),
    { name: 'RangeError', message: 'y.length is 100, expected at least 160 (offsets[8] = 10 rows of hidden 16)' });
  assert.throws(() => native.groupGemmFfn(x, offsetsFrom([1, 0, 0, 0, 0, 3, 0, 0]), t, y, false),
    { name: 'RangeError', message: 'expert 5 has 3 rows but no weights' });
  assert.throws(() => native.groupGemmFfn(x, new Float32Array(9) as unknown as Int32Array, t, y, false),
    { name: 'TypeError', message: 'offsets must be a Int32Array' });
  // Expert 5 without weights is fine while it gets no rows.
  native.groupGemmFfn(x, offsetsFrom([1, 0, 0, 0, 0, 0, 0, 2]), t, y, false);
  t.dispose();
  assert.throws(() => native.groupGemmFfn(x, offsetsFrom([1, 0, 0, 0, 0, 0, 0, 2]), t, y, false),
    { code: 'E_DISPOSED', message: 'experts has been disposed' });
});
