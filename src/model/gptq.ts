// GPTQ checkpoints (AutoGPTQ / GPTQModel, `quantization_config.quant_method: "gptq"`; what Qwen ships as
// its -GPTQ-Int4 MoE checkpoints): symmetric int4 in groups (or int8 per output channel), read as
// expertd's own int4 / int8 codes and scales, exactly. A quantized Linear X is stored as
//   X.qweight I32 [in / (32 / bits), out]: `bits`-bit unsigned values packed along in, the lowest k lowest;
//   X.qzeros  I32 [groups, out / (32 / bits)]: zero points packed along out (checkpoint_format "gptq",
//             the default: each stored as zero - 1, AutoGPTQ's convention; "gptq_v2": as they are);
//   X.scales  F16 [groups, out]; X.g_idx I32 [in] (optional): the group of each input column;
// value[out, k] = (q[k, out] - zero[group(k), out]) * scale[group(k), out]. Symmetric checkpoints hold
// every zero at 2^(bits - 1), so the value is code * scale with code = q - 2^(bits - 1) in -8..7 (int4),
// expertd's int4 format; a group of any multiple of 32 columns is held as groups of 128 (or 32) with its
// scale repeated, the same numbers. Anything else (zero points, act-order, other bit widths, Marlin
// packing) is refused naming the field or tensor.
import { regroupScales, scaleDtypeOf } from './compressed-tensors.js';
import type { IntWeight } from './tensor-source.js';

type Raw = Record<string, unknown>;

export interface GptqConfig {
  method: 'gptq';
  bits: 4 | 8;
  /** Columns per scale as stored; -1: one scale per output channel. */
  groupSize: number;
  /** "gptq" (v1: zeros stored minus one) or "gptq_v2" (as they are). */
  checkpointFormat: 'gptq' | 'gptq_v2';
  /** As the int-code readers take them: the bit width and the stored int4 group (-1: per channel). */
  schemes: { bits: number[]; groupSizes: number[] };
}

const SUPPORTED = 'supported for GPTQ: bits 4 with group_size -1 or a multiple of 32, or bits 8 with group_size -1; ' +
  'sym true, desc_act false, checkpoint_format "gptq" or "gptq_v2"';

/**
 * quantization_config with quant_method "gptq" -> what the loader needs, or an error (made by `fail`)
 * naming the field at fault. Calibration metadata (damp_percent, true_sequential, model_name_or_path,
 * meta, ...) is not read.
 */
export function parseGptq(q: Raw, mt: string, fail: (msg: string) => Error): GptqConfig {
  const refuse = (why: string) => fail(`${mt} config quantization_config ${JSON.stringify(q)} is not supported; ${SUPPORTED}. ${why}`);
  const bits = q.bits;
  if (bits !== 4 && bits !== 8) throw refuse(`bits ${JSON.stringify(bits)}: expertd holds 4-bit and 8-bit integer weights.`);
  const gs = q.group_size ?? -1;
  if (!Number.isInteger(gs) || (gs !== -1 && (gs as number) <= 0))
    throw refuse(`group_size ${JSON.stringify(gs)}: expected -1 (per output channel) or a positive integer.`);
  if (bits === 8 && gs !== -1)
    throw refuse(`group_size ${gs} with bits 8: int8 weights are read with one scale per output channel (group_size -1).`);
  if (bits === 4 && gs !== -1 && (gs as number) % 32 !== 0)
    throw refuse(`group_size ${gs}: int4 groups are held as groups of 32 or 128 columns, so a GPTQ group must be a multiple of 32.`);
  if (q.sym === false)
    throw refuse('sym false: asymmetric weights (a zero point per group) are not read; expertd\'s int4 / int8 formats are symmetric.');
  if (q.desc_act === true)
    throw refuse('desc_act true: activation-ordered groups (g_idx) are not read; requantize with desc_act false ' +
      '(or serve the bf16 original with --quantize int4).');
  if (q.is_marlin_format === true) throw refuse('is_marlin_format true: Marlin-packed weights are not read.');
  const fmt = q.checkpoint_format ?? q.format ?? 'gptq';
  if (fmt !== 'gptq' && fmt !== 'gptq_v2')
    throw refuse(`checkpoint_format ${JSON.stringify(fmt)}: expertd reads the "gptq" and "gptq_v2" packings.`);
  const dyn = q.dynamic;
  if (dyn != null && !(typeof dyn === 'object' && Object.keys(dyn).length === 0))
    throw refuse('dynamic (per-module bits / group_size overrides) is not read: one scheme per checkpoint.');
  return {
    method: 'gptq', bits, groupSize: gs as number, checkpointFormat: fmt,
    schemes: { bits: [bits], groupSizes: bits === 4 ? [gs as number] : [] },
  };
}

