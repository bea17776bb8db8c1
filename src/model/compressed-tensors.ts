// compressed-tensors checkpoints (llm-compressor, what vLLM's users produce): the quantization_config
// schemes expertd reads (int8 W8A8 per output channel, int4 W4A16 per channel or in groups of a multiple of 32, symmetric
// or with zero points (symmetric false: weight_zero_point);
// FP8 e4m3 weights per output channel, per tensor or in blocks) and the stored tensors of one quantized
// integer Linear turned into codes and scales for packInt. Anything else is refused naming the field
// and value.
import type { Fp8Quantization } from './spec.js';
import type { IntWeight, ScaleDtype } from './tensor-source.js';

type Raw = Record<string, unknown>;

export interface CompressedTensorsConfig {
  method: 'compressed-tensors';
  /** int-quantized / naive-quantized (int8 bytes per weight) or pack-quantized (int32 words of 8 nibbles / 4 bytes). */
  format: 'int-quantized' | 'naive-quantized' | 'pack-quantized';
  /** The checkpoint's ignore list (modules left unquantized), as written; the tensors say the same. */
  ignore: string[];
  /** Weight bit widths and int4 group sizes over the config groups. */
  schemes: { bits: number[]; groupSizes: number[] };
  /** Some group's input_activations are static (dynamic false): their `X.input_scale` tensors are not used. */
  staticInputScales?: true;
  /** Some group's weights have zero points (symmetric false: `X.weight_zero_point`). */
  zeroPoints?: true;
  /** Some group's weights are in activation-ordered groups (actorder "group" / "dynamic": `X.weight_g_idx`). */
  actOrderGroups?: true;
}

/** True when a config group's input_activations carry calibrated scales (dynamic false). */
function staticInputs(groups: Raw): boolean {
  return Object.values(groups).some((g) => {
    const ia = (g as Raw | null)?.input_activations as Raw | null | undefined;
    return ia != null && typeof ia === 'object' && ia.dynamic === false;
  });
}

const FORMATS = ['int-quantized', 'naive-quantized', 'pack-quantized'] as const;
const FLOAT_FORMAT = 'float-quantized';
const OTHER_FORMATS: Record<string, string> = {
  'float-quantized': 'FP8 weights: a checkpoint reads them when every config group is float-quantized',
  'nvfp4-pack-quantized': 'NVFP4 (e2m1 with fp8 group scales)',
  'mxfp4-pack-quantized': 'MXFP4 in compressed-tensors packing',
  'marlin-24': '2:4 sparse weights packed for Marlin kernels',
  'sparse-24-bitmask': '2:4 sparse weights with a bitmask',
  'sparse-bitmask': 'sparse weights with a bitmask',
  dense: 'unquantized weights (drop quantization_config)',
  'mixed-precision': 'a different format per group',
};
const TOP_FIELDS = ['quant_method', 'format', 'config_groups', 'ignore', 'quantization_status', 'kv_cache_scheme',
  'global_compression_ratio', 'sparsity_config', 'transform_config', 'version'];
const SUPPORTED = 'supported for compressed-tensors: format "int-quantized", "naive-quantized" or "pack-quantized" with ' +
  'weights {type "int", symmetric true or false, num_bits 8 strategy "channel" | num_bits 4 strategy "group" group_size a multiple of 32 or "channel"} ' +
  'and input_activations null or dynamic int8 per token; format "float-quantized" with weights {type "float", ' +
  'num_bits 8, symmetric, strategy "channel" | "tensor" | "block" with block_structure [rows, cols]} and ' +
  'input_activations null or dynamic';

/**
 * The block grid an FP8 weight with per-channel or per-tensor scales is held on (1 x 128: every row its
 * own scale, repeated across 128-column groups; what the CPU layout holds for DeepSeek's 128 x 128 blocks
 * anyway, and the column blocks the device's FP8 tensor-core path takes).
 */
export const FP8_ROW_GRID: [number, number] = [1, 128];

