// Quantized weights (int8, int4, fp8 from --quantize; FP8 and MXFP4 checkpoint data kept as is):
// the stored values against independent decoders written here (e4m3, e2m1, e8m0 from their
// definitions), quantization error bounds, and DenseGemm / GroupGemm against float64 references
// over the dequantised weights, at every dispatch level, with ragged shapes. Fast mode: int8 and
// int4 weights against activations quantized per row to int8 (quantized here too, from the
// definition), fp8 against bf16-rounded activations.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import type { NativeAddon, PackedWeight, QuantFormat } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import { bf16ToF32, f32ToBf16 } from '../src/model/kv-dtype.js';
import { fileSeed } from './helpers/seed.js';
import { compare, refGemm, roundBf16, silu, uniform } from './helpers/gemm-ref.js';

const native: NativeAddon = loadNative();
// The kernels compute decode(code) * scale in f32, then the f32 kernels' accumulation: against
// a float64 reference over the same dequantised values only f32 accumulation error remains.
const TOL = 2e-5;
// The FFN in fast mode quantizes (or rounds) h between the projections: h here is float64, the
// kernel's f32 (its own exp), so a value next to a rounding boundary may take the other code (one
// int8 step of 1/127 of the row's max, or one bf16 ulp) and move its row's outputs by ~1e-3.
const TOL_FFN_FAST = 2e-3;

let seed = fileSeed(777, 'first case seed');
const rng = () => mulberry32(seed++);

/** e4m3fn from its definition: bias 7, subnormals at exponent 0, 0x7f/0xff NaN. */
function e4m3(code: number): number {
  const sign = code & 0x80 ? -1 : 1;
  const e = (code >> 3) & 0xf, m = code & 7;
  if (e === 15 && m === 7) return NaN;
  return sign * (e === 0 ? (m / 8) * 2 ** -6 : (1 + m / 8) * 2 ** (e - 7));
}
/** e2m1: bias 1, one mantissa bit; sign in bit 3. */
function e2m1(code: number): number {
  const sign = code & 8 ? -1 : 1;
  const e = (code >> 1) & 3, m = code & 1;
  return sign * (e === 0 ? m * 0.5 : (1 + m / 2) * 2 ** (e - 1));
}
const f32 = (v: number) => Math.fround(v);

/** The packed weight's values as float64 [n, k] (what the kernels must use). */
function dequantised(w: PackedWeight): Float64Array {
  const out = new Float64Array(w.n * w.k);
  for (let r = 0; r < w.n; r++)
    for (let c = 0; c < w.k; c++) out[r * w.k + c] = native.packedWeightAt(w, r, c);
  return out;
}

/** Runs fn at every dispatch level (the levels the CPU lacks run its best, which is also fine). */
const LEVELS = ['auto', 'avx512bf16', 'avx512', 'avx2', 'scalar'] as const;
function forEachLevel(fn: (level: string) => void): void {
  try {
    for (const level of LEVELS) {
      native.setSimdLevel(level);
      fn(level);
    }
  } finally {
    native.setSimdLevel('auto');
  }
}

/** Round half to even (what the kernels' activation quantization does). */
function rne(v: number): number {
  const f = Math.floor(v), d = v - f;
  return d > 0.5 ? f + 1 : d < 0.5 ? f : f % 2 === 0 ? f : f + 1;
}

const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));
/** Fast mode's int8 activation block (kActBlock): every weight group that is a multiple of it. */
const ACT_BLOCK = 128;

/**
 * Rows of x [m, k] as fast mode's int8 activations see them: per block of `block` columns of a
 * row, scale = absmax / 127 (f32), code = round-half-even(f32(x / scale)) in [-127, 127]; returns
 * code * scale in float64.
 */
function quantizeRowsI8(x: ArrayLike<number>, m: number, k: number, block: number): Float64Array {
  const out = new Float64Array(m * k);
  for (let r = 0; r < m; r++)
    for (let c0 = 0; c0 < k; c0 += block) {
      const c1 = Math.min(k, c0 + block);
      let amax = 0;
      for (let c = c0; c < c1; c++) amax = Math.max(amax, Math.abs(x[r * k + c]!));
      const sc = f32(amax / 127);
      for (let c = c0; c < c1; c++) {
        const code = sc > 0 ? Math.max(-127, Math.min(127, rne(f32(x[r * k + c]! / sc)))) : 0;
        out[r * k + c] = code * sc;
      }
    }
  return out;
}

