// Embedding gather and dtype conversions (f32/bf16/f16 both ways, fp8 e4m3 block dequant),
// bit-exact against conversions written from the IEEE definitions, special values included.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import type { DType } from '../src/native/index.js';
import {
  bf16ToF32, bitsF32, bothSimd, bothThreadCounts, f16ToF32, f32Bits, f32ToBf16, f32ToF16,
  fp8E4m3ToF32, nanF32, native, rng, uniform,
} from './helpers/ops-ref.js';

/** f32 values that stress rounding: specials, denormals, halfway cases, f16 limits, randoms. */
function nastyF32(n: number, r: () => number): Float32Array {
  const special = [0, -0, Infinity, -Infinity, NaN, 1, -1, 65504, 65519.99, 65520, -65520, 1e-40, -1e-42,
    2 ** -24, 2 ** -25, 1.5 * 2 ** -25, 2 ** -14, 2 ** -14 - 2 ** -24, 3.4e38, 1e-8, 6.1e-5,
    bitsF32(0x3f808000), bitsF32(0x3f818000), bitsF32(0x3f808001), bitsF32(0x7f7fffff), bitsF32(0x7fa00001)];
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    if (i < special.length) x[i] = special[i]!;
    else if (i % 3 === 0) x[i] = bitsF32((r() * 2 ** 32) >>> 0);  // any bit pattern
    else x[i] = (r() * 2 - 1) * 2 ** Math.floor(r() * 40 - 20);
  }
  return x;
}

// 16-bit to 16-bit goes through f32. A JS NaN cannot carry sign or payload, so NaNs are
// written from the bits: f16 NaN -> f32 keeps sign and payload (mant << 13), bf16 rounding sets
// the quiet bit; any NaN -> f16 is the canonical sign | 0x7e00.
function f16ToBf16Ref(h: number): number {
  if ((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0) return (h & 0x8000) | 0x7fc0 | ((h & 0x3ff) >> 3);
  return f32ToBf16(f16ToF32(h));
}

function bf16ToF16Ref(h: number): number {
  if ((h & 0x7f80) === 0x7f80 && (h & 0x7f) !== 0) return (h & 0x8000) | 0x7e00;
  return f32ToF16(bf16ToF32(h));
}

function sameBits(got: ArrayLike<number>, want: ArrayLike<number>, label: string): void {
  for (let i = 0; i < want.length; i++)
    if (got[i] !== want[i]) assert.fail(`${label}[${i}]: got 0x${got[i]!.toString(16)}, expected 0x${want[i]!.toString(16)}`);
}

function sameF32(got: Float32Array, want: ArrayLike<number>, label: string): void {
  for (let i = 0; i < want.length; i++) {
    const ok = Number.isNaN(want[i]) ? Number.isNaN(got[i]) : Object.is(got[i], Math.fround(want[i]!));
    if (!ok) assert.fail(`${label}[${i}]: got ${got[i]}, expected ${want[i]}`);
  }
}

test('convert: f32 <-> bf16 <-> f16 in every direction, bit-exact, both SIMD levels', () => {
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const n of [1, 15, 16, 17, 1000, 70_001]) {
        const label = `${level}/${threads} n${n}`;
        const x = nastyF32(n, rng(n));
        const bf = new Uint16Array(n).fill(0xdead);
        const hf = new Uint16Array(n).fill(0xdead);
        native.convert(x, 'f32', bf, 'bf16');
        native.convert(x, 'f32', hf, 'f16');
        sameBits(bf, Array.from(x, f32ToBf16), `${label} f32->bf16`);
        sameBits(hf, Array.from(x, f32ToF16), `${label} f32->f16`);
        const back = nanF32(n);
        native.convert(bf, 'bf16', back, 'f32');
        sameF32(back, Array.from(bf, bf16ToF32), `${label} bf16->f32`);
        native.convert(hf, 'f16', back, 'f32');
        sameF32(back, Array.from(hf, f16ToF32), `${label} f16->f32`);
        const b2h = new Uint16Array(n).fill(0xdead);
        native.convert(bf, 'bf16', b2h, 'f16');
        sameBits(b2h, Array.from(bf, bf16ToF16Ref), `${label} bf16->f16`);
        const h2b = new Uint16Array(n).fill(0xdead);
        native.convert(hf, 'f16', h2b, 'bf16');
        sameBits(h2b, Array.from(hf, f16ToBf16Ref), `${label} f16->bf16`);
        const same = new Uint16Array(n);
        native.convert(bf, 'bf16', same, 'bf16');
        assert.deepEqual(same, bf);
      }
    });
  });
  // every f16 bit pattern through f32 and back is the identity (NaNs become canonical)
  const all = Uint16Array.from({ length: 65536 }, (_, i) => i);
  const f = new Float32Array(65536);
  const back = new Uint16Array(65536);
  bothSimd((level) => {
    native.convert(all, 'f16', f, 'f32');
    native.convert(f, 'f32', back, 'f16');
    for (let i = 0; i < 65536; i++) {
      const isNan = (i & 0x7c00) === 0x7c00 && (i & 0x3ff) !== 0;
      const want = isNan ? (i & 0x8000) | 0x7e00 : i;
      if (back[i] !== want) assert.fail(`${level}: f16 0x${i.toString(16)} -> ${f[i]} -> 0x${back[i]!.toString(16)}`);
    }
  });
});