/**
 * quantization_config with quant_method "compressed-tensors" -> what the loader needs, or a
 * ConfigError (made by `fail`) naming the field at fault.
 */
export function parseCompressedTensors(q: Raw, mt: string, fail: (msg: string) => Error): CompressedTensorsConfig | Fp8Quantization {
  const refuse = (why: string) => fail(`${mt} config quantization_config ${JSON.stringify(q)} is not supported; ${SUPPORTED}. ${why}`);
  const unknown = Object.keys(q).filter((k) => !TOP_FIELDS.includes(k));
  if (unknown.length) throw refuse(`Unknown field(s): ${unknown.join(', ')}.`);
  const format = q.format === FLOAT_FORMAT ? FLOAT_FORMAT : checkFormat(q.format, 'format', refuse);
  const status = q.quantization_status ?? 'compressed';
  if (status !== 'compressed')
    throw refuse(`quantization_status ${JSON.stringify(status)}: expertd reads compressed (saved) weights, not a model mid-calibration.`);
  if (q.kv_cache_scheme != null)
    throw refuse('kv_cache_scheme (calibrated KV cache scales) is not read: drop it and choose the cache with --kv-dtype.');
  // An empty object says none, as llm-compressor writes it.
  const given = (v: unknown) => v != null && !(typeof v === 'object' && Object.keys(v as object).length === 0);
  if (given(q.sparsity_config)) throw refuse('sparsity_config: sparse compressed-tensors weights are not read.');
  if (given(q.transform_config)) throw refuse('transform_config (rotations applied to the weights) is not read.');
  const ignore = q.ignore ?? [];
  if (!Array.isArray(ignore) || ignore.some((m) => typeof m !== 'string')) throw refuse(`ignore ${JSON.stringify(ignore)}: expected a list of module names.`);
  const groups = q.config_groups;
  if (!groups || typeof groups !== 'object' || Array.isArray(groups) || Object.keys(groups).length === 0)
    throw refuse('config_groups: expected an object of one or more scheme groups.');
  if (format === FLOAT_FORMAT) return floatConfig(groups as Raw, refuse);
  for (const [name, g] of Object.entries(groups as Raw)) checkGroup(name, g, format, refuse);
  const weights = Object.values(groups as Raw).map((g) => (g as Raw).weights as Raw);
  const asym = weights.some((w) => w.symmetric === false);
  const actOrderGroups = weights.some((w) => w.actorder === 'group' || w.actorder === 'dynamic');
  return { method: 'compressed-tensors', format, ignore: ignore as string[], schemes: declaredSchemes(q),
    ...(staticInputs(q.config_groups as Raw) ? { staticInputScales: true as const } : {}),
    ...(asym ? { zeroPoints: true as const } : {}), ...(actOrderGroups ? { actOrderGroups: true as const } : {}) };
}

function checkFormat(f: unknown, field: string, refuse: (why: string) => Error): CompressedTensorsConfig['format'] {
  if ((FORMATS as readonly unknown[]).includes(f)) return f as CompressedTensorsConfig['format'];
  const other = typeof f === 'string' ? OTHER_FORMATS[f] : undefined;
  throw refuse(`${field} ${JSON.stringify(f)} ${other ? `(${other})` : 'is not a format expertd reads'}.`);
}

const ACT_ORDERS = ['static', 'weight', 'group', 'dynamic'];