/**
 * What a weight built as `name` ('int8', 'int4/32', 'fp8', ...) with k columns reads in fast mode:
 * int8 in blocks of gcd(128, its group) columns (native/cpu/gemm_kernels.h kActBlock), bf16, or f32.
 */
function fastActivations(name: string, k: number): { kind: 'int8' | 'bf16' | 'f32'; block: number } {
  const kEven = k + (k & 1);
  if (name === 'int8' || name === 'int8z') return kEven % 4 === 0 ? { kind: 'int8', block: gcd(ACT_BLOCK, kEven) } : { kind: 'f32', block: 0 };
  if (name.startsWith('int4')) return { kind: 'int8', block: gcd(ACT_BLOCK, Number(name.split('/')[1])) };
  if (name === 'mxfp4') return { kind: 'int8', block: 32 };
  return { kind: name.startsWith('fp8') ? 'bf16' : 'f32', block: 0 };
}

/** x [m, k] as a weight built as `name` reads it (fast or reference mode), float64. */
function activationsFor(name: string, x: ArrayLike<number>, m: number, k: number, fast: boolean): Float64Array {
  const { kind: a, block } = fast ? fastActivations(name, k) : { kind: 'f32', block: 0 };
  if (a === 'int8') return quantizeRowsI8(x, m, k, block);
  return Float64Array.from({ length: m * k }, (_, i) => (a === 'bf16' ? roundBf16(x[i]!) : x[i]!));
}

test('FP8 checkpoint data is kept as codes x block scale, ragged edge blocks included', () => {
  const rand = rng();
  // 37 x 300 with 16 x 128 blocks: 3 x 3 scales, the last row and column blocks partial.
  const n = 37, k = 300, br = 16, bc = 128;
  const codes = new Uint8Array(n * k);
  for (let i = 0; i < codes.length; i++) {
    let c = Math.floor(rand() * 256);
    if ((c & 0x7f) === 0x7f) c = 0x7e;  // no NaN codes in real weights
    codes[i] = c;
  }
  const scale = new Float32Array(Math.ceil(n / br) * Math.ceil(k / bc)).map(() => rand() * 0.01 + 1e-4);
  const w = native.packFp8(codes, scale, n, k, br, bc);
  assert.equal(w.quant, 'fp8');
  assert.ok(w.sizeBytes < n * k * 2, `fp8 holds fewer bytes than bf16: ${w.sizeBytes}`);
  for (let r = 0; r < n; r++)
    for (let c = 0; c < k; c++) {
      const want = f32(e4m3(codes[r * k + c]!) * scale[Math.floor(r / br) * 3 + Math.floor(c / bc)]!);
      const got = native.packedWeightAt(w, r, c);
      if (got !== want) assert.fail(`(${r}, ${c}) code ${codes[r * k + c]}: ${got} != ${want}`);
    }
  w.dispose();
});

test('MXFP4 checkpoint data is kept as e2m1 x 2^(e8m0 - 127), gate_up halves apart', () => {
  const rand = rng();
  const n = 20, k = 96;
  const mk = () => {
    const blocks = new Uint8Array(n * k / 2).map(() => Math.floor(rand() * 256));
    const scales = new Uint8Array(n * k / 32).map(() => 115 + Math.floor(rand() * 20));
    return { blocks, scales };
  };
  const g = mk(), u = mk();
  const value = (h: { blocks: Uint8Array; scales: Uint8Array }, r: number, c: number) => {
    const byte = h.blocks[(r * k + c) >> 1]!;
    return e2m1(c & 1 ? byte >> 4 : byte & 0xf) * 2 ** (h.scales[r * (k / 32) + Math.floor(c / 32)]! - 127);
  };
  const w = native.packMxfp4(g.blocks, g.scales, n, k, u.blocks, u.scales);
  assert.equal(w.kind, 'gate_up');
  assert.equal(w.quant, 'mxfp4');
  for (let r = 0; r < 2 * n; r++)
    for (let c = 0; c < k; c++) {
      const want = r < n ? value(g, r, c) : value(u, r - n, c);
      assert.equal(native.packedWeightAt(w, r, c), want, `(${r}, ${c})`);
    }
  w.dispose();
  assert.throws(() => native.packMxfp4(g.blocks, g.scales, n, 40), /multiple of 32/);
});

