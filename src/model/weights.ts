// Turns checkpoint tensors into what the kernels consume: packed GEMM weights, f32 vectors for
// norms and biases, expert tables. Shapes are checked against the config here, by name.
import { loadNative, type ExpertTable, type PackedWeight } from '../native/index.js';
import type { HostTensor, IntWeight, ScaleDtype, TensorSource } from './tensor-source.js';
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

/**
 * A Linear the checkpoint stores as int8 / int4 codes (compressed-tensors, GPTQ), unless `quantize`
 * (--quantize / --quantize-dense) asks for its own format: then the exact dequantised values are
 * re-quantized like any other weight.
 */
export function intWeight(src: TensorSource, name: string, quantize: QuantizeSpec | null): IntWeight | null {
  return quantize ? null : src.getInt?.(name) ?? null;
}

/**
 * A Linear an FP8 checkpoint stores as e4m3 codes and scales (kept so: one byte per weight), unless
 * `quantize` (--quantize-dense) asks for its own format: then its dequantised values are re-quantized.
 */
export function fp8Weight(src: TensorSource, name: string, quantize: QuantizeSpec | null): Fp8Weight | null {
  return quantize ? null : src.getFp8?.(name) ?? null;
}

function checkFp8(name: string, w: Fp8Weight, rows: number, cols: number): void {
  if (w.rows !== rows || w.cols !== cols)
    throw new ShapeError(`tensor ${name} has shape [${w.rows}, ${w.cols}], but the config implies [${rows}, ${cols}]`);
}

/**
 * FP8 weights [rows_i, k] (one checkpoint: one block grid) stacked along the output dimension as
 * one (fused projections): each part's scales spread to one row per block row (the packed layout
 * holds a scale per row and group anyway), so parts whose row counts are not multiples of the
 * block rows stack exactly.
 */
function stackFp8(parts: Fp8Weight[]): Fp8Weight {
  const bc = parts[0]!.bc, k = parts[0]!.cols;
  const nbc = Math.ceil(k / bc), total = parts.reduce((a, w) => a + w.rows, 0);
  const codes = new Uint8Array(total * k), scales = new Float32Array(total * nbc);
  let row = 0;
  for (const w of parts) {
    codes.set(w.codes.subarray(0, w.rows * k), row * k);
    for (let r = 0; r < w.rows; r++)
      scales.set(w.scaleInv.subarray(Math.floor(r / w.br) * nbc, Math.floor(r / w.br) * nbc + nbc), (row + r) * nbc);
    row += w.rows;
  }
  return { codes, scaleInv: scales, rows: total, cols: k, br: 1, bc };
}

function packFp8Weight(w: Fp8Weight): PackedWeight {
  return loadNative().packFp8(w.codes, w.scaleInv, w.rows, w.cols, w.br, w.bc);
}

function checkInt(name: string, w: IntWeight, rows: number, cols: number): void {
  if (w.rows !== rows || w.cols !== cols)
    throw new ShapeError(`tensor ${name} has shape [${w.rows}, ${w.cols}], but the config implies [${rows}, ${cols}]`);
}

/**
 * How a packed int weight holds the scales of w (and up, packed with it): int4 in their stored dtype
 * when gate and up agree, else f32 (which holds either exactly); int8 f32.
 */
export function intScaleDtype(w: IntWeight, up: IntWeight | null = null): ScaleDtype {
  return w.bits === 4 && (!up || up.scaleDtype === w.scaleDtype) ? w.scaleDtype ?? 'f32' : 'f32';
}

/** int8 / int4 codes kept as such (with `up`: a gate_up weight of 2 * rows). */
export function packIntWeight(w: IntWeight, up: IntWeight | null = null): PackedWeight {
  const z = intZeros(w, up);
  return loadNative().packInt(w.codes, w.scales, w.rows, w.cols, w.bits === 8 ? 'int8' : 'int4', w.group,
    up?.codes ?? null, up?.scales ?? null, intScaleDtype(w, up), z.zeros, z.upZeros, sharedPerm(w, up));
}