function checkGroup(name: string, g: unknown, format: string, refuse: (why: string) => Error): void {
  const at = `config_groups.${name}`;
  if (!g || typeof g !== 'object' || Array.isArray(g)) throw refuse(`${at} must be an object.`);
  const grp = g as Raw;
  if (grp.format !== undefined && grp.format !== null && grp.format !== format) checkFormat(grp.format, `${at}.format`, refuse);
  if (grp.output_activations != null) throw refuse(`${at}.output_activations: quantized outputs are not read.`);
  const w = grp.weights as Raw | null | undefined;
  if (!w || typeof w !== 'object') throw refuse(`${at}.weights ${JSON.stringify(w)}: expected the weights' quantization args.`);
  const wa = `${at}.weights`;
  const type = w.type ?? 'int';
  if (type !== 'int')
    throw refuse(`${wa}.type ${JSON.stringify(type)}: expertd reads integer weights (FP8 checkpoints: quant_method "fp8").`);
  if (w.dynamic === true || w.dynamic === 'local') throw refuse(`${wa}.dynamic ${JSON.stringify(w.dynamic)}: weights must carry their scales.`);
  // "weight" (alias "static"): quantized in activation order, groups in the plain order (nothing to read);
  // "group" (alias "dynamic"): groups of inputs in activation order, which X.weight_g_idx says.
  const act = w.actorder ?? null;
  if (act !== null && act !== false && !ACT_ORDERS.includes(act as string))
    throw refuse(`${wa}.actorder ${JSON.stringify(act)}: expected one of ${ACT_ORDERS.map((a) => JSON.stringify(a)).join(', ')} or null.`);
  const bits = w.num_bits, strategy = w.strategy;
  if (bits === 8) {
    if (strategy !== 'channel')
      throw refuse(`${wa}.strategy ${JSON.stringify(strategy)} with num_bits 8: int8 weights are read per output channel (strategy "channel").`);
  } else if (bits === 4) {
    if (strategy !== 'group' && strategy !== 'channel')
      throw refuse(`${wa}.strategy ${JSON.stringify(strategy)} with num_bits 4: int4 weights are read in groups (strategy "group", ` +
        'group_size a multiple of 32) or per output channel ("channel").');
    if (strategy === 'group' && !(Number.isInteger(w.group_size) && (w.group_size as number) > 0 && (w.group_size as number) % 32 === 0))
      throw refuse(`${wa}.group_size ${JSON.stringify(w.group_size)}: int4 groups are held as groups of 32 or 128 columns, so a ` +
        'group must be a multiple of 32.');
  } else {
    throw refuse(`${wa}.num_bits ${JSON.stringify(bits)}: expertd reads 8-bit and 4-bit integer weights.`);
  }
  const ia = grp.input_activations as Raw | null | undefined;
  if (ia != null) {
    // Static ones (dynamic false: calibrated X.input_scale) are read too, their scales unused.
    const ok = typeof ia === 'object' && (ia.type ?? 'int') === 'int' && ia.num_bits === 8 && (ia.dynamic === true || ia.dynamic === false);
    if (!ok)
      throw refuse(`${at}.input_activations ${JSON.stringify(ia)}: expertd quantizes activations itself, dynamically ` +
        '(int8 W8A8 activations, dynamic or static, are read as that; FP8 or other activations on int weights are not).');
  }
}

/**
 * format "float-quantized": every group FP8 e4m3 weights (`X.weight` F8_E4M3 with `X.weight_scale`),
 * one block grid for the checkpoint. Per-channel and per-tensor scales go on FP8_ROW_GRID (the loader
 * spreads them, safetensors.ts fp8ScaleGrid); strategy "block" keeps its block_structure.
 */
