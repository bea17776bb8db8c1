// Argument checks of the device engine's glue ops (cudaGemmF32, cudaAdd, cudaGatedAdd, cudaClamp,
// cudaCopy2D, cudaCopyRowRange, cudaSigmoidMul, cudaDeltaGates): exact TypeError/RangeError messages, raised before the device is
// touched (so the scalar checks run on any full build; buffer sizes need a device to make buffers).
// Their numerics are test/cuda.test.ts's.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import type { CudaAddon, CudaBuffer, CudaStream, NativeAddon } from '../src/native/types.js';
import { needsCudaBuild, needsCudaDevice } from './helpers/cuda-skip.js';

const native = loadNative();
const cu = native as NativeAddon & CudaAddon;
const compiled = needsCudaBuild;
const device = needsCudaDevice;

// Not a CudaBuffer / CudaStream: any check that reaches them fails with its own message.
const nb = {} as CudaBuffer;
const ns = {} as CudaStream;
const typeErr = (message: string) => ({ name: 'TypeError', message, code: 'E_INVALID_ARG' });
const rangeErr = (message: string) => ({ name: 'RangeError', message, code: 'E_INVALID_ARG' });
// Calls a binding with a loose argument list (the bad arguments are the point).
const call = (name: string, ...args: unknown[]) => () =>
  (cu as unknown as Record<string, (...a: unknown[]) => unknown>)[name]!(...args);

const glue = ['cudaGemmF32', 'cudaAdd', 'cudaGatedAdd', 'cudaClamp', 'cudaCopy2D', 'cudaCopyRowRange', 'cudaSigmoidMul',
  'cudaDeltaGates'];

test('the full build exports the eight glue ops', { skip: compiled }, () => {
  for (const name of glue) assert.equal(typeof (cu as unknown as Record<string, unknown>)[name], 'function', name);
});

test('cudaGemmF32 checks its scalars, dtype, flag and stream before its buffers', { skip: compiled }, () => {
  assert.throws(call('cudaGemmF32', nb, 1, nb, 'f32', 1, 1, nb, null), typeErr('cudaGemmF32 expects 9 arguments, got 8'));
  assert.throws(call('cudaGemmF32', nb, -1, nb, 'f32', 1, 1, nb, null, false), rangeErr('m is -1, expected 0..2147483647'));
  assert.throws(call('cudaGemmF32', nb, 1.5, nb, 'f32', 1, 1, nb, null, false), typeErr('m must be an integer, got 1.500000'));
  assert.throws(call('cudaGemmF32', nb, 1, nb, 'f32', '4', 1, nb, null, false), typeErr('n must be a number'));
  assert.throws(call('cudaGemmF32', nb, 1, nb, 'f32', 4, 2 ** 31, nb, null, false), rangeErr('k is 2147483648, expected 0..2147483647'));
  assert.throws(call('cudaGemmF32', nb, 1, nb, 'f16', 4, 8, nb, null, false), typeErr("wDtype must be 'f32' or 'bf16'"));
  assert.throws(call('cudaGemmF32', nb, 1, nb, undefined, 4, 8, nb, null, false), typeErr("wDtype must be 'f32' or 'bf16'"));
  assert.throws(call('cudaGemmF32', nb, 1, nb, 'bf16', 4, 8, nb, null, 1), typeErr('accumulate must be a boolean'));
  assert.throws(call('cudaGemmF32', nb, 1, nb, 'bf16', 4, 8, nb, null, true, ns), typeErr('stream must be a CudaStream or null'));
  // Everything scalar is fine: the first buffer is checked next (and no device was needed so far).
  assert.throws(call('cudaGemmF32', nb, 3, nb, 'bf16', 5, 7, nb, null, true, null), typeErr('x must be a CudaBuffer'));
  assert.throws(call('cudaGemmF32', nb, 0, nb, 'f32', 0, 0, nb, null, false), typeErr('x must be a CudaBuffer'));
});

