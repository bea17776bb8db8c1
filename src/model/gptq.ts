// GPTQ checkpoints (AutoGPTQ / GPTQModel, `quantization_config.quant_method: "gptq"`; what Qwen ships as
// its -GPTQ-Int4 MoE checkpoints): int4 in groups (or int8 per output channel), read as expertd's own
// int4 / int8 codes, scales and zero points, exactly. A quantized Linear X is stored as
//   X.qweight I32 [in / (32 / bits), out]: `bits`-bit unsigned values packed along in, the lowest k lowest;
//   X.qzeros  I32 [groups, out / (32 / bits)]: zero points packed along out (checkpoint_format "gptq",
//             the default: each stored as zero - 1, AutoGPTQ's convention; "gptq_v2": as they are);
//   X.scales  F16 [groups, out]; X.g_idx I32 [in] (optional): the group of each input column;
// value[out, k] = (q[k, out] - zero[group(k), out]) * scale[group(k), out]. expertd holds code = q -
// 2^(bits - 1) (-8..7 for int4) and, unless every zero is 2^(bits - 1) (sym true), the zero points less
// 2^(bits - 1) beside the scales (sym false): value = (code - zero) * scale. A group of any multiple of
// 32 columns is held as groups of 128 (or 32) with its scale and zero repeated, the same numbers.
// desc_act (act-order): a g_idx out of the plain order is read by holding the columns in group order (the
// weight's perm, by which the GEMMs gather x). Other bit widths and Marlin packing are refused naming the
// field or tensor.
import { columnsInOrder, groupOrder, regroupScales, scaleDtypeOf } from './compressed-tensors.js';
import type { IntWeight } from './tensor-source.js';

type Raw = Record<string, unknown>;

/**
 * A GPTQ-family checkpoint: GPTQ itself, or AWQ (AutoAWQ's GEMM packing, `quant_method: "awq"`), which
 * stores the same three tensors per Linear in another packing (packing 'awq', see awqIntWeight).
 */
export interface GptqConfig {
  method: 'gptq';
  /** How qweight / qzeros hold the values: GPTQ's or AWQ's. */
  packing: 'gptq' | 'awq';
  bits: 4 | 8;
  /** Columns per scale as stored; -1: one scale per output channel. */
  groupSize: number;
  /** "gptq" (v1: zeros stored minus one) or "gptq_v2" (as they are). */
  checkpointFormat: 'gptq' | 'gptq_v2';
  /** As the int-code readers take them: the bit width and the stored int4 group (-1: per channel). */
  schemes: { bits: number[]; groupSizes: number[] };
  /** The weights have zero points (GPTQ sym false; AWQ zero_point, its default). */
  zeroPoints?: true;
  /** desc_act true: quantized in activation order (a g_idx out of the plain order is held as a perm). */
  descAct?: true;
}

const SUPPORTED = 'supported for GPTQ: bits 4 with group_size -1 or a multiple of 32, or bits 8 with group_size -1; ' +
  'sym true or false, desc_act true or false, checkpoint_format "gptq" or "gptq_v2"';

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
  if (q.is_marlin_format === true) throw refuse('is_marlin_format true: Marlin-packed weights are not read.');
  const fmt = q.checkpoint_format ?? q.format ?? 'gptq';
  if (fmt !== 'gptq' && fmt !== 'gptq_v2')
    throw refuse(`checkpoint_format ${JSON.stringify(fmt)}: expertd reads the "gptq" and "gptq_v2" packings.`);
  const dyn = q.dynamic;
  if (dyn != null && !(typeof dyn === 'object' && Object.keys(dyn).length === 0))
    throw refuse('dynamic (per-module bits / group_size overrides) is not read: one scheme per checkpoint.');
  return {
    method: 'gptq', packing: 'gptq', bits, groupSize: gs as number, checkpointFormat: fmt,
    schemes: { bits: [bits], groupSizes: bits === 4 ? [gs as number] : [] }, ...(q.sym === false ? { zeroPoints: true as const } : {}),
    ...(q.desc_act === true ? { descAct: true as const } : {}),
  };
}

