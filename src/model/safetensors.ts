// Safetensors checkpoints: header parsing and validation, zero-copy tensor views over mmapped
// files (single file, sharded via model.safetensors.index.json, or any *.safetensors), FP8 block
// dequantisation at load, compressed-tensors int8/int4 codes, and a writer for tests, the demo model and benchmarks.
import fs from 'node:fs';
import path from 'node:path';

import { loadNative } from '../native/index.js';
import { dequantInt, intWeightOf } from './compressed-tensors.js';
import { gptqIntWeight, gptqShape, type GptqConfig } from './gptq.js';
import type { IntWeight } from './tensor-source.js';

/** Safetensors element types this reader understands. */
export type StDType =
  | 'F64' | 'F32' | 'F16' | 'BF16' | 'F8_E4M3' | 'F8_E5M2'
  | 'I64' | 'I32' | 'I16' | 'I8' | 'U64' | 'U32' | 'U16' | 'U8' | 'BOOL';

const DTYPE_BYTES: Record<StDType, number> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, F8_E4M3: 1, F8_E5M2: 1,
  I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1, BOOL: 1,
};

export const SUPPORTED_DTYPES = Object.keys(DTYPE_BYTES) as StDType[];

export type TensorData =
  | Float64Array | Float32Array | Uint16Array | Uint8Array | Int8Array | Int16Array | Int32Array
  | Uint32Array | BigInt64Array | BigUint64Array;

/** Header length above which a file is rejected (a corrupt length would otherwise allocate GBs). */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

export function dtypeBytes(dtype: StDType): number {
  return DTYPE_BYTES[dtype];
}

/** A checkpoint that cannot be read as it is; names the file (and tensor) at fault. */
export class CheckpointError extends Error {
  readonly code = 'E_CHECKPOINT';
  constructor(message: string, readonly file: string | null = null) {
    super(message);
    this.name = 'CheckpointError';
  }
}

export interface TensorInfo {
  name: string;
  dtype: StDType;
  shape: number[];
  /** Absolute path of the file holding the tensor. */
  file: string;
  /** Absolute byte offset of the first element in `file`. */
  offset: number;
  sizeBytes: number;
  /**
   * Typed view of the elements (Uint16Array for BF16/F16, Float32Array for F32, Uint8Array for
   * F8/U8/BOOL, ...). Zero-copy over the read-only mapping unless the offset is misaligned for the
   * element type, in which case the bytes are copied once into an aligned buffer.
   * NOTE: views over the mapping are read-only pages; writing to them faults the process.
   */
  data(): TensorData;
}

export interface SafetensorsHeader {
  file: string;
  fileSizeBytes: number;
  /** Byte offset where the data section starts (8 + header length). */
  dataStart: number;
  metadata: Record<string, string>;
  tensors: Array<{ name: string; dtype: StDType; shape: number[]; begin: number; end: number }>;
}

const base = (file: string): string => path.basename(file);

function fail(file: string, msg: string): never {
  throw new CheckpointError(`${base(file)}: ${msg}`, file);
}

/** Reads and validates the header of one .safetensors file, touching only the header bytes. */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    throw new CheckpointError(`cannot open ${file}: ${(e as Error).message}`, file);
  }
  try {
    const fileSizeBytes = fs.fstatSync(fd).size;
    if (fileSizeBytes < 8)
      fail(file, `file is ${fileSizeBytes} bytes, too short for the 8-byte header length (truncated?)`);
    const lenBuf = Buffer.alloc(8);
    fs.readSync(fd, lenBuf, 0, 8, 0);
    const headerLen64 = lenBuf.readBigUInt64LE(0);
    if (headerLen64 > BigInt(MAX_HEADER_BYTES))
      fail(file, `header length is ${headerLen64} bytes, more than the ${MAX_HEADER_BYTES}-byte limit ` +
        '(not a safetensors file, or corrupt)');
    const headerLen = Number(headerLen64);
    const dataStart = 8 + headerLen;
    if (dataStart > fileSizeBytes)
      fail(file, `header length is ${headerLen} bytes but the file has only ${fileSizeBytes} bytes (truncated?)`);
    const hdrBuf = Buffer.alloc(headerLen);
    if (headerLen > 0 && fs.readSync(fd, hdrBuf, 0, headerLen, 8) !== headerLen)
      fail(file, 'short read of the header');
    let json: unknown;
    try {
      json = JSON.parse(hdrBuf.toString('utf8'));
    } catch (e) {
      fail(file, `header is not valid JSON: ${(e as Error).message}`);
    }
    if (json === null || typeof json !== 'object' || Array.isArray(json))
      fail(file, 'header is not a JSON object');
    return parseHeader(file, fileSizeBytes, dataStart, json as Record<string, unknown>);
  } finally {
    fs.closeSync(fd);
  }
}

function isNonNegInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function parseHeader(file: string, fileSizeBytes: number, dataStart: number,
                     json: Record<string, unknown>): SafetensorsHeader {
  const metadata: Record<string, string> = {};
  const tensors: SafetensorsHeader['tensors'] = [];
  const dataBytes = fileSizeBytes - dataStart;
  for (const [name, value] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (value && typeof value === 'object' && !Array.isArray(value))
        for (const [k, v] of Object.entries(value)) metadata[k] = String(v);
      continue;
    }
    if (!value || typeof value !== 'object' || Array.isArray(value))
      fail(file, `tensor ${name}: header entry is not an object`);
    const e = value as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e.dtype !== 'string' || !(e.dtype in DTYPE_BYTES))
      fail(file, `tensor ${name}: unsupported dtype ${JSON.stringify(e.dtype)}; supported: ` +
        SUPPORTED_DTYPES.join(', '));
    const dtype = e.dtype as StDType;
    if (!Array.isArray(e.shape) || !e.shape.every(isNonNegInt))
      fail(file, `tensor ${name}: shape ${JSON.stringify(e.shape)} is not a list of non-negative integers`);
    const shape = e.shape as number[];
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !isNonNegInt(off[0]) || !isNonNegInt(off[1]) ||
        off[1] < off[0])
      fail(file, `tensor ${name}: data_offsets ${JSON.stringify(off)} is not [begin, end] with begin <= end`);
    const [begin, end] = off as [number, number];
    const numel = shape.reduce((a, b) => a * b, 1);
    const expected = numel * DTYPE_BYTES[dtype];
    if (end - begin !== expected)
      fail(file, `tensor ${name}: shape [${shape.join(', ')}] x ${dtype} is ${expected} bytes but ` +
        `data_offsets [${begin}, ${end}] span ${end - begin} bytes`);
    if (end > dataBytes)
      fail(file, `tensor ${name}: data ends at byte ${dataStart + end} but the file has only ` +
        `${fileSizeBytes} bytes (truncated, or offsets outside the file)`);
    tensors.push({ name, dtype, shape, begin, end });
  }
  const sorted = [...tensors].sort((a, b) => a.begin - b.begin || a.end - b.end);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!;
    const cur = sorted[i]!;
    if (cur.begin < prev.end && cur.end > cur.begin && prev.end > prev.begin)
      fail(file, `tensors ${prev.name} [${prev.begin}, ${prev.end}) and ${cur.name} ` +
        `[${cur.begin}, ${cur.end}) overlap`);
  }
  return { file, fileSizeBytes, dataStart, metadata, tensors };
}