test('--quantize formats: scales from the absmax (int4: rounded to bf16), every value within half a step', () => {
  const rand = rng();
  const n = 33, k = 200;
  const src = uniform(rand, n * k, 0.5);
  for (const [format, group, qmax] of [['int8', 0, 127], ['int4', 32, 7], ['int4', 128, 7]] as const) {
    const w = native.packWeight(src, 'f32', n, k, format, group);
    const g = group === 0 ? k : group;
    for (let r = 0; r < n; r++)
      for (let c0 = 0; c0 < k; c0 += g) {
        let amax = 0;
        for (let c = c0; c < Math.min(k, c0 + g); c++) amax = Math.max(amax, Math.abs(src[r * k + c]!));
        // int4 holds its scales in bf16, rounded before the codes are (ops.h ScaleType).
        const step = format === 'int4' ? bf16ToF32(f32ToBf16(f32(amax / qmax))) : f32(amax / qmax);
        for (let c = c0; c < Math.min(k, c0 + g); c++) {
          const got = native.packedWeightAt(w, r, c);
          const code = got / step;
          assert.ok(Math.abs(code - Math.round(code)) < 1e-3 && Math.abs(code) <= qmax + 1e-3,
            `${format}/${group} (${r}, ${c}): ${got} is not a code times ${step}`);
          assert.ok(Math.abs(got - src[r * k + c]!) <= step / 2 * (1 + 1e-5) + 1e-12,
            `${format}/${group} (${r}, ${c}): |${got} - ${src[r * k + c]}| > step/2`);
        }
      }
    w.dispose();
  }
  // fp8: per 128 x 128 block, scale absmax/448; values are e4m3 codes times it, to 2^-4 relative.
  const w = native.packWeight(src, 'f32', n, k, 'fp8', 128);
  for (let r = 0; r < n; r++)
    for (let c = 0; c < k; c++) {
      let amax = 0;
      const c0 = Math.floor(c / 128) * 128;
      for (let rr = 0; rr < n; rr++)
        for (let cc = c0; cc < Math.min(k, c0 + 128); cc++) amax = Math.max(amax, Math.abs(src[rr * k + cc]!));
      const got = native.packedWeightAt(w, r, c), v = src[r * k + c]!;
      assert.ok(Math.abs(got - v) <= Math.max(Math.abs(v) * 2 ** -4, f32(amax / 448) * 2 ** -9 * 1.01),
        `fp8 (${r}, ${c}): ${got} vs ${v}`);
    }
  w.dispose();
});

/**
 * A checkpoint-style int weight with zero points (AWQ, asymmetric GPTQ): random codes, scales exact
 * in the held dtype (int4: f16, as AWQ stores them) and zero points, value = (code - zero) * scale;
 * with gateUp, a gate_up weight of two such halves of n rows each.
 */
function packIntZ(rand: () => number, n: number, k: number, bits: 4 | 8, group: number, gateUp = false): PackedWeight {
  const groups = group ? Math.ceil(k / group) : 1;
  const half = () => ({
    codes: Int8Array.from({ length: n * k }, () => Math.floor(rand() * (bits === 4 ? 16 : 256)) - (bits === 4 ? 8 : 128)),
    scales: Float32Array.from({ length: n * groups }, () => (256 + Math.floor(rand() * 768)) / 2 ** (bits === 4 ? 14 : 17)),
    zeros: Int8Array.from({ length: n * groups }, () => Math.floor(rand() * (bits === 4 ? 16 : 41)) - (bits === 4 ? 8 : 20)),
  });
  const g = half(), u = gateUp ? half() : null;
  return native.packInt(g.codes, g.scales, n, k, bits === 4 ? 'int4' : 'int8', group, u?.codes ?? null, u?.scales ?? null,
    bits === 4 ? 'f16' : 'f32', g.zeros, u?.zeros ?? null);
}
/** The bits and group of a packIntZ build's name ('int8z', 'int4z/32'), or null. */
function zeroPointBuild(name: string): { bits: 4 | 8; group: number } | null {
  if (name === 'int8z') return { bits: 8, group: 0 };
  return name.startsWith('int4z/') ? { bits: 4, group: Number(name.split('/')[1]) } : null;
}