function floatConfig(groups: Raw, refuse: (why: string) => Error): Fp8Quantization {
  const grids = new Set<string>();
  for (const [name, g] of Object.entries(groups)) {
    const at = `config_groups.${name}`;
    if (!g || typeof g !== 'object' || Array.isArray(g)) throw refuse(`${at} must be an object.`);
    const grp = g as Raw;
    if (grp.format != null && grp.format !== FLOAT_FORMAT)
      throw refuse(`${at}.format ${JSON.stringify(grp.format)}: a float-quantized checkpoint's groups are all float-quantized.`);
    if (grp.output_activations != null) throw refuse(`${at}.output_activations: quantized outputs are not read.`);
    const w = grp.weights as Raw | null | undefined;
    if (!w || typeof w !== 'object') throw refuse(`${at}.weights ${JSON.stringify(w)}: expected the weights' quantization args.`);
    const wa = `${at}.weights`;
    if (w.type !== 'float' || w.num_bits !== 8)
      throw refuse(`${wa} type ${JSON.stringify(w.type)} num_bits ${JSON.stringify(w.num_bits)}: float-quantized weights are ` +
        'read as FP8 (type "float", num_bits 8: e4m3).');
    if (w.symmetric === false) throw refuse(`${wa}.symmetric false: FP8 weights with zero points are not read.`);
    if (w.dynamic === true || w.dynamic === 'local') throw refuse(`${wa}.dynamic ${JSON.stringify(w.dynamic)}: weights must carry their scales.`);
    const strategy = w.strategy;
    if (strategy === 'channel' || strategy === 'tensor') {
      grids.add(FP8_ROW_GRID.join('x'));
    } else if (strategy === 'block') {
      const b = w.block_structure;
      if (!Array.isArray(b) || b.length !== 2 || !b.every((x) => Number.isInteger(x) && (x as number) > 0))
        throw refuse(`${wa}.block_structure ${JSON.stringify(b)}: expected [rows, cols], two positive integers.`);
      if ((b[1] as number) % 2 !== 0) throw refuse(`${wa}.block_structure ${JSON.stringify(b)}: the block width (cols) must be even for the FP8 kernels.`);
      grids.add(b.join('x'));
    } else {
      throw refuse(`${wa}.strategy ${JSON.stringify(strategy)}: FP8 weights are read per output channel ("channel"), per tensor ` +
        '("tensor") or in blocks ("block").');
    }
    const ia = grp.input_activations as Raw | null | undefined;
    if (ia != null) {
      const ok = typeof ia === 'object' && (ia.dynamic === true || ia.dynamic === false) && (ia.type ?? 'float') === 'float' && ia.num_bits === 8;
      if (!ok)
        throw refuse(`${at}.input_activations ${JSON.stringify(ia)}: expertd computes with unquantized (bf16 / f32) activations; ` +
          'FP8 activations, dynamic or static (whose input_scale tensors are not used), are read as that.');
    }
  }
  if (grids.size !== 1)
    throw refuse(`config_groups: FP8 weights on ${[...grids].join(' and ')} block grids; one grid per checkpoint is read.`);
  const [br, bc] = [...grids][0]!.split('x').map(Number) as [number, number];
  return { method: 'fp8', blockSize: [br, bc], scaleSuffix: '_scale', ...(staticInputs(groups) ? { staticInputScales: true as const } : {}) };
}

/** What a Linear's stored tensors are, by their dtypes and shapes (names without the ".weight"). */
export interface CompressedParts {
  /** `.weight` I8 (int-quantized) or `.weight_packed` I32 (pack-quantized). */
  codes: { dtype: string; shape: number[]; data: Int8Array | Int32Array };
  scale: { dtype: string; shape: number[]; data: Float32Array };
  /** `.weight_shape` [rows, cols] (pack-quantized). */
  shape: [number, number] | null;
  /**
   * `.weight_zero_point` (symmetric false): I32 [ceil(rows / per-word), groups] packed along rows
   * (pack-quantized, values + 2^(bits-1)), or I8 [rows, groups] as they are; absent: symmetric.
   */
  zeroPoint?: { dtype: string; shape: number[]; data: Int8Array | Int32Array } | null;
  /** `.weight_g_idx` I32 [cols] (actorder "group"): the group of each input column; absent: the plain order. */
  gIdx?: { dtype: string; shape: number[]; data: Int32Array } | null;
}

/** The schemes a config declares: weight bit widths and int4 group sizes (to read tensors whose
 * shapes alone are ambiguous: an int4 weight stored one value per byte, one group per row). */
