// `npm run bench -- kernels --device cuda[:N]`: expertd's CUDA expert FFN (GroupGemm with tiles
// auto / small / large (mma.sync) and sm90 / sm90-swizzle / sm90-persistent (wgmma + TMA), and the
// per-expert DenseGemm path) against torch._grouped_mm and a torch.matmul loop on the same GPU, each
// against the limits measured in the same run. Tile auto takes sm_90a (sm90-swizzle) above 16 rows/expert once its self-check passed.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

import type { Capabilities, CudaAddon, CudaBuffer, CudaDeviceInfo, CudaGemmPaths, CudaGemmTile, NativeAddon } from '../src/native/index.js';
import { loadNative, nativePath, noCudaDeviceReason } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import { seriesChart, type Series } from '../src/plot/charts.js';
import { writePlot } from '../src/plot/render.js';
import {
  fmt, markdownTable, median, parseIntList, parsePositiveInt, pct, runInfo, stats, writeJson, type Cell, type Stats,
} from './harness.js';
import { runTorchPeer, torchPython, type TorchCheck, type TorchRun, type TorchSpec } from './peers/torch.js';

export interface CudaMoeShape {
  name: string;
  h: number;
  inter: number;
  experts: number;
  about: string;
}

export const CUDA_SHAPES: CudaMoeShape[] = [
  { name: 'mixtral-like', h: 4096, inter: 14336, experts: 8, about: 'Mixtral-8x7B experts' },
  { name: 'deepseek-like', h: 7168, inter: 2048, experts: 32,
    about: "DeepSeek-V3 routed experts, 32 of a layer's 256 to keep memory small" },
];

const DEFAULT_ROWS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096, 8192];
/** Rows per expert at or below this are decode shapes (weight streaming; the HBM target). */
const DECODE_MAX_ROWS = 16;
/** Rows per expert from which the compute targets apply. */
const PREFILL_MIN_ROWS = 256;
/** Average rows per expert of the skewed load. */
const SKEWED_AVG_ROWS = 64;
/** The correctness case's loads (its own experts, same H and I): one row, none, a partial tile. */
const CHECK_COUNTS = [1, 0, 77];
const REL_L2_MAX = 1e-2;
const TARGETS = { vsGroupedMm: 1.1, ofBf16Peak: 0.7, ofHbm: 0.8 };

const OURS = ['group auto', 'group small', 'group large', 'group sm90', 'group sm90-swizzle', 'group sm90-persistent',
  'dense cublaslt', 'dense kernel'] as const;
/** Every GroupGemm variant (the fastest of them is judged against the targets). */
const GROUP_TILES = ['group auto', 'group small', 'group large', 'group sm90', 'group sm90-swizzle', 'group sm90-persistent'] as const;
const SM90_VARIANTS: readonly OurVariant[] = ['group sm90', 'group sm90-swizzle', 'group sm90-persistent'];
const PEERS = ['torch grouped_mm', 'torch loop'] as const;
type OurVariant = (typeof OURS)[number];
type Variant = OurVariant | (typeof PEERS)[number];
const VARIANTS: readonly Variant[] = [...OURS, ...PEERS];

/** Datasheet peaks (dense bf16 tensor cores, no sparsity; HBM), first match by device name. */
const DATASHEETS = [
  { match: /H200.*NVL/i, name: 'H200 NVL datasheet', tflops: 835, gbps: 4800 },
  { match: /H200/i, name: 'H200 SXM datasheet', tflops: 989, gbps: 4800 },
  { match: /H100.*NVL/i, name: 'H100 NVL datasheet', tflops: 835, gbps: 3900 },
  { match: /H100.*PCIe/i, name: 'H100 PCIe datasheet', tflops: 756, gbps: 2000 },
  { match: /H100/i, name: 'H100 SXM5 datasheet', tflops: 989, gbps: 3350 },
  { match: /A100.*80GB/i, name: 'A100 80GB SXM datasheet', tflops: 312, gbps: 2039 },
  { match: /A100/i, name: 'A100 40GB datasheet', tflops: 312, gbps: 1555 },
];
type Datasheet = (typeof DATASHEETS)[number];

interface Options {
  json?: string;
  plot?: string;
  reps: number;
  warmup: number;
  device: string;
  deviceIndex: number;
  rows: number[];
  models: CudaMoeShape[];
  python: string;
  peer: boolean;
  hot: boolean;
  matmulN: number;
  copyMiB: number;
}

/** "name:H:I:E" for a shape of one's own (e.g. tiny:512:1024:4 for a quick smoke run). */
function parseShape(s: string): CudaMoeShape {
  const known = CUDA_SHAPES.find((x) => x.name === s.trim());
  if (known) return known;
  const m = /^([A-Za-z][\w-]*):(\d+):(\d+):(\d+)$/.exec(s.trim());
  if (!m) throw new RangeError(`--models has "${s}", expected ${CUDA_SHAPES.map((x) => x.name).join(', ')} or NAME:H:I:E`);
  const [h, inter, experts] = [Number(m[2]), Number(m[3]), Number(m[4])];
  if (h % 8 || inter % 8 || h === 0 || inter === 0 || experts === 0)
    throw new RangeError(`--models has "${s}": H and I must be positive multiples of 8, E positive`);
  return { name: m[1]!, h, inter, experts, about: 'custom' };
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      json: { type: 'string' }, plot: { type: 'string' }, reps: { type: 'string' }, warmup: { type: 'string' },
      device: { type: 'string' }, rows: { type: 'string' }, models: { type: 'string' }, python: { type: 'string' },
      'no-peer': { type: 'boolean' }, hot: { type: 'boolean' }, 'matmul-n': { type: 'string' },
      'copy-mib': { type: 'string' },
    },
    strict: true,
  });
  const device = values.device ?? 'cuda';
  const dm = /^cuda(?::(\d+))?$/.exec(device);
  if (!dm) throw new RangeError(`--device is "${device}", expected "cuda" or "cuda:N"`);
  const names = values.models ? values.models.split(',') : CUDA_SHAPES.map((s) => s.name);
  return {
    json: values.json,
    plot: values.plot,
    reps: Math.max(1, parsePositiveInt('reps', values.reps, 20)),
    warmup: parsePositiveInt('warmup', values.warmup, 3),
    device,
    deviceIndex: dm[1] === undefined ? 0 : Number(dm[1]),
    rows: values.rows ? parseIntList('rows', values.rows) : DEFAULT_ROWS,
    models: names.map(parseShape),
    python: torchPython(values.python),
    peer: !values['no-peer'],
    hot: values.hot ?? false,
    matmulN: Math.max(256, parsePositiveInt('matmul-n', values['matmul-n'], 8192)),
    copyMiB: Math.max(16, parsePositiveInt('copy-mib', values['copy-mib'], 1024)),
  };
}

