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

// Relative to max |reference|. TOL: the recurrence (decode steps, sequences shorter than a chunk),
// measured worst on the emulator 4.2e-7 relL2 (printed as a diagnostic); bounds leave margin for a
// GPU's exp (double, then rounded) differing in the last bit.
const TOL = { maxAbs: 4e-6, relL2: 2e-6 };
// TOL_CHUNK: sequences of at least opts.chunk tokens (the chunked kernel, then the recurrence for the
// tail). The chunk's cumulative log decay G reaches about -60 at strong decay (g ~ -1 per token), so
// e^(G_i - G_j) inherits G's f32 error (an ulp of 60 is 4e-6), as HF's f32 chunked function does:
// measured worst 1.8e-6 relL2 (the state after one chunk at g ~ U(-2, 0); diagnostic).
const TOL_CHUNK = { maxAbs: 1e-5, relL2: 5e-6 };
// The chunked kernel against the recurrence on the same inputs (both f32, different orders):
// measured worst 1.0e-6 of max |out| (maxAbs), 4.9e-7 relL2.
const CHUNK_VS_REC = { maxAbs: 4e-6, relL2: 2e-6 };

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

  // ---- the chunked kernel (sequences of at least opts.chunk tokens; chunk 1 = the recurrence throughout)
  interface DeltaIn { q: Float32Array; k: Float32Array; v: Float32Array; g: Float32Array; beta: Float32Array }
  const deltaInputs = (seed: number, T: number, Hk: number, Hv: number, Dk: number, Dv: number, l2: boolean,
    gAmp: number): DeltaIn => {
    const r = rng(seed);
    const kAmp = l2 ? 1 : Math.sqrt(3 / Dk);
    return {
      q: uniform(T * Hk * Dk, r, l2 ? 1 : 2 * kAmp), k: uniform(T * Hk * Dk, r, kAmp), v: uniform(T * Hv * Dv, r),
      g: Float32Array.from({ length: T * Hv }, () => -r() * gAmp), beta: Float32Array.from({ length: T * Hv }, () => r()),
    };
  };
  /** One call over sequences of `lens` tokens (slots as given) from pool0; returns out and the pool. */
  const runDelta = (x: DeltaIn, lens: readonly number[], slots: Int32Array, pool0: Float32Array, opts: DeltaRuleOptions,
    seqLens?: Int32Array) => {
    const starts = new Int32Array(lens.length + 1);
    lens.forEach((n, b) => { starts[b + 1] = starts[b]! + n; });
    const T = starts[lens.length]!, n = T * opts.Hv * opts.Dv;
    const bufs = [up(x.q), up(x.k), up(x.v), up(x.g), up(x.beta), up(pool0), up(slots), up(starts)];
    const out = poisoned(n);
    cu.cudaGatedDeltaRule(bufs[0]!, bufs[1]!, bufs[2]!, bufs[3]!, bufs[4]!, bufs[5]!, bufs[6]!, bufs[7]!, lens.length, out,
      { ...opts, T }, null, seqLens);
    const res = { out: down(out, n), pool: down(bufs[5]!, pool0.length) };
    for (const b of [...bufs, out]) b.dispose();
    return res;
  };
  /** Rows [t0, t0 + n) of a [T, w] array. */
  const rows = (a: Float32Array, t0: number, n: number, w: number) => a.slice(t0 * w, (t0 + n) * w);
  const sliceIn = (x: DeltaIn, t0: number, n: number, Hk: number, Hv: number, Dk: number, Dv: number): DeltaIn => ({
    q: rows(x.q, t0, n, Hk * Dk), k: rows(x.k, t0, n, Hk * Dk), v: rows(x.v, t0, n, Hv * Dv),
    g: rows(x.g, t0, n, Hv), beta: rows(x.beta, t0, n, Hv),
  });
  const differs = (a: Float32Array, b: Float32Array) => a.some((x, i) => !Object.is(x, b[i]));

  test(`${label}: chunked prefill (T 64, 130, 300; Hv > Hk; l2norm on/off) vs float64 and vs the token-by-token path`, { skip }, (t) => {
    let worstRef = 0, worstRec = { maxAbs: 0, relL2: 0 }, worstTag = '';
    for (const [Hk, Hv, Dk, Dv, l2, T, gAmp] of [
      [1, 2, 32, 40, true, 64, 2], [2, 4, 16, 24, false, 130, 0.1], [1, 3, 128, 36, true, 300, 0.5], [2, 2, 8, 8, false, 300, 2],
    ] as const) {
      const x = deltaInputs(3400 + T + Dk, T, Hk, Hv, Dk, Dv, l2, gAmp);
      const per = Hv * Dk * Dv;
      const pool0 = uniform(2 * per, rng(3401 + T), 0.5);
      const slot = Int32Array.of(1);
      const base: DeltaRuleOptions = { T, Hk, Hv, Dk, Dv, l2normQk: l2 };
      const chunked = runDelta(x, [T], slot, pool0, { ...base, chunk: 64 });
      const rec = runDelta(x, [T], slot, pool0, { ...base, chunk: 1 });
      const tag = `Hk${Hk} Hv${Hv} Dk${Dk} Dv${Dv} l2 ${l2} T${T} g ${gAmp}`;
      const refState = Float64Array.from(pool0.subarray(per));
      const ref = refDelta(x.q, x.k, x.v, x.g, x.beta, refState, { T, Hk, Hv, Dk, Dv }, l2);
      for (const [got, want, what] of [[chunked.out, ref, 'out'], [chunked.pool.subarray(per), refState, 'state']] as const) {
        const e = close(got, want, TOL_CHUNK, `${tag} chunked ${what}`);
        if (e > worstRef) [worstRef, worstTag] = [e, `${tag} ${what}`];
      }
      assert.deepEqual(chunked.pool.subarray(0, per), pool0.subarray(0, per), `${label} ${tag}: slot 0 untouched`);
      // the chunked kernel ran (its roundings are not the recurrence's) and agrees with it to f32 rounding
      assert.ok(differs(chunked.out, rec.out), `${label} ${tag}: chunk 64 gave the recurrence's bits`);
      const m = maxAbsOf(rec.out);
      const e = assertClose(chunked.out, rec.out, { maxAbs: CHUNK_VS_REC.maxAbs * m, relL2: CHUNK_VS_REC.relL2 },
        `${label} ${tag} chunked vs token by token`);
      worstRec = { maxAbs: Math.max(worstRec.maxAbs, e.maxAbs / m), relL2: Math.max(worstRec.relL2, e.relL2) };
    }
    t.diagnostic(`${label}: chunked worst relL2 vs float64 ${worstRef.toExponential(2)} (${worstTag}); vs token by token ` +
      `maxAbs/max ${worstRec.maxAbs.toExponential(2)}, relL2 ${worstRec.relL2.toExponential(2)}`);
  });

  test(`${label}: a chunked prefill's state carries into the next decode step`, { skip }, () => {
    const [Hk, Hv, Dk, Dv, T] = [1, 2, 32, 32, 131];
    const x = deltaInputs(3500, T, Hk, Hv, Dk, Dv, true, 0.5);
    const per = Hv * Dk * Dv;
    const pool0 = uniform(per, rng(3501), 0.5);
    const base: DeltaRuleOptions = { T, Hk, Hv, Dk, Dv, l2normQk: true, chunk: 64 };
    const pre = runDelta(sliceIn(x, 0, T - 1, Hk, Hv, Dk, Dv), [T - 1], Int32Array.of(0), pool0, base);
    const dec = runDelta(sliceIn(x, T - 1, 1, Hk, Hv, Dk, Dv), [1], Int32Array.of(0), pre.pool, base);
    const refState = Float64Array.from(pool0);
    const ref = refDelta(x.q, x.k, x.v, x.g, x.beta, refState, { T, Hk, Hv, Dk, Dv }, true);
    close(pre.out, ref.subarray(0, (T - 1) * Hv * Dv), TOL_CHUNK, 'prefill out');
    close(dec.out, ref.subarray((T - 1) * Hv * Dv), TOL_CHUNK, 'decode out after the chunked prefill');
    close(dec.pool, refState, TOL_CHUNK, 'state after the decode step');
    // the decode step is the recurrent kernel's: the same bits as a chunk-1 call from the same state
    const rec = runDelta(sliceIn(x, T - 1, 1, Hk, Hv, Dk, Dv), [1], Int32Array.of(0), pre.pool, { ...base, chunk: 1 });
    assert.deepEqual(dec.out, rec.out, `${label}: decode step == the recurrent step`);
    assert.deepEqual(dec.pool, rec.pool, `${label}: decode state == the recurrent step's`);
  });

  test(`${label}: a mixed batch (a 130-token prefill beside two decodes) equals each sequence alone`, { skip }, () => {
    const [Hk, Hv, Dk, Dv] = [2, 4, 16, 40];
    const lens = [1, 130, 1], slots = Int32Array.from([3, 0, 2]);
    const T = 132, per = Hv * Dk * Dv;
    const x = deltaInputs(3600, T, Hk, Hv, Dk, Dv, true, 1);
    const pool0 = uniform(4 * per, rng(3601), 0.5);
    const opts: DeltaRuleOptions = { T, Hk, Hv, Dk, Dv, l2normQk: true, chunk: 64 };
    const both = runDelta(x, lens, slots, pool0, opts);
    // the host-side lengths only decide whether the chunked kernel is launched: the same bits with them
    const hinted = runDelta(x, lens, slots, pool0, opts, Int32Array.from(lens));
    assert.deepEqual(hinted.out, both.out, `${label}: seqLens given == not given (out)`);
    assert.deepEqual(hinted.pool, both.pool, `${label}: seqLens given == not given (state)`);
    // lengths that say no sequence has a whole chunk: every token by the recurrence (a chunk-1 call)
    const rec = runDelta(x, lens, slots, pool0, { ...opts, chunk: 1 });
    assert.deepEqual(runDelta(x, lens, slots, pool0, opts, Int32Array.of(1, 1, 1)).out, rec.out, `${label}: seqLens below the chunk == the recurrence`);
    assert.ok(differs(both.out, rec.out), `${label}: the 130-token sequence ran the chunked kernel`);
    let t0 = 0;
    lens.forEach((n, b) => {
      const sl = slots[b]!;
      const alone = runDelta(sliceIn(x, t0, n, Hk, Hv, Dk, Dv), [n], Int32Array.of(0), pool0.slice(sl * per, (sl + 1) * per), opts);
      assert.deepEqual(both.out.subarray(t0 * Hv * Dv, (t0 + n) * Hv * Dv), alone.out, `${label} seq ${b}: batched == alone (out)`);
      assert.deepEqual(both.pool.subarray(sl * per, (sl + 1) * per), alone.pool, `${label} seq ${b}: batched == alone (state)`);
      const refState = Float64Array.from(pool0.subarray(sl * per, (sl + 1) * per));
      const xi = sliceIn(x, t0, n, Hk, Hv, Dk, Dv);
      const ref = refDelta(xi.q, xi.k, xi.v, xi.g, xi.beta, refState, { T: n, Hk, Hv, Dk, Dv }, true);
      close(alone.out, ref, TOL_CHUNK, `mixed seq ${b} out`);
      close(alone.pool, refState, TOL_CHUNK, `mixed seq ${b} state`);
      t0 += n;
    });
    assert.deepEqual(both.pool.subarray(per, 2 * per), pool0.subarray(per, 2 * per), `${label}: unused slot untouched`);
  });

  test(`${label}: Dk 256 runs chunkwise at chunk 32 and by the recurrence at chunk 64 (shared memory bound)`, { skip }, () => {
    const [Hk, Hv, Dk, Dv, T] = [1, 1, 256, 8, 70];
    const x = deltaInputs(3700, T, Hk, Hv, Dk, Dv, true, 0.5);
    const per = Hv * Dk * Dv, pool0 = uniform(per, rng(3701), 0.5), slot = Int32Array.of(0);
    const base: DeltaRuleOptions = { T, Hk, Hv, Dk, Dv, l2normQk: true };
    const rec = runDelta(x, [T], slot, pool0, { ...base, chunk: 1 });
    const c64 = runDelta(x, [T], slot, pool0, { ...base, chunk: 64 });
    const c32 = runDelta(x, [T], slot, pool0, { ...base, chunk: 32 });
    assert.deepEqual(c64.out, rec.out, `${label}: chunk 64 at Dk 256 is the recurrence`);
    assert.ok(differs(c32.out, rec.out), `${label}: chunk 32 at Dk 256 runs the chunked kernel`);
    const refState = Float64Array.from(pool0);
    const ref = refDelta(x.q, x.k, x.v, x.g, x.beta, refState, { T, Hk, Hv, Dk, Dv }, true);
    close(c32.out, ref, TOL_CHUNK, 'Dk 256 chunk 32 out');
    close(c32.pool, refState, TOL_CHUNK, 'Dk 256 chunk 32 state');
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
    inv(() => cu.cudaGatedDeltaRule(b, b, b, b, b, b, b, b, 1, b, { ...opts, chunk: 0 }), /opts\.chunk is 0, expected 1\.\.256/);
    inv(() => cu.cudaGatedDeltaRule(b, b, b, b, b, b, b, b, 1, b, { ...opts, chunk: 257 }), /opts\.chunk is 257, expected 1\.\.256/);
    inv(() => cu.cudaGatedDeltaRule(b, b, b, b, b, b, b, b, 1, b, { ...opts, chunk: 1.5 }), /opts\.chunk must be an integer/);
    inv(() => cu.cudaGatedDeltaRule(b, b, b, b, b, b, b, b, 1, b, opts, null, Int32Array.of(1, 1)), /seqLens\.length is 2, expected 1/);
    inv(() => cu.cudaGatedDeltaRule(b, b, b, b, b, b, b, b, 1, b, opts, null, Int32Array.of(3)), /seqLens\[0\] is 3, expected 0\.\.2 \(opts\.T\)/);
    inv(() => cu.cudaGatedDeltaRule(b, b, b, b, b, b, b, b, 1, b, opts, null, [2] as unknown as Int32Array), /seqLens must be a Int32Array/);
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