/** One GPTQ Linear's stored tensors (scales widened to f32; their stored dtype beside). */
export interface GptqParts {
  qweight: { dtype: string; shape: number[]; data: Int32Array };
  qzeros: { dtype: string; shape: number[]; data: Int32Array };
  scales: { dtype: string; shape: number[]; data: Float32Array };
  /** X.g_idx when stored (I32 [in]). */
  gIdx: { dtype: string; shape: number[]; data: Int32Array } | null;
}

/** [out, in] of a GPTQ Linear from its qweight's shape [in / per-word, out]. */
export function gptqShape(cfg: GptqConfig, qweightShape: number[]): [number, number] {
  return [qweightShape[1] ?? 0, (qweightShape[0] ?? 0) * (32 / cfg.bits)];
}

/**
 * One GPTQ Linear (`name` = its logical `X.weight`) as codes and scales in expertd's int layout
 * ([out, in] codes, [out, groups] scales); throws (made by `fail`) naming the tensor when its shapes
 * disagree, its zero points are not the symmetric ones, or its g_idx is not the plain group order.
 */
export function gptqIntWeight(name: string, p: GptqParts, cfg: GptqConfig, fail: (msg: string) => Error): IntWeight {
  const base = name.replace(/\.weight$/, '');
  const bits = cfg.bits, per = 32 / bits, mask = (1 << bits) - 1, half = 1 << (bits - 1);
  for (const [part, t] of [['qweight', p.qweight], ['qzeros', p.qzeros]] as const)
    if (t.dtype !== 'I32' || t.shape.length !== 2) throw fail(`${base}.${part} is ${t.dtype} [${t.shape.join(', ')}], expected I32 [rows, cols]`);
  const [rows, cols] = gptqShape(cfg, p.qweight.shape);
  const gs = cfg.groupSize === -1 ? cols : cfg.groupSize;
  const groups = Math.ceil(cols / gs);
  const zw = Math.ceil(rows / per);
  if (p.qzeros.shape[0] !== groups || p.qzeros.shape[1] !== zw)
    throw fail(`${base}.qzeros has shape [${p.qzeros.shape.join(', ')}], expected [${groups}, ${zw}] for ${cols} inputs in groups of ${gs}`);
  if (p.scales.shape.length !== 2 || p.scales.shape[0] !== groups || p.scales.shape[1] !== rows)
    throw fail(`${base}.scales has shape [${p.scales.shape.join(', ')}], expected [${groups}, ${rows}]`);
  // Every zero point must be the symmetric one (v1 stores it minus one).
  const stored = cfg.checkpointFormat === 'gptq' ? half - 1 : half;
  const zeros = p.qzeros.data;
  for (let g = 0; g < groups; g++) {
    for (let w = 0; w < zw; w++) {
      let word = zeros[g * zw + w]!;
      const n = Math.min(per, rows - w * per);
      for (let j = 0; j < n; j++, word >>>= bits) {
        if ((word & mask) !== stored)
          throw fail(`${base}.qzeros holds zero point ${(word & mask) + (stored === half ? 0 : 1)} at group ${g}, output ${w * per + j}: ` +
            `asymmetric weights are not read (a symmetric ${bits}-bit GPTQ checkpoint holds ${half} everywhere)`);
      }
    }
  }
  if (p.gIdx) {
    const g = p.gIdx;
    if (g.dtype !== 'I32' || g.shape.length !== 1 || g.shape[0] !== cols)
      throw fail(`${base}.g_idx is ${g.dtype} [${g.shape.join(', ')}], expected I32 [${cols}]`);
    for (let k = 0; k < cols; k++)
      if (g.data[k] !== Math.floor(k / gs))
        throw fail(`${base}.g_idx puts input ${k} in group ${g.data[k]}, not ${Math.floor(k / gs)}: activation-ordered (desc_act) ` +
          'weights are not read');
  }
  // Codes [out, in]: the words run along in, one row of words per `per` inputs.
  const codes = new Int8Array(rows * cols);
  const q = p.qweight.data;
  for (let i = 0; i < cols / per; i++) {
    const k0 = i * per;
    for (let r = 0; r < rows; r++) {
      let word = q[i * rows + r]!;
      const o = r * cols + k0;
      for (let j = 0; j < per; j++, word >>>= bits) codes[o + j] = (word & mask) - half;
    }
  }
  const sd = scaleDtypeOf(p.scales.dtype);
  if (bits === 8) {
    const scales = new Float32Array(rows);
    scales.set(p.scales.data.subarray(0, rows));
    return { bits, codes, scales, rows, cols, group: 0 };
  }
  // Scales [groups, out] -> [out, groups], then held as groups of 32 / 128 (regroupScales).
  const t = new Float32Array(rows * groups);
  for (let g = 0; g < groups; g++)
    for (let r = 0; r < rows; r++) t[r * groups + g] = p.scales.data[g * rows + r]!;
  return { bits, codes, ...regroupScales(t, rows, cols, cfg.groupSize), rows, cols, scaleDtype: sd };
}