test('convert: bad arguments', () => {
  assert.throws(() => native.convert(new Float32Array(4), 'f32', new Uint16Array(3), 'bf16'),
    { name: 'RangeError', message: 'dst.length is 3, expected at least 4' });
  assert.throws(() => native.convert(new Uint16Array(4), 'f32', new Uint16Array(4), 'bf16'),
    { name: 'TypeError', message: 'src must be a Float32Array' });
  assert.throws(() => native.convert(new Float32Array(4), 'f32', new Float32Array(4), 'bf16'),
    { name: 'TypeError', message: 'dst must be a Uint16Array' });
  assert.throws(() => native.convert(new Float32Array(4), 'f64' as DType, new Float32Array(4), 'f32'),
    { name: 'TypeError', message: "srcDtype is 'f64', expected 'f32', 'bf16' or 'f16'" });
});

test('embedding: rows of f32/bf16/f16 tables, exact, repeated and boundary ids', () => {
  const r = rng(1000);
  const cases: { dtype: DType; v: number; h: number; t: number; table: Float32Array | Uint16Array;
    ids: Int32Array; want: Float64Array }[] = [];
  for (const dtype of ['f32', 'bf16', 'f16'] as const) {
    for (const [v, h, t] of [[1, 1, 1], [10, 7, 5], [4000, 64, 33], [64, 4096, 20]] as const) {
      const src = uniform(v * h, r, 3);
      const enc = dtype === 'bf16' ? f32ToBf16 : f32ToF16;
      const dec = dtype === 'bf16' ? bf16ToF32 : f16ToF32;
      const table = dtype === 'f32' ? src : Uint16Array.from(src, enc);
      const ids = Int32Array.from({ length: t }, (_, i) => (i === 0 ? v - 1 : i === 1 ? 0 : Math.floor(r() * v)));
      if (t > 3) ids[3] = ids[2]!;
      const want = new Float64Array(t * h);
      for (let i = 0; i < t; i++) {
        for (let c = 0; c < h; c++) {
          const j = ids[i]! * h + c;
          want[i * h + c] = table instanceof Float32Array ? table[j]! : dec(table[j]!);
        }
      }
      cases.push({ dtype, v, h, t, table, ids, want });
    }
  }
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const { dtype, v, h, t, table, ids, want } of cases) {
        const out = nanF32(t * h);
        native.embedding(table, dtype, v, h, ids, out);
        sameF32(out, want, `${level}/${threads} ${dtype} v${v} h${h} t${t}`);
      }
    });
  });
});

test('embedding: bad ids and tables', () => {
  const table = new Uint16Array(40);
  assert.throws(() => native.embedding(table, 'bf16', 10, 4, new Int32Array([1, 10]), new Float32Array(8)),
    { name: 'RangeError', message: 'ids[1] is 10, expected 0..9' });
  assert.throws(() => native.embedding(table, 'bf16', 10, 4, new Int32Array([-1]), new Float32Array(8)),
    { name: 'RangeError', message: 'ids[0] is -1, expected 0..9' });
  assert.throws(() => native.embedding(table, 'f32', 10, 4, new Int32Array([1]), new Float32Array(8)),
    { name: 'TypeError', message: 'table must be a Float32Array' });
  assert.throws(() => native.embedding(table, 'f16', 11, 4, new Int32Array([1]), new Float32Array(8)),
    { name: 'RangeError', message: 'table.length is 40, expected at least 44' });
  assert.throws(() => native.embedding(table, 'f16', 10, 4, new Int32Array([1, 2, 3]), new Float32Array(8)),
    { name: 'RangeError', message: 'out.length is 8, expected at least 12' });
});