export function declaredSchemes(q: Raw): { bits: number[]; groupSizes: number[] } {
  const bits = new Set<number>(), groupSizes = new Set<number>();
  for (const g of Object.values((q.config_groups ?? {}) as Record<string, Raw>)) {
    const w = g.weights as Raw;
    bits.add(w.num_bits as number);
    if (w.num_bits === 4) groupSizes.add(w.strategy === 'channel' ? -1 : w.group_size as number);
  }
  return { bits: [...bits], groupSizes: [...groupSizes] };
}

/**
 * One Linear's codes and scales from its stored tensors: `X.weight` int8 [rows, cols] or
 * `X.weight_packed` int32 [rows, ceil(cols * bits / 32)] (values + 2^(bits-1), the lowest bits
 * first) with `X.weight_shape`; `X.weight_scale` [rows, 1] (per channel) or [rows, ceil(cols / group)].
 * Throws naming the tensor when the shapes disagree or the scheme is not one expertd's formats hold.
 */
export function intWeightOf(name: string, p: CompressedParts, schemes: { bits: number[]; groupSizes: number[] },
                            fail: (msg: string) => Error): IntWeight {
  let rows: number, cols: number, codes: Int8Array, bits: 4 | 8;
  const s = p.scale;
  if (p.codes.dtype === 'I8') {
    if (p.codes.shape.length !== 2) throw fail(`${name} is I8 with shape [${p.codes.shape.join(', ')}], expected [rows, cols]`);
    [rows, cols] = p.codes.shape as [number, number];
    codes = p.codes.data as Int8Array;
    // One value per byte: 8-bit, or 4-bit (int-quantized num_bits 4) when the config has only that or
    // the scales are grouped.
    bits = schemes.bits.length === 1 ? (schemes.bits[0] as 4 | 8) : s.shape[1] === 1 ? 8 : 4;
  } else if (p.codes.dtype === 'I32') {
    if (!p.shape) throw fail(`${name}_packed has no ${name}_shape beside it (the unpacked [rows, cols])`);
    [rows, cols] = p.shape;
    const words = p.codes.shape[1] ?? 0;
    if (p.codes.shape.length !== 2 || p.codes.shape[0] !== rows)
      throw fail(`${name}_packed has shape [${p.codes.shape.join(', ')}], expected [${rows}, words] for ${name}_shape [${rows}, ${cols}]`);
    if (words === Math.ceil(cols / 8) && schemes.bits.includes(4)) bits = 4;
    else if (words === Math.ceil(cols / 4) && schemes.bits.includes(8)) bits = 8;
    else throw fail(`${name}_packed has ${words} int32 words per row for ${cols} columns: not the ${schemes.bits.join(' or ')}-bit packing the config declares`);
    codes = unpackInt32(p.codes.data as Int32Array, rows, cols, words, bits);
  } else {
    throw fail(`${name} has dtype ${p.codes.dtype}; compressed-tensors integer weights are I8 or I32 (packed)`);
  }
  if (s.shape.length !== 2 || s.shape[0] !== rows || !(s.shape[1]! >= 1))
    throw fail(`${name}_scale has shape [${s.shape.join(', ')}], expected [${rows}, 1] or [${rows}, groups]`);
  const nScale = s.shape[1]!;
  const zeros = p.zeroPoint ? zeroPointsOf(name, p.zeroPoint, rows, nScale, bits, fail) : undefined;
  if (bits === 8) {
    if (nScale !== 1)
      throw fail(`${name}_scale has ${nScale} scales per row: expertd reads int8 weights with one scale per output channel`);
    // One group per row: only the plain order (every g_idx 0) passes groupOrder; nothing to reorder.
    if (p.gIdx) groupOrder(`${name}_g_idx`, p.gIdx, cols, cols, fail);
    return { bits, codes, scales: s.data, rows, cols, group: 0, ...(zeros ? { zeros } : {}) };  // int8 keeps f32 scales (one per row)
  }
  // Group g covers columns [g * size, (g + 1) * size); the last one may be ragged. -1: per channel.
  const sizes = schemes.groupSizes.length ? schemes.groupSizes : [32, 128];
  const group = sizes.find((gs) => (gs === -1 ? 1 : Math.ceil(cols / gs)) === nScale);
  if (group === undefined)
    throw fail(`${name}_scale has ${nScale} scale(s) per row of ${cols} 4-bit values: not ${sizes.map((g) => (g === -1 ? 'one per row' : `groups of ${g}`)).join(' or ')}`);
  // Act-order (actorder "group"): the columns held in group order and the GEMMs gather x, as for GPTQ's g_idx.
  const perm = p.gIdx ? groupOrder(`${name}_g_idx`, p.gIdx, cols, group === -1 ? cols : group, fail) : undefined;
  if (perm) codes = columnsInOrder(codes, rows, cols, perm);
  return { bits, codes, ...regroupScales(s.data, rows, cols, group, zeros), rows, cols, scaleDtype: scaleDtypeOf(s.dtype),
    ...(perm ? { perm } : {}) };
}

