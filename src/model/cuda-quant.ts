// Quantized experts for the device engine: the byte layout of one quantized matrix in device memory
// (native/include/expertd/cuda_quant.h, what the dequantising GroupGemm reads), written here on the
// host from bf16 weights (--quantize, the CPU's quantization rules) or from an FP8 checkpoint's codes
// and block scales as shipped; and the value of each element, for the emulator and the references.
import type { CudaQuantLayout } from '../native/index.js';
import { bf16ToF32, f32ToBf16, f32ToFp8, fp8ToF32 } from './kv-dtype.js';
import type { QuantizeSpec } from './quantize.js';
import type { Fp8Weight } from './safetensors.js';
import type { HostTensor, IntWeight } from './tensor-source.js';
import { checkExpert, checkIntFfn, toF32, type ExpertSource } from './weights.js';

/** A layout with its defaults filled in (what CudaExpertTable.quant reports). */
export interface DeviceQuant {
  format: CudaQuantLayout['format'];
  /** int8: 0 (per output row); int4: 32 | 128; fp8: block columns; mxfp4: 32. */
  group: number;
  /** fp8 block rows (0 otherwise). */
  blockRows: number;
  /** int8 / int4 with zero points (AWQ, GPTQ sym false, compressed-tensors symmetric false); absent otherwise. */
  zeros?: true;
}

export function deviceQuant(l: CudaQuantLayout): DeviceQuant {
  const z = l.zeros ? { zeros: true as const } : {};
  switch (l.format) {
    case 'int8': return { format: 'int8', group: 0, blockRows: 0, ...z };
    case 'int4': return { format: 'int4', group: l.group ?? 0, blockRows: 0, ...z };
    case 'fp8': return { format: 'fp8', group: l.group ?? 128, blockRows: l.blockRows ?? 128 };
    case 'mxfp4': return { format: 'mxfp4', group: l.group ?? 32, blockRows: 0 };
  }
}

/** --quantize's spec -> the device layout (the same groups and blocks as the CPU engine's). */
export function deviceQuantOf(q: QuantizeSpec): DeviceQuant {
  if (q.format === 'fp8') return { format: 'fp8', group: q.group, blockRows: 128 };
  return deviceQuant({ format: q.format, group: q.group });
}

export function quantBits(q: DeviceQuant): 4 | 8 {
  return q.format === 'int4' || q.format === 'mxfp4' ? 4 : 8;
}

/**
 * Why the layout cannot serve an FFN of hidden x inter on the device, or null (the binding's
 * quant_layout_error: the kernels read codes in 16-byte chunks).
 */
export function deviceQuantError(q: DeviceQuant, hidden: number, inter: number): string | null {
  if (q.zeros && q.format !== 'int8' && q.format !== 'int4') return `zero points are for int8 / int4 weights, not ${q.format}`;
  if (q.format === 'int4' && q.group !== 32 && q.group !== 128) return `int4 groups are 32 or 128, got ${q.group}`;
  if (q.format === 'fp8' && (q.group < 16 || q.group % 16 || q.blockRows < 1))
    return `fp8 blocks must be positive with block columns a multiple of 16, got ${q.blockRows} x ${q.group}`;
  if (q.format === 'mxfp4' && q.group !== 32) return `mxfp4 scales cover 32 values, not ${q.group}`;
  const align = quantBits(q) === 4 ? 32 : 16;
  if (hidden % align || inter % align)
    return `${q.format} experts on the device need hidden and inter multiples of ${align} ` +
      `(hidden is ${hidden}, inter is ${inter})`;
  return null;
}

/**
 * Why the layout cannot serve a plain GEMM over a matrix [n, k] on the device (cudaDenseGemmQuant,
 * cuda_quant.h's quant_dense_error), or null: k a multiple of 16 (8-bit codes) or 32 (4-bit), n even.
 */
export function deviceQuantDenseError(q: DeviceQuant, n: number, k: number): string | null {
  const align = quantBits(q) === 4 ? 32 : 16;
  const why = deviceQuantError(q, align, align);
  if (why) return why;
  if (k % align || n % 2 || n < 2)
    return `${q.format} matrices on the device need k a multiple of ${align} and n even (n is ${n}, k is ${k})`;
  return null;
}