/**
 * The one input order of weights that read the same input (gate and up; fused q/k/v), or null when none has
 * one (act-order GPTQ: PackedWeight's perm). Different orders cannot share one activation row.
 */
export function sharedPerm(...ws: (IntWeight | null)[]): Int32Array | null {
  const first = ws.find((w) => w?.perm)?.perm;
  if (!first) return null;
  for (const w of ws)
    if (w && !(w.perm && w.perm.length === first.length && w.perm.every((v, i) => v === first[i])))
      throw new ShapeError('weights that read one input hold different act-order input orders (g_idx); expertd reads them ' +
        'when they share one, as GPTQ quantizes them from the same inputs');
  return first;
}

/** w's rows [rows, ...] reordered by order: row j of the result is row order[j] of w (codes, scales, zeros). */
function permuteRows(w: IntWeight, order: Int32Array): IntWeight {
  const per = w.group === 0 ? 1 : Math.ceil(w.cols / w.group);
  const codes = new Int8Array(w.codes.length), scales = new Float32Array(w.scales.length);
  const zeros = w.zeros ? new Int8Array(w.zeros.length) : undefined;
  for (let j = 0; j < w.rows; j++) {
    const r = order[j]!;
    codes.set(w.codes.subarray(r * w.cols, (r + 1) * w.cols), j * w.cols);
    scales.set(w.scales.subarray(r * per, (r + 1) * per), j * per);
    zeros?.set(w.zeros!.subarray(r * per, (r + 1) * per), j * per);
  }
  return { ...w, codes, scales, ...(zeros ? { zeros } : {}) };
}

/**
 * An FFN whose down projection is act-order: its input order folded into gate's and up's rows (row j of
 * each becomes row perm[j]), so that h comes out in the order down's columns hold; down loses its perm.
 * The same numbers; the GEMMs then gather only the FFN's input.
 */
export function foldDownPerm(gate: IntWeight, up: IntWeight, down: IntWeight): { gate: IntWeight; up: IntWeight; down: IntWeight } {
  if (!down.perm) return { gate, up, down };
  const { perm, ...rest } = down;
  return { gate: permuteRows(gate, perm), up: permuteRows(up, perm), down: rest };
}

/**
 * The zero points of w (and up, packed with it) as the native packers take them: both null when
 * neither has any, else each its own (a symmetric half gets zeros of 0).
 */
export function intZeros(w: IntWeight, up: IntWeight | null = null): { zeros: Int8Array | null; upZeros: Int8Array | null } {
  if (!w.zeros && !up?.zeros) return { zeros: null, upZeros: null };
  return { zeros: w.zeros ?? new Int8Array(w.scales.length), upZeros: up ? up.zeros ?? new Int8Array(up.scales.length) : null };
}