// Every format as the GEMMs see it: a weight of [n, k] made by the given builder.
type Build = (rand: () => number, n: number, k: number) => PackedWeight;
const BUILDS: [string, Build][] = [
  // Zero points (the epilogue's term): int8 per row, int4 in groups of 32 and 128 with f16 scales.
  ['int8z', (rand, n, k) => packIntZ(rand, n, k, 8, 0)],
  ['int4z/32', (rand, n, k) => packIntZ(rand, n, k, 4, 32)],
  ['int4z/128', (rand, n, k) => packIntZ(rand, n, k, 4, 128)],
  ['int8', (rand, n, k) => native.packWeight(uniform(rand, n * k), 'f32', n, k, 'int8', 0)],
  ['int4/32', (rand, n, k) => native.packWeight(uniform(rand, n * k), 'f32', n, k, 'int4', 32)],
  ['int4/128', (rand, n, k) => native.packWeight(uniform(rand, n * k), 'f32', n, k, 'int4', 128)],
  // Activation blocks of 8 (gcd(128, 24)): the int8 kernels' loops of a length known only at run
  // time, and their 8-k tails.
  ['int4/24', (rand, n, k) => native.packWeight(uniform(rand, n * k), 'f32', n, k, 'int4', 24)],
  ['fp8', (rand, n, k) => native.packWeight(uniform(rand, n * k), 'f32', n, k, 'fp8', 128)],
  // e4m3 codes of exponents 0 to 3, half of them 0 (zero and the subnormals, which the fast kernel
  // fixes up after its shift-and-mask decode), so that they weigh in the outputs; both signs, 64 x
  // 64 blocks (ragged at both edges). The 'fp8' weights above span the large exponents.
  ['fp8/codes', (rand, n, k) => {
    const codes = new Uint8Array(n * k).map(() => {
      const c = Math.floor(rand() * 256);
      return rand() < 0.5 ? c & 0x87 : (c & 0x9f) | ((c & 0x18) === 0 ? 0x08 : 0);
    });
    const scale = new Float32Array(Math.ceil(n / 64) * Math.ceil(k / 64)).map(() => 1e-3 + rand() * 1e-2);
    return native.packFp8(codes, scale, n, k, 64, 64);
  }],
  ['mxfp4', (rand, n, k) => {
    const kk = Math.ceil(k / 32) * 32;  // MXFP4 needs k % 32 == 0
    const blocks = new Uint8Array(n * kk / 2).map(() => Math.floor(rand() * 256));
    const scales = new Uint8Array(n * kk / 32).map(() => 120 + Math.floor(rand() * 8));
    return native.packMxfp4(blocks, scales, n, kk);
  }],
];

function denseCase(name: string, build: Build, m: number, n: number, k: number, fast: boolean,
                   tag = ''): void {
  const rand = rng();
  const w = build(rand, n, k);
  const kk = w.k;
  // Outliers in some rows: the per-row int8 scale follows each row's own maximum.
  const x = uniform(rand, m * kk);
  for (let r = 1; r < m; r += 3) x[r * kk + Math.floor(rand() * kk)] = 20 * (rand() - 0.5);
  // Row 2 repeats row 1 (as a decode token's copies after the permute): int8 activations copy the
  // row before's codes (quantize_rows_i8).
  if (m >= 3) x.copyWithin(2 * kk, kk, 2 * kk);
  const bias = uniform(rand, n);
  const y = new Float32Array(m * n).fill(NaN);
  native.denseGemm(x, m, w, y, bias, false, fast);
  const ref = refGemm(activationsFor(name, x, m, kk, fast), m, dequantised(w), n, kk, false);
  for (let r = 0; r < m; r++) for (let j = 0; j < n; j++) ref[r * n + j] += bias[j]!;
  compare(y, ref, TOL, `${name} dense m=${m} n=${n} k=${kk} fast=${fast}${tag}`);
  if (m >= 3) assert.deepEqual(y.subarray(2 * n, 3 * n), y.subarray(n, 2 * n), `${name} dense: a repeated row's outputs${tag}`);
  // NOTE (determinism): a row alone gives the bits it gives inside the batch.
  if (m > 1) {
    const r = m - 1, one = new Float32Array(n);
    native.denseGemm(x.subarray(r * kk, (r + 1) * kk), 1, w, one, bias, false, fast);
    assert.deepEqual(one, y.subarray(r * n, (r + 1) * n), `${name} dense row ${r} alone${tag}`);
  }
  w.dispose();
}