function typedView(dtype: StDType, buf: ArrayBuffer, byteOffset: number, numel: number): TensorData {
  switch (dtype) {
    case 'F64': return new Float64Array(buf, byteOffset, numel);
    case 'F32': return new Float32Array(buf, byteOffset, numel);
    case 'F16': case 'BF16': case 'U16': return new Uint16Array(buf, byteOffset, numel);
    case 'I16': return new Int16Array(buf, byteOffset, numel);
    case 'I32': return new Int32Array(buf, byteOffset, numel);
    case 'U32': return new Uint32Array(buf, byteOffset, numel);
    case 'I64': return new BigInt64Array(buf, byteOffset, numel);
    case 'U64': return new BigUint64Array(buf, byteOffset, numel);
    case 'I8': return new Int8Array(buf, byteOffset, numel);
    default: return new Uint8Array(buf, byteOffset, numel);
  }
}

export type { IntWeight };

/**
 * How an FP8 weight [rows, cols]'s stored scale tensor (shape `shape`) covers it, on the grid of
 * br x bc blocks: 'tensor' (one: [], [1] or [1, 1]), 'channel' (one per output row, [rows, 1] or
 * [rows]; only where br is 1), 'grid' ([ceil(rows / br), ceil(cols / bc)]); null: none of them.
 * Where a shape fits several (a one-block grid, a one-column grid of rows) they mean the same, and
 * the order makes every matrix of a checkpoint name its one form.
 */
export function fp8ScaleForm(shape: number[], rows: number, cols: number, br: number, bc: number): 'grid' | 'channel' | 'tensor' | null {
  if (shape.every((d) => d === 1)) return 'tensor';
  const perRow = (shape.length === 2 && shape[0] === rows && shape[1] === 1) || (shape.length === 1 && shape[0] === rows);
  if (perRow && br === 1) return 'channel';
  return shape.length === 2 && shape[0] === Math.ceil(rows / br) && shape[1] === Math.ceil(cols / bc) ? 'grid' : null;
}

/**
 * An FP8 weight [rows, cols]'s stored scales (f32 values of the tensor `name`, shape `shape`) on the
 * grid of br x bc blocks [ceil(rows / br), ceil(cols / bc)] (fp8ScaleForm): block scales of that grid
 * as they are, a scale per output channel repeated along its row, one per tensor everywhere.
 * Anything else is refused by `fail`.
 */
export function fp8ScaleGrid(name: string, shape: number[], values: Float32Array, rows: number, cols: number,
                             br: number, bc: number, fail: (msg: string) => Error): Float32Array {
  const nbr = Math.ceil(rows / br), nbc = Math.ceil(cols / bc);
  const form = fp8ScaleForm(shape, rows, cols, br, bc);
  if (form === 'grid') return values;
  if (form === 'tensor') return new Float32Array(nbr * nbc).fill(values[0]!);
  if (form === 'channel') {
    const out = new Float32Array(nbr * nbc);
    for (let r = 0; r < rows; r++) out.fill(values[r]!, r * nbc, (r + 1) * nbc);
    return out;
  }
  throw fail(fp8ScaleShapeError(name, shape, rows, cols, br, bc));
}

/** Why a scale tensor of shape `shape` fits none of fp8ScaleForm's forms for a [rows, cols] weight. */
export function fp8ScaleShapeError(name: string, shape: number[], rows: number, cols: number, br: number, bc: number): string {
  return `tensor ${name} has shape [${shape.join(', ')}], expected [${Math.ceil(rows / br)}, ${Math.ceil(cols / bc)}] for a ` +
    `[${rows}, ${cols}] weight in ${br}x${bc} blocks` +
    (br === 1 ? `, [${rows}, 1] (one scale per output channel) or [1] (one per tensor)` : ' or [1] (one scale per tensor)');
}

/** A GPTQ Linear's stored tensor `part` (qweight, qzeros, scales, g_idx) for its logical `X.weight`. */
export function gptqName(name: string, part: string): string {
  return `${name.replace(/\.weight$/, '')}.${part}`;
}