/** Packs a Linear weight [n, k] (quantized in `quantize`'s format when given: --quantize-dense). */
export function packLinear(src: TensorSource, name: string, n: number, k: number,
                           quantize: QuantizeSpec | null = null): PackedWeight {
  const iw = intWeight(src, name, quantize);
  if (iw) {
    checkInt(name, iw, n, k);
    return packIntWeight(iw);
  }
  const fw = fp8Weight(src, name, quantize);
  if (fw) {
    checkFp8(name, fw, n, k);
    return packFp8Weight(fw);
  }
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
  const ints = names.map((name) => intWeight(src, name, quantize));
  if (ints.some((w) => w)) {
    const first = ints[0];
    const same = first && ints.every((w) => w && w.bits === first.bits && w.group === first.group);
    if (!same)
      throw new ShapeError(`${names.join(', ')} are fused into one weight but are not all stored in one int format ` +
        `(${ints.map((w) => (w ? `int${w.bits}${w.group ? `/g${w.group}` : ''}` : 'float')).join(', ')}); ` +
        'quantize them with one scheme, or serve with --quantize-dense to re-quantize them');
    ints.forEach((w, i) => checkInt(names[i]!, w!, rows[i]!, k));
    const total = rows.reduce((a, b) => a + b, 0);
    const codes = new Int8Array(total * k);
    const scales = new Float32Array(ints.reduce((a, w) => a + w!.scales.length, 0));
    // Zero points when any part has them (the symmetric parts' are 0).
    const zeros = ints.some((w) => w!.zeros) ? new Int8Array(scales.length) : undefined;
    let co = 0, so = 0;
    for (const w of ints) {
      codes.set(w!.codes, co);
      scales.set(w!.scales, so);
      if (zeros && w!.zeros) zeros.set(w!.zeros, so);
      co += w!.codes.length;
      so += w!.scales.length;
    }
    const scaleDtype = ints.every((w) => w!.scaleDtype === first.scaleDtype) ? first.scaleDtype : 'f32';
    const perm = sharedPerm(...ints);
    return packIntWeight({ ...first, codes, scales, rows: total, scaleDtype, zeros, ...(perm ? { perm } : {}) });
  }
  // FP8 parts stay FP8 when all of them are (else, as any mix of dtypes, their values are widened).
  const fp8 = names.map((name) => fp8Weight(src, name, quantize));
  if (fp8.every((w) => w)) {
    fp8.forEach((w, i) => checkFp8(names[i]!, w!, rows[i]!, k));
    return packFp8Weight(stackFp8(fp8 as Fp8Weight[]));
  }
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
  const names = ['gate_proj', 'up_proj', 'down_proj'].map((p) => `${prefix}${p}.weight`);
  const [gi, ui, di] = names.map((name) => intWeight(src, name, quantize));
  const [gf, uf, df] = gi || ui || di ? [null, null, null] : names.map((name) => fp8Weight(src, name, quantize));
  const fp8 = gf && uf && df;
  if (fp8) {
    checkFp8(names[0]!, gf, i, h);
    checkFp8(names[1]!, uf, i, h);
    checkFp8(names[2]!, df, h, i);
  }
  const w = gi || ui || di ? packIntFfn(names, gi ?? null, ui ?? null, di ?? null, h, i)
    : fp8 ? packFp8Expert({ gate: gf, up: uf, down: df })
    : packExpert(ffnSource(src, prefix), prefix.replace(/\.$/, ''), h, i, quantize);
  table.set(0, w.gateUp, w.down);
  const sizeBytes = w.gateUp.sizeBytes + w.down.sizeBytes;
  w.gateUp.dispose();
  w.down.dispose();
  return { table, sizeBytes };
}

/**
 * A gated FFN (an expert, a shared expert, a dense FFN) stored as int8 / int4 codes (compressed-
 * tensors): gate/up [i, h] in one format (they are fused), down [h, i]. names: gate, up, down.
 */
export function packIntFfn(names: string[], gate: IntWeight | null, up: IntWeight | null, down: IntWeight | null,
                           h: number, i: number): { gateUp: PackedWeight; down: PackedWeight } {
  const w = checkIntFfn(names, gate, up, down, h, i);
  return { gateUp: packIntWeight(w.gate, w.up), down: packIntWeight(w.down) };
}

/** packIntFfn's checks: all three stored as int codes, gate and up in one format, shapes as the config says. */
export function checkIntFfn(names: string[], gate: IntWeight | null, up: IntWeight | null, down: IntWeight | null,
                            h: number, i: number): { gate: IntWeight; up: IntWeight; down: IntWeight } {
  if (!gate || !up || !down)
    throw new ShapeError(`${names.join(', ')}: some are stored as int codes and some as floats; expertd reads a ` +
      'quantized FFN with all three projections quantized (quantize them together), or re-quantizes them with --quantize');
  if (gate.bits !== up.bits || gate.group !== up.group)
    throw new ShapeError(`${names[0]} and ${names[1]} are fused into one weight but have different int formats ` +
      `(int${gate.bits} group ${gate.group}, int${up.bits} group ${up.group})`);
  checkInt(names[0]!, gate, i, h);
  checkInt(names[1]!, up, i, h);
  checkInt(names[2]!, down, h, i);
  sharedPerm(gate, up);
  return foldDownPerm(gate, up, down);
}