// Ragged shapes: n not a multiple of 16; k odd, k % 4 == 2 (int8 keeps f32 activations), k % 4 ==
// 0 but not % 16 or % 32 (int8 k steps of 4; int4 groups padded), rows past the 6-row tile, and
// 50 rows: fp8 from 48 rows decodes a task's blocks once (run_tiles: to bf16 pairs), and the last
// row alone (decoded in registers) must give the same bits.
const DENSE_SHAPES = [[1, 16, 64], [7, 37, 130], [13, 50, 257], [1, 300, 512], [9, 33, 36], [2, 20, 132], [50, 40, 260]] as const;

test('denseGemm on quantized weights matches float64 over the dequantised values', () => {
  for (const [name, build] of BUILDS)
    for (const fast of [false, true])
      for (const [m, n, k] of DENSE_SHAPES) denseCase(name, build, m, n, k, fast);
});

test('denseGemm on quantized weights: every dispatch level matches float64 too', () => {
  forEachLevel((level) => {
    if (level === 'auto') return;  // the test above
    for (const [name, build] of BUILDS)
      for (const fast of [false, true])
        for (const [m, n, k] of [[1, 16, 64], [7, 37, 130], [9, 33, 36]] as const)
          denseCase(name, build, m, n, k, fast, ` level=${level}`);
  });
});

test('int4 scales held in bf16 / f16 / f32: the same values, half the scale bytes, the same bits from every kernel', () => {
  const rand = rng();
  const n = 48, k = 256;  // rows a multiple of 16: no padding rows in the byte counts
  for (const group of [32, 128]) {
    const groups = k / group;
    const codes = Int8Array.from({ length: n * k }, () => Math.floor(rand() * 16) - 8);
    // Scales exact in bf16 and in f16 alike (8 significant bits, inside f16's normal range), and
    // ones exact in f16 only (11 bits).
    const both = Float32Array.from({ length: n * groups }, () => (1 + Math.floor(rand() * 128) / 128) * 2 ** -(4 + Math.floor(rand() * 8)));
    const f16Only = Float32Array.from(both, (v, i) => v + 2 ** (Math.floor(Math.log2(v)) - 10) * (1 + (i % 7)));
    const wf = native.packInt(codes, both, n, k, 'int4', group, null, null, 'f32');
    const wb = native.packInt(codes, both, n, k, 'int4', group, null, null, 'bf16');
    const wh = native.packInt(codes, f16Only, n, k, 'int4', group, null, null, 'f16');
    const wh32 = native.packInt(codes, f16Only, n, k, 'int4', group, null, null, 'f32');
    try {
      const codeBytes = n * k / 2;
      assert.equal(wf.sizeBytes, codeBytes + n * groups * 4);
      assert.equal(wb.sizeBytes, codeBytes + n * groups * 2, 'bf16 scales: two bytes each');
      assert.equal(wh.sizeBytes, codeBytes + n * groups * 2, 'f16 scales: two bytes each');
      for (let r = 0; r < n; r++)
        for (let c = 0; c < k; c++) {
          assert.equal(native.packedWeightAt(wb, r, c), native.packedWeightAt(wf, r, c));
          assert.equal(native.packedWeightAt(wh, r, c), codes[r * k + c]! * f16Only[r * groups + Math.floor(c / group)]!);
        }
      forEachLevel((level) => {
        for (const fast of [false, true])
          for (const m of [1, 5]) {
            const x = uniform(rand, m * k, 1);
            const run = (w: PackedWeight) => {
              const y = new Float32Array(m * n);
              native.denseGemm(x, m, w, y, null, false, fast);
              return y;
            };
            const label = `g${group} ${level} fast=${fast} m=${m}`;
            assert.deepEqual(run(wb), run(wf), `${label}: bf16 scales give f32 scales' bits`);
            assert.deepEqual(run(wh), run(wh32), `${label}: f16 scales give f32 scales' bits`);
          }
      });
    } finally {
      for (const w of [wf, wb, wh, wh32]) w.dispose();
    }
    // A scale the dtype cannot hold is refused, naming it; int8 keeps f32.
    assert.throws(() => native.packInt(codes, f16Only, n, k, 'int4', group, null, null, 'bf16'), /not a bf16 number/);
    assert.throws(() => native.packInt(codes, Float32Array.from(both, (v) => v * 2 ** -20), n, k, 'int4', group, null, null, 'f16'), /not a f16 number/);
  }
  assert.throws(() => native.packInt(new Int8Array(16 * 32), new Float32Array(16), 16, 32, 'int8', 0, null, null, 'bf16'), /int8 weights keep f32 scales/);
  assert.throws(() => native.packInt(new Int8Array(16 * 32), new Float32Array(16), 16, 32, 'int4', 32, null, null, 'f8' as 'f16'), /scaleDtype must be/);
});