test('cudaSigmoidMul and cudaDeltaGates check their scalars before their buffers', { skip: compiled }, () => {
  assert.throws(call('cudaSigmoidMul', nb, nb), typeErr('cudaSigmoidMul expects 3 arguments, got 2'));
  assert.throws(call('cudaSigmoidMul', nb, nb, -1), rangeErr('n is -1, expected 0..4398046511104'));
  assert.throws(call('cudaSigmoidMul', nb, nb, 8, ns), typeErr('stream must be a CudaStream or null'));
  assert.throws(call('cudaSigmoidMul', nb, nb, 8), typeErr('x must be a CudaBuffer'));
  assert.throws(call('cudaDeltaGates', nb, 2, 4, nb, nb, nb), typeErr('cudaDeltaGates expects 7 arguments, got 6'));
  assert.throws(call('cudaDeltaGates', nb, -2, 4, nb, nb, nb, nb), rangeErr('t is -2, expected 0..2147483647'));
  assert.throws(call('cudaDeltaGates', nb, 2, 'hv', nb, nb, nb, nb), typeErr('hv must be a number'));
  assert.throws(call('cudaDeltaGates', nb, 2, 4, nb, nb, nb, nb, ns), typeErr('stream must be a CudaStream or null'));
  assert.throws(call('cudaDeltaGates', nb, 2, 4, nb, nb, nb, nb), typeErr('ba must be a CudaBuffer'));
});

test('cudaAdd, cudaGatedAdd and cudaClamp check their scalars before their buffers', { skip: compiled }, () => {
  assert.throws(call('cudaAdd', nb, nb), typeErr('cudaAdd expects 3 arguments, got 2'));
  assert.throws(call('cudaAdd', nb, nb, -1), rangeErr('n is -1, expected 0..4398046511104'));
  assert.throws(call('cudaAdd', nb, nb, 2 ** 43), rangeErr('n is 8796093022208, expected 0..4398046511104'));
  assert.throws(call('cudaAdd', nb, nb, 8, ns), typeErr('stream must be a CudaStream or null'));
  assert.throws(call('cudaAdd', nb, nb, 8), typeErr('y must be a CudaBuffer'));

  assert.throws(call('cudaGatedAdd', nb, nb, nb, 1), typeErr('cudaGatedAdd expects 5 arguments, got 4'));
  assert.throws(call('cudaGatedAdd', nb, nb, nb, -2, 8), rangeErr('t is -2, expected 0..2147483647'));
  assert.throws(call('cudaGatedAdd', nb, nb, nb, 2, 'h'), typeErr('h must be a number'));
  assert.throws(call('cudaGatedAdd', nb, nb, nb, 2, 8, ns), typeErr('stream must be a CudaStream or null'));
  assert.throws(call('cudaGatedAdd', nb, nb, nb, 2, 8), typeErr('out must be a CudaBuffer'));

  assert.throws(call('cudaClamp', nb, 8), typeErr('cudaClamp expects 3 arguments, got 2'));
  assert.throws(call('cudaClamp', nb, -8, 1), rangeErr('n is -8, expected 0..4398046511104'));
  assert.throws(call('cudaClamp', nb, 8, '1'), typeErr('limit must be a number'));
  assert.throws(call('cudaClamp', nb, 8, -1), rangeErr('limit is -1, expected a non-negative number'));
  assert.throws(call('cudaClamp', nb, 8, -0.1), rangeErr('limit is -0.1, expected a non-negative number'));
  assert.throws(call('cudaClamp', nb, 8, NaN), rangeErr('limit is NaN, expected a non-negative number'));
  assert.throws(call('cudaClamp', nb, 8, -Infinity), rangeErr('limit is -Infinity, expected a non-negative number'));
  assert.throws(call('cudaClamp', nb, 8, 8, ns), typeErr('stream must be a CudaStream or null'));
  // 0, a fraction and Infinity are valid limits.
  for (const limit of [0, 0.5, Infinity]) assert.throws(call('cudaClamp', nb, 8, limit), typeErr('x must be a CudaBuffer'));
});

test('cudaCopy2D checks offsets, pitches, width and rows before its buffers', { skip: compiled }, () => {
  assert.throws(call('cudaCopy2D', nb, 0, 8, nb, 0, 8, 8), typeErr('cudaCopy2D expects 8 arguments, got 7'));
  assert.throws(call('cudaCopy2D', nb, -4, 8, nb, 0, 8, 8, 1), rangeErr('dstOffsetBytes is -4, expected 0..17592186044416'));
  assert.throws(call('cudaCopy2D', nb, 0, -8, nb, 0, 8, 8, 1), rangeErr('dstPitchBytes is -8, expected 0..17592186044416'));
  assert.throws(call('cudaCopy2D', nb, 0, 8, nb, 0.5, 8, 8, 1), typeErr('srcOffsetBytes must be an integer, got 0.500000'));
  assert.throws(call('cudaCopy2D', nb, 0, 8, nb, 0, null, 8, 1), typeErr('srcPitchBytes must be a number'));
  assert.throws(call('cudaCopy2D', nb, 0, 8, nb, 0, 8, -1, 1), rangeErr('widthBytes is -1, expected 0..17592186044416'));
  assert.throws(call('cudaCopy2D', nb, 0, 8, nb, 0, 8, 8, -1), rangeErr('rows is -1, expected 0..17592186044416'));
  assert.throws(call('cudaCopy2D', nb, 0, 8, nb, 0, 16, 12, 2), rangeErr('widthBytes is 12, expected at most dstPitchBytes = 8'));
  assert.throws(call('cudaCopy2D', nb, 0, 16, nb, 0, 8, 12, 2), rangeErr('widthBytes is 12, expected at most srcPitchBytes = 8'));
  assert.throws(call('cudaCopy2D', nb, 0, 16, nb, 0, 16, 12, 2, ns), typeErr('stream must be a CudaStream or null'));
  assert.throws(call('cudaCopy2D', nb, 0, 16, nb, 0, 16, 12, 2), typeErr('dst must be a CudaBuffer'));
});