export interface OpenOptions {
  /** FP8 block size [rows, cols] (config quantization_config.weight_block_size); default [128, 128]. */
  fp8BlockSize?: [number, number];
  /** The FP8 scale tensor beside X.weight: X.weight + this ('_scale_inv' by default; compressed-tensors '_scale'). */
  fp8ScaleSuffix?: '_scale_inv' | '_scale';
  /** compressed-tensors: the weight bit widths and int4 group sizes its config declares. */
  compressed?: { bits: number[]; groupSizes: number[] };
  /** GPTQ: Linear weights stored as X.qweight / X.qzeros / X.scales (gptq.ts). */
  gptq?: GptqConfig;
}

export type LoadedWeight =
  | { dtype: 'bf16' | 'f16'; data: Uint16Array }
  | { dtype: 'f32'; data: Float32Array };

/** An opened checkpoint: every tensor of every file, validated, mapped on first access. */
export class Checkpoint {
  readonly tensors = new Map<string, TensorInfo>();
  readonly headers: SafetensorsHeader[] = [];
  private readonly maps = new Map<string, ArrayBuffer>();
  /** True when tensor data is read with copies (addon missing or external buffers refused). */
  copyFallback = false;

  constructor(readonly dir: string, readonly files: string[], readonly options: OpenOptions = {}) {
    for (const file of files) {
      const h = readSafetensorsHeader(file);
      this.headers.push(h);
      for (const t of h.tensors) {
        const prev = this.tensors.get(t.name);
        if (prev)
          throw new CheckpointError(`tensor ${t.name} appears in both ${base(prev.file)} and ${base(file)}`, file);
        const offset = h.dataStart + t.begin;
        const numel = t.shape.reduce((a, b) => a * b, 1);
        const info: TensorInfo = {
          name: t.name, dtype: t.dtype, shape: t.shape, file, offset, sizeBytes: t.end - t.begin,
          data: () => this.view(file, t.dtype, offset, numel, t.end - t.begin),
        };
        this.tensors.set(t.name, info);
      }
    }
  }

