// The quantized GroupGemm on a GPU (group_gemm_quant.cu): the expert FFN over int8, int4, fp8 (weights
// dequantised in registers, and FP8 activations on sm_89+) and MXFP4 tables beside the bf16 GroupGemm
// in the same run, as ratios to bf16 and to the torch peer (bench/peers/torch_quant.py: a bf16
// torch.matmul loop and torch._scaled_mm on e4m3 with row-wise scales), with the weight bytes each
// format reads per call. Median and p10-p90 of CUDA-event times; random codes (speed, not numerics:
// test/cuda-quant.test.ts holds the numerics).
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { deviceQuant, quantExpertBytes, type DeviceQuant } from '../src/model/cuda-quant.js';
import { loadNative, type CudaAddon, type CudaFp8Path, type CudaQuantLayout } from '../src/native/index.js';
import { withEnv } from '../test/helpers/env.js';
import { runSpecScript } from './harness.js';

/** gemv: the decode kernel (EXPERTD_QGEMV=1: no shared-memory weight tile; up to 2 rows per table expert on average). */
interface Variant { name: string; layout: CudaQuantLayout | null; fp8Path: CudaFp8Path; gemv?: boolean }

const VARIANTS: Record<string, Variant> = {
  bf16: { name: 'bf16', layout: null, fp8Path: 'auto' },
  int8: { name: 'int8', layout: { format: 'int8' }, fp8Path: 'dequant' },
  int4: { name: 'int4 g32', layout: { format: 'int4', group: 32 }, fp8Path: 'dequant' },
  'int4-g128': { name: 'int4 g128', layout: { format: 'int4', group: 128 }, fp8Path: 'dequant' },
  fp8: { name: 'fp8 (dequant)', layout: { format: 'fp8' }, fp8Path: 'dequant' },
  'fp8-act': { name: 'fp8 (FP8 act)', layout: { format: 'fp8' }, fp8Path: 'act' },
  mxfp4: { name: 'mxfp4', layout: { format: 'mxfp4' }, fp8Path: 'dequant' },
  'int8-gemv': { name: 'int8 (decode kernel)', layout: { format: 'int8' }, fp8Path: 'dequant', gemv: true },
  'int4-gemv': { name: 'int4 g32 (decode kernel)', layout: { format: 'int4', group: 32 }, fp8Path: 'dequant', gemv: true },
  'fp8-gemv': { name: 'fp8 (decode kernel)', layout: { format: 'fp8' }, fp8Path: 'dequant', gemv: true },
  'mxfp4-gemv': { name: 'mxfp4 (decode kernel)', layout: { format: 'mxfp4' }, fp8Path: 'dequant', gemv: true },
};

interface Row {
  variant: string; rowsPerExpert: number; medianMs: number | null; p10Ms?: number; p90Ms?: number;
  vsBf16?: number; weightGBps?: number; tflops?: number; torch?: { bf16Ms?: number; fp8Ms?: number; error?: string };
  vsTorch?: number; note?: string;
}

const quantile = (s: number[], q: number) => s[Math.min(s.length - 1, Math.floor(q * (s.length - 1) + 0.5))]!;