test('fast mode runs int8 activations on the int8 dot-product kernels where the CPU has them', () => {
  const caps = native.capabilities();
  assert.equal(caps.int8Dot, caps.isa.avx512vnni && caps.isa.avx512bw);
  // Large k (int32 sums of 4096 products) with codes at both ends of the range: the shifted
  // unsigned products and their correction stay exact.
  const rand = rng();
  const n = 64, k = 4096, m = 3;
  for (const [name, format, group] of [['int8', 'int8', 0], ['int4/128', 'int4', 128]] as const) {
    const src = uniform(rand, n * k);
    for (let i = 0; i < src.length; i += 7) src[i] = i % 2 ? 1 : -1;  // +-qmax codes
    const w = native.packWeight(src, 'f32', n, k, format, group);
    const x = uniform(rand, m * k);
    for (let i = 0; i < x.length; i += 5) x[i] = i % 2 ? 1 : -1;  // +-127 codes
    const y = new Float32Array(m * n);
    native.denseGemm(x, m, w, y, null, false, true);
    compare(y, refGemm(quantizeRowsI8(x, m, k, ACT_BLOCK), m, dequantised(w), n, k, false), TOL, `${name} k=${k}`);
    w.dispose();
  }
});

/** The level now in effect when `level` is asked for. */
function levelOf(level: 'avx2' | 'avx512' | 'auto'): string {
  try {
    return native.setSimdLevel(level);
  } finally {
    native.setSimdLevel('auto');
  }
}
const NO_AVX2_AND_512 = levelOf('avx2') === 'avx2' && levelOf('avx512') !== 'avx2' && native.capabilities().isa.avx512f ? false
  : `this CPU lacks AVX2 or AVX-512 (simd ${native.capabilities().simd}): nothing to compare the AVX2 kernels with`;

test('the AVX2 kernels give the AVX-512 kernels\' bits (f32, int8 and fast fp8\'s bf16 activations)', { skip: NO_AVX2_AND_512 }, () => {
  const rand = rng();
  // m: row tiles of 1, 2 (decode's few rows per expert: one block per pass on AVX2), 6 + 3.
  const n = 70;
  // bf16 weights from random bit patterns' top halves (any bf16 value but NaN and inf).
  const bf16 = (r: () => number, nn: number, kk: number) =>
    native.packWeight(new Uint16Array(nn * kk).map(() => (Math.floor(r() * 0x10000) & 0xbfff) | 0x3000), 'bf16', nn, kk);
  const builds: [string, Build][] = [
    ['f32', (r, nn, kk) => native.packWeight(uniform(r, nn * kk), 'f32', nn, kk)],
    ['bf16', bf16],
    ...BUILDS,
  ];
  // k = 288: int8 activations for int8 too; 290: int8 keeps f32 ones (k % 4 == 2), ragged fp8 chunks.
  for (const k of [288, 290]) for (const [name, build] of builds) for (const m of [1, 2, 9]) {
    const w = build(rand, n, k);
    const x = uniform(rand, m * w.k);
    // Reference mode: f32 activations on Avx512 / Avx2; fast int8 and int4: Vnni (or ScalarI8) /
    // Avx2I8; fast fp8: Bf16Dot / Avx2F8 (vdpbf16ps's sums, FMA by FMA).
    for (const [fast, other] of [[false, 'avx512'], [true, 'auto']] as const) {
      const int8Acts = name.startsWith('int') || name === 'mxfp4';
      if (fast && !int8Acts && !name.startsWith('fp8')) continue;
      if (fast && name.startsWith('fp8') && !native.capabilities().bf16Dot) continue;
      const run = (level: 'avx2' | 'avx512' | 'auto') => {
        native.setSimdLevel(level);
        try {
          const y = new Float32Array(m * w.n);
          native.denseGemm(x, m, w, y, null, false, fast);
          return y;
        } finally {
          native.setSimdLevel('auto');
        }
      };
      if (fast && int8Acts && !native.capabilities().int8Dot) continue;  // ScalarI8 rounds its per-block FMA in two steps
      assert.deepEqual(run('avx2'), run(other), `${name} k=${k} m=${m} fast=${fast}: avx2 vs ${other}`);
    }
    w.dispose();
  }
});