/**
 * The input order of an act-order weight from its g_idx (`tensor`: I32 [cols], the group of each input
 * column), or undefined when g_idx keeps the plain order (input // gs). The order is stable by group, then
 * input; each group must then hold gs inputs as in the plain order (the last one ragged), which expertd's
 * int layout needs. Throws (made by `fail`) naming `what`. GPTQ's g_idx and compressed-tensors'
 * weight_g_idx (actorder "group") alike.
 */
export function groupOrder(what: string, tensor: { dtype: string; shape: number[]; data: Int32Array }, cols: number, gs: number,
                           fail: (msg: string) => Error): Int32Array | undefined {
  const g = tensor.data;
  if (tensor.dtype !== 'I32' || tensor.shape.length !== 1 || tensor.shape[0] !== cols)
    throw fail(`${what} is ${tensor.dtype} [${tensor.shape.join(', ')}], expected I32 [${cols}]`);
  let plain = true;
  for (let k = 0; k < cols && plain; k++) plain = g[k] === Math.floor(k / gs);
  if (plain) return undefined;
  const perm = Int32Array.from({ length: cols }, (_, k) => k).sort((a, b) => g[a]! - g[b]! || a - b);
  for (let j = 0; j < cols; j++)
    if (g[perm[j]!] !== Math.floor(j / gs))
      throw fail(`${what} holds groups of other sizes than group_size ${gs} (group ${Math.floor(j / gs)} ` +
        `would take input ${perm[j]}, which it puts in group ${g[perm[j]!]})`);
  return perm;
}

/** codes [rows, cols] with column j taken from column perm[j] (an act-order weight's columns in group order). */
export function columnsInOrder(codes: Int8Array, rows: number, cols: number, perm: Int32Array): Int8Array {
  const out = new Int8Array(rows * cols);
  for (let r = 0; r < rows; r++)
    for (let j = 0; j < cols; j++) out[r * cols + j] = codes[r * cols + perm[j]!]!;
  return out;
}

/**
 * `X.weight_zero_point` as signed zero points [rows, groups] (value = (code - zero) * scale), or undefined when
 * every one is 0 (a symmetric weight stored with its zeros).
 */
function zeroPointsOf(name: string, zp: NonNullable<CompressedParts['zeroPoint']>, rows: number, groups: number, bits: 4 | 8,
                      fail: (msg: string) => Error): Int8Array | undefined {
  let zeros: Int8Array;
  const per = 32 / bits;
  if (zp.dtype === 'I8' && zp.shape.length === 2 && zp.shape[0] === rows && zp.shape[1] === groups) {
    zeros = zp.data as Int8Array;
  } else if (zp.dtype === 'I32' && zp.shape.length === 2 && zp.shape[0] === Math.ceil(rows / per) && zp.shape[1] === groups) {
    // Packed along the rows: word [j, g] holds rows per * j + i in field i, each + 2^(bits-1).
    const words = zp.data as Int32Array, mask = (1 << bits) - 1, offset = 1 << (bits - 1);
    zeros = new Int8Array(rows * groups);
    for (let r = 0; r < rows; r++)
      for (let g = 0; g < groups; g++) zeros[r * groups + g] = ((words[Math.floor(r / per) * groups + g]! >>> (bits * (r % per))) & mask) - offset;
  } else {
    throw fail(`${name}_zero_point is ${zp.dtype} [${zp.shape.join(', ')}], expected I8 [${rows}, ${groups}] or I32 ` +
      `[${Math.ceil(rows / per)}, ${groups}] (packed along the rows)`);
  }
  return zeros.some((z) => z !== 0) ? zeros : undefined;
}

