// Element types of the paged KV cache (--kv-cache-dtype): sizes, the arrays that hold them, and the
// scalar conversions the kernels use (f32 -> bf16 / fp8 e4m3 and back), for references and the emulator.
import { loadNative, type KvArray } from '../native/index.js';

export type { KvArray };
export type KvDtype = 'f32' | 'bf16' | 'fp8';
export const KV_DTYPES: readonly KvDtype[] = ['f32', 'bf16', 'fp8'];

export function kvDtypeBytes(d: KvDtype): number {
  return d === 'f32' ? 4 : d === 'bf16' ? 2 : 1;
}

/**
 * `auto` follows the compute mode: f32 in the reference mode (outputs stay exact), bf16 in the fast
 * mode (what vLLM and SGLang keep by default).
 */
export function resolveKvDtype(flag: string, computeDtype: 'f32' | 'bf16'): KvDtype {
  if (flag === 'auto') return computeDtype === 'f32' ? 'f32' : 'bf16';
  if ((KV_DTYPES as readonly string[]).includes(flag)) return flag as KvDtype;
  throw new RangeError(`--kv-cache-dtype is '${flag}', expected auto, f32, bf16 or fp8`);
}

export function allocKvArray(d: KvDtype, elements: number): KvArray {
  return kvView(d, new ArrayBuffer(elements * kvDtypeBytes(d)));
}

function kvView(d: KvDtype, buf: ArrayBuffer): KvArray {
  return d === 'f32' ? new Float32Array(buf) : d === 'bf16' ? new Uint16Array(buf) : new Uint8Array(buf);
}

/**
 * A cache array in native memory (allocHostBuffer: on 2 MiB pages where the kernel lends them, as the
 * weights; a decode's attention reads its sequence's blocks scattered over the whole cache).
 */
export function allocHostKvArray(d: KvDtype, elements: number): KvArray {
  return kvView(d, loadNative().allocHostBuffer(elements * kvDtypeBytes(d)));
}

/** The dtype an array holds (by its element type). */
export function kvDtypeOf(a: KvArray): KvDtype {
  return a instanceof Float32Array ? 'f32' : a instanceof Uint16Array ? 'bf16' : 'fp8';
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** f32 -> bf16 bits, round to nearest even (NaN stays NaN), as the native f32_to_bf16. */
export function f32ToBf16(x: number): number {
  f32[0] = x;
  const u = u32[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16ToF32(h: number): number {
  u32[0] = (h & 0xffff) << 16;
  return f32[0]!;
}

/**
 * f32 -> fp8 e4m3fn bits, round to nearest even, saturating to +-448 (never the NaN code 0x7f),
 * as the native f32_to_fp8_e4m3 (the stored value is e4m3(x / scale)).
 */
export function f32ToFp8(x: number): number {
  f32[0] = x;
  const u = u32[0]!;
  const sign = (u >>> 24) & 0x80;
  const abs = u & 0x7fffffff;
  if (abs > 0x7f800000) return sign | 0x7f;
  if (abs >= 0x43e00000) return sign | 0x7e;
  if (abs < 0x3c800000) {
    u32[0] = abs;
    const scaled = f32[0]! * 512; // exact, < 8
    let r = Math.floor(scaled);
    const rem = scaled - r;
    if (rem > 0.5 || (rem === 0.5 && (r & 1))) r++;
    return sign | r;
  }
  const exp = (abs >>> 23) - 127 + 7;
  let h = (exp << 3) | ((abs >>> 20) & 7);
  const rest = abs & 0xfffff;
  if (rest > 0x80000 || (rest === 0x80000 && (h & 1))) h++;
  if (h > 0x7e) h = 0x7e;
  return sign | h;
}

/** fp8 e4m3fn bits -> value (exact; 0x7f / 0xff are NaN). */
export function fp8ToF32(b: number): number {
  const sign = b & 0x80 ? -1 : 1;
  const exp = (b >>> 3) & 0xf;
  const mant = b & 7;
  if (exp === 0xf && mant === 7) return NaN;
  if (exp === 0) return sign * mant * 2 ** -9;
  return sign * (1 + mant / 8) * 2 ** (exp - 7);
}

/** f32 rounding of a * b (what the kernels compute for e4m3 value x scale). */
export function mulF32(a: number, b: number): number {
  return Math.fround(Math.fround(a) * Math.fround(b));
}

/**
 * Stores x (an f32 value) in a cache element of type d: the f32 itself, its bf16 bits, or
 * e4m3(x / scale) (the division rounded to f32 first, as in the kernels).
 */
export function kvEncode(d: KvDtype, x: number, scale = 1): number {
  if (d === 'f32') return Math.fround(x);
  if (d === 'bf16') return f32ToBf16(x);
  return f32ToFp8(Math.fround(Math.fround(x) / Math.fround(scale)));
}

/** The f32 value a cache element of type d holds (fp8: e4m3 x scale rounded to f32). */
export function kvDecode(d: KvDtype, e: number, scale = 1): number {
  if (d === 'f32') return e;
  if (d === 'bf16') return bf16ToF32(e);
  return mulF32(fp8ToF32(e), scale);
}
