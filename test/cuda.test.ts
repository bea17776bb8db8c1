// The CUDA backend (full build): every op against a float64 reference written plainly here, with
// fresh random inputs, outputs poisoned with NaN, max-abs and normalised-L2 errors under per-dtype
// tolerances. The device suite runs twice: on the real addon (skipped with a one-line reason when
// no GPU is present) and on the CPU emulator (test/helpers/cuda-emu.ts, always). The build checks
// (portable addon free of CUDA, argument errors, no abort without a device) run on the real addon.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, packageRoot } from '../src/native/index.js';
import type { CudaAddon, CudaBuffer, NativeAddon } from '../src/native/types.js';
import { mulberry32 } from '../src/engine/rng.js';
import { BatchSampler } from '../src/engine/batch-sampler.js';
import { Sampler, SamplingState } from '../src/engine/sampler.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { emulatorSkip, needsCudaDevice } from './helpers/cuda-skip.js';
import { SAMPLING_CASES } from './helpers/sampling-cases.js';
import { fileSeed } from './helpers/seed.js';

const native = loadNative();
const caps = native.capabilities();
const cu = native as NativeAddon & CudaAddon;
const skip = needsCudaDevice;

// ---------------------------------------------------------------------------------- helpers
const rng = mulberry32;
const rand = rng(fileSeed());
const uniform = (n: number, lo = -1, hi = 1) => Float32Array.from({ length: n }, () => lo + (hi - lo) * rand());

const f32b = new Float32Array(1);
const u32b = new Uint32Array(f32b.buffer);
function toBf16(v: number): number {
  f32b[0] = v;
  let u = u32b[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  u = (u + 0x7fff + ((u >>> 16) & 1)) >>> 0;
  return u >>> 16;
}
function fromBf16(h: number): number {
  u32b[0] = h << 16;
  return f32b[0]!;
}
const bf16Array = (x: Float32Array) => Uint16Array.from(x, toBf16);
// f16 as dtype.h converts it (round to nearest even, overflow to inf, subnormals kept).
function toF16(v: number): number {
  f32b[0] = v;
  const u = u32b[0]!, sign = (u >>> 16) & 0x8000, abs = u & 0x7fffffff;
  if (abs > 0x7f800000) return sign | 0x7e00;
  if (abs >= 0x477ff000) return sign | 0x7c00;
  if (abs < 0x38800000) {
    const scaled = Math.abs(f32b[0]!) * 16777216;
    let r = Math.floor(scaled);
    const rem = scaled - r;
    if (rem > 0.5 || (rem === 0.5 && (r & 1))) r++;
    return sign | r;
  }
  const mant = abs & 0x7fffff, exp = (abs >>> 23) - 127 + 15;
  let h = (exp << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1))) h++;
  return sign | h;
}
function fromF16(h: number): number {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >>> 10) & 0x1f, mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}
const bf16Round = (x: Float32Array) => Float32Array.from(x, (v) => fromBf16(toBf16(v)));

/** Upload, poisoned allocation and read-back on one backend. */
function deviceHelpers(cu: CudaAddon) {
  return {
    upload(data: ArrayBufferView): CudaBuffer {
      const b = cu.cudaBuffer(Math.max(16, data.byteLength));
      cu.cudaCopyToDevice(b, 0, data);
      return b;
    },
    /** A device buffer of n elements of `bytes` each, filled with 0xff (NaN for f32 and bf16). */
    poisoned(n: number, bytes = 4): CudaBuffer {
      const b = cu.cudaBuffer(Math.max(16, n * bytes));
      cu.cudaFill(b, 0xff);
      return b;
    },
    f32Of(b: CudaBuffer, n: number): Float32Array {
      const out = new Float32Array(n);
      cu.cudaSynchronize();
      cu.cudaCopyToHost(out, b, 0);
      return out;
    },
    i32Of(b: CudaBuffer, n: number): Int32Array {
      const out = new Int32Array(n);
      cu.cudaSynchronize();
      cu.cudaCopyToHost(out, b, 0);
      return out;
    },
    bf16Of(b: CudaBuffer, n: number): Float32Array {
      const out = new Uint16Array(n);
      cu.cudaSynchronize();
      cu.cudaCopyToHost(out, b, 0);
      return Float32Array.from(out, fromBf16);
    },
    u8Of(b: CudaBuffer, n: number): Uint8Array {
      const out = new Uint8Array(n);
      cu.cudaSynchronize();
      cu.cudaCopyToHost(out, b, 0);
      return out;
    },
  };
}

/** Asserts out ~ ref: no NaN, max-abs and ||out - ref|| / ||ref|| under their tolerances. */
function close(what: string, out: ArrayLike<number>, ref: ArrayLike<number>, relL2: number, maxAbs: number) {
  assert.equal(out.length, ref.length, `${what}: length`);
  let num = 0, den = 0, worst = 0;
  for (let i = 0; i < ref.length; i++) {
    const o = out[i]!, r = ref[i]!;
    assert.ok(Number.isFinite(o), `${what}: element ${i} is ${o} (unwritten or NaN), expected ${r}`);
    num += (o - r) ** 2;
    den += r * r;
    worst = Math.max(worst, Math.abs(o - r));
  }
  const rel = Math.sqrt(num / Math.max(den, 1e-300));
  assert.ok(rel <= relL2, `${what}: normalised L2 error ${rel.toExponential(2)} > ${relL2}`);
  assert.ok(worst <= maxAbs, `${what}: max-abs error ${worst.toExponential(2)} > ${maxAbs}`);
}

/** float64 y0 + bias + x w^T: x [m, k], w [n, k], y0 [m, n]. */
function gemmRef(x: Float32Array, w: Float32Array, bias: Float32Array, y0: Float32Array, m: number, n: number, k: number): Float64Array {
  const ref = new Float64Array(m * n);
  for (let r = 0; r < m; r++)
    for (let o = 0; o < n; o++) {
      let acc = y0[r * n + o]! + bias[o]!;
      for (let i = 0; i < k; i++) acc += x[r * k + i]! * w[o * k + i]!;
      ref[r * n + o] = acc;
    }
  return ref;
}

// ---------------------------------------------------------------------------------- everywhere
test('the portable addon references no CUDA symbol', { skip: existsSync(path.join(packageRoot(), 'build/Release/expertd.node')) ? false : 'portable addon not built' }, () => {
  const bin = readFileSync(path.join(packageRoot(), 'build/Release/expertd.node'));
  for (const sym of ['cudaMalloc', 'libcudart', 'cudaGroupGemmFfn', 'ncclSend'])
    assert.equal(bin.indexOf(sym), -1, `portable addon contains '${sym}'`);
});

test('capabilities and the cuda surface agree', () => {
  if (!caps.cudaCompiled) {
    assert.equal(cu.cudaBuffer, undefined);
    assert.equal(caps.cudaDevices, 0);
    assert.deepEqual([caps.cudaError, caps.cudaDriverVersion, caps.cudaRuntimeVersion], [null, 0, 0]);
    return;
  }
  assert.equal(caps.build, 'full');
  // cudart is linked statically: its version is known with or without a driver.
  assert.ok(caps.cudaRuntimeVersion >= 12000, `cudaRuntimeVersion is ${caps.cudaRuntimeVersion}`);
  if (caps.cudaDevices > 0) assert.equal(caps.cudaError, null);
  else {
    // No fake green: the runtime's reason is kept, and every device test's skip names it.
    assert.match(caps.cudaError ?? 'null', /^cudaError\w+ \(.+\)$/);
    assert.ok(typeof needsCudaDevice === 'string' && needsCudaDevice.includes(caps.cudaError!), `skip: ${needsCudaDevice}`);
    assert.match(String(needsCudaDevice), /; driver (none|\d+\.\d+), runtime \d+\.\d+$/);
  }
  assert.equal(cu.cudaDeviceCount(), caps.cudaDevices);
  assert.equal(cu.cudaDeviceLost(), false);
  assert.equal(typeof caps.ncclFound, 'boolean');
  const lt = cu.cudaCublasLt();
  assert.ok(lt === null || /cublasLt/.test(lt));
});

test('without a device, CUDA calls fail with E_CUDA and the process survives', { skip: !caps.cudaCompiled ? 'CUDA not compiled in (portable build)' : caps.cudaDevices > 0 ? 'a CUDA device is present' : false }, () => {
  assert.throws(() => cu.cudaBuffer(1024), (e: Error & { code?: string }) => e.code === 'E_CUDA' && /at .*cuda_backend\.cc:\d+/.test(e.message));
  assert.throws(() => new cu.CudaStream(), { code: 'E_CUDA' });
  assert.equal(cu.cudaDeviceLost(), false, 'a missing driver is not a lost device');
});

