// Turns checkpoint tensors into what the kernels consume: packed GEMM weights, f32 vectors for
// norms and biases, expert tables. Shapes are checked against the config here, by name.
import { loadNative, type ExpertTable, type PackedWeight } from '../native/index.js';
import type { HostTensor, TensorSource } from './tensor-source.js';
import type { QuantizeSpec } from './quantize.js';
import type { Fp8Weight } from './safetensors.js';

export class ShapeError extends Error {
  override name = 'ShapeError';
}

export function checkShape(name: string, t: HostTensor, expected: number[]): void {
  const ok = t.shape.length === expected.length && t.shape.every((d, i) => d === expected[i]);
  if (!ok)
    throw new ShapeError(`tensor ${name} has shape [${t.shape.join(', ')}], but the config implies ` +
      `[${expected.join(', ')}]`);
}

/** Packs a Linear weight [n, k] (quantized in `quantize`'s format when given: --quantize-dense). */
export function packLinear(src: TensorSource, name: string, n: number, k: number,
                           quantize: QuantizeSpec | null = null): PackedWeight {
  const t = src.get(name);
  checkShape(name, t, [n, k]);
  return loadNative().packWeight(t.data, t.dtype, n, k, quantize?.format, quantize?.group);
}

/**
 * Packs Linear weights [rows[i], k] stacked along the output dimension as one weight
 * [sum(rows), k] (fused projections). Mixed dtypes are widened to f32 (exact).
 */
export function packStacked(src: TensorSource, names: string[], rows: number[], k: number,
                            quantize: QuantizeSpec | null = null): PackedWeight {
  const parts = names.map((name, i) => {
    const t = src.get(name);
    checkShape(name, t, [rows[i]!, k]);
    return t;
  });
  const total = rows.reduce((a, b) => a + b, 0);
  const same = parts.every((t) => t.dtype === parts[0]!.dtype);
  const dtype = same ? parts[0]!.dtype : 'f32';
  const out = dtype === 'f32' ? new Float32Array(total * k) : new Uint16Array(total * k);
  let off = 0;
  for (const t of parts) {
    if (same) (out as Float32Array | Uint16Array).set(t.data as never, off);
    else (out as Float32Array).set(toF32(t), off);
    off += t.data.length;
  }
  return loadNative().packWeight(out, dtype, total, k, quantize?.format, quantize?.group);
}

/** Any 1-D tensor as f32 (norm weights, biases, correction biases). */
export function vectorF32(src: TensorSource, name: string, n: number): Float32Array {
  const t = src.get(name);
  checkShape(name, t, [n]);
  return toF32(t);
}

export function toF32(t: HostTensor): Float32Array {
  if (t.dtype === 'f32') return Float32Array.from(t.data as Float32Array);
  const out = new Float32Array(t.data.length);
  loadNative().convert(t.data, t.dtype, out, 'f32');
  return out;
}

/** Rows [r0, r1) of a 2-D tensor (a zero-copy view). */
export function rowsOf(t: HostTensor, r0: number, r1: number): HostTensor {
  const cols = t.shape[1]!;
  return { dtype: t.dtype, shape: [r1 - r0, cols], data: t.data.subarray(r0 * cols, r1 * cols) };
}

/** Slice e of a 3-D stacked tensor [E, a, b]. */
export function sliceOf(t: HostTensor, e: number): HostTensor {
  const a = t.shape[1]!;
  const b = t.shape[2]!;
  return { dtype: t.dtype, shape: [a, b], data: t.data.subarray(e * a * b, (e + 1) * a * b) };
}

/** Transposes a 2-D tensor [a, b] -> [b, a] keeping its dtype (load time only). */
export function transpose(t: HostTensor): HostTensor {
  const [a, b] = t.shape as [number, number];
  const out = t.dtype === 'f32' ? new Float32Array(a * b) : new Uint16Array(a * b);
  const src = t.data;
  for (let i = 0; i < a; i++) for (let j = 0; j < b; j++) out[j * a + i] = src[i * b + j]!;
  return { dtype: t.dtype, shape: [b, a], data: out };
}

export interface ExpertSource {
  gate: HostTensor; // [I, H]
  up: HostTensor;   // [I, H]
  down: HostTensor; // [H, I]
}

/** A gated FFN's gate_proj, up_proj and down_proj under a prefix (dense layers, shared experts). */
export function ffnSource(src: TensorSource, prefix: string): ExpertSource {
  return {
    gate: src.get(`${prefix}gate_proj.weight`), up: src.get(`${prefix}up_proj.weight`),
    down: src.get(`${prefix}down_proj.weight`),
  };
}

/** Checks an expert's shapes against the config: gate/up [i, h], down [h, i], one dtype for gate and up. */
export function checkExpert(ex: ExpertSource, names: string, h: number, i: number): void {
  checkShape(`${names} gate`, ex.gate, [i, h]);
  checkShape(`${names} up`, ex.up, [i, h]);
  checkShape(`${names} down`, ex.down, [h, i]);
  if (ex.gate.dtype !== ex.up.dtype)
    throw new ShapeError(`${names}: gate and up have different dtypes (${ex.gate.dtype}, ${ex.up.dtype})`);
}

export function packExpert(ex: ExpertSource, names: string, h: number, i: number,
                           quantize: QuantizeSpec | null = null): { gateUp: PackedWeight; down: PackedWeight } {
  checkExpert(ex, names, h, i);
  const n = loadNative();
  const q = quantize;
  return {
    gateUp: n.packGateUp(ex.gate.data, ex.up.data, ex.gate.dtype, i, h, q?.format, q?.group),
    down: n.packWeight(ex.down.data, ex.down.dtype, h, i, q?.format, q?.group),
  };
}

/** An FP8 checkpoint's expert kept in FP8: gate/up and down with their block scales. */
export function packFp8Expert(ex: { gate: Fp8Weight; up: Fp8Weight; down: Fp8Weight }):
    { gateUp: PackedWeight; down: PackedWeight } {
  const n = loadNative();
  const { gate, up, down } = ex;
  return {
    gateUp: n.packFp8(gate.codes, gate.scaleInv, gate.rows, gate.cols, gate.br, gate.bc, up.codes, up.scaleInv),
    down: n.packFp8(down.codes, down.scaleInv, down.rows, down.cols, down.br, down.bc),
  };
}

/**
 * A one-expert table (dense FFN, shared expert) from the gate/up/down_proj under a prefix, quantized
 * in `quantize`'s format when given (--quantize-dense); its resident bytes beside it.
 */
export function denseFfnTable(src: TensorSource, prefix: string, h: number, i: number,
                              quantize: QuantizeSpec | null = null): { table: ExpertTable; sizeBytes: number } {
  const n = loadNative();
  const table = new n.ExpertTable(1, h, i);
  const w = packExpert(ffnSource(src, prefix), prefix.replace(/\.$/, ''), h, i, quantize);
  table.set(0, w.gateUp, w.down);
  const sizeBytes = w.gateUp.sizeBytes + w.down.sizeBytes;
  w.gateUp.dispose();
  w.down.dispose();
  return { table, sizeBytes };
}
