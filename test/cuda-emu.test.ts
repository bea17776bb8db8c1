// The CUDA emulator itself (test/helpers/cuda-emu.ts): the bindings' argument errors, what it does
// where a GPU would fault (device lost), memory accounting, expert-table lifetimes, and the time a
// tiny MoE forward takes on it. Op semantics are checked by the shared device suite in cuda.test.ts.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import type { CudaAddon, CudaBuffer } from '../src/native/types.js';
import { mulberry32 } from '../src/engine/rng.js';
import { createCudaEmulator, f32ToBf16 } from './helpers/cuda-emu.js';
import { fileSeed } from './helpers/seed.js';

const rand = mulberry32(fileSeed(1234));
const rnd = (n: number, amp = 0.1) => Float32Array.from({ length: n }, () => (rand() * 2 - 1) * amp);
const bf16 = (x: Float32Array) => Uint16Array.from(x, f32ToBf16);
const coded = (code: string) => (e: Error & { code?: string }) => e.code === code;

function upload(cu: CudaAddon, data: ArrayBufferView): CudaBuffer {
  const b = cu.cudaBuffer(Math.max(16, data.byteLength));
  cu.cudaCopyToDevice(b, 0, data);
  return b;
}

test('the emulator reports one healthy device without cuBLASLt or NCCL', () => {
  const cu = createCudaEmulator();
  assert.equal(cu.cudaDeviceCount(), 1);
  assert.equal(cu.cudaDeviceLost(), false);
  assert.equal(cu.cudaCublasLt(), null);
  assert.equal(cu.cudaDeviceInfo(0).computeCapability, '9.0');
  assert.throws(() => cu.cudaDeviceInfo(1), { name: 'RangeError', message: 'device is 1, expected 0..0' });
  assert.throws(() => cu.cudaSetDevice(1), coded('E_CUDA'));
  // NCCL is the loopback group: a world of one sends to itself.
  const g = cu.cudaNcclJoin(cu.cudaNcclUniqueId(), 1, 0);
  const src = upload(cu, Uint16Array.from({ length: 32 }, (_, i) => i * 3 + 1)), dst = cu.cudaBuffer(64);
  g.all2allv(src, Float64Array.of(64), dst, Float64Array.of(64));
  const back = new Uint16Array(32);
  cu.cudaCopyToHost(back, dst, 0);
  assert.deepEqual(Array.from(back), Array.from({ length: 32 }, (_, i) => i * 3 + 1));
  g.dispose();
  assert.throws(() => cu.cudaNcclJoin(new Uint8Array(12), 1, 0), { name: 'RangeError', message: 'uniqueId.length is 12, expected 128' });
  const x = upload(cu, new Uint16Array(64)), y = cu.cudaBuffer(4 * 8 * 8);
  assert.equal(cu.cudaDenseGemm(x, 4, upload(cu, new Uint16Array(64)), 8, 8, y, null, false, 'auto'), 'kernel');
  assert.throws(() => cu.cudaDenseGemm(x, 4, x, 8, 8, y, null, false, 'cublaslt'), coded('E_CUDA'));
});