// ---------------------------------------------------------------------------------------------
// Loads

interface Load {
  label: string;
  /** rows on every expert; null for the skewed load */
  rowsPerExpert: number | null;
  counts: number[];
}

/** Zipf-like (expert e gets ~1/(e+1)), avg rows per expert on average; the rounding goes to expert 0. */
function skewedCounts(experts: number, avg: number): number[] {
  const total = experts * avg;
  const w = Array.from({ length: experts }, (_, e) => 1 / (e + 1));
  const sum = w.reduce((a, b) => a + b, 0);
  const counts = w.map((v) => Math.floor((total * v) / sum));
  counts[0]! += total - counts.reduce((a, b) => a + b, 0);
  return counts;
}

function loadsFor(shape: CudaMoeShape, rows: number[]): Load[] {
  return [
    ...rows.map((r) => ({ label: String(r), rowsPerExpert: r, counts: new Array<number>(shape.experts).fill(r) })),
    { label: 'skewed', rowsPerExpert: null, counts: skewedCounts(shape.experts, SKEWED_AVG_ROWS) },
  ];
}

const caseId = (shape: CudaMoeShape, load: Load) => `${shape.name}/${load.label}`;

function torchSpec(opts: Options, loads: Map<string, Load[]>, flushBytes: number, checkDir: string | null): TorchSpec {
  return {
    device: opts.device, reps: opts.reps, warmup: opts.warmup, flushBytes, seed: 0x5eed,
    limits: { matmulN: opts.matmulN, copyBytes: opts.copyMiB * 2 ** 20, reps: 10 },
    checkDir,
    shapes: opts.models.map((s) => ({
      name: s.name, h: s.h, inter: s.inter, experts: s.experts, check: { counts: CHECK_COUNTS },
      cases: loads.get(s.name)!.map((l) => ({ id: caseId(s, l), counts: l.counts })),
    })),
  };
}

// ---------------------------------------------------------------------------------------------
// Device helpers

type Cu = NativeAddon & CudaAddon;

/** Every buffer and view of one piece of work, disposed together. */
class Arena {
  private readonly items: { dispose(): void }[] = [];
  constructor(private readonly cu: Cu) {}
  buffer(sizeBytes: number): CudaBuffer {
    return this.keep(this.cu.cudaBuffer(Math.max(16, sizeBytes)));
  }
  upload(data: ArrayBufferView): CudaBuffer {
    const b = this.buffer(data.byteLength);
    this.cu.cudaCopyToDevice(b, 0, data);
    return b;
  }
  view(b: CudaBuffer, offsetBytes: number, sizeBytes: number): CudaBuffer {
    return this.keep(b.view(offsetBytes, sizeBytes));
  }
  keep<T extends { dispose(): void }>(x: T): T {
    this.items.push(x);
    return x;
  }
  dispose(): void {
    for (const x of this.items.splice(0).reverse()) x.dispose();
    this.cu.cudaSynchronize();
    this.cu.cudaEmptyCache();
  }
}

/** n random bf16 values, uniform in [-scale, scale), on the device: the source of every input. */
function randomPool(arena: Arena, n: number, scale: number, seed: number): CudaBuffer {
  const rand = mulberry32(seed);
  const f = new Float32Array(n);
  for (let i = 0; i < n; i++) f[i] = (rand() * 2 - 1) * scale;
  const u = new Uint32Array(f.buffer);
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = u[i]! >>> 16;
  return arena.upload(out);
}

/** Fills dst with the pool's bytes from a rotated start, so that buffers differ (never zeros). */
function fillFromPool(cu: Cu, dst: CudaBuffer, pool: CudaBuffer, rotateBytes: number): void {
  let off = 0;
  let src = (2 * Math.floor(rotateBytes / 2)) % pool.sizeBytes;
  while (off < dst.sizeBytes) {
    const n = Math.min(pool.sizeBytes - src, dst.sizeBytes - off);
    cu.cudaCopyDevice(dst, off, pool, src, n);
    off += n;
    src = 0;
  }
}

/**
 * ms per rep of run() on the device: (flush L2), synchronize, start event, run, end event. The
 * synchronize keeps the host's launch time inside the window (the torch peer does the same).
 */
function timeOnDevice(cu: Cu, run: () => void, warmup: number, reps: number, flush: CudaBuffer | null): number[] {
  const start = new cu.CudaEvent(true);
  const end = new cu.CudaEvent(true);
  const times: number[] = [];
  try {
    for (let r = 0; r < warmup + reps; r++) {
      if (flush) cu.cudaFill(flush, r & 0xff);
      cu.cudaSynchronize();
      start.record();
      run();
      end.record();
      end.synchronize();
      if (r >= warmup) times.push(end.elapsedMs(start));
    }
  } finally {
    start.dispose();
    end.dispose();
  }
  return times;
}