const AWQ_SUPPORTED = 'supported for AWQ: bits 4, group_size -1 or a multiple of 32, version "gemm" (or "exllama" / "ipex", ' +
  'which load the same packing), zero_point true or false';

/**
 * quantization_config with quant_method "awq" (AutoAWQ; also the older `w_bit` / `q_group_size` names)
 * -> the loader's config, or an error (made by `fail`) naming the field at fault. Linears named in
 * modules_to_not_convert are stored unquantized (X.weight) and read so, as any Linear without X.qweight.
 */
export function parseAwq(q: Raw, mt: string, fail: (msg: string) => Error): GptqConfig {
  const refuse = (why: string) => fail(`${mt} config quantization_config ${JSON.stringify(q)} is not supported; ${AWQ_SUPPORTED}. ${why}`);
  const bits = q.bits ?? q.w_bit;
  if (bits !== 4) throw refuse(`bits ${JSON.stringify(bits)}: AWQ checkpoints expertd reads are 4-bit.`);
  const gs = q.group_size ?? q.q_group_size ?? 128;
  if (!Number.isInteger(gs) || (gs !== -1 && ((gs as number) <= 0 || (gs as number) % 32 !== 0)))
    throw refuse(`group_size ${JSON.stringify(gs)}: int4 groups are held as groups of 32 or 128 columns, so an AWQ group must be -1 or a multiple of 32.`);
  const version = String(q.version ?? 'gemm').toLowerCase();
  if (version !== 'gemm' && version !== 'exllama' && version !== 'ipex')
    throw refuse(`version ${JSON.stringify(q.version)}: only the GEMM packing (qweight [in, out / 8]) is read; ${version === 'gemv' || version === 'gemv_fast'
      ? 'GEMV checkpoints pack along the input' : 'that packing is its own kernel\'s'}.`);
  const backend = q.backend ?? 'autoawq';
  if (backend !== 'autoawq') throw refuse(`backend ${JSON.stringify(backend)}: only AutoAWQ's packing is read.`);
  return {
    method: 'gptq', packing: 'awq', bits: 4, groupSize: gs as number, checkpointFormat: 'gptq_v2',
    schemes: { bits: [4], groupSizes: [gs as number] }, ...(q.zero_point !== false ? { zeroPoints: true as const } : {}),
  };
}

/** Output column of nibble i of an AWQ word (AutoAWQ packs columns 0, 2, 4, 6, 1, 3, 5, 7 of 8). */
const AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7];

/** One GPTQ Linear's stored tensors (scales widened to f32; their stored dtype beside). */
export interface GptqParts {
  qweight: { dtype: string; shape: number[]; data: Int32Array };
  qzeros: { dtype: string; shape: number[]; data: Int32Array };
  scales: { dtype: string; shape: number[]; data: Float32Array };
  /** X.g_idx when stored (I32 [in]). */
  gIdx: { dtype: string; shape: number[]; data: Int32Array } | null;
}

/** [out, in] of a GPTQ Linear from its qweight's shape [in / per-word, out] (AWQ: [in, out / per-word]). */
export function gptqShape(cfg: GptqConfig, qweightShape: number[]): [number, number] {
  if (cfg.packing === 'awq') return [(qweightShape[1] ?? 0) * (32 / cfg.bits), qweightShape[0] ?? 0];
  return [qweightShape[1] ?? 0, (qweightShape[0] ?? 0) * (32 / cfg.bits)];
}

/** What a qweight of this packing looks like, for shape errors. */
export function gptqLayoutNote(cfg: GptqConfig, rows: number, cols: number): string {
  const per = 32 / cfg.bits;
  return cfg.packing === 'awq' ? `I32 [${cols}, ${rows / per}] (4-bit values packed along the output, AWQ's order)`
    : `I32 [${cols / per}, ${rows}] (${cfg.bits}-bit values packed along the input)`;
}