test('dequantFp8: e4m3fn times block scale_inv, rounded to bf16, partial blocks, all 256 codes', () => {
  const r = rng(1100);
  const cases = [[1, 1, 128, 128], [300, 260, 128, 128], [7, 33, 2, 16], [256, 512, 128, 128]].map(([rows, cols, br, bc]) => {
    const src = Uint8Array.from({ length: rows! * cols! }, (_, i) => (i < 256 ? i : Math.floor(r() * 256)));
    const sc = Math.ceil(cols! / bc!);
    const scale = Float32Array.from({ length: Math.ceil(rows! / br!) * sc },
      () => Math.fround(r() * 2 ** (Math.floor(r() * 20) - 16)));
    const want = new Uint16Array(rows! * cols!);
    for (let i = 0; i < rows!; i++) {
      for (let c = 0; c < cols!; c++) {
        const s = scale[Math.floor(i / br!) * sc + Math.floor(c / bc!)]!;
        const code = src[i * cols! + c]!;
        // 0x7f/0xff are NaN; the product keeps the NaN's sign, which a JS NaN cannot carry
        want[i * cols! + c] = (code & 0x7f) === 0x7f ? (code & 0x80 ? 0xffc0 : 0x7fc0)
          : f32ToBf16(Math.fround(fp8E4m3ToF32(code) * s));
      }
    }
    return { rows: rows!, cols: cols!, br: br!, bc: bc!, src, scale, want };
  });
  bothSimd((level) => {
    bothThreadCounts((threads) => {
      for (const { rows, cols, br, bc, src, scale, want } of cases) {
        const dst = new Uint16Array(rows * cols).fill(0xdead);
        native.dequantFp8(src, scale, rows, cols, br, bc, dst);
        sameBits(dst, want, `${level}/${threads} ${rows}x${cols} blocks ${br}x${bc}`);
      }
    });
  });
});

test('dequantFp8: bad arguments', () => {
  assert.throws(() => native.dequantFp8(new Uint8Array(12), new Float32Array(3), 3, 4, 1, 2, new Uint16Array(12)),
    { name: 'RangeError', message: 'scaleInv.length is 3, expected at least 6' });
  assert.throws(() => native.dequantFp8(new Uint8Array(11), new Float32Array(6), 3, 4, 1, 2, new Uint16Array(12)),
    { name: 'RangeError', message: 'src.length is 11, expected at least 12' });
  assert.throws(() => native.dequantFp8(new Uint8Array(12), new Float32Array(6), 3, 4, 0, 2, new Uint16Array(12)),
    { name: 'RangeError', message: 'blockRows is 0, expected 1..2147483647' });
});

test('reference conversions agree with known encodings (guards the references themselves)', () => {
  assert.equal(f32ToBf16(1), 0x3f80);
  assert.equal(f32ToBf16(bitsF32(0x3f808000)), 0x3f80);  // halfway, even stays
  assert.equal(f32ToBf16(bitsF32(0x3f818000)), 0x3f82);  // halfway, odd rounds up
  assert.equal(f32ToF16(65504), 0x7bff);
  assert.equal(f32ToF16(65520), 0x7c00);
  assert.equal(f32ToF16(2 ** -24), 0x0001);
  assert.equal(f32ToF16(2 ** -25), 0x0000);
  assert.equal(f32ToF16(-(2 ** -14)), 0x8400);
  assert.equal(f16ToF32(0x3c00), 1);
  assert.equal(fp8E4m3ToF32(0x7e), 448);
  assert.equal(fp8E4m3ToF32(0x01), 2 ** -9);
  assert.ok(Number.isNaN(fp8E4m3ToF32(0xff)));
  assert.equal(f32Bits(-0), 0x80000000);
});