/** Per-expert weights and rows as the FFN calls see them. */
interface Ffn {
  h: number;
  inter: number;
  counts: number[];
  gateUp: CudaBuffer[]; // per expert [2I, H] bf16, gate rows then up rows
  down: CudaBuffer[];   // per expert [H, I] bf16
  table: InstanceType<CudaAddon['CudaExpertTable']>;
  x: CudaBuffer;        // [rows, H] bf16, expert-contiguous
  offsets: CudaBuffer;  // [E + 1] i32
  y: CudaBuffer;        // [rows, H] f32
  hScratch: CudaBuffer; // [rows, I] bf16
  xViews: (CudaBuffer | null)[];
  yViews: (CudaBuffer | null)[];
  gu: CudaBuffer;       // [max rows_e, 2I] f32 (DenseGemm path)
  act: CudaBuffer;      // [max rows_e, I] f32
  actBf16: CudaBuffer;  // [max rows_e, I] bf16
}

function makeFfn(cu: Cu, arena: Arena, h: number, inter: number, counts: number[], x: CudaBuffer,
                 gateUp: CudaBuffer[], down: CudaBuffer[]): Ffn {
  const e = counts.length;
  const rows = counts.reduce((a, b) => a + b, 0);
  const maxM = Math.max(1, ...counts);
  const offs = new Int32Array(e + 1);
  for (let i = 0; i < e; i++) offs[i + 1] = offs[i]! + counts[i]!;
  const table = arena.keep(new cu.CudaExpertTable(e, h, inter));
  for (let i = 0; i < e; i++) table.set(i, gateUp[i]!, down[i]!);
  const y = arena.buffer(rows * h * 4);
  const views = (b: CudaBuffer, rowBytes: number) => counts.map((m, i) =>
    m > 0 ? arena.view(b, offs[i]! * rowBytes, m * rowBytes) : null);
  return {
    h, inter, counts, gateUp, down, table, x, y,
    offsets: arena.upload(offs),
    hScratch: arena.buffer(rows * inter * 2),
    xViews: views(x, h * 2),
    yViews: views(y, h * 4),
    gu: arena.buffer(maxM * 2 * inter * 4),
    act: arena.buffer(maxM * inter * 4),
    actBf16: arena.buffer(maxM * inter * 2),
  };
}

function runVariant(cu: Cu, f: Ffn, v: OurVariant): void {
  const rows = f.counts.reduce((a, b) => a + b, 0);
  if (v.startsWith('group ')) {
    const tile = v.slice(6) as CudaGemmTile;
    cu.cudaGroupGemmFfn(f.x, f.offsets, f.table, rows, f.hScratch, f.y, { tile });
    return;
  }
  // DenseGemm path: per expert gate_up GEMM (f32 out), SiLU*mul, to bf16, down GEMM.
  const backend = v.slice(6) as 'cublaslt' | 'kernel';
  for (let e = 0; e < f.counts.length; e++) {
    const m = f.counts[e]!;
    if (m === 0) continue;
    cu.cudaDenseGemm(f.xViews[e]!, m, f.gateUp[e]!, 2 * f.inter, f.h, f.gu, null, false, backend);
    cu.cudaSiluMul(f.gu, m, f.inter, f.act);
    cu.cudaConvert(f.act, 'f32', f.actBf16, 'bf16', m * f.inter);
    cu.cudaDenseGemm(f.actBf16, m, f.down[e]!, f.h, f.inter, f.yViews[e]!, null, false, backend);
  }
}

const errText = (err: unknown): string => (err instanceof Error ? err.message : String(err)).split('\n')[0]!;

// ---------------------------------------------------------------------------------------------
// Correctness: expertd on the inputs the torch peer wrote, against its float32 reference

interface CheckResult {
  relL2?: number;
  error?: string;
}

function relL2(out: Float32Array, ref: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < ref.length; i++) {
    const o = out[i]!;
    if (!Number.isFinite(o)) return Infinity; // NaN poison left: unwritten
    num += (o - ref[i]!) ** 2;
    den += ref[i]! ** 2;
  }
  return Math.sqrt(num / Math.max(den, 1e-300));
}

/** Why the sm90 variants are not run (the self-check did not pass), or null. */
let sm90Refusal: string | null = null;