test('cudaCopyRowRange checks lo <= hi, rowBytes and maxRows before its buffers', { skip: compiled }, () => {
  assert.throws(call('cudaCopyRowRange', nb, nb, nb, 0, 1, 16), typeErr('cudaCopyRowRange expects 7 arguments, got 6'));
  assert.throws(call('cudaCopyRowRange', nb, nb, nb, -1, 1, 16, 4), rangeErr('lo is -1, expected 0..2147483647'));
  assert.throws(call('cudaCopyRowRange', nb, nb, nb, 3, 2, 16, 4), rangeErr('hi is 2, expected 3..2147483646'));
  assert.throws(call('cudaCopyRowRange', nb, nb, nb, 0, 2 ** 31 - 1, 16, 4), rangeErr('hi is 2147483647, expected 0..2147483646'));
  assert.throws(call('cudaCopyRowRange', nb, nb, nb, 0, 1, -16, 4), rangeErr('rowBytes is -16, expected 0..1099511627776'));
  assert.throws(call('cudaCopyRowRange', nb, nb, nb, 0, 1, 16, -4), rangeErr('maxRows is -4, expected 0..2147483647'));
  assert.throws(call('cudaCopyRowRange', nb, nb, nb, 0, 1, 16, 4, ns), typeErr('stream must be a CudaStream or null'));
  assert.throws(call('cudaCopyRowRange', nb, nb, nb, 2, 2, 16, 4), typeErr('dst must be a CudaBuffer'));
});