test('the emulator validates arguments with the bindings\' messages', () => {
  const cu = createCudaEmulator();
  assert.throws(() => cu.cudaBuffer(-1), { name: 'RangeError', message: 'sizeBytes is -1, expected 0..17592186044416' });
  assert.throws(() => cu.cudaBuffer(1.5), { name: 'TypeError', message: 'sizeBytes must be an integer, got 1.500000' });
  assert.throws(() => cu.cudaRmsNorm({} as CudaBuffer, 1, 8, {} as CudaBuffer, 1e-6, {} as CudaBuffer, null), {
    name: 'TypeError', message: 'x must be a CudaBuffer',
  });
  assert.throws(() => cu.cudaDenseGemm({} as CudaBuffer, 1, {} as CudaBuffer, 12, 16, {} as CudaBuffer, null, false), {
    name: 'RangeError', message: 'n and k must be multiples of 8 (n is 12, k is 16)',
  });
  assert.throws(() => new cu.CudaExpertTable(0, 64, 32), { name: 'RangeError', message: 'numExperts is 0, expected 1..1024' });
  const small = cu.cudaBuffer(16), out = cu.cudaBuffer(64);
  assert.throws(() => cu.cudaRmsNorm(small, 2, 8, small, 1e-6, out, null), {
    name: 'RangeError', message: 'x.sizeBytes is 16, expected at least 64',
  });
  assert.throws(() => cu.cudaSoftmax(out, 2, 8, out, true, {} as never), { name: 'TypeError', message: 'stream must be a CudaStream or null' });
  assert.throws(() => cu.cudaPagedAttention(out, out, out, out, out, {
    numSeqs: 1, heads: 4, kvHeads: 3, dk: 8, dv: 8, blockSize: 16, maxBlocks: 1, scale: 1, totalTokens: 1, maxContext: 1, numBlocks: 1,
  }, out), { name: 'RangeError', message: 'opts.heads must be a multiple of opts.kvHeads' });
  assert.throws(() => cu.cudaPagedAttention(out, out, out, out, out, {
    numSeqs: 1, heads: 4, kvHeads: 2.5, dk: 8, dv: 8, blockSize: 16, maxBlocks: 1, scale: 1, totalTokens: 1, maxContext: 1, numBlocks: 1,
  }, out), { name: 'RangeError', message: 'opts.kvHeads is 2.500000, expected an integer in 1..4' });
  assert.throws(() => new (cu.CudaBuffer as new () => CudaBuffer)(), {
    name: 'TypeError', message: 'CudaBuffer cannot be constructed directly; use cudaBuffer()',
  });
  // The emulator's own checks of the glue ops (bounds computed like the others).
  assert.throws(() => cu.cudaCopy2D(out, 0, 8, out, 0, 4, 8, 2), {
    name: 'RangeError', message: 'srcPitchBytes is 4, expected at least widthBytes = 8',
  });
  assert.throws(() => cu.cudaCopyRowRange(out, out, small, 2, 1, 4, 4), { name: 'RangeError', message: 'hi is 1, expected 2..2147483647' });
  assert.throws(() => cu.cudaGemmF32(out, 1, out, 'f16' as 'f32', 1, 1, out, null, false), {
    name: 'TypeError', message: "wDtype must be 'f32' or 'bf16'",
  });
});

test('the emulator poisons fresh memory, reuses cached blocks and runs out of memory', () => {
  const cu = createCudaEmulator({ totalBytes: 1 << 20 });
  const a = cu.cudaBuffer(1000);
  const fresh = new Float32Array(250);
  cu.cudaCopyToHost(fresh, a, 0);
  assert.ok(fresh.every(Number.isNaN), 'fresh device memory reads as NaN');
  cu.cudaFill(a, 0);
  const v = a.view(0, 8);
  a.dispose();
  assert.equal(cu.cudaMemInfo().allocatedBytes, 1024, 'a live view keeps the block');
  v.dispose();
  assert.deepEqual([cu.cudaMemInfo().allocatedBytes, cu.cudaMemInfo().cachedBytes], [0, 1024]);
  const b = cu.cudaBuffer(1000);
  const info = cu.cudaMemInfo();
  assert.deepEqual([info.cacheHits, info.deviceMallocs], [1, 1]);
  const reused = new Float32Array(250);
  cu.cudaCopyToHost(reused, b, 0);
  assert.ok(reused.every((x) => x === 0), 'a cached block keeps its old bytes, as on a GPU');
  assert.throws(() => cu.cudaBuffer(2 << 20), (e: Error & { code?: string }) => e.code === 'E_OOM' && /out of memory/.test(e.message));
  b.dispose();
  cu.cudaEmptyCache();
  assert.equal(cu.cudaMemInfo().cachedBytes, 0);
  assert.equal(cu.cudaMemInfo().freeBytes, 1 << 20);
});

test('device data that would make a kernel fault loses the emulated device', () => {
  const cu = createCudaEmulator();
  const T = 4, kvh = 2, dk = 8, slotsN = 16;
  const k = upload(cu, rnd(T * kvh * dk)), kc = cu.cudaBuffer(slotsN * kvh * dk * 4);
  cu.cudaKvCacheWrite(k, null, T, upload(cu, Int32Array.of(0, 15, -1, 3)), kc, null, kvh, dk, 0, 0, slotsN);
  assert.equal(cu.cudaDeviceLost(), false);
  // An out-of-range expert id is no fault: permute skips it (its contract, routing.cu).
  const E = 4, x = upload(cu, rnd(T * 8)), pidx = cu.cudaBuffer(T * 4);
  cu.cudaPermute(x, T, 8, upload(cu, Int32Array.of(0, 4, -1, 3)), 1, E, cu.cudaBuffer(T * 8 * 4), pidx, cu.cudaBuffer((E + 1) * 4), 'f32');
  assert.equal(cu.cudaDeviceLost(), false);
  assert.throws(() => cu.cudaKvCacheWrite(k, null, T, upload(cu, Int32Array.of(0, 16, 1, 3)), kc, null, kvh, dk, 0, 0, slotsN),
    (e: Error & { code?: string }) => e.code === 'E_CUDA' && /slots\[1\] is 16/.test(e.message) && /device is lost/.test(e.message));
  assert.equal(cu.cudaDeviceLost(), true);
  assert.throws(() => cu.cudaSynchronize(), coded('E_CUDA'));
  assert.throws(() => cu.cudaBuffer(16), coded('E_CUDA'));
  // A misaligned f32 view faults too (on a fresh device).
  const cu2 = createCudaEmulator();
  const b = cu2.cudaBuffer(64);
  assert.throws(() => cu2.cudaAdd(b.view(2, 32), b, 4), coded('E_CUDA'));
  assert.equal(cu2.cudaDeviceLost(), true);
});

