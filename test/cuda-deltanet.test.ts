// The Gated DeltaNet device ops (cudaCausalConv1d, cudaGatedDeltaRule, cudaGatedRmsNorm) against
// the float64 references of test/deltanet.test.ts and the CPU ops, on the emulator
// (test/helpers/cuda-emu.ts, deltanet.cu's roundings) and on a GPU when there is one (skips here).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import type { CudaAddon, CudaBuffer, DeltaRuleOptions, NativeAddon } from '../src/native/types.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { emulatorSkip, needsCudaDevice } from './helpers/cuda-skip.js';
import { refConv, refDelta, refGatedRmsNorm, type DeltaShape } from './helpers/deltanet-ref.js';
import { assertClose, rng, uniform } from './helpers/ops-ref.js';

const native = loadNative();

// Relative to max |reference|. The device runs the recurrence token by token in f32 (no chunks):
// measured worst on the emulator 2.2e-7 relL2 (printed as a diagnostic); bounds leave margin for a
// GPU's exp (double, then rounded) differing in the last bit.
const TOL = { maxAbs: 4e-6, relL2: 2e-6 };

function maxAbsOf(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m || 1;
}

function deviceSuite(label: string, cu: CudaAddon, skip: string | false) {
  const up = (a: Float32Array | Int32Array): CudaBuffer => {
    const b = cu.cudaBuffer(Math.max(16, a.byteLength));
    cu.cudaCopyToDevice(b, 0, a);
    return b;
  };
  const poisoned = (n: number): CudaBuffer => up(new Float32Array(n).fill(NaN));
  const down = (b: CudaBuffer, n: number): Float32Array => {
    const h = new Float32Array(n);
    cu.cudaSynchronize();
    cu.cudaCopyToHost(h, b, 0);
    return h;
  };
  const close = (got: Float32Array, ref: ArrayLike<number>, tol: { maxAbs: number; relL2: number }, what: string) => {
    const m = maxAbsOf(ref);
    const e = assertClose(got, ref, { maxAbs: tol.maxAbs * m, relL2: tol.relL2 }, `${label} ${what}`);
    return e.relL2;
  };

  test(`${label}: causal conv over a batch vs float64; split calls carry the state exactly`, { skip }, () => {
    const r = rng(3100);
    const C = 40, K = 4, lens = [9, 0, 1, 70];
    const slots = Int32Array.from([2, 0, 3, 1]);
    const T = lens.reduce((a, b) => a + b, 0);
    const starts = new Int32Array(lens.length + 1);
    lens.forEach((n, b) => { starts[b + 1] = starts[b]! + n; });
    const x = uniform(T * C, r, 2), w = uniform(C * K, r), bias = uniform(C, r, 0.5);
    const per = C * (K - 1);
    const pool0 = uniform(5 * per, r, 2);
    const pool = up(pool0), out = poisoned(T * C);
    const bufs = [up(x), up(w), up(bias), up(slots), up(starts)];
    const [xb, wb, bb, sb, stb] = bufs as [CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer];
    cu.cudaCausalConv1d(xb, T, C, wb, bb, K, pool, sb, stb, lens.length, true, out);
    const got = down(out, T * C), gotPool = down(pool, 5 * per);
    for (let b = 0; b < lens.length; b++) {
      const st0 = pool0.subarray(slots[b]! * per, (slots[b]! + 1) * per);
      const ref = refConv(x.subarray(starts[b]! * C, starts[b + 1]! * C), lens[b]!, C, w, bias, K, st0, true);
      if (lens[b]) close(got.subarray(starts[b]! * C, starts[b + 1]! * C), ref.out, { maxAbs: 1e-6, relL2: 4e-7 }, `conv seq ${b}`);
      assert.deepEqual(gotPool.subarray(slots[b]! * per, (slots[b]! + 1) * per), Float32Array.from(ref.state), `${label} conv state ${b}`);
    }
    assert.deepEqual(gotPool.subarray(4 * per), pool0.subarray(4 * per), `${label} unused slot untouched`);
    // sequence 3 again in pieces of 7 tokens, from its initial state: the same bits
    const b = 3, n = lens[b]!, t0 = starts[b]!;
    const pool2 = up(pool0), out2 = poisoned(n * C);
    const one = up(Int32Array.of(slots[b]!));
    for (let s0 = 0; s0 < n; s0 += 7) {
      const m = Math.min(7, n - s0);
      const xs = up(x.slice((t0 + s0) * C, (t0 + s0 + m) * C));
      const os = poisoned(m * C);
      const st = up(Int32Array.of(0, m));
      cu.cudaCausalConv1d(xs, m, C, wb, bb, K, pool2, one, st, 1, true, os);
      cu.cudaCopyDevice(out2, s0 * C * 4, os, 0, m * C * 4);
      for (const q of [xs, os, st]) q.dispose();
    }
    assert.deepEqual(down(out2, n * C), got.subarray(t0 * C, (t0 + n) * C), `${label} conv pieces of 7`);
    for (const q of [...bufs, pool, out, pool2, out2, one]) q.dispose();
  });

  test(`${label}: gated delta rule over a batch (prefill and decode rows) vs float64; batched == alone`, { skip }, (t) => {
    let worst = 0;
    for (const [Hk, Hv, Dk, Dv, l2, lens] of [
      [2, 4, 16, 40, true, [1, 70, 0, 5]], [1, 2, 128, 128, true, [1, 1, 1]], [3, 3, 8, 8, false, [33]],
    ] as const) {
      const T = (lens as readonly number[]).reduce((a, b) => a + b, 0);
      const B = lens.length;
      const r = rng(3200 + T);
      const s: DeltaShape = { T, Hk, Hv, Dk, Dv };
      const kAmp = l2 ? 1 : Math.sqrt(3 / Dk);
      const q = uniform(T * Hk * Dk, r, l2 ? 1 : 2 * kAmp), k = uniform(T * Hk * Dk, r, kAmp), v = uniform(T * Hv * Dv, r);
      const g = Float32Array.from({ length: T * Hv }, () => -r() * 2);
      const beta = Float32Array.from({ length: T * Hv }, () => r());
      const per = Hv * Dk * Dv;
      const pool0 = uniform((B + 1) * per, r, 0.5);
      const slots = Int32Array.from({ length: B }, (_, i) => B - i);
      const starts = new Int32Array(B + 1);
      lens.forEach((n, b) => { starts[b + 1] = starts[b]! + n; });
      const opts: DeltaRuleOptions = { T, Hk, Hv, Dk, Dv, l2normQk: l2 };
      const bufs = [up(q), up(k), up(v), up(g), up(beta)];
      const [qb, kb, vb, gb, bb] = bufs as [CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer, CudaBuffer];
      const pool = up(pool0), sb = up(slots), stb = up(starts), out = poisoned(T * Hv * Dv);
      cu.cudaGatedDeltaRule(qb, kb, vb, gb, bb, pool, sb, stb, B, out, opts);
      const got = down(out, T * Hv * Dv), gotPool = down(pool, (B + 1) * per);
      const tag = `Hk${Hk} Hv${Hv} Dk${Dk} Dv${Dv} l2 ${l2} lens ${lens.join(',')}`;
      for (let b = 0; b < B; b++) {
        const t0 = starts[b]!, n = lens[b]!;
        const sl = (a: Float32Array, w: number) => a.slice(t0 * w, (t0 + n) * w);
        const refState = Float64Array.from(pool0.subarray(slots[b]! * per, (slots[b]! + 1) * per));
        const ref = refDelta(sl(q, Hk * Dk), sl(k, Hk * Dk), sl(v, Hv * Dv), sl(g, Hv), sl(beta, Hv), refState,
          { ...s, T: n }, l2);
        if (n) worst = Math.max(worst, close(got.subarray(t0 * Hv * Dv, (t0 + n) * Hv * Dv), ref, TOL, `${tag} seq ${b} out`));
        worst = Math.max(worst, close(gotPool.subarray(slots[b]! * per, (slots[b]! + 1) * per), refState, TOL, `${tag} seq ${b} state`));
        // alone: the same sequence in its own call, its own pool
        if (n === 0) continue;
        const ab = [up(sl(q, Hk * Dk)), up(sl(k, Hk * Dk)), up(sl(v, Hv * Dv)), up(sl(g, Hv)), up(sl(beta, Hv))];
        const apool = up(pool0.slice(slots[b]! * per, (slots[b]! + 1) * per));
        const aslot = up(Int32Array.of(0)), ast = up(Int32Array.of(0, n)), aout = poisoned(n * Hv * Dv);
        cu.cudaGatedDeltaRule(ab[0]!, ab[1]!, ab[2]!, ab[3]!, ab[4]!, apool, aslot, ast, 1, aout, { ...opts, T: n });
        assert.deepEqual(down(aout, n * Hv * Dv), got.subarray(t0 * Hv * Dv, (t0 + n) * Hv * Dv), `${label} ${tag} seq ${b}: alone == batched (out)`);
        assert.deepEqual(down(apool, per), gotPool.subarray(slots[b]! * per, (slots[b]! + 1) * per), `${label} ${tag} seq ${b}: alone == batched (state)`);
        for (const q_ of [...ab, apool, aslot, ast, aout]) q_.dispose();
      }
      // the CPU ops on the same inputs agree to f32 rounding (chunkwise vs recurrent for prefill)
      const cpuPool = Float32Array.from(pool0), cpuOut = new Float32Array(T * Hv * Dv);
      (native as NativeAddon).gatedDeltaRuleBatch(q, k, v, g, beta, cpuPool, slots, starts, cpuOut, opts);
      close(got, cpuOut, { maxAbs: 2e-5, relL2: 1e-5 }, `${tag} vs the CPU op`);
      for (const q_ of [...bufs, pool, sb, stb, out]) q_.dispose();
    }
    t.diagnostic(`${label}: worst relL2 vs float64 ${worst.toExponential(2)}`);
  });

  test(`${label}: gated RMSNorm vs float64 and the CPU op`, { skip }, () => {
    const r = rng(3300);
    for (const [rows, D] of [[1, 1], [7, 128], [130, 100]] as const) {
      const x = uniform(rows * D, r, 2), z = uniform(rows * D, r, 4), w = uniform(D, r, 1.5);
      const bufs = [up(x), up(z), up(w)];
      const out = poisoned(rows * D);
      cu.cudaGatedRmsNorm(bufs[0]!, bufs[1]!, bufs[2]!, 1e-6, rows, D, out);
      const got = down(out, rows * D);
      close(got, refGatedRmsNorm(x, z, w, 1e-6, rows, D), { maxAbs: 1e-6, relL2: 5e-7 }, `norm ${rows}x${D}`);
      const cpu = new Float32Array(rows * D);
      native.gatedRmsNorm(x, z, w, 1e-6, rows, D, cpu);
      close(got, cpu, { maxAbs: 1e-6, relL2: 5e-7 }, `norm ${rows}x${D} vs the CPU op`);
      for (const q of [...bufs, out]) q.dispose();
    }
  });

  test(`${label}: argument errors are E_INVALID_ARG and touch nothing`, { skip }, () => {
    const b = cu.cudaBuffer(1 << 16), small = cu.cudaBuffer(16);
    const opts: DeltaRuleOptions = { T: 2, Hk: 1, Hv: 2, Dk: 8, Dv: 8, l2normQk: true };
    const inv = (fn: () => void, msg: RegExp) => assert.throws(fn, (e: Error & { code?: string }) => e.code === 'E_INVALID_ARG' && msg.test(e.message));
    inv(() => cu.cudaGatedDeltaRule(b, b, b, b, b, b, b, b, 1, b, { ...opts, Dk: 257 }), /opts\.Dk is 257, expected 1\.\.256/);
    inv(() => cu.cudaGatedDeltaRule(b, b, b, b, b, b, b, b, 1, b, { ...opts, Hv: 3, Hk: 2 }), /opts\.Hv is 3, expected a multiple of opts\.Hk \(2\)/);
    inv(() => cu.cudaGatedDeltaRule(small, b, b, b, b, b, b, b, 1, b, opts), /q\.sizeBytes is 16, expected at least 64/);
    inv(() => cu.cudaCausalConv1d(b, 2, 4, b, null, 65, b, b, b, 1, true, b), /k is 65, expected 1\.\.64/);
    inv(() => cu.cudaGatedRmsNorm(b, b, small, 1e-6, 2, 8, b), /weight\.sizeBytes is 16, expected at least 32/);
    for (const q of [b, small]) q.dispose();
  });
}

deviceSuite('emulated', createCudaEmulator(), emulatorSkip);
deviceSuite('device', native as NativeAddon & CudaAddon, needsCudaDevice);

test('emulated: a slot outside the state pool is a device fault (deltanet.cu traps), never a stray write', { skip: emulatorSkip }, () => {
  const cu = createCudaEmulator();
  const up = (a: Float32Array | Int32Array) => {
    const b = cu.cudaBuffer(Math.max(16, a.byteLength));
    cu.cudaCopyToDevice(b, 0, a);
    return b;
  };
  const x = up(new Float32Array(8)), w = up(new Float32Array(16)), pool = up(new Float32Array(12)), out = up(new Float32Array(8));
  assert.throws(() => cu.cudaCausalConv1d(x, 2, 4, w, null, 4, pool, up(Int32Array.of(1)), up(Int32Array.of(0, 2)), 1, true, out),
    (e: Error & { code?: string }) => e.code === 'E_CUDA' && /slots\[0\] is 1, expected 0\.\.0/.test(e.message));
  assert.equal(cu.cudaDeviceLost(), true);
});