// ---------------------------------------------------------------------------------- device
// Buffer sizes and alignments: buffers need a device to exist.
test('glue ops check every buffer size and alignment', { skip: device }, () => {
  const bufs: CudaBuffer[] = [];
  const buf = (bytes: number) => {
    const b = cu.cudaBuffer(bytes);
    bufs.push(b);
    return b;
  };
  const [m, n, k] = [3, 5, 7];
  const x = buf(m * k * 4), wf = buf(n * k * 4), wb = buf(n * k * 2), y = buf(m * n * 4), bias = buf(n * 4);
  const big = buf(4096);
  assert.throws(call('cudaGemmF32', buf(m * k * 4 - 4), m, wf, 'f32', n, k, y, bias, false), rangeErr('x.sizeBytes is 80, expected at least 84'));
  assert.throws(call('cudaGemmF32', x, m, buf(n * k * 4 - 1), 'f32', n, k, y, bias, false), rangeErr('w.sizeBytes is 139, expected at least 140'));
  assert.throws(call('cudaGemmF32', x, m, wf.view(0, n * k * 2), 'bf16', n, k + 1, y, bias, false), rangeErr('x.sizeBytes is 84, expected at least 96'));
  assert.throws(call('cudaGemmF32', x, m, buf(n * k * 2 - 2), 'bf16', n, k, y, bias, false), rangeErr('w.sizeBytes is 68, expected at least 70'));
  assert.throws(call('cudaGemmF32', x, m, wb, 'bf16', n, k, buf(m * n * 4 - 4), bias, false), rangeErr('y.sizeBytes is 56, expected at least 60'));
  assert.throws(call('cudaGemmF32', x, m, wb, 'bf16', n, k, y, buf(n * 4 - 4), true), rangeErr('bias.sizeBytes is 16, expected at least 20'));
  assert.throws(call('cudaGemmF32', big.view(2, 1024), m, wb, 'bf16', n, k, y, null, false), rangeErr('x must start 4-byte aligned'));
  assert.throws(call('cudaGemmF32', x, m, big.view(2, 1024), 'f32', n, k, y, null, false), rangeErr('w must start 4-byte aligned'));
  assert.throws(call('cudaGemmF32', x, m, big.view(1, 1024), 'bf16', n, k, y, null, false), rangeErr('w must start 2-byte aligned'));
  assert.throws(call('cudaGemmF32', x, m, big.view(2, 1024), 'bf16', n, k, big.view(6, 1024), null, false), rangeErr('y must start 4-byte aligned'));
  assert.throws(call('cudaGemmF32', x, m, wb, 'bf16', n, k, y, bias, false, ns), typeErr('stream must be a CudaStream or null'));
  // Sizes far beyond any memory are computed in 64 bits (cudaCopy2D below saturates past them).
  assert.throws(call('cudaGemmF32', x, 2 ** 31 - 1, wb, 'bf16', n, 2 ** 31 - 1, y, null, false), rangeErr('x.sizeBytes is 84, expected at least 18446744056529682436'));
  assert.throws(call('cudaGemmF32', x, m, wb, 'bf16', n, k, y, nb, false), typeErr('bias must be a CudaBuffer'));

  assert.throws(call('cudaAdd', buf(28), big, 8), rangeErr('y.sizeBytes is 28, expected at least 32'));
  assert.throws(call('cudaAdd', big, buf(28), 8), rangeErr('x.sizeBytes is 28, expected at least 32'));
  assert.throws(call('cudaAdd', big, nb, 8), typeErr('x must be a CudaBuffer'));
  assert.throws(call('cudaAdd', big, big.view(1, 64), 8), rangeErr('x must start 4-byte aligned'));

  assert.throws(call('cudaGatedAdd', buf(60), big, big, 2, 8), rangeErr('out.sizeBytes is 60, expected at least 64'));
  assert.throws(call('cudaGatedAdd', big, buf(60), big, 2, 8), rangeErr('y.sizeBytes is 60, expected at least 64'));
  assert.throws(call('cudaGatedAdd', big, big, buf(4), 2, 8), rangeErr('gate.sizeBytes is 4, expected at least 8'));
  assert.throws(call('cudaGatedAdd', big, big, big.view(3, 64), 2, 8), rangeErr('gate must start 4-byte aligned'));

  assert.throws(call('cudaClamp', buf(12), 4, 1), rangeErr('x.sizeBytes is 12, expected at least 16'));
  assert.throws(call('cudaClamp', big.view(2, 64), 4, 1), rangeErr('x must start 4-byte aligned'));

  // A slice reaches offset + (rows - 1) * pitch + width bytes of its buffer; past 64 bits the size
  // saturates (it never wraps under a buffer's size).
  assert.throws(call('cudaCopy2D', buf(115), 4, 32, big, 0, 16, 16, 4), rangeErr('dst.sizeBytes is 115, expected at least 116'));
  assert.throws(call('cudaCopy2D', big, 0, 16, buf(114), 3, 32, 16, 4), rangeErr('src.sizeBytes is 114, expected at least 115'));
  assert.throws(call('cudaCopy2D', big, 0, 2 ** 44, big, 0, 16, 16, 2 ** 44), rangeErr('dst.sizeBytes is 4096, expected at least 18446744073709551615'));
  assert.throws(call('cudaCopy2D', big, 0, 16, nb, 0, 16, 16, 1), typeErr('src must be a CudaBuffer'));
  // Empty slices need no bytes (and copy nothing).
  cu.cudaCopy2D(buf(4), 8, 16, buf(4), 8, 16, 16, 0);
  cu.cudaCopy2D(buf(4), 8, 16, buf(4), 8, 16, 0, 4);

  assert.throws(call('cudaCopyRowRange', buf(63), big, big, 0, 2, 16, 4), rangeErr('dst.sizeBytes is 63, expected at least 64'));
  assert.throws(call('cudaCopyRowRange', big, buf(63), big, 0, 2, 16, 4), rangeErr('src.sizeBytes is 63, expected at least 64'));
  assert.throws(call('cudaCopyRowRange', big, big, buf(8), 0, 2, 16, 4), rangeErr('offsets.sizeBytes is 8, expected at least 12'));
  assert.throws(call('cudaCopyRowRange', big, big, big.view(2, 64), 0, 2, 16, 4), rangeErr('offsets must start 4-byte aligned'));
  assert.throws(call('cudaCopyRowRange', big, big, nb, 0, 2, 16, 4), typeErr('offsets must be a CudaBuffer'));

  // A disposed buffer is refused before any work is enqueued.
  const gone = buf(64);
  gone.dispose();
  assert.throws(call('cudaAdd', gone, big, 4), { code: 'E_DISPOSED' });
  assert.throws(call('cudaCopyRowRange', big, big, gone, 0, 1, 4, 4), { code: 'E_DISPOSED' });
  cu.cudaSynchronize();
  assert.equal(cu.cudaDeviceLost(), false);
  for (const b of bufs) b.dispose();
});