/**
 * One GPTQ Linear (`name` = its logical `X.weight`) as codes and scales in expertd's int layout
 * ([out, in] codes, [out, groups] scales and zero points; an act-order one's columns in group order, with
 * its perm); throws (made by `fail`) naming the tensor when its shapes disagree or its g_idx's groups are not
 * group_size wide.
 */
export function gptqIntWeight(name: string, p: GptqParts, cfg: GptqConfig, fail: (msg: string) => Error): IntWeight {
  if (cfg.packing === 'awq') return awqIntWeight(name, p, cfg, fail);
  const { base, rows, cols, gs, groups, zw } = packedGeometry(name, p, cfg, fail);
  const bits = cfg.bits, per = 32 / bits, mask = (1 << bits) - 1, half = 1 << (bits - 1);
  // Zero points [out, groups] less the symmetric one (v1 stores each minus one): absent when every one is
  // symmetric (the usual sym true checkpoint), so the weight stays a symmetric one.
  const plus = cfg.checkpointFormat === 'gptq' ? 1 : 0;
  const qz = p.qzeros.data;
  let zeros: Int8Array | undefined;
  for (let g = 0; g < groups; g++) {
    for (let w = 0; w < zw; w++) {
      let word = qz[g * zw + w]!;
      const n = Math.min(per, rows - w * per);
      for (let j = 0; j < n; j++, word >>>= bits) {
        const z = (word & mask) + plus - half;
        if (z === 0) continue;
        if (z > 127)
          throw fail(`${base}.qzeros holds zero point ${z + half} at group ${g}, output ${w * per + j}: above the ${bits}-bit range`);
        (zeros ??= new Int8Array(rows * groups))[(w * per + j) * groups + g] = z;
      }
    }
  }
  // desc_act true: the groups must still be input // group_size (checked below); without g_idx that is unknown.
  if (!p.gIdx && cfg.descAct && groups > 1)
    throw fail(`${base}.g_idx is missing: a desc_act checkpoint in groups needs it to say which group each input is in`);
  // Act-order (desc_act without static_groups): g_idx puts the inputs in groups out of order. The columns
  // are then held in group order (perm: stable by group, then input), each group gs of them as in the plain
  // order, and the GEMMs gather x by perm.
  const perm = p.gIdx ? groupOrder(`${base}.g_idx`, p.gIdx, cols, gs, fail) : undefined;
  // Codes [out, in]: the words run along in, one row of words per `per` inputs.
  let codes: Int8Array = new Int8Array(rows * cols);
  const q = p.qweight.data;
  for (let i = 0; i < cols / per; i++) {
    const k0 = i * per;
    for (let r = 0; r < rows; r++) {
      let word = q[i * rows + r]!;
      const o = r * cols + k0;
      for (let j = 0; j < per; j++, word >>>= bits) codes[o + j] = (word & mask) - half;
    }
  }
  if (perm) codes = columnsInOrder(codes, rows, cols, perm);
  const order = perm ? { perm } : {};
  const sd = scaleDtypeOf(p.scales.dtype);
  if (bits === 8) {
    const scales = new Float32Array(rows);
    scales.set(p.scales.data.subarray(0, rows));
    return { bits, codes, scales, rows, cols, group: 0, ...(zeros ? { zeros } : {}), ...order };
  }
  return { bits, codes, ...heldScales(p, cfg, rows, cols, groups, zeros), rows, cols, scaleDtype: sd, ...order };
}

/**
 * The geometry of one GPTQ / AWQ Linear from its stored parts, checked: qweight and qzeros I32 matrices,
 * qzeros [groups, ceil(out / per-word)], scales [groups, out]; throws (made by `fail`) naming the tensor.
 */