test('groupGemmFfn with quantized experts (and a bf16 one beside them) matches float64', () => {
  const run = () => {
    for (const [name, build] of BUILDS) {
      const rand = rng();
      const e = 4, h = name === 'mxfp4' ? 96 : 72, inter = name === 'mxfp4' ? 64 : 40;
      const table = new native.ExpertTable(e, h, inter);
      const experts: { gate: Float64Array; up: Float64Array; down: Float64Array }[] = [];
      for (let i = 0; i < e; i++) {
        let gu: PackedWeight, dn: PackedWeight;
        if (i === 3) {  // a plain f32 expert in the same call
          gu = native.packGateUp(uniform(rand, inter * h), uniform(rand, inter * h), 'f32', inter, h);
          dn = native.packWeight(uniform(rand, h * inter), 'f32', h, inter);
        } else if (zeroPointBuild(name)) {
          const z = zeroPointBuild(name)!;
          gu = packIntZ(rand, inter, h, z.bits, z.group, true);
          dn = build(rand, h, inter);
        } else if (name === 'mxfp4') {
          const half = () => ({
            b: new Uint8Array(inter * h / 2).map(() => Math.floor(rand() * 256)),
            s: new Uint8Array(inter * h / 32).map(() => 120 + Math.floor(rand() * 6)),
          });
          const g = half(), u = half();
          gu = native.packMxfp4(g.b, g.s, inter, h, u.b, u.s);
          dn = build(rand, h, inter);
        } else {
          const fmt = name.split('/')[0] as QuantFormat;
          const group = name === 'int8' ? 0 : name.startsWith('int4/') ? Number(name.split('/')[1]) : 128;
          gu = native.packGateUp(uniform(rand, inter * h), uniform(rand, inter * h), 'f32', inter, h, fmt, group);
          dn = build(rand, h, inter);
        }
        const d = dequantised(gu);
        experts.push({ gate: d.subarray(0, inter * h), up: d.subarray(inter * h), down: dequantised(dn) });
        table.set(i, gu, dn);
        gu.dispose();
        dn.dispose();
      }
      const counts = [3, 0, 9, 2];
      const offsets = new Int32Array(e + 1);
      for (let i = 0; i < e; i++) offsets[i + 1] = offsets[i]! + counts[i]!;
      const rows = offsets[e]!;
      const x = uniform(rand, rows * h);
      for (const fast of [false, true]) {
        const y = new Float32Array(rows * h).fill(NaN);
        native.groupGemmFfn(x, offsets, table, y, fast);
        const ref = new Float64Array(rows * h);
        for (let i = 0; i < e; i++) {
          const r0 = offsets[i]!, r1 = offsets[i + 1]!;
          if (r1 === r0) continue;
          // The f32 expert in fast mode rounds nothing (only bf16 and fp8 weights round activations).
          const fmt = i === 3 ? 'f32' : name;
          const gateFmt = i !== 3 && name === 'mxfp4' ? 'mxfp4' : fmt;
          const xs = activationsFor(gateFmt, x.subarray(r0 * h, r1 * h), r1 - r0, h, fast);
          const g = refGemm(xs, r1 - r0, experts[i]!.gate, inter, h, false);
          const u = refGemm(xs, r1 - r0, experts[i]!.up, inter, h, false);
          const hh = activationsFor(fmt, g.map((v, j) => silu(v) * u[j]!), r1 - r0, inter, fast);
          ref.set(refGemm(hh, r1 - r0, experts[i]!.down, h, inter, false), r0 * h);
        }
        compare(y, ref, fast && name !== 'mxfp4' ? TOL_FFN_FAST : TOL, `${name} ffn fast=${fast}`);
      }
      table.dispose();
    }
  };
  forEachLevel(run);
});