export async function runKernelsQuant(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv, options: {
      device: { type: 'string', default: 'cuda:0' }, json: { type: 'string' }, reps: { type: 'string', default: '20' },
      warmup: { type: 'string', default: '3' }, rows: { type: 'string', default: '1,16,256' },
      shape: { type: 'string', default: 'qwen3-30b-like:2048:768:128:8' },
      formats: { type: 'string', default: 'bf16,int8,int4,int4-g128,fp8,fp8-act,mxfp4,int8-gemv,int4-gemv,fp8-gemv,mxfp4-gemv' },
      python: { type: 'string' }, 'no-peer': { type: 'boolean', default: false },
      standin: { type: 'boolean', default: false },
    },
  });
  const [shapeName, ...dims] = values.shape!.split(':');
  const [H, I, E, A] = dims.map(Number) as [number, number, number, number];
  const reps = Number(values.reps), warmup = Number(values.warmup);
  const rowsList = values.rows!.split(',').map(Number);
  const formats = values.formats!.split(',');
  for (const f of formats) if (!VARIANTS[f]) throw new RangeError(`--formats: '${f}' is not one of ${Object.keys(VARIANTS).join(', ')}`);
  let cu: CudaAddon;
  if (values.standin) {
    // The CPU emulator: the plumbing timed, not a GPU (labelled so in every output).
    const { createCudaEmulator } = await import('../test/helpers/cuda-emu.js');
    cu = createCudaEmulator();
  } else {
    const native = loadNative();
    const why = native.capabilities().cudaDevices > 0 ? null : `no CUDA device (${native.capabilities().cudaError ?? 'portable build'})`;
    if (why) throw new Error(`kernels-quant: ${why}`);
    cu = native as unknown as CudaAddon;
    cu.cudaSetDevice(Number(values.device!.split(':')[1] ?? 0));
  }
  const info = cu.cudaDeviceInfo(0);
  const fp8Act = cu.cudaQuantPaths().fp8Act;
  console.error(`# kernels-quant on ${info.name} (cc ${info.computeCapability})${values.standin ? ' [STANDIN: CPU emulator]' : ''}: ` +
    `${shapeName} H=${H} I=${I} E=${E}, ${A} active experts, rows/expert ${rowsList.join(',')}`);

  const maxRows = A * Math.max(...rowsList);
  const rnd = (n: number) => Uint8Array.from({ length: n }, (_, i) => (i * 2654435761) >>> 24);
  const st = new cu.CudaStream();
  const x = cu.cudaBuffer(maxRows * H * 2), hs = cu.cudaBuffer(maxRows * I * 2), y = cu.cudaBuffer(maxRows * H * 4);
  // x: bf16 values of moderate size (0x3c00..0x3cff: 0.0078..0.0156 and their bit neighbours).
  cu.cudaCopyToDevice(x, 0, Uint16Array.from({ length: maxRows * H }, (_, i) => 0x3c00 | (i & 0xff)));
  const offsets = cu.cudaBuffer((E + 1) * 4);
  const t0 = new cu.CudaEvent(true), t1 = new cu.CudaEvent(true);
  const results: Row[] = [];
  for (const f of formats) {
    const v = VARIANTS[f]!;
    if (v.fp8Path === 'act' && !fp8Act) {
      for (const r of rowsList) results.push({ variant: v.name, rowsPerExpert: r, medianMs: null, note: 'no FP8-activation kernels here (sm_89+)' });
      continue;
    }
    const q: DeviceQuant | null = v.layout ? deviceQuant(v.layout) : null;
    const bytes = q ? quantExpertBytes(q, H, I) : { gateUp: 2 * I * H * 2, down: H * I * 2 };
    const table = new cu.CudaExpertTable(E, H, I, v.layout);
    const bufs = [];
    for (let e = 0; e < A; e++) {
      const gu = cu.cudaBuffer(bytes.gateUp), dn = cu.cudaBuffer(bytes.down);
      // Codes: a fixed byte pattern; scales land inside it too (speed only). bf16: the same bytes.
      cu.cudaCopyToDevice(gu, 0, rnd(bytes.gateUp).map((b) => b & 0x3b));
      cu.cudaCopyToDevice(dn, 0, rnd(bytes.down).map((b) => b & 0x3b));
      table.set(e, gu, dn);
      bufs.push(gu, dn);
    }
    withEnv('EXPERTD_QGEMV', v.gemv ? '1' : '0', () => {
      for (const r of rowsList) {
        const offs = Int32Array.from({ length: E + 1 }, (_, e) => Math.min(e, A) * r);
        cu.cudaCopyToDevice(offsets, 0, offs, st);
        const call = () => cu.cudaGroupGemmFfn(x, offsets, table, A * r, hs, y, { fp8Path: v.fp8Path }, st);
        for (let i = 0; i < warmup; i++) call();
        const ms: number[] = [];
        for (let i = 0; i < reps; i++) {
          t0.record(st);
          call();
          t1.record(st);
          t1.synchronize();
          ms.push(t1.elapsedMs(t0));
        }
        ms.sort((a, b) => a - b);
        const med = quantile(ms, 0.5);
        results.push({
          variant: v.name, rowsPerExpert: r, medianMs: med, p10Ms: quantile(ms, 0.1), p90Ms: quantile(ms, 0.9),
          weightGBps: A * (bytes.gateUp + bytes.down) / (med * 1e6), tflops: 6 * A * r * H * I / (med * 1e9),
        });
      }
    });
    table.dispose();
    for (const b of bufs) b.dispose();
  }
  for (const r of results) {
    const base = results.find((b) => b.variant === 'bf16' && b.rowsPerExpert === r.rowsPerExpert);
    if (base?.medianMs && r.medianMs) r.vsBf16 = base.medianMs / r.medianMs;
  }
  const peer = values['no-peer'] || values.standin ? null : runTorchQuant(values.python ?? process.env.EXPERTD_BENCH_PYTHON ?? 'python3',
    { device: values.device!, h: H, inter: I, experts: A, rows: rowsList, reps, warmup });
  for (const r of results) {
    const t = peer?.results?.[String(r.rowsPerExpert)];
    if (!t) continue;
    r.torch = t;
    const ref = r.variant.startsWith('fp8') ? t.fp8Ms : t.bf16Ms;
    if (ref && r.medianMs) r.vsTorch = ref / r.medianMs;
  }
  const f2 = (v: number | undefined, d = 3) => (v === undefined ? '-' : v.toFixed(d));
  console.log(`\n${values.standin ? 'STANDIN (CPU emulator, not a GPU): ' : ''}${info.name}, ${shapeName} (H ${H}, I ${I}, ${A} active of ${E} experts)` +
    `${peer ? `; torch ${peer.torch ?? '?'}: ${peer.error ?? peer.fp8Recipe ?? ''}` : ''}\n`);
  console.log('| format | rows/expert | median ms (p10-p90) | x bf16 | x torch | weights GB/s | TFLOP/s |');
  console.log('|:--|--:|--:|--:|--:|--:|--:|');
  for (const r of results) {
    console.log(`| ${r.variant} | ${r.rowsPerExpert} | ${r.medianMs === null ? r.note : `${f2(r.medianMs)} (${f2(r.p10Ms)}-${f2(r.p90Ms)})`} | ` +
      `${f2(r.vsBf16, 2)} | ${f2(r.vsTorch, 2)} | ${f2(r.weightGBps, 0)} | ${f2(r.tflops, 1)} |`);
  }
  if (values.json) {
    writeFileSync(values.json, JSON.stringify({ device: info, standin: values.standin, shape: { name: shapeName, H, I, E, A }, reps, warmup, results, peer }, null, 2) + '\n');
  }
  for (const b of [x, hs, y, offsets]) b.dispose();
  t0.dispose();
  t1.dispose();
  st.dispose();
}

interface TorchQuantRun {
  ok: boolean; error?: string; torch?: string; fp8Recipe?: string;
  results?: Record<string, { bf16Ms?: number; fp8Ms?: number; error?: string }>;
}

const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bench/peers/torch_quant.py');

function runTorchQuant(python: string, spec: Record<string, unknown>): TorchQuantRun {
  return runSpecScript<TorchQuantRun>(python, SCRIPT, spec, 300_000);
}