  names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  getTensor(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) {
      throw new CheckpointError(`tensor ${name} is not in the checkpoint at ${this.dir} ` +
        `(${this.tensors.size} tensors in ${this.files.map(base).join(', ')})`);
    }
    return t;
  }

  /**
   * The weight in a dtype the kernels take: BF16/F16/F32 as stored (zero-copy), F8_E4M3 with its
   * `<name>_scale_inv` block scales dequantised to bf16 (a new buffer), compressed-tensors int8 /
   * int4 dequantised to f32 (exact; a new buffer).
   */
  loadWeightBf16OrNative(name: string): LoadedWeight {
    const iw = this.loadInt(name);
    if (iw) return { dtype: 'f32', data: dequantInt(iw) };
    const t = this.getTensor(name);
    switch (t.dtype) {
      case 'BF16': return { dtype: 'bf16', data: t.data() as Uint16Array };
      case 'F16': return { dtype: 'f16', data: t.data() as Uint16Array };
      case 'F32': return { dtype: 'f32', data: t.data() as Float32Array };
      case 'F8_E4M3': return { dtype: 'bf16', data: this.dequantFp8(t) };
      default:
        throw new CheckpointError(`tensor ${name} has dtype ${t.dtype}; weights must be BF16, F16, F32 ` +
          'or F8_E4M3 with block scales', t.file);
    }
  }

  private dequantFp8(t: TensorInfo): Uint16Array {
    const f = this.fp8Parts(t);
    const dst = new Uint16Array(f.rows * f.cols);
    loadNative().dequantFp8(f.codes, f.scaleInv, f.rows, f.cols, f.br, f.bc, dst);
    return dst;
  }

  /**
   * True when `name` (`X.weight`) is stored as int codes: compressed-tensors' `X.weight_packed`, or I8 with
   * `X.weight_scale`; GPTQ's `X.qweight`.
   */
  isCompressed(name: string): boolean {
    if (this.options.gptq) return this.isGptq(name);
    if (!this.options.compressed || !name.endsWith('.weight')) return false;
    if (this.tensors.has(`${name}_packed`)) return true;
    return this.tensors.get(name)?.dtype === 'I8' && this.tensors.has(`${name}_scale`);
  }

  /** Shape [rows, cols] of a weight, compressed or not. */
  weightShape(name: string): number[] {
    if (this.isGptq(name)) return gptqShape(this.options.gptq!, this.getTensor(gptqName(name, 'qweight')).shape);
    if (this.isCompressed(name) && !this.tensors.has(name)) return this.packedShape(name);
    return this.getTensor(name).shape;
  }

  private packedShape(name: string): [number, number] {
    const t = this.getTensor(`${name}_shape`);
    const d = t.data();
    if (t.shape.length !== 1 || t.shape[0] !== 2 || !(d instanceof Int32Array || d instanceof BigInt64Array))
      throw new CheckpointError(`tensor ${name}_shape is ${t.dtype} [${t.shape.join(', ')}], expected I32 or I64 [2]`, t.file);
    return [Number(d[0]), Number(d[1])];
  }

  /**
   * A compressed-tensors int8 / int4 weight's codes (unpacked, one per element) and f32 scales;
   * null when `name` is not stored so.
   */
  loadInt(name: string): IntWeight | null {
    if (!this.isCompressed(name)) return null;
    if (this.options.gptq) return this.loadGptq(name);
    const packed = this.tensors.has(`${name}_packed`);
    const c = this.getTensor(packed ? `${name}_packed` : name);
    const s = this.getTensor(`${name}_scale`);
    const z = this.tensors.get(`${name}_zero_point`);
    const g = this.tensors.get(`${name}_g_idx`);
    const fail = (msg: string) => new CheckpointError(msg, c.file);
    return intWeightOf(name, {
      codes: { dtype: c.dtype, shape: c.shape, data: c.data() as Int8Array | Int32Array },
      scale: { dtype: s.dtype, shape: s.shape, data: this.floatScales(s) },
      shape: packed ? this.packedShape(name) : null,
      zeroPoint: z ? { dtype: z.dtype, shape: z.shape, data: z.data() as Int8Array | Int32Array } : null,
      gIdx: g ? { dtype: g.dtype, shape: g.shape, data: g.data() as Int32Array } : null,
    }, this.options.compressed!, fail);
  }

  private isGptq(name: string): boolean {
    return !!this.options.gptq && name.endsWith('.weight') && this.tensors.has(gptqName(name, 'qweight'));
  }

  private loadGptq(name: string): IntWeight {
    const q = this.getTensor(gptqName(name, 'qweight'));
    const z = this.getTensor(gptqName(name, 'qzeros'));
    const s = this.getTensor(gptqName(name, 'scales'));
    const g = this.tensors.get(gptqName(name, 'g_idx')) ?? null;
    const ints = (t: TensorInfo) => ({ dtype: t.dtype, shape: t.shape, data: t.dtype === 'I32' ? t.data() as Int32Array : new Int32Array(0) });
    return gptqIntWeight(name, {
      qweight: ints(q), qzeros: ints(z), scales: { dtype: s.dtype, shape: s.shape, data: this.floatScales(s) },
      gIdx: g && ints(g),
    }, this.options.gptq!, (msg) => new CheckpointError(msg, q.file));
  }

  private floatScales(s: TensorInfo): Float32Array {
    const d = s.data();
    if (s.dtype === 'F32') return d as Float32Array;
    if (s.dtype === 'BF16' || s.dtype === 'F16') {
      const out = new Float32Array(d.length);
      loadNative().convert(d as Uint16Array, s.dtype === 'BF16' ? 'bf16' : 'f16', out, 'f32');
      return out;
    }
    throw new CheckpointError(`tensor ${s.name} has dtype ${s.dtype}, expected F32, BF16 or F16 scales`, s.file);
  }

  /**
   * An F8_E4M3 weight as stored: its codes and `<name>_scale_inv` block scales (f32), for kernels
   * that keep FP8 (the experts); null when the tensor is not F8_E4M3.
   */
  loadFp8(name: string): Fp8Weight | null {
    if (this.isCompressed(name)) return null;
    const t = this.getTensor(name);
    return t.dtype === 'F8_E4M3' ? this.fp8Parts(t) : null;
  }

  private fp8Parts(t: TensorInfo): Fp8Weight {
    const scaleName = `${t.name}${this.options.fp8ScaleSuffix ?? '_scale_inv'}`;
    if (!this.tensors.has(scaleName))
      throw new CheckpointError(`tensor ${t.name} is F8_E4M3 but ${scaleName} (its scales) is missing`, t.file);
    if (t.shape.length !== 2)
      throw new CheckpointError(`tensor ${t.name} is F8_E4M3 with shape [${t.shape.join(', ')}]; ` +
        'only 2-D block-quantised weights are supported', t.file);
    const [rows, cols] = t.shape as [number, number];
    const [br, bc] = this.options.fp8BlockSize ?? [128, 128];
    const s = this.getTensor(scaleName);
    const scale = fp8ScaleGrid(scaleName, s.shape, this.floatScales(s), rows, cols, br, bc,
      (msg) => new CheckpointError(msg, s.file));
    return { codes: t.data() as Uint8Array, scaleInv: scale, rows, cols, br, bc };
  }

  /**
   * Releases the resident pages of every file mapped so far (the loader calls it once the weights
   * are packed): the pages stay in the page cache, and a tensor view read later (a zero-copy
   * embedding, the offloader's slow tier) faults its pages back in from there.
   */
  releasePages(): void {
    for (const buf of this.maps.values()) loadNative().dropMappedPages(buf);
  }

  private mapping(file: string): ArrayBuffer | null {
    if (this.copyFallback) return null;
    let buf = this.maps.get(file);
    if (buf) return buf;
    try {
      buf = loadNative().mmapFile(file);
    } catch (e) {
      const msg = (e as Error).message;
      // Only a missing addon or a runtime refusing external buffers falls back to copies;
      // a real I/O error is the caller's to see.
      if (msg.includes('not built') || msg.includes('external ArrayBuffers')) {
        this.copyFallback = true;
        return null;
      }
      throw new CheckpointError(`cannot map ${file}: ${msg}`, file);
    }
    this.maps.set(file, buf);
    return buf;
  }

  private view(file: string, dtype: StDType, offset: number, numel: number, sizeBytes: number): TensorData {
    const buf = this.mapping(file);
    const align = DTYPE_BYTES[dtype];
    if (buf && offset % align === 0) return typedView(dtype, buf, offset, numel);
    // Copy: either no mapping, or an offset the typed view cannot start at.
    const copy = new ArrayBuffer(sizeBytes);
    const bytes = new Uint8Array(copy);
    if (buf) {
      bytes.set(new Uint8Array(buf, offset, sizeBytes));
    } else if (sizeBytes > 0) {
      const fd = fs.openSync(file, 'r');
      try {
        let done = 0;
        while (done < sizeBytes) {
          const n = fs.readSync(fd, bytes, done, sizeBytes - done, offset + done);
          if (n <= 0) throw new CheckpointError(`short read of ${file} at byte ${offset + done}`, file);
          done += n;
        }
      } finally {
        fs.closeSync(fd);
      }
    }
    return typedView(dtype, copy, 0, numel);
  }
}