test('CUDA bindings validate arguments before touching the device', { skip: caps.cudaCompiled ? false : 'CUDA not compiled in (portable build)' }, () => {
  assert.throws(() => cu.cudaBuffer(-1), { name: 'RangeError', message: 'sizeBytes is -1, expected 0..17592186044416' });
  assert.throws(() => cu.cudaRmsNorm({} as CudaBuffer, 1, 8, {} as CudaBuffer, 1e-6, {} as CudaBuffer, null), {
    name: 'TypeError', message: 'x must be a CudaBuffer',
  });
  assert.throws(() => cu.cudaDenseGemm({} as CudaBuffer, 1, {} as CudaBuffer, 12, 16, {} as CudaBuffer, null, false), {
    name: 'RangeError', message: 'n and k must be multiples of 8 (n is 12, k is 16)',
  });
  assert.throws(() => new cu.CudaExpertTable(0, 64, 32), { name: 'RangeError', message: 'numExperts is 0, expected 1..1024' });
  assert.throws(() => cu.cudaNcclJoin(new Uint8Array(12), 1, 0), {
    name: 'RangeError', message: 'uniqueId.length is 12, expected 128',
  });
});

test('caching allocator reuses blocks', { skip }, () => {
  const a = cu.cudaBuffer(1 << 20);
  a.dispose();
  const before = cu.cudaMemInfo();
  const b = cu.cudaBuffer(1 << 20);
  const after = cu.cudaMemInfo();
  assert.equal(after.cacheHits, before.cacheHits + 1);
  assert.equal(after.deviceMallocs, before.deviceMallocs);
  b.dispose();
});

// ---------------------------------------------------------------------------------- device
// GroupGemm: bf16 operands, f32 accumulate; h rounded to bf16 as the kernel stores it.
const silu = (g: number) => g / (1 + Math.exp(-g));

/**
 * Rows of the experts e < E with weights (gu[e] [2I, H], dn[e] [H, I]; null: an empty slot):
 * h [rows, I] (bf16-rounded) and y [rows, H] in float64; every other row is NaN (unwritten).
 */
function ffnRef(x: Float32Array, offsets: Int32Array, gu: (Float32Array | null)[], dn: (Float32Array | null)[],
                rows: number, H: number, I: number) {
  const h = new Float64Array(rows * I).fill(NaN), y = new Float64Array(rows * H).fill(NaN);
  for (let e = 0; e < gu.length; e++) {
    const g0 = gu[e], d0 = dn[e];
    if (!g0 || !d0) continue;
    for (let r = offsets[e]!; r < offsets[e + 1]!; r++) {
      for (let i = 0; i < I; i++) {
        let g = 0, u = 0;
        for (let c = 0; c < H; c++) {
          g += x[r * H + c]! * g0[i * H + c]!;
          u += x[r * H + c]! * g0[(I + i) * H + c]!;
        }
        h[r * I + i] = fromBf16(toBf16(silu(g) * u));
      }
      for (let o = 0; o < H; o++) {
        let acc = 0;
        for (let i = 0; i < I; i++) acc += h[r * I + i]! * d0[o * I + i]!;
        y[r * H + o] = acc;
      }
    }
  }
  return { h, y };
}

// Routing reference (HF semantics, float64 scores).
function routeRef(logits: Float32Array, T: number, E: number, k: number, o: {
  sigmoid: boolean; bias?: Float32Array; nGroup: number; topkGroup: number; top2: boolean; renorm: boolean; scale: number;
}) {
  const ids = new Int32Array(T * k), w = new Float64Array(T * k), counts = new Int32Array(E);
  for (let t = 0; t < T; t++) {
    const l = Array.from(logits.subarray(t * E, t * E + E));
    let score: number[];
    if (o.sigmoid) score = l.map((v) => 1 / (1 + Math.exp(-v)));
    else {
      const mx = Math.max(...l);
      const ex = l.map((v) => Math.exp(v - mx));
      const s = ex.reduce((a, b) => a + b, 0);
      score = ex.map((v) => v / s);
    }
    const choice = score.map((v, i) => v + (o.bias ? o.bias[i]! : 0));
    const allowed = new Array<boolean>(E).fill(true);
    if (o.nGroup > 1 && o.topkGroup < o.nGroup) {
      const gs = E / o.nGroup;
      const gsc = Array.from({ length: o.nGroup }, (_, g) => {
        const v = choice.slice(g * gs, g * gs + gs).sort((a, b) => b - a);
        return o.top2 ? v[0]! + v[1]! : v[0]!;
      });
      const keep = gsc.map((v, g) => [v, g] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, o.topkGroup);
      allowed.fill(false);
      for (const [, g] of keep) for (let i = 0; i < gs; i++) allowed[g * gs + i] = true;
    }
    const order = choice.map((v, i) => [v, i] as const).filter(([, i]) => allowed[i]).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
    let sum = 0;
    for (let j = 0; j < k; j++) {
      ids[t * k + j] = order[j]![1];
      w[t * k + j] = score[order[j]![1]]!;
      sum += w[t * k + j]!;
      counts[order[j]![1]]!++;
    }
    for (let j = 0; j < k; j++) {
      if (o.renorm) w[t * k + j]! /= sum;
      w[t * k + j]! *= o.scale;
    }
  }
  return { ids, w, counts };
}