/** The int4 group (32 or 128) expertd holds a stored group of `gs` columns in (-1: per channel): 128 where it divides. */
export function heldInt4Group(gs: number): number {
  return gs === -1 || gs % 128 === 0 ? 128 : 32;
}

/**
 * Int4 scales [rows, ceil(cols / gs)] (gs a multiple of 32, or -1: one per row) as expertd holds them, in
 * groups of heldInt4Group(gs) columns: each held group lies inside one stored group and takes its scale,
 * so code * scale is the same number everywhere.
 */
export function regroupScales(scales: Float32Array, rows: number, cols: number, gs: number,
                              zeros?: Int8Array): { scales: Float32Array; group: number; zeros?: Int8Array } {
  const hg = heldInt4Group(gs);
  if (gs === hg) return { scales, group: hg, ...(zeros ? { zeros } : {}) };
  const stored = gs === -1 ? 1 : Math.ceil(cols / gs), held = Math.ceil(cols / hg), span = gs === -1 ? cols : gs;
  const spread = <T extends Float32Array | Int8Array>(v: T, out: T): T => {
    for (let r = 0; r < rows; r++)
      for (let j = 0; j < held; j++) out[r * held + j] = v[r * stored + Math.floor((j * hg) / span)]!;
    return out;
  };
  return { scales: spread(scales, new Float32Array(rows * held)), group: hg, ...(zeros ? { zeros: spread(zeros, new Int8Array(rows * held)) } : {}) };
}

/** A stored scale tensor's dtype as a weight can hold it (its values are exact there). */
export function scaleDtypeOf(dtype: string): ScaleDtype {
  return dtype === 'BF16' ? 'bf16' : dtype === 'F16' ? 'f16' : 'f32';
}

/** Unpacks words [rows, words] of `bits`-bit values (offset by 2^(bits-1), lowest bits first) to signed codes [rows, cols]. */
export function unpackInt32(packed: Int32Array, rows: number, cols: number, words: number, bits: 4 | 8): Int8Array {
  const per = 32 / bits, mask = (1 << bits) - 1, offset = 1 << (bits - 1);
  const out = new Int8Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const o = r * cols;
    for (let w = 0; w < words; w++) {
      let word = packed[r * words + w]!;
      const c0 = w * per, n = Math.min(per, cols - c0);
      for (let j = 0; j < n; j++, word >>>= bits) out[o + c0 + j] = (word & mask) - offset;
    }
  }
  return out;
}

/**
 * The f32 values (code - zero) * scale (exact for bf16 scales) of an int weight [rows, cols], in the
 * inputs' order (an act-order weight's column c is input perm[c]).
 */
export function dequantInt(w: IntWeight): Float32Array {
  const out = new Float32Array(w.rows * w.cols);
  const g = w.group === 0 ? w.cols : w.group, per = Math.ceil(w.cols / g);
  for (let r = 0; r < w.rows; r++)
    for (let c = 0; c < w.cols; c++) {
      const at = r * per + Math.floor(c / g);
      out[r * w.cols + (w.perm ? w.perm[c]! : c)] = Math.fround((w.codes[r * w.cols + c]! - (w.zeros?.[at] ?? 0)) * w.scales[at]!);
    }
  return out;
}