/**
 * Opens a checkpoint folder: model.safetensors.index.json (sharded) if present, else
 * model.safetensors, else every *.safetensors in the folder.
 */
export function openCheckpoint(dir: string, options: OpenOptions = {}): Checkpoint {
  const abs = path.resolve(dir);
  let stat: fs.Stats;
  try {
    stat = fs.statSync(abs);
  } catch {
    throw new CheckpointError(`checkpoint folder ${abs} does not exist`);
  }
  if (stat.isFile() && abs.endsWith('.safetensors'))
    return new Checkpoint(path.dirname(abs), [abs], options);
  if (!stat.isDirectory()) throw new CheckpointError(`${abs} is not a folder or a .safetensors file`);

  const index = path.join(abs, 'model.safetensors.index.json');
  if (fs.existsSync(index)) {
    let weightMap: Record<string, unknown>;
    try {
      const j = JSON.parse(fs.readFileSync(index, 'utf8')) as { weight_map?: unknown };
      if (!j.weight_map || typeof j.weight_map !== 'object') throw new Error('no weight_map object');
      weightMap = j.weight_map as Record<string, unknown>;
    } catch (e) {
      throw new CheckpointError(`model.safetensors.index.json: ${(e as Error).message}`, index);
    }
    const files = [...new Set(Object.values(weightMap).map(String))].sort();
    for (const f of files) {
      if (!fs.existsSync(path.join(abs, f)))
        throw new CheckpointError(`model.safetensors.index.json names ${f}, which is missing from ${abs}`, index);
    }
    const ckpt = new Checkpoint(abs, files.map((f) => path.join(abs, f)), options);
    for (const [name, f] of Object.entries(weightMap)) {
      const t = ckpt.tensors.get(name);
      if (!t)
        throw new CheckpointError(`model.safetensors.index.json places ${name} in ${f}, which has no such tensor`, index);
      if (base(t.file) !== path.basename(String(f)))
        throw new CheckpointError(`model.safetensors.index.json places ${name} in ${f}, but it is in ${base(t.file)}`, index);
    }
    return ckpt;
  }
  const single = path.join(abs, 'model.safetensors');
  if (fs.existsSync(single)) return new Checkpoint(abs, [single], options);
  const all = fs.readdirSync(abs).filter((f) => f.endsWith('.safetensors')).sort();
  if (all.length === 0) throw new CheckpointError(`no .safetensors files in ${abs}`);
  return new Checkpoint(abs, all.map((f) => path.join(abs, f)), options);
}