function deviceSuite(label: string, cu: CudaAddon, skip: string | false) {
  const { upload, poisoned, f32Of, i32Of, bf16Of, u8Of } = deviceHelpers(cu);

  test(`${label}: views check bounds; copies round-trip; pinned memory, streams and events`, { skip }, () => {
    const b = cu.cudaBuffer(1 << 20);
    const host = uniform(1000);
    cu.cudaCopyToDevice(b, 4096, host);
    const v = b.view(4096, 4000);
    assert.equal(v.sizeBytes, 4000);
    assert.deepEqual(f32Of(v, 1000), host);
    assert.throws(() => b.view(0, (1 << 20) + 1), { name: 'RangeError' });
    assert.throws(() => cu.cudaCopyToHost(new Float32Array(1001), v, 0), { name: 'RangeError' });
    b.dispose();
    assert.throws(() => cu.cudaFill(b, 0), { code: 'E_DISPOSED' });
    // A view keeps the allocation alive after its parent handle is disposed.
    assert.deepEqual(f32Of(v, 1000), host);
    const c = cu.cudaBuffer(64);
    cu.cudaCopyDevice(c, 8, v, 16, 32);
    assert.deepEqual(f32Of(c.view(8, 32), 8), host.subarray(4, 12));
    // Pinned host memory and streams/events.
    const pinned = new Float32Array(cu.cudaPinnedBuffer(4000));
    const s = new cu.CudaStream();
    const e0 = new cu.CudaEvent(true), e1 = new cu.CudaEvent(true);
    e0.record(s);
    cu.cudaCopyToHost(pinned, v, 0, s);
    e1.record(s);
    s.synchronize();
    assert.ok(e1.query());
    assert.ok(e1.elapsedMs(e0) >= 0);
    assert.deepEqual(pinned, host);
    s.dispose();
    assert.throws(() => cu.cudaFill(c, 0, s), { code: 'E_DISPOSED' });
    e0.dispose();
    e1.dispose();
    v.dispose();
    c.dispose();
  });

  test(`${label}: cudaConvert f32 <-> bf16 <-> f16 matches dtype.h bit for bit`, { skip }, () => {
    const n = 4099;
    const x = uniform(n, -300, 300);
    const src = upload(x);
    const bf = poisoned(n, 2), back = poisoned(n);
    cu.cudaConvert(src, 'f32', bf, 'bf16', n);
    cu.cudaConvert(bf, 'bf16', back, 'f32', n);
    assert.deepEqual(f32Of(back, n), bf16Round(x));
    const h16 = cu.cudaBuffer(2 * n), gpu16 = new Uint16Array(n);
    const cpu16 = Uint16Array.from(x, toF16);
    cu.cudaConvert(src, 'f32', h16, 'f16', n);
    cu.cudaSynchronize();
    cu.cudaCopyToHost(gpu16, h16, 0);
    assert.deepEqual(gpu16, cpu16);
  });

  for (const c of [
    { E: 4, H: 64, I: 32, counts: [0, 1, 17, 70] },
    { E: 8, H: 128, I: 96, counts: [3, 0, 0, 130, 1, 2, 0, 9] },
    { E: 3, H: 256, I: 136, counts: [5, 0, 200] },
    { E: 2, H: 72, I: 40, counts: [1, 2] },
  ]) {
    for (const tile of ['small', 'large', 'auto'] as const) {
      test(`${label}: cudaGroupGemmFfn E=${c.E} H=${c.H} I=${c.I} counts=[${c.counts}] tile=${tile}`, { skip }, () => {
        const { E, H, I, counts } = c;
        const rows = counts.reduce((a, b) => a + b, 0);
        const offsets = new Int32Array(E + 1);
        for (let e = 0; e < E; e++) offsets[e + 1] = offsets[e]! + counts[e]!;
        const x = bf16Round(uniform(rows * H));
        const gu: Float32Array[] = [], dn: Float32Array[] = [];
        const table = new cu.CudaExpertTable(E, H, I);
        for (let e = 0; e < E; e++) {
          gu.push(bf16Round(uniform(2 * I * H, -0.2, 0.2)));
          dn.push(bf16Round(uniform(H * I, -0.2, 0.2)));
          if (counts[e]! > 0) table.set(e, upload(bf16Array(gu[e]!)), upload(bf16Array(dn[e]!)));
        }
        assert.equal(table.has(1), counts[1]! > 0);
        const y = poisoned(rows * H), hs = poisoned(rows * I, 2);
        cu.cudaGroupGemmFfn(upload(bf16Array(x)), upload(offsets), table, rows, hs, y, { tile });
        close('y', f32Of(y, rows * H), ffnRef(x, offsets, gu, dn, rows, H, I).y, 5e-3, 5e-2);
        table.dispose();
      });
    }
  }

  // The contract the device engine relies on (LongCat-Flash's identity experts sit after the real
  // experts, beyond the table): rows of an empty slot and rows past offsets[E] are not written.
  // The operands are views at the least alignment the binding accepts (x, hScratch 16 B, y 8 B).
  for (const tile of ['small', 'large'] as const) {
    test(`${label}: cudaGroupGemmFfn leaves rows of empty slots and past offsets[E] alone (tile=${tile})`, { skip }, () => {
      const E = 4, H = 64, I = 32, counts = [5, 3, 0, 20], beyond = 7;
      const valid = counts.reduce((a, b) => a + b, 0), rows = valid + beyond;
      const offsets = new Int32Array(E + 1);
      for (let e = 0; e < E; e++) offsets[e + 1] = offsets[e]! + counts[e]!;
      const x = bf16Round(uniform(rows * H));
      const table = new cu.CudaExpertTable(E, H, I);
      const gu: (Float32Array | null)[] = [], dn: (Float32Array | null)[] = [];
      for (let e = 0; e < E; e++) {
        // Expert 1 has rows but no weights; expert 2 has weights but no rows.
        gu.push(e === 1 ? null : bf16Round(uniform(2 * I * H, -0.2, 0.2)));
        dn.push(e === 1 ? null : bf16Round(uniform(H * I, -0.2, 0.2)));
        if (gu[e]) table.set(e, upload(bf16Array(gu[e]!)), upload(bf16Array(dn[e]!)));
      }
      const xBig = cu.cudaBuffer(16 + rows * H * 2), hBig = poisoned(48 / 2 + rows * I, 2), yBig = poisoned(2 + rows * H);
      cu.cudaCopyToDevice(xBig, 16, bf16Array(x));
      const y = yBig.view(8, rows * H * 4), hs = hBig.view(48, rows * I * 2);
      cu.cudaGroupGemmFfn(xBig.view(16, rows * H * 2), upload(offsets), table, rows, hs, y, { tile });
      const ref = ffnRef(x, offsets, gu, dn, rows, H, I);
      const gotY = f32Of(y, rows * H), gotH = bf16Of(hs, rows * I);
      const written = (r: number) => r < offsets[1]! || (r >= offsets[2]! && r < offsets[E]!);
      for (let r = 0; r < rows; r++) {
        const yr = gotY.subarray(r * H, r * H + H), hr = gotH.subarray(r * I, r * I + I);
        if (written(r)) continue;
        assert.ok(yr.every(Number.isNaN), `row ${r} of y was written (${r < valid ? 'empty slot' : 'past offsets[E]'})`);
        assert.ok(hr.every(Number.isNaN), `row ${r} of hScratch was written`);
      }
      const rowsOf = (a: ArrayLike<number>, w: number) =>
        Float64Array.from({ length: rows * w }, (_, i) => a[i]!).filter((_, i) => written(Math.floor(i / w)));
      close('y (written rows)', rowsOf(gotY, H), rowsOf(ref.y, H), 5e-3, 5e-2);
      // h is stored as bf16: one rounding apart at most where the f32 sums straddle a tie.
      close('hScratch (written rows)', rowsOf(gotH, I), rowsOf(ref.h, I), 1e-2, 2e-2);
      // Nothing before the views was touched.
      assert.ok(bf16Of(hBig, 24).every(Number.isNaN) && f32Of(yBig, 2).every(Number.isNaN));
      assert.equal(cu.cudaDeviceLost(), false);
      table.dispose();
    });
  }

  // gpt-oss's experts: biases on both GEMMs and the clamped SwiGLU (alpha 1.702, limit 7), against a
  // float64 reference; gate/up values spread past the limit so that both clamps act. Expert 1 has
  // rows but no weights: its rows of hScratch and y, and rows past offsets[E], stay unwritten.
  test(`${label}: cudaGroupGemmBiasedFfn (gpt-oss) and cudaClampedSwiglu against float64`, { skip }, () => {
    const E = 4, H = 64, I = 40, counts = [9, 3, 0, 70], beyond = 5, alpha = 1.702, limit = 7;
    const valid = counts.reduce((a, b) => a + b, 0), rows = valid + beyond;
    const offsets = new Int32Array(E + 1);
    for (let e = 0; e < E; e++) offsets[e + 1] = offsets[e]! + counts[e]!;
    const x = bf16Round(uniform(rows * H));
    const table = new cu.CudaExpertTable(E, H, I);
    const gu: (Float32Array | null)[] = [], dn: (Float32Array | null)[] = [];
    for (let e = 0; e < E; e++) {
      gu.push(e === 1 ? null : bf16Round(uniform(2 * I * H, -1.5, 1.5)));
      dn.push(e === 1 ? null : bf16Round(uniform(H * I, -0.2, 0.2)));
      if (gu[e]) table.set(e, upload(bf16Array(gu[e]!)), upload(bf16Array(dn[e]!)));
    }
    const guBias = uniform(E * 2 * I, -2, 2), dnBias = uniform(E * H, -1, 1);
    const y = poisoned(rows * H), hs = poisoned(rows * I, 2), guS = poisoned(rows * 2 * I);
    cu.cudaGroupGemmBiasedFfn(upload(bf16Array(x)), upload(offsets), table, rows, guS, hs, y,
      { gateUpBias: upload(guBias), downBias: upload(dnBias), alpha, limit });
    const act = (g0: number, u0: number) => {
      const g = Math.min(g0, limit), u = Math.min(Math.max(u0, -limit), limit);
      return (u + 1) * g / (1 + Math.exp(-alpha * g));
    };
    const refY = new Float64Array(rows * H), refH = new Float64Array(rows * I);
    let clamped = 0;
    const written = (r: number) => r < offsets[1]! || (r >= offsets[2]! && r < offsets[E]!);
    for (let e = 0; e < E; e++) {
      if (!gu[e]) continue;
      for (let r = offsets[e]!; r < offsets[e + 1]!; r++) {
        const h = new Float64Array(I);
        for (let i = 0; i < I; i++) {
          let g = guBias[e * 2 * I + i]!, u = guBias[e * 2 * I + I + i]!;
          for (let c = 0; c < H; c++) {
            g += x[r * H + c]! * gu[e]![i * H + c]!;
            u += x[r * H + c]! * gu[e]![(I + i) * H + c]!;
          }
          if (g > limit || Math.abs(u) > limit) clamped++;
          // The kernel stores h as bf16: the reference's down pass reads it rounded too.
          h[i] = refH[r * I + i] = act(g, u);
        }
        const hb = bf16Round(Float32Array.from(h));
        for (let o = 0; o < H; o++) {
          let v = dnBias[e * H + o]!;
          for (let i = 0; i < I; i++) v += hb[i]! * dn[e]![o * I + i]!;
          refY[r * H + o] = v;
        }
      }
    }
    assert.ok(clamped > 20, `the clamps must act (${clamped} clamped gate/up values)`);
    const gotY = f32Of(y, rows * H), gotH = bf16Of(hs, rows * I);
    for (let r = 0; r < rows; r++) {
      if (written(r)) continue;
      assert.ok(gotY.subarray(r * H, r * H + H).every(Number.isNaN), `row ${r} of y was written`);
      assert.ok(gotH.subarray(r * I, r * I + I).every(Number.isNaN), `row ${r} of hScratch was written`);
    }
    const rowsOf = (a: ArrayLike<number>, w: number) =>
      Float64Array.from({ length: rows * w }, (_, i) => a[i]!).filter((_, i) => written(Math.floor(i / w)));
    close('biased ffn y', rowsOf(gotY, H), rowsOf(refY, H), 5e-3, 5e-2);
    // h reaches (limit + 1) * limit = 56, stored as bf16: one rounding of 56 is 0.22.
    close('biased ffn h', rowsOf(gotH, I), rowsOf(refH, I), 1e-2, 0.25);
    table.dispose();

    const T = 13;
    const g2 = uniform(T * 2 * I, -12, 12), out = poisoned(T * I);
    cu.cudaClampedSwiglu(upload(g2), T, I, alpha, limit, out);
    const ref = new Float64Array(T * I);
    for (let t = 0; t < T; t++) for (let i = 0; i < I; i++) ref[t * I + i] = act(g2[t * 2 * I + i]!, g2[t * 2 * I + I + i]!);
    close('clampedSwiglu', f32Of(out, T * I), ref, 1e-6, 1e-5);
  });

  for (const c of [{ m: 1, n: 96, k: 64 }, { m: 7, n: 256, k: 512 }, { m: 130, n: 136, k: 72 }]) {
    for (const backend of ['kernel', 'auto'] as const) {
      test(`${label}: cudaDenseGemm m=${c.m} n=${c.n} k=${c.k} backend=${backend} (+bias, accumulate)`, { skip }, () => {
        const { m, n, k } = c;
        const x = bf16Round(uniform(m * k)), w = bf16Round(uniform(n * k)), bias = uniform(n), y0 = uniform(m * n);
        const y = upload(y0);
        const used = cu.cudaDenseGemm(upload(bf16Array(x)), m, upload(bf16Array(w)), n, k, y, upload(bias), true, backend);
        assert.ok(backend === 'kernel' ? used === 'kernel' : used === (cu.cudaCublasLt() ? 'cublaslt' : 'kernel'));
        close('y', f32Of(y, m * n), gemmRef(x, w, bias, y0, m, n, k), 1e-5, 1e-3);
      });
    }
  }

  // Views 16 bytes into their allocations: the least alignment the binding accepts (cuBLASLt's
  // plans are chosen per operand alignment, 256 B otherwise).
  for (const backend of ['kernel', 'auto'] as const) {
    test(`${label}: cudaDenseGemm on 16-byte aligned views backend=${backend}`, { skip }, () => {
      const m = 9, n = 40, k = 56, at = 16;
      const x = bf16Round(uniform(m * k)), w = bf16Round(uniform(n * k)), bias = uniform(n), y0 = uniform(m * n);
      const view = (data: ArrayBufferView) => {
        const b = cu.cudaBuffer(at + data.byteLength);
        cu.cudaCopyToDevice(b, at, data);
        return b.view(at, data.byteLength);
      };
      const y = view(y0);
      cu.cudaDenseGemm(view(bf16Array(x)), m, view(bf16Array(w)), n, k, y, view(bias), true, backend);
      close('y', f32Of(y, m * n), gemmRef(x, w, bias, y0, m, n, k), 1e-5, 1e-3);
    });
  }

  for (const c of [
    { T: 37, E: 8, k: 2, sigmoid: false, nGroup: 1, topkGroup: 1, top2: false, renorm: true, scale: 1, bias: false },
    { T: 5, E: 60, k: 4, sigmoid: false, nGroup: 1, topkGroup: 1, top2: false, renorm: false, scale: 1, bias: false },
    { T: 19, E: 64, k: 6, sigmoid: false, nGroup: 8, topkGroup: 3, top2: false, renorm: false, scale: 16, bias: false },
    { T: 23, E: 256, k: 8, sigmoid: true, nGroup: 8, topkGroup: 4, top2: true, renorm: true, scale: 2.5, bias: true },
  ]) {
    test(`${label}: cudaRoute T=${c.T} E=${c.E} k=${c.k} ${c.sigmoid ? 'sigmoid+bias' : 'softmax'} groups=${c.nGroup}/${c.topkGroup}`, { skip }, () => {
      const { T, E, k } = c;
      const logits = uniform(T * E, -4, 4);
      const bias = c.bias ? uniform(E, -0.1, 0.1) : undefined;
      const ids = poisoned(T * k), w = poisoned(T * k), counts = poisoned(E);
      cu.cudaRoute(upload(logits), T, E, k, {
        scoring: c.sigmoid ? 'sigmoid' : 'softmax', bias: bias ? upload(bias) : null, nGroup: c.nGroup,
        topkGroup: c.topkGroup, groupScore: c.top2 ? 'top2sum' : 'max', renormalize: c.renorm, scale: c.scale,
      }, ids, w, counts);
      const ref = routeRef(logits, T, E, k, { ...c, bias });
      assert.deepEqual(i32Of(ids, T * k), ref.ids);
      assert.deepEqual(i32Of(counts, E), ref.counts);
      close('weights', f32Of(w, T * k), ref.w, 1e-5, 1e-5 * c.scale);
    });
  }

  /**
   * Runs cudaPermute and checks it against the stable reference (by expert, then token, then slot;
   * ids outside 0..E-1 get no row and permIndex -1). Returns the reference and the device outputs.
   */
  function checkPermute(x: Float32Array, ids: Int32Array, T: number, h: number, k: number, E: number, dtype: 'f32' | 'bf16') {
    const ok = (p: number) => ids[p]! >= 0 && ids[p]! < E;
    const offsets = new Int32Array(E + 1);
    for (let p = 0; p < T * k; p++) if (ok(p)) offsets[ids[p]! + 1]!++;
    for (let e = 0; e < E; e++) offsets[e + 1]! += offsets[e]!;
    const cursor = offsets.slice(0, E), perm = new Int32Array(T * k);
    for (let p = 0; p < T * k; p++) perm[p] = ok(p) ? cursor[ids[p]!]!++ : -1;
    const xp = poisoned(T * k * h, dtype === 'f32' ? 4 : 2), pidx = poisoned(T * k), offs = poisoned(E + 1);
    cu.cudaPermute(upload(x), T, h, upload(ids), k, E, xp, pidx, offs, dtype);
    assert.deepEqual(i32Of(offs, E + 1), offsets);
    assert.deepEqual(i32Of(pidx, T * k), perm);
    const got = dtype === 'f32' ? f32Of(xp, T * k * h) : bf16Of(xp, T * k * h);
    const xr = dtype === 'f32' ? x : bf16Round(x);
    for (let p = 0; p < T * k; p++)
      if (ok(p)) assert.deepEqual(got.subarray(perm[p]! * h, perm[p]! * h + h), xr.subarray(Math.floor(p / k) * h, Math.floor(p / k) * h + h));
    return { perm, pidx, got, offsets };
  }

  for (const c of [{ T: 1, h: 64, k: 8, E: 64 }, { T: 333, h: 96, k: 2, E: 8 }, { T: 700, h: 40, k: 6, E: 160 }]) {
    for (const dtype of ['f32', 'bf16'] as const) {
      test(`${label}: cudaPermute/UnpermuteCombine T=${c.T} h=${c.h} k=${c.k} E=${c.E} ${dtype}`, { skip }, () => {
        const { T, h, k, E } = c;
        const x = uniform(T * h);
        const ids = new Int32Array(T * k);
        for (let t = 0; t < T; t++) {
          const pool = Array.from({ length: E }, (_, i) => i);
          for (let j = 0; j < k; j++) ids[t * k + j] = pool.splice(Math.floor(rand() * Math.min(pool.length, 1 + (t % 7))), 1)[0]!;
        }
        const { perm, pidx } = checkPermute(x, ids, T, h, k, E, dtype);
        // Combine: out = base + sum_j w * yPerm[perm]
        const yPerm = uniform(T * k * h), w = uniform(T * k, 0, 1), base = uniform(T * h);
        const out = upload(base);
        cu.cudaUnpermuteCombine(upload(yPerm), pidx, upload(w), T, k, h, out, true);
        const ref = new Float64Array(T * h);
        for (let t = 0; t < T; t++)
          for (let cc = 0; cc < h; cc++) {
            let s = 0;
            for (let j = 0; j < k; j++) s += w[t * k + j]! * yPerm[perm[t * k + j]! * h + cc]!;
            ref[t * h + cc] = base[t * h + cc]! + s;
          }
        close('combine', f32Of(out, T * h), ref, 1e-6, 1e-5);
      });
    }
  }

  // Act-order experts (GPTQ desc_act): each expert's rows of xPerm in its input order. Experts 0, 5 and
  // E-1 get no rows (the search passes empty experts over), and two skipped ids leave rows past
  // offsets[e] (unwritten NaNs), which are copied as they are.
  test(`${label}: cudaGatherExpertColumns puts each row in its expert's input order (or, without offsets, all in one)`, { skip }, () => {
    const T = 41, h = 72, k = 2, E = 12;
    const used = [1, 2, 3, 4, 6, 7, 8, 9, 10];
    const ids = Int32Array.from({ length: T * k }, () => used[Math.floor(rand() * used.length)]!);
    ids[7] = -1;
    ids[30] = E;
    const { got, offsets } = checkPermute(uniform(T * h), ids, T, h, k, E, 'bf16');
    assert.ok(offsets[1] === 0 && offsets[6] === offsets[5] && offsets[E] === offsets[E - 1] && offsets[E]! === T * k - 2);
    const orders = new Int32Array(E * h);
    for (let e = 0; e < E; e++) {
      const o = Int32Array.from({ length: h }, (_, j) => j);
      for (let i = h - 1; i > 0; i--) {
        const j = Math.floor(rand() * (i + 1));
        [o[i], o[j]] = [o[j]!, o[i]!];
      }
      orders.set(o, e * h);
    }
    const rows = T * k;
    const xPerm = upload(Uint16Array.from(got, toBf16)), offs = upload(offsets), out = poisoned(rows * h, 2);
    cu.cudaGatherExpertColumns(xPerm, offs, E, rows, h, upload(orders), out);
    const want = new Float32Array(rows * h);
    for (let r = 0; r < rows; r++) {
      let e = -1;
      for (let ex = 0; ex < E; ex++) if (offsets[ex]! <= r && r < offsets[ex + 1]!) e = ex;
      for (let c = 0; c < h; c++) want[r * h + c] = got[r * h + (e < 0 ? c : orders[e * h + c]!)]!;
    }
    assert.deepEqual(bf16Of(out, rows * h), want);
    assert.ok(want.subarray(offsets[E]! * h).every(Number.isNaN), 'the rows past offsets[e] are the unwritten ones');
    assert.throws(() => cu.cudaGatherExpertColumns(xPerm, offs, E, rows, h, upload(orders), xPerm), /out must not be x/);
    // Without offsets (a dense Linear's act-order input): every row in the first order; e must be 1.
    const one = poisoned(rows * h, 2);
    cu.cudaGatherExpertColumns(xPerm, null, 1, rows, h, upload(orders), one);
    const wantOne = new Float32Array(rows * h);
    for (let r = 0; r < rows; r++) for (let c = 0; c < h; c++) wantOne[r * h + c] = got[r * h + orders[c]!]!;
    assert.deepEqual(bf16Of(one, rows * h), wantOne);
    assert.throws(() => cu.cudaGatherExpertColumns(xPerm, null, 2, rows, h, upload(orders), one), /without offsets e must be 1/);
    assert.equal(cu.cudaDeviceLost(), false);
  });

  // ids live on the device: one outside 0..e-1 is skipped (permIndex -1, no row, not counted),
  // and the combine skips its slot.
  for (const dtype of ['f32', 'bf16'] as const) {
    test(`${label}: cudaPermute skips ids outside 0..e-1, cudaUnpermuteCombine their slots (${dtype})`, { skip }, () => {
      const T = 45, h = 24, k = 3, E = 6;
      const ids = Int32Array.from({ length: T * k }, () => Math.floor(rand() * E));
      for (const [p, bad] of [[0, -1], [4, E], [10, E + 100], [11, 2 ** 31 - 1], [20, -(2 ** 31)], [21, 7], [22, -5], [23, E]] as [number, number][])
        ids[p] = bad;  // token 7 (positions 21..23) has no valid slot at all
      const ok = (p: number) => ids[p]! >= 0 && ids[p]! < E;
      const { perm, pidx, got, offsets } = checkPermute(uniform(T * h), ids, T, h, k, E, dtype);
      assert.ok(got.subarray(offsets[E]! * h).every(Number.isNaN), 'rows from offsets[e] on stay unwritten');
      // Combine over the valid slots only (yPerm's rows past offsets[e] hold garbage on purpose).
      const yPerm = uniform(T * k * h), w = uniform(T * k, 0, 1), base = uniform(T * h);
      for (const accumulate of [true, false]) {
        const out = upload(base);
        cu.cudaUnpermuteCombine(upload(yPerm), pidx, upload(w), T, k, h, out, accumulate);
        const ref = new Float64Array(T * h);
        for (let t = 0; t < T; t++)
          for (let c = 0; c < h; c++) {
            let acc = accumulate ? base[t * h + c]! : 0;
            for (let j = 0; j < k; j++) if (ok(t * k + j)) acc += w[t * k + j]! * yPerm[perm[t * k + j]! * h + c]!;
            ref[t * h + c] = acc;
          }
        const o = f32Of(out, T * h);
        close(`combine accumulate=${accumulate}`, o, ref, 1e-6, 1e-5);
        if (!accumulate) assert.ok(o.subarray(7 * h, 8 * h).every((v) => v === 0), 'a token without a valid slot gets 0');
      }
      assert.equal(cu.cudaDeviceLost(), false);
    });
  }

  test(`${label}: cudaRmsNorm with and without residual`, { skip }, () => {
    for (const [rows, dim] of [[1, 4096], [17, 96], [64, 2048]] as const) {
      const x = uniform(rows * dim, -3, 3), w = uniform(dim), res0 = uniform(rows * dim);
      const out = poisoned(rows * dim), res = upload(res0);
      cu.cudaRmsNorm(upload(x), rows, dim, upload(w), 1e-6, out, res);
      const refOut = new Float64Array(rows * dim), refRes = new Float64Array(rows * dim);
      for (let r = 0; r < rows; r++) {
        let ss = 0;
        for (let i = 0; i < dim; i++) {
          refRes[r * dim + i] = res0[r * dim + i]! + x[r * dim + i]!;
          ss += refRes[r * dim + i]! ** 2;
        }
        const inv = 1 / Math.sqrt(ss / dim + 1e-6);
        for (let i = 0; i < dim; i++) refOut[r * dim + i] = w[i]! * refRes[r * dim + i]! * inv;
      }
      close('residual', f32Of(res, rows * dim), refRes, 1e-6, 1e-5);
      close('out', f32Of(out, rows * dim), refOut, 1e-5, 1e-4);
      // Without a residual: out = rmsnorm(x) * w, x untouched.
      const xb = upload(x), out2 = poisoned(rows * dim);
      cu.cudaRmsNorm(xb, rows, dim, upload(w), 1e-6, out2, null);
      const ref2 = new Float64Array(rows * dim);
      for (let r = 0; r < rows; r++) {
        let ss = 0;
        for (let i = 0; i < dim; i++) ss += x[r * dim + i]! ** 2;
        const inv = 1 / Math.sqrt(ss / dim + 1e-6);
        for (let i = 0; i < dim; i++) ref2[r * dim + i] = w[i]! * x[r * dim + i]! * inv;
      }
      close('out (no residual)', f32Of(out2, rows * dim), ref2, 1e-5, 1e-4);
      assert.deepEqual(f32Of(xb, rows * dim), x);
    }
  });

  test(`${label}: cudaRope rotate-half and interleaved, partial with offset`, { skip }, () => {
    for (const il of [false, true]) {
      const T = 9, heads = 4, headStride = 24, offset = 8, rot = 16, rowStride = heads * headStride + 8;
      const x0 = uniform(T * rowStride);
      const pos = Int32Array.from({ length: T }, () => Math.floor(rand() * 5000));
      const inv = Float32Array.from({ length: rot / 2 }, (_, i) => Math.pow(10000, (-2 * i) / rot));
      const x = upload(x0);
      cu.cudaRope(x, T, heads, rowStride, headStride, offset, upload(pos), upload(inv), rot, 1.25, il);
      const ref = Float64Array.from(x0);
      for (let t = 0; t < T; t++)
        for (let hd = 0; hd < heads; hd++)
          for (let i = 0; i < rot / 2; i++) {
            const base = t * rowStride + hd * headStride + offset;
            const ia = base + (il ? 2 * i : i), ib = base + (il ? 2 * i + 1 : i + rot / 2);
            const ang = Math.fround(pos[t]! * inv[i]!);
            const c = Math.cos(ang) * 1.25, s = Math.sin(ang) * 1.25;
            ref[ia] = x0[ia]! * c - x0[ib]! * s;
            ref[ib] = x0[ib]! * c + x0[ia]! * s;
          }
      close(`rope interleaved=${il}`, f32Of(x, T * rowStride), ref, 1e-6, 1e-5);
    }
  });

  test(`${label}: cudaSiluMul, cudaEmbedding (f32/bf16/f16), cudaSoftmax, cudaTopN`, { skip }, () => {
    const T = 13, I = 200;
    const gu = uniform(T * 2 * I, -6, 6), out = poisoned(T * I);
    cu.cudaSiluMul(upload(gu), T, I, out);
    const ref = new Float64Array(T * I);
    for (let t = 0; t < T; t++) for (let i = 0; i < I; i++) ref[t * I + i] = silu(gu[t * 2 * I + i]!) * gu[t * 2 * I + I + i]!;
    close('siluMul', f32Of(out, T * I), ref, 1e-6, 1e-5);

    const V = 300, H = 72;
    const table = uniform(V * H), ids = Int32Array.from({ length: T }, () => Math.floor(rand() * V));
    for (const dtype of ['f32', 'bf16', 'f16'] as const) {
      const tb = dtype === 'f32' ? table : Uint16Array.from(table, dtype === 'bf16' ? toBf16 : toF16);
      const expect = dtype === 'f32' ? table
        : Float32Array.from(tb as Uint16Array, dtype === 'bf16' ? fromBf16 : fromF16);
      const o = poisoned(T * H);
      cu.cudaEmbedding(upload(tb), dtype, V, H, upload(ids), T, o);
      const got = f32Of(o, T * H);
      for (let t = 0; t < T; t++) assert.deepEqual(got.subarray(t * H, t * H + H), expect.subarray(ids[t]! * H, ids[t]! * H + H), dtype);
    }

    const rows = 3, cols = 50_001;
    const x = uniform(rows * cols, -20, 20);
    for (const log of [false, true]) {
      const o = poisoned(rows * cols);
      cu.cudaSoftmax(upload(x), rows, cols, o, log);
      const r = new Float64Array(rows * cols);
      for (let q = 0; q < rows; q++) {
        let mx = -Infinity, s = 0;
        for (let i = 0; i < cols; i++) mx = Math.max(mx, x[q * cols + i]!);
        for (let i = 0; i < cols; i++) s += Math.exp(x[q * cols + i]! - mx);
        for (let i = 0; i < cols; i++) r[q * cols + i] = log ? x[q * cols + i]! - mx - Math.log(s) : Math.exp(x[q * cols + i]! - mx) / s;
      }
      close(`softmax log=${log}`, f32Of(o, rows * cols), r, 1e-5, log ? 1e-4 : 1e-6);
    }
    const n = 40;
    x[5] = x[9] = 25;  // a tie: the lower index first
    const tid = poisoned(rows * n), tv = poisoned(rows * n);
    cu.cudaTopN(upload(x), rows, cols, n, tid, tv);
    const gi = i32Of(tid, rows * n), gv = f32Of(tv, rows * n);
    for (let q = 0; q < rows; q++) {
      const order = Array.from({ length: cols }, (_, i) => i).sort((a, b) => x[q * cols + b]! - x[q * cols + a]! || a - b).slice(0, n);
      assert.deepEqual(Array.from(gi.subarray(q * n, q * n + n)), order);
      assert.deepEqual(Array.from(gv.subarray(q * n, q * n + n)), order.map((i) => x[q * cols + i]!));
    }
  });

  test(`${label}: cudaSampleBatch gives the JS sampler's tokens (every option, seeds, bitmask) and its logprobs`, { skip }, () => {
    for (const V of [1001, 152_064]) {
      const R = SAMPLING_CASES.length;
      const words = Math.ceil(V / 32);
      const js = new Sampler(V);
      const dev = new BatchSampler(V);
      const mk = (i: number) => new SamplingState({
        temperature: 1, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0,
        seed: 7 + i, ...SAMPLING_CASES[i],
      }, [1, 2, 3, 5, 8, 13], V, i % 2);
      const ref = SAMPLING_CASES.map((_, i) => mk(i)), got = SAMPLING_CASES.map((_, i) => mk(i));
      for (let step = 0; step < (V > 10_000 ? 1 : 4); step++) {
        const logits = uniform(R * V, -4, 4);
        for (let r = 0; r < R; r++) logits[r * V + ((r * 7919 + step) % V)] = 9;   // a peaked head
        if (step === 1) logits.fill(-Infinity, 0, V);                              // a row with nothing to draw
        const masks = SAMPLING_CASES.map((_, r) => {
          if (r % 3 !== 1) return null;
          const m = Int32Array.from({ length: words }, () => (rand() * 2 ** 32) | 0);
          return m;
        });
        const d = upload(logits);
        const out = dev.sample(new Float32Array(0), got, masks, (rows, batch, o) => cu.cudaSampleBatch(d, rows, V, batch, o));
        for (let r = 0; r < R; r++) {
          const want = js.sample(logits.subarray(r * V, (r + 1) * V), ref[r]!, masks[r]);
          const where = `V ${V} step ${step} ${JSON.stringify(SAMPLING_CASES[r])}`;
          assert.equal(out[r]!.tokenId, want.tokenId, `${where}: token`);
          if (want.logprob !== undefined && Number.isFinite(want.logprob)) {
            assert.ok(Math.abs(out[r]!.logprob! - want.logprob) <= 1e-7 * (1 + Math.abs(want.logprob)), `${where}: logprob`);
          }
          assert.deepEqual(out[r]!.top?.map((t) => t.tokenId), want.top?.map((t) => t.tokenId), `${where}: top ids`);
          assert.deepEqual(got[r]!.rng.getState(), ref[r]!.rng.getState(), `${where}: rng state`);
          ref[r]!.addOutputToken(want.tokenId);
          got[r]!.addOutputToken(out[r]!.tokenId);
        }
        d.dispose();
      }
    }
  });

  // Paged attention against a float64 reference over the same cache.
  interface AttnCase { name: string; heads: number; kvHeads: number; dk: number; dv: number; mla: boolean; window: number; seqs: [number, number][]; sinks?: boolean }
  for (const c of [
    { name: 'GQA prefill+decode', heads: 8, kvHeads: 2, dk: 64, dv: 64, mla: false, window: 0, seqs: [[37, 37], [1, 90], [5, 21]] },
    { name: 'MHA sliding window', heads: 4, kvHeads: 4, dk: 32, dv: 48, mla: false, window: 19, seqs: [[40, 60], [1, 77]] },
    { name: 'MLA (V from the K cache)', heads: 16, kvHeads: 1, dk: 96, dv: 64, mla: true, window: 0, seqs: [[12, 30], [1, 45]] },
    { name: 'long decode (split-K)', heads: 32, kvHeads: 8, dk: 128, dv: 128, mla: false, window: 0, seqs: [[1, 3000], [2, 1500]] },
    // gpt-oss: a sink per head in the denominator, with a window and without; once after the split merge.
    { name: 'sinks, sliding window', heads: 8, kvHeads: 2, dk: 64, dv: 64, mla: false, window: 7, seqs: [[20, 20], [1, 50]], sinks: true },
    { name: 'sinks, long decode (split-K)', heads: 32, kvHeads: 8, dk: 64, dv: 64, mla: false, window: 0, seqs: [[1, 3000], [2, 1500]], sinks: true },
  ] satisfies AttnCase[]) {
    test(`${label}: cudaPagedAttention ${c.name}`, { skip }, () => {
      const bs = 16, { heads, kvHeads, dk, dv } = c;
      const vStride = c.mla ? dk : dv;
      const maxBlocks = Math.max(...c.seqs.map(([, ctx]) => Math.ceil(ctx / bs)));
      const numBlocks = c.seqs.reduce((a, [, ctx]) => a + Math.ceil(ctx / bs), 0) + 3;
      const free = Array.from({ length: numBlocks }, (_, i) => i).sort(() => rand() - 0.5);
      const kc = uniform(numBlocks * bs * kvHeads * dk), vc = c.mla ? kc : uniform(numBlocks * bs * kvHeads * vStride);
      const seqInfo = new Int32Array(c.seqs.length * 3), tables = new Int32Array(c.seqs.length * maxBlocks);
      let T = 0;
      c.seqs.forEach(([qLen, ctx], s) => {
        seqInfo.set([T, qLen, ctx], 3 * s);
        T += qLen;
        for (let b = 0; b < Math.ceil(ctx / bs); b++) tables[s * maxBlocks + b] = free.pop()!;
      });
      const q = uniform(T * heads * dk), scale = 1 / Math.sqrt(dk);
      const out = poisoned(T * heads * dv);
      // Sinks from -2 to 6: some far above the scores (most of the mass), some below.
      const sinks = c.sinks ? uniform(heads, -2, 6) : null;
      // MLA passes the K cache itself as V (the kernel then reads V from its staged K chunk).
      const kBuf = upload(kc);
      cu.cudaPagedAttention(upload(q), kBuf, c.mla ? kBuf : upload(vc), upload(seqInfo), upload(tables), {
        numSeqs: c.seqs.length, heads, kvHeads, dk, dv, vStride, vOffset: 0, blockSize: bs, maxBlocks, scale,
        slidingWindow: c.window, totalTokens: T, maxContext: Math.max(...c.seqs.map(([, ctx]) => ctx)), numBlocks,
        ...(sinks ? { sinks: upload(sinks) } : {}),
      }, out);
      const ref = new Float64Array(T * heads * dv);
      const g = heads / kvHeads;
      c.seqs.forEach(([qLen, ctx], s) => {
        for (let i = 0; i < qLen; i++) {
          const pos = ctx - qLen + i, lo = c.window > 0 ? Math.max(0, pos - c.window + 1) : 0;
          for (let hd = 0; hd < heads; hd++) {
            const kvh = Math.floor(hd / g), qr = (seqInfo[3 * s]! + i) * heads * dk + hd * dk;
            const sc: number[] = [];
            for (let j = lo; j <= pos; j++) {
              const row = (tables[s * maxBlocks + Math.floor(j / bs)]! * bs + (j % bs)) * kvHeads + kvh;
              let d = 0;
              for (let e = 0; e < dk; e++) d += q[qr + e]! * kc[row * dk + e]!;
              sc.push(d * scale);
            }
            const mx = Math.max(...sc), p = sc.map((v) => Math.exp(v - mx));
            const sum = p.reduce((a, b) => a + b, 0) + (sinks ? Math.exp(sinks[hd]! - mx) : 0);
            const o = (seqInfo[3 * s]! + i) * heads * dv + hd * dv;
            for (let j = lo; j <= pos; j++) {
              const row = (tables[s * maxBlocks + Math.floor(j / bs)]! * bs + (j % bs)) * kvHeads + kvh;
              for (let e = 0; e < dv; e++) ref[o + e]! += (p[j - lo]! / sum) * vc[row * vStride + e]!;
            }
          }
        }
      });
      close('attention', f32Of(out, T * heads * dv), ref, 1e-5, 1e-5);
    });
  }

  // maxContext must be >= every ctxLen (the engine takes it from its host copy of seqInfo). When it
  // is not, the device reads no key at or past min(maxContext, maxBlocks * blockSize): queries keep
  // their positions and see the keys below that cap. The emulator refuses it (stricter on purpose).
  for (const c of [
    { name: 'maxContext', seqs: [[1, 1000], [2, 300]], maxContext: 600, maxBlocks: 63 },
    { name: 'maxBlocks * blockSize', seqs: [[1, 1000], [3, 300]], maxContext: 1000, maxBlocks: 20 },
  ] as { name: string; seqs: [number, number][]; maxContext: number; maxBlocks: number }[]) {
    test(`${label}: cudaPagedAttention with a ctxLen above ${c.name}: ${label === 'emulated' ? 'refused (E_CUDA)' : 'no key past it is read'}`, { skip }, () => {
      const bs = 16, heads = 4, kvHeads = 2, dk = 32, dv = 32, { maxBlocks, maxContext } = c;
      const cap = Math.min(maxContext, maxBlocks * bs);
      const numBlocks = c.seqs.length * maxBlocks;
      const kc = uniform(numBlocks * bs * kvHeads * dk), vc = uniform(numBlocks * bs * kvHeads * dv);
      const seqInfo = new Int32Array(c.seqs.length * 3), tables = new Int32Array(c.seqs.length * maxBlocks);
      let T = 0;
      c.seqs.forEach(([qLen, ctx], s) => {
        seqInfo.set([T, qLen, ctx], 3 * s);
        T += qLen;
        for (let b = 0; b < maxBlocks; b++) tables[s * maxBlocks + b] = s * maxBlocks + b;
      });
      const q = uniform(T * heads * dk), scale = 1 / Math.sqrt(dk), out = poisoned(T * heads * dv);
      const run = () => cu.cudaPagedAttention(upload(q), upload(kc), upload(vc), upload(seqInfo), upload(tables), {
        numSeqs: c.seqs.length, heads, kvHeads, dk, dv, blockSize: bs, maxBlocks, scale, totalTokens: T, maxContext, numBlocks,
      }, out);
      if (label === 'emulated') {
        assert.throws(run, (e: Error & { code?: string }) => e.code === 'E_CUDA' && /ctxLen 1000/.test(e.message));
        assert.equal(cu.cudaDeviceLost(), false, 'a precondition, not a fault');
        return;
      }
      run();
      const ref = new Float64Array(T * heads * dv), g = heads / kvHeads;
      c.seqs.forEach(([qLen, ctx], s) => {
        for (let i = 0; i < qLen; i++) {
          const last = Math.min(ctx - qLen + i, cap - 1), row = seqInfo[3 * s]! + i;
          for (let hd = 0; hd < heads; hd++) {
            const kvh = Math.floor(hd / g), sc: number[] = [];
            for (let j = 0; j <= last; j++) {
              const kr = (tables[s * maxBlocks + Math.floor(j / bs)]! * bs + (j % bs)) * kvHeads + kvh;
              let d = 0;
              for (let e = 0; e < dk; e++) d += q[(row * heads + hd) * dk + e]! * kc[kr * dk + e]!;
              sc.push(d * scale);
            }
            const mx = Math.max(...sc), p = sc.map((v) => Math.exp(v - mx)), sum = p.reduce((a, b) => a + b, 0);
            for (let j = 0; j <= last; j++) {
              const kr = (tables[s * maxBlocks + Math.floor(j / bs)]! * bs + (j % bs)) * kvHeads + kvh;
              for (let e = 0; e < dv; e++) ref[(row * heads + hd) * dv + e]! += (p[j]! / sum) * vc[kr * dv + e]!;
            }
          }
        }
      });
      close('attention', f32Of(out, T * heads * dv), ref, 1e-5, 1e-5);
      assert.equal(cu.cudaDeviceLost(), false);
    });
  }

  test(`${label}: cudaKvCacheWrite writes K and strided V at slots, skipping negative ones`, { skip }, () => {
    const T = 6, kvh = 2, dk = 8, dv = 4, vs = 6, slotsN = 32;
    const k = uniform(T * kvh * dk), v = uniform(T * kvh * dv);
    const slots = Int32Array.from([3, -1, 17, 0, 31, 8]);
    const kc = poisoned(slotsN * kvh * dk), vcache = poisoned(slotsN * kvh * vs);
    cu.cudaKvCacheWrite(upload(k), upload(v), T, upload(slots), kc, vcache, kvh, dk, dv, vs, slotsN);
    const gk = f32Of(kc, slotsN * kvh * dk), gv = f32Of(vcache, slotsN * kvh * vs);
    for (let t = 0; t < T; t++) {
      if (slots[t]! < 0) continue;
      assert.deepEqual(gk.subarray(slots[t]! * kvh * dk, (slots[t]! + 1) * kvh * dk), k.subarray(t * kvh * dk, (t + 1) * kvh * dk));
      for (let h = 0; h < kvh; h++)
        assert.deepEqual(gv.subarray((slots[t]! * kvh + h) * vs, (slots[t]! * kvh + h) * vs + dv), v.subarray((t * kvh + h) * dv, (t * kvh + h) * dv + dv));
    }
    assert.ok(Number.isNaN(gk[1 * kvh * dk]!), 'an unwritten slot stays poisoned');
  });

  // --- glue for the device engine
  for (const c of [{ m: 5, n: 10, k: 37 }, { m: 1, n: 3, k: 1 }, { m: 17, n: 64, k: 130 }]) {
    for (const wDtype of ['f32', 'bf16'] as const) {
      for (const [withBias, accumulate] of [[false, false], [true, false], [false, true], [true, true]] as const) {
        test(`${label}: cudaGemmF32 m=${c.m} n=${c.n} k=${c.k} w=${wDtype}${withBias ? ' +bias' : ''}${accumulate ? ' accumulate' : ''}`, { skip }, () => {
          const { m, n, k } = c;
          const x = uniform(m * k, -2, 2), w = wDtype === 'f32' ? uniform(n * k) : bf16Round(uniform(n * k));
          const bias = uniform(n), y0 = uniform(m * n);
          // Two extra elements past y[m, n] must stay poisoned.
          const y = poisoned(m * n + 2);
          if (accumulate) cu.cudaCopyToDevice(y, 0, y0);
          cu.cudaGemmF32(upload(x), m, upload(wDtype === 'f32' ? w : bf16Array(w)), wDtype, n, k, y,
            withBias ? upload(bias) : null, accumulate);
          const ref = new Float64Array(m * n);
          for (let r = 0; r < m; r++)
            for (let o = 0; o < n; o++) {
              let s = (withBias ? bias[o]! : 0) + (accumulate ? y0[r * n + o]! : 0);
              for (let i = 0; i < k; i++) s += x[r * k + i]! * w[o * k + i]!;
              ref[r * n + o] = s;
            }
          const got = f32Of(y, m * n + 2);
          close('y', got.subarray(0, m * n), ref, 1e-6, 1e-5);
          assert.ok(Number.isNaN(got[m * n]!) && Number.isNaN(got[m * n + 1]!), 'nothing written past y[m, n]');
        });
      }
    }
  }

  test(`${label}: cudaAdd, cudaGatedAdd, cudaClamp`, { skip }, () => {
    const n = 1003;
    const y0 = uniform(n, -3, 3), x = uniform(n, -3, 3);
    const y = poisoned(n + 3);
    cu.cudaCopyToDevice(y, 0, y0);
    cu.cudaAdd(y, upload(x), n);
    const gotAdd = f32Of(y, n + 3);
    // One f32 addition per element: exact against the f32-rounded double sum.
    assert.deepEqual(gotAdd.subarray(0, n), Float32Array.from(y0, (v, i) => v + x[i]!));
    assert.ok(gotAdd.subarray(n).every(Number.isNaN), 'cudaAdd wrote past n');

    const T = 7, H = 37;
    const out0 = uniform(T * H), yy = uniform(T * H, -4, 4), gate = uniform(T, -6, 6);
    gate[0] = 0;
    gate[1] = -30;  // sigmoid ~ 1e-13: the row stays at out0
    const out = poisoned(T * H + 2);
    cu.cudaCopyToDevice(out, 0, out0);
    cu.cudaGatedAdd(out, upload(yy), upload(gate), T, H);
    const ref = new Float64Array(T * H);
    for (let t = 0; t < T; t++)
      for (let c = 0; c < H; c++) ref[t * H + c] = out0[t * H + c]! + yy[t * H + c]! / (1 + Math.exp(-gate[t]!));
    const gotGated = f32Of(out, T * H + 2);
    close('gatedAdd', gotGated.subarray(0, T * H), ref, 1e-6, 1e-5);
    assert.ok(gotGated.subarray(T * H).every(Number.isNaN), 'cudaGatedAdd wrote past t * h');

    const v = uniform(n, -5, 5);
    v[0] = Infinity;
    v[1] = -Infinity;
    v[2] = 2.5;
    v[3] = -2.5;
    const xc = poisoned(n + 3);
    cu.cudaCopyToDevice(xc, 0, v);
    cu.cudaClamp(xc, n, 2.5);
    const gotClamp = f32Of(xc, n + 3);
    assert.deepEqual(gotClamp.subarray(0, n), Float32Array.from(v, (e) => Math.min(Math.max(e, -2.5), 2.5)));
    assert.ok(gotClamp.subarray(n).every(Number.isNaN), 'cudaClamp wrote past n');
  });

  test(`${label}: cudaSigmoidMul and cudaDeltaGates (Qwen3-Next's gates) against float64`, { skip }, () => {
    const n = 517;
    const x0 = uniform(n, -4, 4), gate = uniform(n, -8, 8);
    gate[0] = 0;
    gate[1] = -40;  // sigmoid ~ 4e-18: x goes to ~0
    const x = poisoned(n + 2);
    cu.cudaCopyToDevice(x, 0, x0);
    cu.cudaSigmoidMul(x, upload(gate), n);
    const gotMul = f32Of(x, n + 2);
    close('sigmoidMul', gotMul.subarray(0, n), Float64Array.from(x0, (v, i) => v / (1 + Math.exp(-gate[i]!))), 1e-7, 1e-6);
    assert.ok(gotMul.subarray(n).every(Number.isNaN), 'cudaSigmoidMul wrote past n');

    const T = 9, Hv = 6;
    const ba = uniform(T * 2 * Hv, -6, 6);
    ba[Hv] = 25;     // a + dt_bias above softplus's threshold 20: softplus(v) = v
    ba[Hv + 1] = -30; // softplus ~ 1e-13
    const negA = Float32Array.from(uniform(Hv, -2, 2), (v) => -Math.exp(v));
    const dtBias = uniform(Hv, -1, 1);
    const g = poisoned(T * Hv + 2), beta = poisoned(T * Hv + 2);
    cu.cudaDeltaGates(upload(ba), T, Hv, upload(negA), upload(dtBias), g, beta);
    const refG = new Float64Array(T * Hv), refB = new Float64Array(T * Hv);
    for (let t = 0; t < T; t++)
      for (let h = 0; h < Hv; h++) {
        const v = ba[t * 2 * Hv + Hv + h]! + dtBias[h]!;
        refG[t * Hv + h] = negA[h]! * (v > 20 ? v : Math.log(1 + Math.exp(v)));
        refB[t * Hv + h] = 1 / (1 + Math.exp(-ba[t * 2 * Hv + h]!));
      }
    const gotG = f32Of(g, T * Hv + 2), gotB = f32Of(beta, T * Hv + 2);
    // |g| reaches |A| x (a + dt_bias) ~ 7.4 x 26 past softplus's threshold, where f32's ulp is 1.5e-5: the
    // max-abs bound is 4 ulps of the largest |g| (a flat 1e-5 failed at 1.03e-5 on a seed whose |g| reached 167).
    const gMax = refG.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    close('g', gotG.subarray(0, T * Hv), refG, 1e-6, Math.max(1e-5, 8 * gMax * 2 ** -24));
    close('beta', gotB.subarray(0, T * Hv), refB, 1e-7, 1e-6);
    assert.ok(gotG.subarray(T * Hv).every(Number.isNaN) && gotB.subarray(T * Hv).every(Number.isNaN), 'cudaDeltaGates wrote past t * hv');
  });

  test(`${label}: cudaCopy2D slices columns out of and into bigger strided buffers`, { skip }, () => {
    // A fused qkv [T, 48] f32: take k = columns [16, 32) into a packed [T, 16], then write it into
    // columns [4, 20) of a wider [T, 24] buffer at a byte offset.
    const T = 6, W = 48, c0 = 16, C = 16, W2 = 24, c2 = 4, base = 8;
    const qkv = uniform(T * W);
    const packed = poisoned(T * C);
    cu.cudaCopy2D(packed, 0, C * 4, upload(qkv), c0 * 4, W * 4, C * 4, T);
    const k = f32Of(packed, T * C);
    for (let t = 0; t < T; t++) assert.deepEqual(k.subarray(t * C, t * C + C), qkv.subarray(t * W + c0, t * W + c0 + C));
    const wideBytes = base + T * W2 * 4 + 16;
    const wide = poisoned(wideBytes, 1);
    cu.cudaCopy2D(wide, base + c2 * 4, W2 * 4, packed, 0, C * 4, C * 4, T);
    const got = u8Of(wide, wideBytes);
    const kBytes = new Uint8Array(k.buffer);
    for (let i = 0; i < wideBytes; i++) {
      const rel = i - base, t = Math.floor(rel / (W2 * 4)), col = rel - t * W2 * 4;
      const inside = rel >= 0 && t < T && col >= c2 * 4 && col < (c2 + C) * 4;
      const want = inside ? kBytes[t * C * 4 + col - c2 * 4]! : 0xff;
      assert.equal(got[i], want, `byte ${i} (${inside ? 'copied' : 'untouched'})`);
    }
    // No rows: nothing moves.
    cu.cudaCopy2D(wide, 0, 4, packed, 0, 4, 4, 0);
    assert.deepEqual(u8Of(wide, wideBytes), got);
  });

  test(`${label}: cudaCopyRowRange copies rows [offsets[lo], offsets[hi]) read on the device`, { skip }, () => {
    const maxRows = 20, rowFloats = 3, rowBytes = rowFloats * 4;
    const src = uniform(maxRows * rowFloats);
    const offsets = Int32Array.from([0, 3, 3, 9, 14, 20]);
    const srcB = upload(src), offB = upload(offsets);
    for (const [lo, hi] of [[2, 4], [0, 5], [1, 2], [3, 3], [4, 5]] as const) {
      const dst = poisoned(maxRows * rowFloats);
      cu.cudaCopyRowRange(dst, srcB, offB, lo, hi, rowBytes, maxRows);
      const got = f32Of(dst, maxRows * rowFloats);
      for (let r = 0; r < maxRows; r++) {
        const row = got.subarray(r * rowFloats, r * rowFloats + rowFloats);
        if (r >= offsets[lo]! && r < offsets[hi]!) assert.deepEqual(row, src.subarray(r * rowFloats, r * rowFloats + rowFloats), `lo=${lo} hi=${hi} row ${r}`);
        else assert.ok(row.every(Number.isNaN), `lo=${lo} hi=${hi}: row ${r} outside the range was written`);
      }
    }
  });
}