test('expert tables hold their weights; experts without weights leave their rows alone', () => {
  const cu = createCudaEmulator();
  const E = 3, H = 16, I = 8;
  const table = new cu.CudaExpertTable(E, H, I);
  assert.throws(() => table.set(0, cu.cudaBuffer(16), cu.cudaBuffer(H * I * 2)), {
    name: 'RangeError', message: `gateUp.sizeBytes is 16, expected at least ${2 * I * H * 2}`,
  });
  const big = cu.cudaBuffer(2 * I * H * 2 + 8);
  assert.throws(() => table.set(0, big.view(8, 2 * I * H * 2), cu.cudaBuffer(H * I * 2)), {
    name: 'RangeError', message: 'gateUp and down must start 16-byte aligned',
  });
  assert.throws(() => table.has(3), { name: 'RangeError', message: 'expert is 3, expected 0..2' });
  for (let e = 0; e < E; e++) {
    const gu = upload(cu, bf16(rnd(2 * I * H))), dn = upload(cu, bf16(rnd(H * I)));
    table.set(e, gu, dn);
    gu.dispose();  // the table keeps the allocation
    dn.dispose();
  }
  table.clear(1);
  assert.deepEqual([table.has(0), table.has(1), table.has(2)], [true, false, true]);
  const rows = 6, offsets = Int32Array.of(0, 2, 4, 6);
  const y = cu.cudaBuffer(rows * H * 4), hs = cu.cudaBuffer(rows * I * 2);
  cu.cudaFill(y, 0xff);
  cu.cudaGroupGemmFfn(upload(cu, bf16(rnd(rows * H, 1))), upload(cu, offsets), table, rows, hs, y);
  const got = new Float32Array(rows * H);
  cu.cudaCopyToHost(got, y, 0);
  for (let r = 0; r < rows; r++) {
    const row = got.subarray(r * H, r * H + H);
    assert.ok(r >= 2 && r < 4 ? row.every(Number.isNaN) : row.every(Number.isFinite), `row ${r}`);
  }
  table.dispose();
  assert.throws(() => table.has(0), { code: 'E_DISPOSED', message: 'expert table has been disposed' });
  assert.equal(cu.cudaMemInfo().allocatedBytes > 0, true);
});

