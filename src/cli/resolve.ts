// Turns the model flags into engine options: the demo model when no --model is given, the compute
// dtype from the CPU when 'auto'.
import { readFileSync } from 'node:fs';
import path from 'node:path';

import { parseModelConfig } from '../model/config.js';
import { ensureDemoModel } from '../model/demo.js';
import { resolveKvDtype } from '../model/kv-dtype.js';
import { parsePlacement } from '../moe/ep-comm.js';
import { loadNative } from '../native/index.js';
import type { EngineOptions } from '../engine/protocol.js';
import type { ModelInfo } from '../engine/types.js';
import type { EvictionPolicy } from '../offload/expert-cache.js';
import type { OffloadConfig } from '../offload/setup.js';
import { UsageError, type ParsedFlags } from './options.js';
import { quantizeSpec, type QuantizeSpec } from '../model/quantize.js';

/** `ranks`: the rank processes of the group (serve --nproc-per-node x --nnodes), 1 without. */
export function resolveEngineOptions(flags: ParsedFlags, servedModelName?: string, ranks = 1):
    EngineOptions & { isDemo: boolean; info: ModelInfo } {
  const given = String(flags['model'] ?? '');
  const isDemo = given === '';
  const modelDir = isDemo ? ensureDemoModel() : path.resolve(given);
  // Fail fast, before a worker starts, on a config we cannot serve (names what is supported).
  const spec = parseModelConfig(modelDir);
  const offload = offloadOptions(flags);
  const device = resolveDevice(String(flags['device'] ?? 'auto'));
  let dtype = String(flags['compute-dtype'] ?? 'auto');
  if (device !== 'cpu') {
    // The device GEMMs take bf16 operands (f32 accumulate); routers stay in f32.
    if (dtype === 'f32') throw new UsageError(`--compute-dtype f32 runs on the CPU only; --device ${device} computes in bf16`);
    dtype = 'bf16';
  }
  const quantize = quantizeOption(flags, device);
  if (dtype === 'auto') dtype = autoComputeDtype(loadNative().capabilities().bf16Dot, quantize !== null || spec.quantization !== null);
  const name = servedModelName || (isDemo ? 'expertd-demo' : path.basename(modelDir));
  const info: ModelInfo = {
    name, architecture: spec.modelType, maxContext: spec.maxContext, vocabSize: spec.vocabSize,
    eosTokenIds: spec.eosTokenIds, numMoeLayers: spec.layers.filter((l) => l.ffn === 'moe').length,
    numExperts: spec.moe.numExperts, topK: spec.moe.router.topK,
  };
  return {
    modelDir, isDemo, info,
    computeDtype: dtype as 'f32' | 'bf16',
    quantize,
    kvCacheBlocks: Number(flags['kv-cache-blocks'] ?? 0),
    kvCacheGb: Number(flags['kv-cache-gb'] ?? 0),
    kvCacheDtype: resolveKvDtype(String(flags['kv-cache-dtype'] ?? 'auto'), dtype as 'f32' | 'bf16'),
    blockSize: Number(flags['block-size'] ?? 16),
    prefixCaching: flags['prefix-caching'] !== false,
    maxNumSeqs: Number(flags['max-num-seqs'] ?? 16),
    maxNumBatchedTokens: Number(flags['max-num-batched-tokens'] ?? 512),
    threads: Number(flags['threads'] ?? 0),
    expertKernel: String(flags['expert-kernel'] ?? 'auto') as 'auto' | 'group' | 'dense',
    pipelineChunks: pipelineChunks(String(flags['pipeline-chunks'] ?? 'auto')),
    servedModelName: name,
    device,
    ...expertParallel(flags, device, offload.offload !== undefined, spec.moe.numExperts, ranks),
    ...offload,
  };
}

/**
 * --compute-dtype auto: the fast mode (bf16, int8 activations for int8 / int4 weights) where the CPU
 * has bf16 dot products, and wherever the weights are quantized (--quantize, or an FP8 / MXFP4 / GPTQ /
 * compressed-tensors checkpoint): their numbers are already the format's, and their kernels read
 * int8 or bf16 activations (an AVX2 CPU decodes int4 at one row 3.4x faster so). Else f32, the
 * exact reference mode.
 */
export function autoComputeDtype(bf16Dot: boolean, quantized: boolean): 'f32' | 'bf16' {
  return bf16Dot || quantized ? 'bf16' : 'f32';
}

/**
 * --quantize / --quantize-group / --quantize-dense / --quantize-lm-head -> the spec (null = none). On a device the experts stay quantized in
 * device memory (group_gemm_quant.cu), in the device expert cache's slots and on expert ranks too, and
 * --quantize-dense's weights run through cudaDenseGemmQuant and quantized one-expert tables.
 */