function runCheck(cu: Cu, shape: CudaMoeShape, chk: TorchCheck | undefined): Partial<Record<OurVariant, CheckResult>> | string {
  if (!chk) return 'unchecked (no torch peer)';
  if (chk.error || !chk.files || !chk.dir || !chk.counts) return `unchecked (torch check failed: ${chk.error ?? 'no files'})`;
  if (chk.h !== shape.h || chk.inter !== shape.inter) return 'unchecked (torch check shape differs)';
  const { h, inter, counts } = { h: shape.h, inter: shape.inter, counts: chk.counts };
  const arena = new Arena(cu);
  const out: Partial<Record<OurVariant, CheckResult>> = {};
  try {
    const file = (k: keyof NonNullable<TorchCheck['files']>) => readFileSync(path.join(chk.dir!, chk.files![k]));
    const refBytes = file('ref');
    const ref = new Float32Array(refBytes.buffer.slice(refBytes.byteOffset, refBytes.byteOffset + refBytes.length));
    const rows = counts.reduce((a, b) => a + b, 0);
    if (ref.length !== rows * h) return `unchecked (ref.bin has ${ref.length} floats, expected ${rows * h})`;
    const x = arena.upload(file('x'));              // [rows, H] bf16
    const guAll = arena.upload(file('gateUp'));     // [E, 2I, H] bf16
    const dnAll = arena.upload(file('down'));       // [E, H, I] bf16
    const guBytes = 2 * inter * h * 2;
    const dnBytes = h * inter * 2;
    const gateUp = counts.map((_, e) => arena.view(guAll, e * guBytes, guBytes));
    const down = counts.map((_, e) => arena.view(dnAll, e * dnBytes, dnBytes));
    const f = makeFfn(cu, arena, h, inter, counts, x, gateUp, down);
    const y = new Float32Array(rows * h);
    for (const v of OURS) {
      try {
        if (v === 'dense cublaslt' && !cu.cudaCublasLt()) throw new Error('cuBLASLt not loaded (libcublasLt.so.13/.12)');
        if (sm90Refusal && SM90_VARIANTS.includes(v)) throw new Error(sm90Refusal);
        cu.cudaFill(f.y, 0xff); // NaN: an unwritten output fails
        cu.cudaFill(f.hScratch, 0xff);
        runVariant(cu, f, v);
        cu.cudaSynchronize();
        cu.cudaCopyToHost(y, f.y, 0);
        out[v] = { relL2: relL2(y, ref) };
      } catch (err) {
        out[v] = { error: errText(err) };
      }
    }
  } catch (err) {
    return `unchecked (${errText(err)})`;
  } finally {
    arena.dispose();
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Results

interface VariantResult {
  status: 'ok' | 'refused' | 'failed' | 'n/a';
  note?: string;
  stats?: Stats;
  tflops?: number;
  gbps?: number;
}

export interface CudaRow {
  model: string;
  load: string;
  rowsPerExpert: number | null;
  counts: number[];
  rows: number;
  activeExperts: number;
  /** 6 x rows x H x I (gate, up, down) */
  flops: number;
  /** bytes of the weights of experts with rows (bf16): what a decode step must read */
  weightBytes: number;
  results: Record<Variant, VariantResult>;
}

interface Limits {
  torchMatmulTflops: number | null;
  torchCopyGBps: number | null;
  cublasLtTflops: number | null;
  copyGBps: number | null;
  /** the limits the fractions use: torch's matmul (else cuBLASLt), the better copy */
  bf16Tflops: number | null;
  bf16Source: string;
  hbmGBps: number | null;
  datasheet: Datasheet | null;
  notes: string[];
}

function measureLimits(cu: Cu, opts: Options, flush: CudaBuffer | null, pool: CudaBuffer, peer: TorchRun | null): Limits {
  const lim: Limits = {
    torchMatmulTflops: peer?.limits?.matmul?.tflops ?? null, torchCopyGBps: peer?.limits?.copy?.gbps ?? null,
    cublasLtTflops: null, copyGBps: null, bf16Tflops: null, bf16Source: '', hbmGBps: null, datasheet: null, notes: [],
  };
  if (peer?.limits?.error) lim.notes.push(`torch limits: ${peer.limits.error}`);
  const arena = new Arena(cu);
  try {
    const n = opts.copyMiB * 2 ** 20;
    const a = arena.buffer(n);
    const b = arena.buffer(n);
    fillFromPool(cu, a, pool, 0);
    const t = timeOnDevice(cu, () => cu.cudaCopyDevice(b, 0, a, 0, n), 3, 10, flush);
    lim.copyGBps = (2 * n) / (median(t) / 1e3) / 1e9;
  } catch (err) {
    lim.notes.push(`expertd copy: ${errText(err)}`);
  } finally {
    arena.dispose();
  }
  if (cu.cudaCublasLt()) {
    const arena2 = new Arena(cu);
    try {
      const N = opts.matmulN;
      const x = arena2.buffer(N * N * 2);
      const w = arena2.buffer(N * N * 2);
      const y = arena2.buffer(N * N * 4);
      fillFromPool(cu, x, pool, 0);
      fillFromPool(cu, w, pool, 12345);
      const t = timeOnDevice(cu, () => cu.cudaDenseGemm(x, N, w, N, N, y, null, false, 'cublaslt'), 3, 10, flush);
      lim.cublasLtTflops = (2 * N ** 3) / (median(t) / 1e3) / 1e12;
    } catch (err) {
      lim.notes.push(`cuBLASLt ${opts.matmulN}^3: ${errText(err)}`);
    } finally {
      arena2.dispose();
    }
  } else lim.notes.push('cuBLASLt not loaded: no cudaDenseGemm limit');
  if (lim.torchMatmulTflops !== null) {
    lim.bf16Tflops = lim.torchMatmulTflops;
    lim.bf16Source = `torch.matmul bf16 ${peer!.limits!.matmul!.n}^3`;
  } else if (lim.cublasLtTflops !== null) {
    lim.bf16Tflops = lim.cublasLtTflops;
    lim.bf16Source = `cudaDenseGemm cuBLASLt ${opts.matmulN}^3 (no torch)`;
  }
  const copies = [lim.torchCopyGBps, lim.copyGBps].filter((v): v is number => v !== null);
  lim.hbmGBps = copies.length ? Math.max(...copies) : null;
  return lim;
}

function benchShape(cu: Cu, opts: Options, shape: CudaMoeShape, loads: Load[], peer: TorchRun | null,
                    flush: CudaBuffer | null, checks: Record<string, unknown>): CudaRow[] {
  const { h, inter, experts } = shape;
  console.error(`# ${shape.name}: checking against torch, then ${loads.length} loads...`);
  // The check first: a variant whose result is wrong is not timed.
  const chk = runCheck(cu, shape, peer?.checks?.[shape.name]);
  const verdict: Partial<Record<Variant, VariantResult>> = {};
  const torchChk = peer?.checks?.[shape.name];
  checks[shape.name] = { counts: CHECK_COUNTS, expertd: chk, torch: torchChk?.relL2 ?? null, torchErrors: torchChk?.errors ?? null };
  if (typeof chk !== 'string') {
    for (const v of OURS) {
      const c = chk[v];
      if (c?.error) {
        verdict[v] = /cuBLASLt not loaded|sm_90a self-check|is unavailable here/.test(c.error)
          ? { status: 'n/a', note: c.error } : { status: 'failed', note: `failed on the check case: ${c.error}` };
      } else if (c?.relL2 === undefined || !(c.relL2 <= REL_L2_MAX)) {
        verdict[v] = { status: 'refused', note: `wrong result: relative L2 ${c?.relL2?.toExponential(2)} > ${REL_L2_MAX} vs torch float32` };
      }
    }
  }

  const arena = new Arena(cu);
  const rowsOut: CudaRow[] = [];
  try {
    const wPool = randomPool(arena, 1 << 24, 1 / Math.sqrt(h), 0x77 + h);
    const xPool = randomPool(arena, 1 << 24, 1, 0x99 + h);
    const gateUp: CudaBuffer[] = [];
    const down: CudaBuffer[] = [];
    for (let e = 0; e < experts; e++) {
      gateUp.push(arena.buffer(2 * inter * h * 2)); // [2I, H] bf16
      down.push(arena.buffer(h * inter * 2));       // [H, I] bf16
      fillFromPool(cu, gateUp[e]!, wPool, 7919 * 2 * e);
      fillFromPool(cu, down[e]!, wPool, 104729 * 2 * e + 1001);
    }
    for (const load of loads) {
      const rows = load.counts.reduce((a, b) => a + b, 0);
      const active = load.counts.filter((c) => c > 0).length;
      const row: CudaRow = {
        model: shape.name, load: load.label, rowsPerExpert: load.rowsPerExpert, counts: load.counts, rows,
        activeExperts: active, flops: 6 * rows * h * inter, weightBytes: active * 3 * h * inter * 2,
        results: {} as Record<Variant, VariantResult>,
      };
      const caseArena = new Arena(cu);
      try {
        const x = caseArena.buffer(rows * h * 2);
        fillFromPool(cu, x, xPool, rows * 31);
        const f = makeFfn(cu, caseArena, h, inter, load.counts, x, gateUp, down);
        for (const v of OURS) {
          if (verdict[v]) { row.results[v] = verdict[v]!; continue; }
          if (sm90Refusal && SM90_VARIANTS.includes(v)) { row.results[v] = { status: 'n/a', note: sm90Refusal }; continue; }
          if (cu.cudaDeviceLost()) { row.results[v] = { status: 'failed', note: 'device lost earlier in the run' }; continue; }
          try {
            row.results[v] = { status: 'ok', stats: stats(timeOnDevice(cu, () => runVariant(cu, f, v), opts.warmup, opts.reps, flush)) };
          } catch (err) {
            row.results[v] = { status: 'failed', note: errText(err) };
          }
        }
      } catch (err) {
        for (const v of OURS) row.results[v] ??= { status: 'failed', note: errText(err) };
      } finally {
        caseArena.dispose();
      }
      const peerCase = peer?.results?.[caseId(shape, load)];
      for (const [v, key] of [['torch grouped_mm', 'grouped_mm'], ['torch loop', 'loop']] as const) {
        const r = peerCase?.[key];
        if (r?.timesMs?.length) row.results[v] = { status: 'ok', stats: stats(r.timesMs) };
        else {
          const why = !peer ? 'peer disabled (--no-peer)' : !peer.ok ? (peer.error ?? 'peer failed') : (r?.error ?? 'no result');
          row.results[v] = { status: /wrong result/.test(why) ? 'refused' : !peer || why === 'n/a' ? 'n/a' : 'failed',
            note: why === 'n/a' ? peer?.groupedMm?.reason ?? 'n/a' : why };
        }
      }
      for (const v of VARIANTS) {
        const r = row.results[v];
        if (r.status !== 'ok') continue;
        const s = r.stats!.medianMs / 1e3;
        r.tflops = row.flops / s / 1e12;
        r.gbps = row.weightBytes / s / 1e9;
      }
      rowsOut.push(row);
      const g = row.results['group auto'];
      console.error(`#   ${shape.name} ${load.label} rows/expert: group auto ${g.status === 'ok' ? `${fmt(g.stats!.medianMs)} ms` : g.status}`);
    }
  } finally {
    arena.dispose();
  }
  return rowsOut;
}

// ---------------------------------------------------------------------------------------------
// Summaries

const ms = (r: VariantResult | undefined): number | null => (r?.status === 'ok' ? r.stats!.medianMs : null);

/** The fastest GroupGemm variant of a row (the kernel the targets are judged on). */
function bestGroup(row: CudaRow): { ms: number; variant: Variant } | null {
  const c = GROUP_TILES.map((v) => ({ ms: ms(row.results[v]), variant: v as Variant }))
    .filter((x): x is { ms: number; variant: Variant } => x.ms !== null);
  return c.length ? c.reduce((a, b) => (b.ms < a.ms ? b : a)) : null;
}

function bestDense(row: CudaRow): { ms: number; variant: Variant } | null {
  const c = (['dense cublaslt', 'dense kernel'] as const)
    .map((v) => ({ ms: ms(row.results[v]), variant: v as Variant }))
    .filter((x): x is { ms: number; variant: Variant } => x.ms !== null);
  return c.length ? c.reduce((a, b) => (b.ms < a.ms ? b : a)) : null;
}

/** The smallest even load from which the best DenseGemm beats GroupGemm (auto) at every larger one. */
function crossover(rows: CudaRow[]): string {
  const even = rows.filter((r) => r.rowsPerExpert !== null && ms(r.results['group auto']) !== null && bestDense(r))
    .sort((a, b) => a.rowsPerExpert! - b.rowsPerExpert!);
  if (!even.length) return 'n/a (no timed pairs)';
  let from: number | null = null;
  for (const r of even) {
    const denseFaster = bestDense(r)!.ms < ms(r.results['group auto'])!;
    if (denseFaster && from === null) from = r.rowsPerExpert;
    if (!denseFaster) from = null;
  }
  return from === null ? 'none' : `${from} rows/expert`;
}

interface Target {
  name: string;
  pass: boolean | null;
  detail: string;
}

function targets(rows: CudaRow[], limits: Limits): Target[] {
  const even = rows.filter((r) => r.rowsPerExpert !== null);
  const check = (name: string, sel: CudaRow[], value: (r: CudaRow) => number | null, goal: number, show: (v: number) => string): Target => {
    const vals = sel.map((r) => ({ r, v: value(r) })).filter((x): x is { r: CudaRow; v: number } => x.v !== null);
    if (!vals.length) return { name, pass: null, detail: 'n/a (no data)' };
    const worst = vals.reduce((a, b) => (b.v < a.v ? b : a));
    const best = bestGroup(worst.r);
    return { name, pass: worst.v >= goal, detail: `worst ${show(worst.v)} at ${worst.r.rowsPerExpert} rows/expert (fastest GroupGemm there: ${best ? best.variant.slice(6) : '-'})` };
  };
  // NOTE: judged on the fastest GroupGemm variant of each load (sm90 ones included), not on auto:
  // the targets are about the best kernel we have (auto is judged in its own column).
  const group = (r: CudaRow): VariantResult => {
    const b = bestGroup(r);
    return b ? r.results[b.variant] : r.results['group auto'];
  };
  const big = even.filter((r) => r.rowsPerExpert! >= PREFILL_MIN_ROWS);
  const small = even.filter((r) => r.rowsPerExpert! <= DECODE_MAX_ROWS);
  return [
    check(`GroupGemm >= ${TARGETS.vsGroupedMm}x torch grouped_mm at >= ${PREFILL_MIN_ROWS} rows/expert`, big, (r) => {
      const a = ms(group(r)); const b = ms(r.results['torch grouped_mm']);
      return a !== null && b !== null ? b / a : null;
    }, TARGETS.vsGroupedMm, (v) => `${fmt(v)}x`),
    check(`GroupGemm >= ${pct(TARGETS.ofBf16Peak)} of dense bf16 peak (measured) at >= ${PREFILL_MIN_ROWS} rows/expert`, big,
      (r) => (group(r).tflops !== undefined && limits.bf16Tflops ? group(r).tflops! / limits.bf16Tflops : null),
      TARGETS.ofBf16Peak, pct),
    check(`GroupGemm >= ${pct(TARGETS.ofHbm)} of HBM bandwidth (measured) at <= ${DECODE_MAX_ROWS} rows/expert`, small,
      (r) => (group(r).gbps !== undefined && limits.hbmGBps ? group(r).gbps! / limits.hbmGBps : null),
      TARGETS.ofHbm, pct),
  ];
}

function cell(r: VariantResult): Cell {
  if (r.status !== 'ok') return r.status === 'refused' ? 'wrong (refused)' : r.status;
  const s = r.stats!;
  return `${fmt(s.medianMs)} ±${((s.maxMs - s.minMs) / 2 / s.medianMs * 100).toFixed(0)}%`;
}

function printShape(shape: CudaMoeShape, rows: CudaRow[], limits: Limits, check: unknown): void {
  const ds = limits.datasheet;
  console.log(`\n### ${shape.name}: H ${shape.h}, I ${shape.inter}, E ${shape.experts} (${shape.about})\n`);
  const c = check as { expertd: Partial<Record<OurVariant, CheckResult>> | string; torch: Partial<Record<string, number>> | null };
  const chkText = typeof c.expertd === 'string' ? c.expertd : OURS.map((v) => {
    const r = (c.expertd as Partial<Record<OurVariant, CheckResult>>)[v];
    return `${v} ${r?.relL2 !== undefined ? r.relL2.toExponential(1) : r?.error ? 'error' : '-'}`;
  }).join(', ');
  const torchText = c.torch ? Object.entries(c.torch).map(([k, v]) => `torch ${k} ${v!.toExponential(1)}`).join(', ') : 'torch -';
  console.log(`Check before timing (relative L2 vs torch float32; ${CHECK_COUNTS.length} experts of this H and I with ` +
    `[${CHECK_COUNTS}] rows; above ${REL_L2_MAX} a kernel is not timed): ${chkText}; ${torchText}.\n`);

  console.log('Median ms (± half the min-max range):\n');
  const head = ['rows/expert', 'rows', ...VARIANTS];
  console.log(markdownTable(head, rows.map((r) => [r.load, r.rows, ...VARIANTS.map((v) => cell(r.results[v]))]),
    head.map((_, i) => (i === 0 ? 'left' : 'right'))));

  console.log(`\nGroupGemm (tile auto) against the limits and the peers; GB/s = weights of experts with rows / time:\n`);
  const h2 = ['rows/expert', 'TFLOP/s', 'of bf16 meas.', 'of datasheet', 'GB/s', 'of HBM meas.',
    'of datasheet HBM', 'fastest tile', 'vs grouped_mm', 'vs loop', 'dense vs group'];
  const body: Cell[][] = rows.map((r) => {
    const g = r.results['group auto'];
    const gm = ms(g);
    const tiles = GROUP_TILES.filter((v) => v !== 'group auto' && ms(r.results[v]) !== null);
    const fastest = tiles.length ? tiles.reduce((a, b) => (ms(r.results[b])! < ms(r.results[a])! ? b : a)).slice(6) : '-';
    const ratio = (v: Variant) => (gm !== null && ms(r.results[v]) !== null ? `${fmt(ms(r.results[v])! / gm)}x` : '-');
    const bd = bestDense(r);
    return [
      r.load, g.tflops ?? null, limits.bf16Tflops && g.tflops ? pct(g.tflops / limits.bf16Tflops) : '-',
      ds && g.tflops ? pct(g.tflops / ds.tflops) : '-',
      g.gbps ?? null, limits.hbmGBps && g.gbps ? pct(g.gbps / limits.hbmGBps) : '-',
      ds && g.gbps ? pct(g.gbps / ds.gbps) : '-', fastest, ratio('torch grouped_mm'), ratio('torch loop'),
      bd && gm !== null ? `${fmt(gm / bd.ms)}x (${bd.variant.slice(6)})` : '-',
    ];
  });
  console.log(markdownTable(h2, body, h2.map((_, i) => (i === 0 || i === 7 ? 'left' : 'right'))));

  const notes = new Map<string, string[]>();
  for (const r of rows)
    for (const v of VARIANTS) {
      const n = r.results[v].note;
      if (r.results[v].status !== 'ok' && n) notes.set(`${v}: ${n}`, [...(notes.get(`${v}: ${n}`) ?? []), r.load]);
    }
  if (notes.size) {
    console.log('\nNot timed:');
    for (const [n, at] of notes) console.log(`- ${n} (${at.length === rows.length ? 'every load' : `rows/expert ${at.join(', ')}`})`);
  }
  console.log(`\nCrossover (best DenseGemm faster than GroupGemm auto from here on): ${crossover(rows)}.`);
  console.log('\nTargets:');
  for (const t of targets(rows, limits))
    console.log(`- ${t.pass === null ? 'n/a' : t.pass ? 'PASS' : 'FAIL'} ${t.name}: ${t.detail}`);
}

async function plot(file: string, rows: CudaRow[], shapes: CudaMoeShape[], limits: Limits, device: string): Promise<void> {
  for (const s of shapes) {
    const even = rows.filter((r) => r.model === s.name && r.rowsPerExpert !== null);
    const tflops = (r: CudaRow, ms: number | undefined) => (ms ? r.flops / (ms / 1e3) / 1e12 : null);
    const series: Series[] = [
      ...(['group auto', 'group sm90', 'group sm90-swizzle', 'group sm90-persistent', 'torch grouped_mm', 'torch loop'] as const).map((v) => ({
        name: v,
        values: even.map((r) => r.results[v].tflops ?? null),
        lo: even.map((r) => tflops(r, r.results[v].stats?.maxMs)),
        hi: even.map((r) => tflops(r, r.results[v].stats?.minMs)),
      })),
      { name: 'dense best', values: even.map((r) => { const b = bestDense(r); return b ? r.flops / (b.ms / 1e3) / 1e12 : null; }) },
      { name: `bf16 peak (measured, ${limits.bf16Source})`, values: even.map(() => limits.bf16Tflops), dashed: true },
    ].filter((x) => x.values.some((v) => v !== null));
    const out = shapes.length > 1 ? file.replace(/(\.png)?$/i, `-${s.name}.png`) : file;
    const w = await writePlot(out, seriesChart({
      title: `Expert FFN on GPU ${s.name} (H ${s.h}, I ${s.inter}, E ${s.experts}) vs the measured bf16 peak`,
      note: 'median over reps, bars: min-max', machine: device,
      x: even.map((r) => r.load), xTitle: 'rows per expert', yTitle: 'throughput (TFLOP/s)', legendTitle: 'kernel', series, logY: 'auto',
    }));
    console.error(`# wrote ${w.png}, ${w.svg} and ${w.spec}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Entry

interface SmiInfo {
  driver?: string;
  cudaVersion?: string;
  state?: string;
  error?: string;
}

/** Driver and CUDA driver versions, and clocks / temperature / power (to spot a throttled card). */
function nvidiaSmi(index: number): SmiInfo {
  try {
    const q = execFileSync('nvidia-smi', ['-i', String(index),
      '--query-gpu=driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,pstate', '--format=csv,noheader'],
    { encoding: 'utf8', timeout: 30_000, stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    const head = execFileSync('nvidia-smi', [], { encoding: 'utf8', timeout: 30_000, stdio: ['ignore', 'pipe', 'ignore'] });
    const [driver, ...rest] = q.split(',').map((s) => s.trim());
    return { driver, cudaVersion: /CUDA Version:\s*([\d.]+)/.exec(head)?.[1], state: rest.join(', ') };
  } catch (err) {
    return { error: errText(err) };
  }
}

function noDeviceReason(native: NativeAddon, caps: Capabilities, where: string): string | null {
  if (!caps.cudaCompiled || typeof native.cudaGroupGemmFfn !== 'function')
    return `the addon (${where}) is the ${caps.build} build, without CUDA (build the full one with npm run build:gpu)`;
  if (caps.cudaDevices === 0) return `the CUDA build (${where}) sees no device (${noCudaDeviceReason(caps)})`;
  return null;
}

function peerSummary(p: TorchRun): string {
  if (!p.torch) return `unavailable with ${p.pythonPath} (${p.error ?? 'no answer'})`;
  const gmm = p.groupedMm?.fn ?? `no grouped_mm: ${p.groupedMm?.reason ?? '?'}`;
  return `${p.pythonPath}: torch ${p.torch} (CUDA ${p.torchCuda ?? 'none'}), ${gmm}${p.ok ? '' : `; ${p.error}`}`;
}

export async function runKernelsCuda(argv: string[]): Promise<void> {
  const opts = parseOptions(argv);
  const native = loadNative();
  const caps = native.capabilities();
  const where = path.relative(process.cwd(), nativePath() ?? '?') || '?';
  const loads = new Map(opts.models.map((s) => [s.name, loadsFor(s, opts.rows)]));
  const work = mkdtempSync(path.join(os.tmpdir(), 'expertd-kernels-cuda-'));
  try {
    const reason = noDeviceReason(native, caps, where);
    if (reason) {
      // Check what can be checked without a GPU: the options, the addon, the peer's script and torch.
      const peer = opts.peer
        ? runTorchPeer(opts.python, torchSpec(opts, loads, 0, null), work, { dryRun: true, timeoutMs: 120_000 }) : null;
      const nLoads = [...loads.values()].reduce((a, l) => a + l.length, 0);
      console.log(`no CUDA device: ${reason}; checked: options (${opts.models.length} shapes, ${nLoads} loads), ` +
        `addon ${caps.build} build, torch peer ${peer ? peerSummary(peer) : 'skipped (--no-peer)'}.`);
      if (opts.json) writeJson(opts.json, { bench: 'kernels-cuda', run: runInfo(), skipped: reason, peer });
      return;
    }
    const cu = native as Cu;
    if (opts.deviceIndex >= caps.cudaDevices)
      throw new RangeError(`--device is "${opts.device}", but this machine has ${caps.cudaDevices} CUDA device(s)`);
    cu.cudaSetDevice(opts.deviceIndex);
    const dev: CudaDeviceInfo = cu.cudaDeviceInfo(opts.deviceIndex);
    // The sm_90a path, measured beside mma.sync: the self-check first (a small problem, every wait
    // bounded), so a broken kernel is reported rather than forced.
    const sm90: CudaGemmPaths = cu.cudaSm90SelfCheck();
    sm90Refusal = sm90.sm90 === 'passed' ? null : `sm_90a self-check ${sm90.sm90}${sm90.reason ? `: ${sm90.reason}` : ''}`;
    console.error(`# sm_90a: ${sm90.sm90}${sm90.reason ? ` (${sm90.reason})` : ''}; tile auto ${process.env.EXPERTD_SM90 === '0' ? 'opted out (EXPERTD_SM90=0)' : 'takes it above 16 rows/expert'}`);
    const smiBefore = nvidiaSmi(opts.deviceIndex);
    const flushBytes = opts.hot ? 0 : Math.max(4 * dev.l2Bytes, 64 << 20);

    let peer: TorchRun | null = null;
    if (opts.peer) {
      console.error(`# running the PyTorch peer (${opts.python})...`);
      peer = runTorchPeer(opts.python, torchSpec(opts, loads, flushBytes, work), work, { dryRun: false, timeoutMs: 45 * 60_000 });
      if (!peer.ok) console.error(`# torch peer: ${peer.error}`);
    }

    const arena = new Arena(cu);
    const rows: CudaRow[] = [];
    const checks: Record<string, unknown> = {};
    let limits: Limits;
    try {
      const flush = flushBytes ? arena.buffer(flushBytes) : null;
      const pool = randomPool(arena, 1 << 24, 1, 0x1234);
      console.error('# measuring the limits (copy, cuBLASLt)...');
      limits = measureLimits(cu, opts, flush, pool, peer);
      limits.datasheet = DATASHEETS.find((d) => d.match.test(dev.name)) ?? null;
      for (const shape of opts.models) rows.push(...benchShape(cu, opts, shape, loads.get(shape.name)!, peer, flush, checks));
    } finally {
      arena.dispose();
    }
    const smiAfter = nvidiaSmi(opts.deviceIndex);

    const ds = limits.datasheet;
    console.log(`## kernels (${opts.device}: ${dev.name}, median of ${opts.reps} after ${opts.warmup} warm-up)\n`);
    console.log(`Device: ${dev.name}, compute ${dev.computeCapability}, ${dev.smCount} SMs, L2 ${fmt(dev.l2Bytes / 2 ** 20)} MiB, ` +
      `${fmt(dev.totalBytes / 2 ** 30)} GiB; driver ${peer?.driver ?? smiBefore.driver ?? '?'}, CUDA driver ${peer?.cudaDriver ?? smiBefore.cudaVersion ?? '?'}; ` +
      `cuBLASLt ${cu.cudaCublasLt() ?? 'not loaded'}; state before ${smiBefore.state ?? smiBefore.error ?? '?'}, after ${smiAfter.state ?? smiAfter.error ?? '?'} ` +
      '(SM clock, memory clock, temperature, power, P-state).');
    console.log(`Peer: ${peer ? peerSummary(peer) : 'disabled (--no-peer)'}.`);
    console.log(`sm_90a GroupGemm: self-check ${sm90.sm90}${sm90.reason ? ` (${sm90.reason})` : ''}; tile auto ${process.env.EXPERTD_SM90 === '0' ? 'opted out (EXPERTD_SM90=0)' : 'takes sm90-swizzle above 16 rows/expert once the check passed'}; ` +
      'the targets are judged on the fastest GroupGemm variant of each load.');
    console.log(`Timing: CUDA events around each call after a device synchronize (host launch time included, as called from JS / Python); ` +
      `L2 ${flushBytes ? `flushed (${fmt(flushBytes / 2 ** 20)} MiB written) before each rep` : 'not flushed (--hot)'}; inputs random bf16, never zeros. ` +
      `DenseGemm path per expert: gate_up GEMM (f32 out), SiLU*mul, f32->bf16, down GEMM; expertd's y is f32, torch's bf16.`);
    console.log('\n| limit | measured | datasheet |\n|:--|--:|--:|');
    console.log(`| dense bf16 (${limits.bf16Source || 'n/a'}) | ${fmt(limits.bf16Tflops)} TFLOP/s | ${ds ? `${ds.tflops} TFLOP/s (${ds.name})` : '-'} |`);
    console.log(`| cudaDenseGemm cuBLASLt ${opts.matmulN}^3, f32 out | ${fmt(limits.cublasLtTflops)} TFLOP/s | |`);
    console.log(`| HBM, device copy read+write (best of torch ${fmt(limits.torchCopyGBps)}, expertd ${fmt(limits.copyGBps)}) | ${fmt(limits.hbmGBps)} GB/s | ${ds ? `${ds.gbps} GB/s` : '-'} |`);
    for (const n of limits.notes) console.log(`\nNote: ${n}`);
    for (const s of opts.models) printShape(s, rows.filter((r) => r.model === s.name), limits, checks[s.name]);

    if (opts.json)
      writeJson(opts.json, {
        bench: 'kernels-cuda', run: runInfo(), options: { ...opts, models: opts.models },
        device: dev, nvidiaSmi: { before: smiBefore, after: smiAfter }, cublasLt: cu.cudaCublasLt(), libraries: cu.cudaLibraries(), sm90,
        peer: peer ? { ...peer, results: undefined, checks: undefined } : null,
        limits: { ...limits, datasheet: ds ? { name: ds.name, tflops: ds.tflops, gbps: ds.gbps } : null },
        checks, rows,
        crossover: Object.fromEntries(opts.models.map((s) => [s.name, crossover(rows.filter((r) => r.model === s.name))])),
        targets: Object.fromEntries(opts.models.map((s) => [s.name, targets(rows.filter((r) => r.model === s.name), limits)])),
      });
    if (opts.plot) await plot(opts.plot, rows, opts.models, limits, `${dev.name} (sm ${dev.computeCapability})`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