export interface QuantMatrixBytes {
  codeBytes: number;
  scaleOffset: number;
  scaleBytes: number;
  /** A multiple of 16. */
  totalBytes: number;
  scaleCols: number;
  /** fp8 gate_up: the first scale row of the up half. */
  gateScaleRows: number;
  /** Zero points (q.zeros): int8 laid out as the scales, at zeroOffset (0: none). */
  zeroOffset: number;
  zeroBytes: number;
}

const up16 = (v: number) => Math.ceil(v / 16) * 16;

/** cuda_quant.h's quant_matrix_bytes: one matrix [n, k] (gate_up: n = 2I). */
export function quantMatrixBytes(q: DeviceQuant, n: number, k: number, gateUp: boolean): QuantMatrixBytes {
  const codeBytes = n * k * quantBits(q) / 8;
  const scaleOffset = up16(codeBytes);
  let scaleCols = 0, scales = 0, elem = 4, gateScaleRows = 0;
  if (q.format === 'int8') {
    scaleCols = 1;
    scales = n;
  } else if (q.format === 'int4') {
    scaleCols = Math.ceil(k / q.group);
    scales = n * scaleCols;
  } else if (q.format === 'fp8') {
    scaleCols = Math.ceil(k / q.group);
    gateScaleRows = Math.ceil((gateUp ? n / 2 : n) / q.blockRows);
    scales = (gateUp ? 2 : 1) * gateScaleRows * scaleCols;
  } else {
    scaleCols = k / 32;
    scales = n * scaleCols;
    elem = 1;
  }
  const scaleBytes = scales * elem;
  const end = up16(scaleOffset + scaleBytes);
  const zeroBytes = q.zeros && (q.format === 'int8' || q.format === 'int4') ? scales : 0;
  return { codeBytes, scaleOffset, scaleBytes, totalBytes: zeroBytes ? up16(end + zeroBytes) : end, scaleCols, gateScaleRows,
    zeroOffset: zeroBytes ? end : 0, zeroBytes };
}

/** Bytes of one expert (gate_up and down) on the device. */
export function quantExpertBytes(q: DeviceQuant, hidden: number, inter: number): { gateUp: number; down: number } {
  return {
    gateUp: quantMatrixBytes(q, 2 * inter, hidden, true).totalBytes,
    down: quantMatrixBytes(q, hidden, inter, false).totalBytes,
  };
}