test('tiny MoE forward (H=64, V=1024, 4 layers, 100 tokens) timing', (t) => {
  const cu = createCudaEmulator();
  const T = 100, H = 64, V = 1024, L = 4, heads = 4, kvHeads = 2, dk = 16, E = 8, K = 2, I = 128, bs = 16;
  const emb = upload(cu, rnd(V * H, 1));
  const lm = upload(cu, rnd(V * H));
  const normW = upload(cu, Float32Array.from({ length: H }, () => 1));
  const layers = Array.from({ length: L }, () => {
    const table = new cu.CudaExpertTable(E, H, I);
    for (let e = 0; e < E; e++) table.set(e, upload(cu, bf16(rnd(2 * I * H))), upload(cu, bf16(rnd(H * I))));
    return {
      qkv: upload(cu, rnd((heads + 2 * kvHeads) * dk * H)), o: upload(cu, rnd(H * heads * dk)), gate: upload(cu, rnd(E * H)), table,
      kc: cu.cudaBuffer(8 * bs * kvHeads * dk * 4), vc: cu.cudaBuffer(8 * bs * kvHeads * dk * 4),
    };
  });
  const ids = upload(cu, Int32Array.from({ length: T }, (_, i) => (i * 37) % V));
  const pos = upload(cu, Int32Array.from({ length: T }, (_, i) => i));
  const slots = upload(cu, Int32Array.from({ length: T }, (_, i) => i));
  const seqInfo = upload(cu, Int32Array.of(0, T, T)), tables = upload(cu, Int32Array.from({ length: 8 }, (_, i) => i));
  const inv = upload(cu, Float32Array.from({ length: dk / 2 }, (_, i) => Math.pow(10000, (-2 * i) / dk)));
  const x = cu.cudaBuffer(T * H * 4), res = cu.cudaBuffer(T * H * 4), hn = cu.cudaBuffer(T * H * 4);
  const qkvOut = cu.cudaBuffer(T * (heads + 2 * kvHeads) * dk * 4), q = cu.cudaBuffer(T * heads * dk * 4);
  const k = cu.cudaBuffer(T * kvHeads * dk * 4), v = cu.cudaBuffer(T * kvHeads * dk * 4), att = cu.cudaBuffer(T * heads * dk * 4);
  const logits = cu.cudaBuffer(T * E * 4), rid = cu.cudaBuffer(T * K * 4), rw = cu.cudaBuffer(T * K * 4), cnt = cu.cudaBuffer(E * 4);
  const xp = cu.cudaBuffer(T * K * H * 2), pidx = cu.cudaBuffer(T * K * 4), offs = cu.cudaBuffer((E + 1) * 4);
  const hs = cu.cudaBuffer(T * K * I * 2), yp = cu.cudaBuffer(T * K * H * 4), out = cu.cudaBuffer(T * V * 4);
  const topIds = cu.cudaBuffer(T * 4), topVals = cu.cudaBuffer(T * 4);
  const forward = () => {
    cu.cudaEmbedding(emb, 'f32', V, H, ids, T, x);
    cu.cudaFill(res, 0);
    for (const l of layers) {
      cu.cudaRmsNorm(x, T, H, normW, 1e-6, hn, res);
      const W = (heads + 2 * kvHeads) * dk;
      cu.cudaGemmF32(hn, T, l.qkv, 'f32', W, H, qkvOut, null, false);
      cu.cudaCopy2D(q, 0, heads * dk * 4, qkvOut, 0, W * 4, heads * dk * 4, T);
      cu.cudaCopy2D(k, 0, kvHeads * dk * 4, qkvOut, heads * dk * 4, W * 4, kvHeads * dk * 4, T);
      cu.cudaCopy2D(v, 0, kvHeads * dk * 4, qkvOut, (heads + kvHeads) * dk * 4, W * 4, kvHeads * dk * 4, T);
      cu.cudaRope(q, T, heads, heads * dk, dk, 0, pos, inv, dk, 1, false);
      cu.cudaRope(k, T, kvHeads, kvHeads * dk, dk, 0, pos, inv, dk, 1, false);
      cu.cudaKvCacheWrite(k, v, T, slots, l.kc, l.vc, kvHeads, dk, dk, dk, 8 * bs);
      cu.cudaPagedAttention(q, l.kc, l.vc, seqInfo, tables, {
        numSeqs: 1, heads, kvHeads, dk, dv: dk, blockSize: bs, maxBlocks: 8, scale: 0.25, totalTokens: T, maxContext: T, numBlocks: 8,
      }, att);
      cu.cudaGemmF32(att, T, l.o, 'f32', H, heads * dk, x, null, false);
      cu.cudaRmsNorm(x, T, H, normW, 1e-6, hn, res);
      cu.cudaGemmF32(hn, T, l.gate, 'f32', E, H, logits, null, false);
      cu.cudaRoute(logits, T, E, K, { scoring: 'softmax', renormalize: true }, rid, rw, cnt);
      cu.cudaPermute(hn, T, H, rid, K, E, xp, pidx, offs, 'bf16');
      cu.cudaGroupGemmFfn(xp, offs, l.table, T * K, hs, yp);
      cu.cudaUnpermuteCombine(yp, pidx, rw, T, K, H, x, false);
    }
    cu.cudaRmsNorm(x, T, H, normW, 1e-6, hn, res);
    cu.cudaGemmF32(hn, T, lm, 'f32', V, H, out, null, false);
    cu.cudaTopN(out, T, V, 1, topIds, topVals);
    const got = new Float32Array(T);
    cu.cudaCopyToHost(got, topVals, 0);
    return got;
  };
  forward();
  const t0 = performance.now();
  const vals = forward();
  const ms = performance.now() - t0;
  t.diagnostic(`emulated forward: ${ms.toFixed(1)} ms`);
  assert.ok(vals.every(Number.isFinite));
});