deviceSuite('cuda', cu, skip);

// No silent fallback: on a device DenseGemm 'auto' must run cuBLASLt (the GPU image ships it in
// torch's wheels, which cuda_libs.cc searches); EXPERTD_ALLOW_NO_CUBLASLT=1 accepts the in-house
// kernel on a machine that truly has no cuBLASLt.
test('on a device, cuBLASLt is loaded and DenseGemm auto runs it', {
  skip: skip || (process.env.EXPERTD_ALLOW_NO_CUBLASLT === '1' ? 'EXPERTD_ALLOW_NO_CUBLASLT=1' : false),
}, () => {
  const libs = cu.cudaLibraries();
  assert.ok(libs.cublasLt.path, `cuBLASLt was not loaded; tried: ${libs.cublasLt.tried.join('; ')}`);
  assert.equal(cu.cudaCublasLt(), libs.cublasLt.path);
  const m = 4, n = 16, k = 32;
  const x = cu.cudaBuffer(m * k * 2), w = cu.cudaBuffer(n * k * 2), y = cu.cudaBuffer(m * n * 4);
  cu.cudaCopyToDevice(x, 0, bf16Array(bf16Round(uniform(m * k))));
  cu.cudaCopyToDevice(w, 0, bf16Array(bf16Round(uniform(n * k))));
  assert.equal(cu.cudaDenseGemm(x, m, w, n, k, y, null, false, 'auto'), 'cublaslt', 'DenseGemm auto fell back to the in-house kernel');
  cu.cudaSynchronize();
  for (const b of [x, w, y]) b.dispose();
});
deviceSuite('emulated', createCudaEmulator(), emulatorSkip);

test('NCCL single-rank group: all2allv to itself and the counts exchange', { skip: skip || (caps.ncclFound ? false : 'NCCL not found (libnccl.so.2)') }, () => {
  const { upload, poisoned } = deviceHelpers(cu);
  const id = cu.cudaNcclUniqueId();
  assert.equal(id.length, 128);
  const g = cu.cudaNcclJoin(id, 1, 0);
  assert.equal(g.backend, 'nccl');
  const data = Uint8Array.from({ length: 1000 }, () => Math.floor(rand() * 256));
  const recv = poisoned(1000, 1);
  g.all2allv(upload(data), Float64Array.of(1000), recv, Float64Array.of(1000));
  const got = new Uint8Array(1000);
  cu.cudaCopyToHost(got, recv, 0);
  assert.deepEqual(got, data);
  const counts = new Float64Array(1);
  g.all2allCounts(Float64Array.of(42), counts);
  assert.equal(counts[0], 42);
  g.barrier();
  g.dispose();
  assert.throws(() => g.barrier(), { code: 'E_DISPOSED' });
});