export function quantizeOption(flags: ParsedFlags, device: string): QuantizeSpec | null {
  let q: QuantizeSpec | null;
  try {
    q = quantizeSpec(String(flags['quantize'] ?? 'none'), Number(flags['quantize-group'] ?? 32), flags['quantize-dense'] === true,
      flags['quantize-lm-head'] === true);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  if (q?.lmHead && device !== 'cpu')
    throw new UsageError(`--quantize-lm-head runs on the CPU engine only for now (the device engine keeps the LM head in the checkpoint's precision); drop --quantize-lm-head or use --device cpu`);
  return q;
}

/** --pipeline-chunks auto|N (N in 1..256). */
export function pipelineChunks(flag: string): 'auto' | number {
  if (flag === 'auto') return 'auto';
  const n = /^\d+$/.test(flag) ? Number(flag) : NaN;
  if (!(n >= 1 && n <= 256)) throw new UsageError(`--pipeline-chunks: '${flag}' is not auto or an integer from 1 to 256`);
  return n;
}

/**
 * 'auto' -> cuda:0 when this build has CUDA and sees a device, else cpu. An explicit cuda[:N] is
 * checked here, before any worker starts.
 */
export function resolveDevice(flag: string): string {
  const m = /^(auto|cpu|cuda)(?::(\d+))?$/.exec(flag);
  if (!m || (m[2] !== undefined && m[1] !== 'cuda'))
    throw new UsageError(`--device: '${flag}' is not one of auto, cpu, cuda, cuda:N`);
  // Tests only: a stand-in for the CUDA ops (see worker.ts) is one device.
  const standIn = process.env.EXPERTD_CUDA_STANDIN ? { cudaCompiled: true, cudaDevices: 1 } : null;
  const caps = standIn ?? loadNative().capabilities();
  if (m[1] === 'cpu') return 'cpu';
  if (m[1] === 'auto') return caps.cudaCompiled && caps.cudaDevices > 0 ? 'cuda:0' : 'cpu';
  const index = Number(m[2] ?? 0);
  if (!caps.cudaCompiled)
    throw new UsageError(`--device ${flag}: this addon was built without CUDA (run npm run build:gpu where the CUDA toolkit is installed)`);
  if (index >= caps.cudaDevices)
    throw new UsageError(`--device ${flag}: ${caps.cudaDevices === 0 ? `no CUDA device is visible${'cudaError' in caps && caps.cudaError ? ` (${caps.cudaError})` : ''}` : `only ${caps.cudaDevices} CUDA device(s) are visible`}`);
  return `cuda:${index}`;
}

function expertParallel(flags: ParsedFlags, device: string, offload: boolean, experts: number, ranks: number):
    { expertParallel?: number; expertPlacement?: number[] } {
  const n = Number(flags['expert-parallel'] ?? 1);
  const file = String(flags['expert-placement'] ?? '');
  // Rank processes: the table spreads the experts over the group's ranks (--dist-moe expert).
  if (file && n <= 1 && ranks > 1) return { expertPlacement: expertPlacement(file, experts, ranks) };
  if (file && n <= 1) throw new UsageError('--expert-placement needs --expert-parallel N (N >= 2) or rank processes (--nproc-per-node, --nnodes)');
  if (n <= 1) return {};
  if (device !== 'cpu') {
    // Device ranks: rank r on cuda:r of this process (a stand-in counts as enough devices).
    const visible = process.env.EXPERTD_CUDA_STANDIN ? n : loadNative().capabilities().cudaDevices;
    if (device !== 'cuda:0') throw new UsageError(`--expert-parallel on devices puts rank r on cuda:r; use --device cuda (got ${device})`);
    if (visible < n) throw new UsageError(`--expert-parallel ${n} on devices needs ${n} CUDA devices, ${visible} visible`);
  }
  if (offload) throw new UsageError('--expert-parallel and expert offloading (--expert-cache-*, --trace-dir) cannot be combined yet');
  if (n > experts) throw new UsageError(`--expert-parallel ${n}: the model has only ${experts} routed experts`);
  return { expertParallel: n, ...(file ? { expertPlacement: expertPlacement(file, experts, n) } : {}) };
}

/** --expert-placement FILE: the owner rank of each expert, checked here, before any worker starts. */
export function expertPlacement(file: string, experts: number, worldSize: number): number[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new UsageError(`--expert-placement ${file}: ${(e as Error).message}`);
  }
  try {
    return Array.from(parsePlacement(text, experts, worldSize).owner);
  } catch (e) {
    throw new UsageError(`--expert-placement ${file}: ${(e as Error).message}`);
  }
}

/** Offloading is on when the expert cache is smaller than all experts or a trace folder is given. */
function offloadOptions(flags: ParsedFlags): { offload?: OffloadConfig } {
  const gb = Number(flags['expert-cache-gb'] ?? 0);
  const fraction = Number(flags['expert-cache-fraction'] ?? 1);
  const traceDir = String(flags['trace-dir'] ?? '');
  if (!(gb > 0) && !(fraction < 1) && !traceDir) return {};
  return {
    offload: {
      policy: String(flags['cache-policy'] ?? 'eam') as EvictionPolicy,
      ...(gb > 0 ? { budgetBytes: gb * 2 ** 30 } : { fraction }),
      ...(traceDir ? {
        traceDir: path.resolve(traceDir),
        traceMaxFileBytes: Math.round(Number(flags['trace-max-file-mb'] ?? 64) * 2 ** 20),
        traceMaxFiles: Number(flags['trace-max-files'] ?? 8),
        traceSample: Number(flags['trace-sample'] ?? 1),
      } : {}),
      eamCapacity: Number(flags['eam-capacity'] ?? 1000),
      copyThread: copyThread(flags),
    },
  };
}

// The copy thread only overlaps with compute when it has a core of its own: with every core in the
// kernel pool it steals one from a pool worker and the step waits (measured: slower on 2 vCPUs).
function copyThread(flags: ParsedFlags): boolean {
  const mode = String(flags['expert-loader'] ?? 'auto');
  if (mode !== 'auto') return mode === 'copy-thread';
  const caps = loadNative().capabilities();
  const threads = Number(flags['threads'] ?? 0) || caps.hardwareThreads;
  return threads < caps.hardwareThreads;
}