/** std::nearbyint in the default rounding mode: to nearest, ties to even. */
function roundEven(v: number): number {
  const f = Math.floor(v), d = v - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** A view on a blob's scales (f32, or e8m0 bytes for mxfp4). */
export function scalesOf(q: DeviceQuant, blob: Uint8Array, b: QuantMatrixBytes): Float32Array | Uint8Array {
  const at = blob.byteOffset + b.scaleOffset;
  return q.format === 'mxfp4' ? blob.subarray(b.scaleOffset, b.scaleOffset + b.scaleBytes)
    : new Float32Array(blob.buffer, at, b.scaleBytes / 4);
}

function setCode(q: DeviceQuant, codes: Uint8Array, k: number, r: number, c: number, code: number) {
  if (quantBits(q) === 8) {
    codes[r * k + c] = code & 0xff;
    return;
  }
  const i = (r * k + c) >> 1;
  codes[i] = c & 1 ? (codes[i]! & 0x0f) | ((code & 0xf) << 4) : (codes[i]! & 0xf0) | (code & 0xf);
}

/**
 * Quantizes gate [rows, k] (and up [rows, k] for a gate_up matrix) into the device layout with the
 * CPU engine's rules (native/cpu/quant.cc): int8 / int4 symmetric absmax per (row, group), the
 * int4 scale rounded to bf16 (the device layout keeps f32 scales; the values are the CPU's), code =
 * nearbyint(x / scale) in f32; fp8 absmax / 448 per (blockRows x group) block of each matrix, code =
 * e4m3(x / scale). mxfp4 is a checkpoint format, not a quantization target.
 */
export function quantizeMatrix(q: DeviceQuant, gate: HostTensor, up: HostTensor | null, rows: number, k: number): Uint8Array {
  if (q.format === 'mxfp4') throw new RangeError('MXFP4 is a checkpoint format, not a quantization target');
  const gateUp = up !== null;
  const n = gateUp ? 2 * rows : rows;
  const b = quantMatrixBytes(q, n, k, gateUp);
  const blob = new Uint8Array(b.totalBytes);
  const codes = blob.subarray(0, b.codeBytes);
  const scales = scalesOf(q, blob, b) as Float32Array;
  const mats = gateUp ? [toF32(gate), toF32(up)] : [toF32(gate)];
  const fr = Math.fround;
  mats.forEach((m, half) => {
    if (q.format === 'fp8') {
      const nbc = b.scaleCols, nbr = b.gateScaleRows;
      const s = new Float32Array(nbr * nbc);
      for (let r = 0; r < rows; r++)
        for (let c = 0; c < k; c++) {
          const at = Math.floor(r / q.blockRows) * nbc + Math.floor(c / q.group);
          s[at] = Math.max(s[at]!, Math.abs(m[r * k + c]!));
        }
      for (let i = 0; i < s.length; i++) s[i] = fr(s[i]! / 448);
      scales.set(s, half * nbr * nbc);
      for (let r = 0; r < rows; r++)
        for (let c = 0; c < k; c++) {
          const sc = s[Math.floor(r / q.blockRows) * nbc + Math.floor(c / q.group)]!;
          setCode(q, codes, k, half * rows + r, c, sc > 0 ? f32ToFp8(fr(m[r * k + c]! / sc)) : 0);
        }
      return;
    }
    const qmax = q.format === 'int8' ? 127 : 7;
    const group = q.format === 'int8' ? k : q.group;
    for (let r = 0; r < rows; r++) {
      const wr = half * rows + r;
      for (let c0 = 0, g = 0; c0 < k; c0 += group, g++) {
        const c1 = Math.min(k, c0 + group);
        let amax = 0;
        for (let c = c0; c < c1; c++) amax = Math.max(amax, Math.abs(m[r * k + c]!));
        // int4: the scale rounded to bf16 first, as the CPU weight holds it (quant.cc round_scale).
        const sc = q.format === 'int4' ? bf16ToF32(f32ToBf16(fr(amax / qmax))) : fr(amax / qmax);
        scales[wr * b.scaleCols + g] = sc;
        for (let c = c0; c < c1; c++) {
          const v = sc > 0 ? roundEven(fr(m[r * k + c]! / sc)) : 0;
          setCode(q, codes, k, wr, c, Math.max(-qmax, Math.min(qmax, v)));
        }
      }
    }
  });
  return blob;
}

/**
 * An FP8 checkpoint's matrix kept in FP8: codes copied, weight_scale_inv [ceil(rows/br),
 * ceil(cols/bc)] as the scale grid (gate_up: gate's grid then up's). q must carry the weight's br x bc.
 */
export function fp8Matrix(q: DeviceQuant, gate: Fp8Weight, up: Fp8Weight | null): Uint8Array {
  if (q.format !== 'fp8' || gate.br !== q.blockRows || gate.bc !== q.group)
    throw new RangeError(`an FP8 weight with ${gate.br} x ${gate.bc} blocks does not fit the table's ` +
      `${q.format} ${q.blockRows} x ${q.group} layout`);
  const parts = up ? [gate, up] : [gate];
  const b = quantMatrixBytes(q, gate.rows * parts.length, gate.cols, up !== null);
  const blob = new Uint8Array(b.totalBytes);
  const scales = scalesOf(q, blob, b) as Float32Array;
  parts.forEach((w, i) => {
    blob.set(w.codes.subarray(0, w.rows * w.cols), i * gate.rows * gate.cols);
    scales.set(w.scaleInv.subarray(0, b.gateScaleRows * b.scaleCols), i * b.gateScaleRows * b.scaleCols);
  });
  return blob;
}

/**
 * A routed expert's gate_up [2I, H] and down [H, I] in the device layout q, as the resident tables and
 * the device expert cache's pinned store both hold it (so that the two are equal bit for bit): an FP8
 * checkpoint's codes and block scales as shipped (fp8 given, q fp8 and not --quantize), else the
 * weights quantized with the CPU engine's rules (an FP8 checkpoint with --quantize: from its
 * dequantised weights, as the CPU engine does).
 */
export function quantizedExpert(q: DeviceQuant, ex: () => ExpertSource, fp8: Fp8Expert | null, quantizedAtLoad: boolean,
                                name: string, hidden: number, inter: number): { gateUp: Uint8Array; down: Uint8Array } {
  if (fp8 && q.format === 'fp8' && !quantizedAtLoad) return { gateUp: fp8Matrix(q, fp8.gate, fp8.up), down: fp8Matrix(q, fp8.down, null) };
  const w = ex();
  checkExpert(w, name, hidden, inter);
  return { gateUp: quantizeMatrix(q, w.gate, w.up, inter, hidden), down: quantizeMatrix(q, w.down, null, hidden, inter) };
}

/** An FP8 checkpoint's expert (moe-tensors' expertFp8). */
export interface Fp8Expert { gate: Fp8Weight; up: Fp8Weight; down: Fp8Weight }

/** E rows of the plain input order 0..h-1 (the act-order input-order table's rows for experts without one). */
export function plainOrders(e: number, h: number): Int32Array {
  const o = new Int32Array(e * h);
  for (let r = 0; r < e; r++) for (let c = 0; c < h; c++) o[r * h + c] = c;
  return o;
}

/**
 * A checkpoint's int8 / int4 weight kept as its codes, scales and zero points (gate_up: gate's rows then
 * up's). q must be the weight's format and group (int8: one scale per row); a weight with zero points
 * needs a layout with them (a symmetric weight in such a layout gets zeros of 0). An act-order weight's
 * columns stay in its stored (group) order, which only a caller that gathers its input so may take
 * (`gathered`: through cudaGatherExpertColumns).
 */
export function intMatrix(q: DeviceQuant, gate: IntWeight, up: IntWeight | null, gathered = false): Uint8Array {
  const want = gate.bits === 8 ? 'int8' : 'int4';
  // Multiplied by an ungathered x, such a weight would give wrong values: every device caller gathers.
  if ((gate.perm || up?.perm) && !gathered)
    throw new Error('intMatrix: an act-order weight (desc_act) is held in group order; its caller must gather x by its input order');
  if ((gate.zeros || up?.zeros) && !q.zeros)
    throw new RangeError(`an int${gate.bits} weight with zero points does not fit the table's ${q.format} layout without them ` +
      '(a checkpoint whose config says it is symmetric stores zero points)');
  if (q.format !== want || (want === 'int4' && gate.group !== q.group) || (up && (up.bits !== gate.bits || up.group !== gate.group)))
    throw new RangeError(`an int${gate.bits} weight${gate.group ? ` in groups of ${gate.group}` : ''} does not fit the table's ` +
      `${q.format}${q.group ? ` group ${q.group}` : ''} layout`);
  const parts = up ? [gate, up] : [gate];
  const n = gate.rows * parts.length, k = gate.cols;
  const b = quantMatrixBytes(q, n, k, up !== null);
  const blob = new Uint8Array(b.totalBytes);
  const codes = blob.subarray(0, b.codeBytes);
  const scales = scalesOf(q, blob, b) as Float32Array;
  const zeros = b.zeroBytes ? new Int8Array(blob.buffer, blob.byteOffset + b.zeroOffset, b.zeroBytes) : null;
  parts.forEach((w, half) => {
    for (let r = 0; r < w.rows; r++)
      for (let c = 0; c < k; c++) setCode(q, codes, k, half * w.rows + r, c, w.codes[r * k + c]!);
    scales.set(w.scales, half * w.rows * b.scaleCols);
    if (zeros && w.zeros) zeros.set(w.zeros, half * w.rows * b.scaleCols);
  });
  return blob;
}

/**
 * A gated FFN a checkpoint stores as int codes (gate, up, down; `names` for errors), checked as
 * packIntFfn checks it (all three int, gate and up in one format, shapes as the config says), as layout
 * q's gate_up and down matrices. An act-order FFN (`gathered` callers only) comes with its input order
 * `perm` (gate's and up's, shared; down's is folded into their rows, so h needs none); null otherwise.
 */
export function intFfnMatrices(q: DeviceQuant, names: string[], gate: IntWeight | null, up: IntWeight | null,
                               down: IntWeight | null, h: number, i: number, gathered = false):
    { gateUp: Uint8Array; down: Uint8Array; perm: Int32Array | null } {
  const w = checkIntFfn(names, gate, up, down, h, i);
  return { gateUp: intMatrix(q, w.gate, w.up, gathered), down: intMatrix(q, w.down, null), perm: w.gate.perm ?? null };
}

/**
 * A matrix from codes and scales already in the device order (tests, MXFP4 checkpoints): codes
 * [n, k * bits / 8] bytes, scales f32 (mxfp4: e8m0 bytes) in the scale grid of the layout.
 */
export function rawQuantMatrix(q: DeviceQuant, n: number, k: number, gateUp: boolean, codes: Uint8Array,
                               scales: Float32Array | Uint8Array, zeros: Int8Array | null = null): Uint8Array {
  const b = quantMatrixBytes(q, n, k, gateUp);
  if (codes.byteLength !== b.codeBytes) throw new RangeError(`codes are ${codes.byteLength} bytes, expected ${b.codeBytes}`);
  if (scales.byteLength !== b.scaleBytes) throw new RangeError(`scales are ${scales.byteLength} bytes, expected ${b.scaleBytes}`);
  if ((zeros?.byteLength ?? 0) !== b.zeroBytes) throw new RangeError(`zeros are ${zeros?.byteLength ?? 0} bytes, expected ${b.zeroBytes}`);
  const blob = new Uint8Array(b.totalBytes);
  blob.set(codes, 0);
  blob.set(new Uint8Array(scales.buffer, scales.byteOffset, scales.byteLength), b.scaleOffset);
  if (zeros) blob.set(new Uint8Array(zeros.buffer, zeros.byteOffset, zeros.byteLength), b.zeroOffset);
  return blob;
}

/** e2m1 nibble -> value. */
export function e2m1ToF32(nib: number): number {
  const e = (nib >> 1) & 3, m = nib & 1;
  const mag = e === 0 ? 0.5 * m : (1 + m / 2) * 2 ** (e - 1);
  return nib & 8 ? -mag : mag;
}

/** e8m0 -> 2^(s - 127) (255: NaN). */
export function e8m0ToF32(s: number): number {
  return s === 255 ? NaN : 2 ** (s - 127);
}

/**
 * Element (r, c) of a matrix [n, k] in the device layout as code and scale (exact values): its value
 * is code x scale (with zero points: code is the stored code less its zero, an exact integer). The
 * float64 references multiply them in double; the kernels in f32, then round to bf16.
 */
export function quantElement(q: DeviceQuant, blob: Uint8Array, b: QuantMatrixBytes, n: number, k: number,
                             gateUp: boolean, r: number, c: number,
                             scales = scalesOf(q, blob, b)): { code: number; scale: number } {
  const zero = (at: number) => (b.zeroBytes ? ((blob[b.zeroOffset + at]! << 24) >> 24) : 0);
  if (q.format === 'int8') {
    const v = blob[r * k + c]!;
    return { code: (v > 127 ? v - 256 : v) - zero(r), scale: scales[r]! };
  }
  if (q.format === 'fp8') {
    const half = gateUp ? n / 2 : n;
    const srow = r >= half ? b.gateScaleRows + Math.floor((r - half) / q.blockRows) : Math.floor(r / q.blockRows);
    return { code: fp8ToF32(blob[r * k + c]!), scale: scales[srow * b.scaleCols + Math.floor(c / q.group)]! };
  }
  const byte = blob[(r * k + c) >> 1]!;
  const nib = c & 1 ? byte >> 4 : byte & 0xf;
  if (q.format === 'int4') {
    const at = r * b.scaleCols + Math.floor(c / q.group);
    return { code: (nib & 8 ? nib - 16 : nib) - zero(at), scale: scales[at]! };
  }
  return { code: e2m1ToF32(nib), scale: e8m0ToF32(scales[r * b.scaleCols + (c >> 5)]!) };
}

/**
 * The whole matrix [n, k] as the kernels see it: bf16(f32(code x scale)), widened to f32
 * (group_gemm_quant.cu's dequant8), into out (length n * k).
 */
export function dequantMatrixBf16(q: DeviceQuant, blob: Uint8Array, n: number, k: number, gateUp: boolean,
                                  out: Float32Array): Float32Array {
  const b = quantMatrixBytes(q, n, k, gateUp);
  const scales = scalesOf(q, blob, b);
  for (let r = 0; r < n; r++)
    for (let c = 0; c < k; c++) {
      const { code, scale } = quantElement(q, blob, b, n, k, gateUp, r, c, scales);
      out[r * k + c] = bf16ToF32(f32ToBf16(Math.fround(code * scale)));
    }
  return out;
}