/** An FP8 block-quantised weight as stored: e4m3 codes [rows, cols], scales [ceil(rows/br), ceil(cols/bc)]. */
export interface Fp8Weight {
  codes: Uint8Array;
  scaleInv: Float32Array;
  rows: number;
  cols: number;
  br: number;
  bc: number;
}

export interface TensorToWrite {
  name: string;
  dtype: StDType;
  shape: number[];
  data: ArrayBufferView;
}

/**
 * Writes one .safetensors file (tensors in the given order, header padded to 8 bytes so every
 * tensor offset stays aligned when each size is a multiple of 8). Written to `<path>.tmp` then
 * renamed, so readers never see half a file.
 */
export function writeSafetensors(file: string, tensors: TensorToWrite[],
                                 metadata?: Record<string, string>): void {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  const seen = new Set<string>();
  for (const t of tensors) {
    if (seen.has(t.name)) throw new CheckpointError(`writeSafetensors: duplicate tensor ${t.name}`, file);
    seen.add(t.name);
    if (!(t.dtype in DTYPE_BYTES))
      throw new CheckpointError(`writeSafetensors: tensor ${t.name} has unsupported dtype ${t.dtype}`, file);
    const numel = t.shape.reduce((a, b) => a * b, 1);
    const size = numel * DTYPE_BYTES[t.dtype];
    if (t.data.byteLength !== size)
      throw new CheckpointError(`writeSafetensors: tensor ${t.name} [${t.shape.join(', ')}] ${t.dtype} needs ` +
        `${size} bytes, data has ${t.data.byteLength}`, file);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  let json = JSON.stringify(header);
  const pad = (8 - ((8 + Buffer.byteLength(json)) % 8)) % 8;
  json += ' '.repeat(pad);
  const hdr = Buffer.from(json, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hdr.length));
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, len);
    fs.writeSync(fd, hdr);
    for (const t of tensors) {
      const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
      let done = 0;
      while (done < bytes.length) done += fs.writeSync(fd, bytes, done, Math.min(bytes.length - done, 1 << 26));
    }
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}
