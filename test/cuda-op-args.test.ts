// Argument checks of cudaGroupGemmFfn, cudaGroupGemmBiasedFfn, cudaClampedSwiglu, cudaDenseGemm and cudaRope: exact TypeError/RangeError
// messages, raised before the device is touched. Each suite runs on the full addon (scalar checks
// on any full build, buffer sizes and alignments where a device can make buffers) and on the CPU
// emulator (test/helpers/cuda-emu.ts, always), which must agree with the bindings message for message.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import type { CudaAddon, CudaBuffer, NativeAddon } from '../src/native/types.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { emulatorSkip, needsCudaBuild, needsCudaDevice } from './helpers/cuda-skip.js';

const native = loadNative();
const real = native as NativeAddon & CudaAddon;
const compiled = needsCudaBuild;
const device = needsCudaDevice;

const nb = {} as CudaBuffer;  // not a CudaBuffer: any check that reaches it fails with its own message
const typeErr = (message: string) => ({ name: 'TypeError', message, code: 'E_INVALID_ARG' });
const rangeErr = (message: string) => ({ name: 'RangeError', message, code: 'E_INVALID_ARG' });

function argSuite(label: string, cu: CudaAddon, scalarSkip: string | false, bufferSkip: string | false) {
  // Calls a binding with a loose argument list (the bad arguments are the point).
  const call = (name: string, ...args: unknown[]) => () =>
    (cu as unknown as Record<string, (...a: unknown[]) => unknown>)[name]!(...args);

  test(`${label}: cudaRope refuses overlapping heads and a rotDim beyond 4096 before its buffers`, { skip: scalarSkip }, () => {
    const msg = (hs: number, rot: number) =>
      `headStride is ${hs}, expected at least rotDim = ${rot} when heads > 1 (heads must not overlap)`;
    // (x, t, heads, rowStride, headStride, offset, positions, invFreq, rotDim, attnScale, interleaved)
    assert.throws(call('cudaRope', nb, 2, 4, 64, 0, 0, nb, nb, 16, 1, false), rangeErr(msg(0, 16)));
    assert.throws(call('cudaRope', nb, 2, 2, 64, 8, 0, nb, nb, 16, 1, true), rangeErr(msg(8, 16)));
    assert.throws(call('cudaRope', nb, 2, 2, 64, 15, 0, nb, nb, 16, 1, false), rangeErr(msg(15, 16)));
    assert.throws(call('cudaRope', nb, 1, 2, 4096, 0, 0, nb, nb, 4096, 1, false), rangeErr(msg(0, 4096)));
    assert.throws(call('cudaRope', nb, 2, 1, 8192, 0, 0, nb, nb, 4098, 1, false), rangeErr('rotDim is 4098, expected 2..4096'));
    assert.throws(call('cudaRope', nb, 2, 1, 1 << 17, 0, 0, nb, nb, 1 << 16, 1, false), rangeErr('rotDim is 65536, expected 2..4096'));
    assert.throws(call('cudaRope', nb, 2, 1, 8192, 0, 0, nb, nb, 4095, 1, false), rangeErr('rotDim is 4095, expected an even number'));
    // Valid: one head with headStride 0, heads exactly rotDim apart, rotDim 4096. The buffers come next.
    assert.throws(call('cudaRope', nb, 2, 1, 64, 0, 0, nb, nb, 16, 1, false), typeErr('x must be a CudaBuffer'));
    assert.throws(call('cudaRope', nb, 2, 4, 64, 16, 0, nb, nb, 16, 1, false), typeErr('x must be a CudaBuffer'));
    assert.throws(call('cudaRope', nb, 2, 1, 4096, 0, 0, nb, nb, 4096, 1, false), typeErr('x must be a CudaBuffer'));
    // The span check still follows: 2 heads 16 apart from column 40 reach column 72 > 64.
    assert.throws(call('cudaRope', nb, 2, 2, 64, 16, 40, nb, nb, 16, 1, false),
      rangeErr('heads, headStride, offset and rotDim reach column 72, beyond rowStride 64'));
  });

  test(`${label}: cudaGroupGemmFfn checks its table and rows before its buffers`, { skip: scalarSkip }, () => {
    assert.throws(call('cudaGroupGemmFfn', nb, nb, {}, 4, nb, nb), typeErr('experts must be a CudaExpertTable'));
    const table = new cu.CudaExpertTable(2, 64, 32);
    assert.throws(call('cudaGroupGemmFfn', nb, nb, table, -1, nb, nb), rangeErr('rows is -1, expected 0..268435456'));
    assert.throws(call('cudaGroupGemmFfn', nb, nb, table, 4, nb, nb), typeErr('x must be a CudaBuffer'));
    table.dispose();
  });

  test(`${label}: cudaGroupGemmBiasedFfn and cudaClampedSwiglu (gpt-oss) check their scalars before their buffers`, { skip: scalarSkip }, () => {
    const act = { gateUpBias: nb, downBias: nb, alpha: 1.702, limit: 7 };
    assert.throws(call('cudaGroupGemmBiasedFfn', nb, nb, {}, 4, nb, nb, nb, act), typeErr('experts must be a CudaExpertTable'));
    const table = new cu.CudaExpertTable(2, 64, 32);
    assert.throws(call('cudaGroupGemmBiasedFfn', nb, nb, table, -1, nb, nb, nb, act), rangeErr('rows is -1, expected 0..268435456'));
    assert.throws(call('cudaGroupGemmBiasedFfn', nb, nb, table, 4, nb, nb, nb, null), typeErr('opts must be an object'));
    assert.throws(call('cudaGroupGemmBiasedFfn', nb, nb, table, 4, nb, nb, nb, { ...act, alpha: '1' }), typeErr('opts.alpha must be a number'));
    assert.throws(call('cudaGroupGemmBiasedFfn', nb, nb, table, 4, nb, nb, nb, { ...act, limit: -7 }),
      rangeErr('opts.limit is -7.000000, expected a positive number'));
    assert.throws(call('cudaGroupGemmBiasedFfn', nb, nb, table, 4, nb, nb, nb, act), typeErr('x must be a CudaBuffer'));
    table.dispose();
    assert.throws(call('cudaClampedSwiglu', nb, 2, 8, 0, 7, nb), rangeErr('alpha is 0.000000, expected a positive number'));
    assert.throws(call('cudaClampedSwiglu', nb, 2, 8, 1.702, Infinity, nb), rangeErr('limit is inf, expected a positive number'));
    assert.throws(call('cudaClampedSwiglu', nb, 2, 8, 1.702, 7, nb), typeErr('gu must be a CudaBuffer'));
  });

  test(`${label}: cudaGroupGemmFfn checks sizes and alignments: x, hScratch 16 B, y 8 B, offsets 4 B`, { skip: bufferSkip }, () => {
    const E = 2, H = 64, I = 32, rows = 4;
    const table = new cu.CudaExpertTable(E, H, I);
    const big = cu.cudaBuffer(8192);
    const x = cu.cudaBuffer(rows * H * 2), hs = cu.cudaBuffer(rows * I * 2), y = cu.cudaBuffer(rows * H * 4);
    const offsets = cu.cudaBuffer((E + 1) * 4);
    cu.cudaFill(offsets, 0);  // no expert has rows
    const ffn = (...a: unknown[]) => call('cudaGroupGemmFfn', ...a);
    assert.throws(ffn(big.view(16, rows * H * 2 - 2), offsets, table, rows, hs, y), rangeErr('x.sizeBytes is 510, expected at least 512'));
    assert.throws(ffn(big.view(8, rows * H * 2), offsets, table, rows, hs, y), rangeErr('x must start 16-byte aligned'));
    assert.throws(ffn(big.view(2, rows * H * 2), offsets, table, rows, hs, y), rangeErr('x must start 16-byte aligned'));
    assert.throws(ffn(x, big.view(0, 8), table, rows, hs, y), rangeErr('offsets.sizeBytes is 8, expected at least 12'));
    assert.throws(ffn(x, big.view(2, 12), table, rows, hs, y), rangeErr('offsets must start 4-byte aligned'));
    assert.throws(ffn(x, offsets, table, rows, big.view(0, rows * I * 2 - 2), y), rangeErr('hScratch.sizeBytes is 254, expected at least 256'));
    assert.throws(ffn(x, offsets, table, rows, big.view(4, rows * I * 2), y), rangeErr('hScratch must start 16-byte aligned'));
    assert.throws(ffn(x, offsets, table, rows, big.view(8, rows * I * 2), y), rangeErr('hScratch must start 16-byte aligned'));
    assert.throws(ffn(x, offsets, table, rows, hs, big.view(0, rows * H * 4 - 4)), rangeErr('y.sizeBytes is 1020, expected at least 1024'));
    assert.throws(ffn(x, offsets, table, rows, hs, big.view(4, rows * H * 4)), rangeErr('y must start 8-byte aligned'));
    assert.throws(ffn(x, offsets, table, rows, hs, y, { tile: 'huge' }), typeErr("opts.tile must be 'auto', 'small', 'large', 'sm90', 'sm90-swizzle' or 'sm90-persistent'"));
    // The least alignments the binding accepts run (offsets all 0: no expert has rows).
    cu.cudaFill(big, 0);
    cu.cudaGroupGemmFfn(big.view(16, rows * H * 2), big.view(4096, 12), table, rows, big.view(1040, rows * I * 2),
      big.view(2056, rows * H * 4));
    cu.cudaSynchronize();
    assert.equal(cu.cudaDeviceLost(), false);
    for (const b of [table, big, x, hs, y, offsets]) b.dispose();
  });

  test(`${label}: cudaDenseGemm checks sizes and 16-byte alignment of x, w, y and bias`, { skip: bufferSkip }, () => {
    const m = 2, n = 8, k = 16;
    const big = cu.cudaBuffer(4096);
    const x = cu.cudaBuffer(m * k * 2), w = cu.cudaBuffer(n * k * 2), y = cu.cudaBuffer(m * n * 4), bias = cu.cudaBuffer(n * 4);
    const gemm = (...a: unknown[]) => call('cudaDenseGemm', ...a);
    assert.throws(gemm(big.view(8, m * k * 2), m, w, n, k, y, null, false), rangeErr('x must start 16-byte aligned'));
    assert.throws(gemm(x, m, big.view(2, n * k * 2), n, k, y, null, false), rangeErr('w must start 16-byte aligned'));
    assert.throws(gemm(x, m, w, n, k, big.view(8, m * n * 4), null, false), rangeErr('y must start 16-byte aligned'));
    assert.throws(gemm(x, m, w, n, k, y, big.view(4, n * 4), false), rangeErr('bias must start 16-byte aligned'));
    assert.throws(gemm(x, m, w, n, k, y, big.view(16, n * 4 - 4), false), rangeErr('bias.sizeBytes is 28, expected at least 32'));
    assert.throws(gemm(x, m, w, n, k, y, nb, false), typeErr('bias must be a CudaBuffer'));
    assert.equal(cu.cudaDeviceLost(), false);
    for (const b of [big, x, w, y, bias]) b.dispose();
  });
}

argSuite('cuda', real, compiled, device);
if (!emulatorSkip) argSuite('emulated', createCudaEmulator(), false, false);