function packedGeometry(name: string, p: GptqParts, cfg: GptqConfig, fail: (msg: string) => Error):
  { base: string; rows: number; cols: number; gs: number; groups: number; zw: number } {
  const base = name.replace(/\.weight$/, '');
  for (const [part, t] of [['qweight', p.qweight], ['qzeros', p.qzeros]] as const)
    if (t.dtype !== 'I32' || t.shape.length !== 2) throw fail(`${base}.${part} is ${t.dtype} [${t.shape.join(', ')}], expected I32 [rows, cols]`);
  const [rows, cols] = gptqShape(cfg, p.qweight.shape);
  const gs = cfg.groupSize === -1 ? cols : cfg.groupSize;
  const groups = Math.ceil(cols / gs), zw = Math.ceil(rows / (32 / cfg.bits));
  if (p.qzeros.shape[0] !== groups || p.qzeros.shape[1] !== zw)
    throw fail(`${base}.qzeros has shape [${p.qzeros.shape.join(', ')}], expected [${groups}, ${zw}] for ${cols} inputs in groups of ${gs}`);
  if (p.scales.shape.length !== 2 || p.scales.shape[0] !== groups || p.scales.shape[1] !== rows)
    throw fail(`${base}.scales has shape [${p.scales.shape.join(', ')}], expected [${groups}, ${rows}]`);
  return { base, rows, cols, gs, groups, zw };
}

/** Int4 scales [groups, out] (and zero points [out, groups]) as held: [out, groups], then in groups of 32 / 128 (regroupScales). */
function heldScales(p: GptqParts, cfg: GptqConfig, rows: number, cols: number, groups: number, zeros?: Int8Array) {
  const t = new Float32Array(rows * groups);
  for (let g = 0; g < groups; g++)
    for (let r = 0; r < rows; r++) t[r * groups + g] = p.scales.data[g * rows + r]!;
  return regroupScales(t, rows, cols, cfg.groupSize, zeros);
}

/**
 * One AWQ Linear (AutoAWQ's GEMM packing) as codes, scales and zero points in expertd's int4 layout:
 *   X.qweight I32 [in, out / 8]: 4-bit values packed along out, nibble i of word j holding output
 *             8 j + AWQ_ORDER[i];
 *   X.qzeros  I32 [groups, out / 8]: the zero points, packed the same way;
 *   X.scales  F16 [groups, out];
 * value[out, k] = (q[k, out] - zero[group(k), out]) * scale[group(k), out], held as code = q - 8 and
 * zero - 8 (absent when every zero is 8).
 */
export function awqIntWeight(name: string, p: GptqParts, cfg: GptqConfig, fail: (msg: string) => Error): IntWeight {
  const { base, rows, cols, groups, zw: words } = packedGeometry(name, p, cfg, fail);
  if (p.gIdx) throw fail(`${base}.g_idx is present: AWQ checkpoints have no g_idx (is this a GPTQ checkpoint?)`);
  // Unpacks [n, words] words into [n][rows] values less 8: out[i * rows + (8 w + AWQ_ORDER[j])].
  const unpack = (data: Int32Array, n: number, put: (i: number, r: number, v: number) => void) => {
    for (let i = 0; i < n; i++)
      for (let w = 0; w < words; w++) {
        let word = data[i * words + w]!;
        for (let j = 0; j < 8; j++, word >>>= 4) put(i, 8 * w + AWQ_ORDER[j]!, (word & 15) - 8);
      }
  };
  const codes = new Int8Array(rows * cols);
  unpack(p.qweight.data, cols, (k, r, v) => { codes[r * cols + k] = v; });
  let zeros: Int8Array | undefined;
  unpack(p.qzeros.data, groups, (g, r, v) => { if (v !== 0) (zeros ??= new Int8Array(rows * groups))[r * groups + g] = v; });
  return { bits: 4, codes, ...heldScales(p, cfg, rows, cols, groups, zeros), rows, cols, scaleDtype: scaleDtypeOf(p.scales.dtype) };
}