test('groupGemmFfn with quantized experts: a decode-sized call (one job) gives a big batch\'s bits (two jobs), on 1 or 2 threads', () => {
  // Up to 64 Ki rows x inter the two phases run as one job (each expert's down items wait for its
  // own gate/up items); above it, as two jobs with h quantized on the pool between them. A row's
  // arithmetic is the same in both.
  const withThreads = (t: number, fn: () => void) => {
    const before = native.capabilities().threads;
    native.setNumThreads(t);
    try { fn(); } finally { native.setNumThreads(before); }
  };
  for (const [name, build] of BUILDS.filter(([b]) => ['int8', 'int4/32', 'fp8', 'mxfp4', 'int8z', 'int4z/128'].includes(b))) {
    const rand = rng();
    const e = 4, h = 64, inter = 64;
    const table = new native.ExpertTable(e, h, inter);
    for (let i = 0; i < e; i++) {
      const z = zeroPointBuild(name);
      const gu = z ? packIntZ(rand, inter, h, z.bits, z.group, true) : name === 'mxfp4'
        ? native.packMxfp4(new Uint8Array(inter * h / 2).map(() => Math.floor(rand() * 256)), new Uint8Array(inter * h / 32).fill(124),
          inter, h, new Uint8Array(inter * h / 2).map(() => Math.floor(rand() * 256)), new Uint8Array(inter * h / 32).fill(125))
        : native.packGateUp(uniform(rand, inter * h), uniform(rand, inter * h), 'f32', inter, h,
          name.split('/')[0] as QuantFormat, name === 'int8' ? 0 : name === 'fp8' ? 128 : 32);
      const dn = build(rand, h, inter);
      table.set(i, gu, dn);
      gu.dispose();
      dn.dispose();
    }
    const counts = [700, 1, 0, 400];  // 1101 rows x 64 > 64 Ki: the two-job path
    const offsets = new Int32Array(e + 1);
    for (let i = 0; i < e; i++) offsets[i + 1] = offsets[i]! + counts[i]!;
    const rows = offsets[e]!;
    const x = uniform(rand, rows * h);
    for (const fast of [false, true]) {
      const big = new Float32Array(rows * h);
      native.groupGemmFfn(x, offsets, table, big, fast);
      for (const threads of [1, 2]) {
        withThreads(threads, () => {
          // Three rows of three experts in one decode-sized call, and one row alone.
          const pick = [5, 700, 1100];
          const xs = new Float32Array(3 * h);
          pick.forEach((r, j) => xs.set(x.subarray(r * h, (r + 1) * h), j * h));
          const small = new Float32Array(3 * h);
          native.groupGemmFfn(xs, new Int32Array([0, 1, 2, 2, 3]), table, small, fast);
          pick.forEach((r, j) => assert.deepEqual(small.subarray(j * h, (j + 1) * h), big.subarray(r * h, (r + 1) * h),
            `${name} fast=${fast} threads=${threads} row ${r}`));
          const one = new Float32Array(h);
          native.groupGemmFfn(x.subarray(0, h), new Int32Array([0, 1, 1, 1, 1]), table, one, fast);
          assert.deepEqual(one, big.subarray(0, h), `${name} fast=${fast} threads=${threads} row 0 alone`);
        });
      }
    }
    table.dispose();
  }
});

test('a quantized expert slot re-quantizes what repackInto gives it', () => {
  const rand = rng();
  const n = 24, k = 64;
  const a = uniform(rand, n * k), b = uniform(rand, n * k, 3);
  const w = native.packWeight(a, 'f32', n, k, 'int8', 0);
  native.repackInto(w, b, 'f32');
  const fresh = native.packWeight(b, 'f32', n, k, 'int8', 0);
  assert.deepEqual(dequantised(w), dequantised(fresh));
  w.dispose();
  fresh.dispose();
});

test('bad quantization arguments are refused with a reason', () => {
  const src = new Float32Array(32 * 64);
  assert.throws(() => native.packWeight(src, 'f32', 32, 64, 'int3' as QuantFormat, 32), /format must be/);
  assert.throws(() => native.packWeight(src, 'f32', 32, 64, 'int4', 31), /group 31 must be even/);
  assert.throws(() => native.packFp8(new Uint8Array(10), new Float32Array(1), 32, 64, 128, 128), /codes/);
});
