// Wiring an offloader onto a loaded model: load it with `loadExpert: skipAllExperts` (no expert is
// packed at load), then attachOffloader() builds the checkpoint store and the cache from the
// user's settings and becomes the model's MoE hooks.
import type { CudaModel } from '../model/cuda-model.js';
import { CheckpointSource, type LoadedModel } from '../model/load.js';
import { loadNative, type CudaAddon, type CudaBuffer } from '../native/index.js';
import { PinnedExpertStore } from './device-store.js';
import { intCodeQuant, type ModelSpec } from '../model/spec.js';
import type { EvictionPolicy } from './expert-cache.js';
import { CheckpointExpertStore, expertTensorPrefix, SimulatedLinkStore, type ExpertStore } from './expert-store.js';
import { CompressedExpertStore } from './compressed-store.js';
import { Mxfp4ExpertStore } from './mxfp4-store.js';
import { Offloader } from './offloader.js';
import type { BatchCombine } from './predictor.js';
import type { QuantizeSpec } from '../model/quantize.js';

export interface OffloadConfig {
  policy: EvictionPolicy;
  /** --quantize: cache slots hold quantized experts (set by the worker from the engine options). */
  quantize?: QuantizeSpec | null;
  /** Byte budget of the fast tier (--expert-cache-gb); wins over `fraction` when > 0. */
  budgetBytes?: number;
  /** Fraction of all experts (--expert-cache-fraction). */
  fraction?: number;
  prefetch?: boolean;
  prefetchWindowBytes?: number;
  prefetchMinProbability?: number;
  combine?: BatchCombine;
  traceDir?: string;
  /** Trace files: rotate before this size (--trace-max-file-mb), keep the newest N (--trace-max-files). */
  traceMaxFileBytes?: number;
  traceMaxFiles?: number;
  /** Fraction of requests traced (--trace-sample). */
  traceSample?: number;
  eamCapacity?: number;
  /**
   * Load experts on the native copy thread (default true), so that prefetching overlaps compute;
   * false loads on the engine thread (and prefetching is then off unless asked for).
   */
  copyThread?: boolean;
  /** SIMULATION (benchmarks): a host-to-device link in front of the real store. */
  simulatedLink?: { gbps: number; latencyUs: number };
}

/** Model load option: leaves every routed expert out of the tables (the cache fills them). */
export const skipAllExperts = (): boolean => false;

/** A model identity for the persisted collection and trace (shape, not weights). */
export function offloadModelId(spec: ModelSpec): string {
  const moeLayers = spec.layers.filter((l) => l.ffn === 'moe').length;
  return `${spec.modelType}:${moeLayers}x${spec.moe.numExperts}:h${spec.hidden}:i${spec.moe.intermediate}`;
}

/** What the offloader reports outside the numbers (the trace writer's drops); the worker logs it. */
export interface OffloadHooks {
  warn?: (msg: string) => void;
}

export function attachOffloader(loaded: LoadedModel, cfg: OffloadConfig, hooks: OffloadHooks = {}): Offloader {
  const { spec, model, checkpoint } = loaded;
  // MXFP4 checkpoints (gpt-oss) have a store of their own: slots hold MXFP4 (or --quantize's format).
  const mxfp4 = spec.quantization?.method === 'mxfp4' && checkpoint.names().some((n) => n.endsWith('.mlp.experts.gate_up_proj_blocks'));
  // compressed-tensors checkpoints with int experts likewise (slots hold int8 / int4 codes and scales).
  const names = expertTensorPrefix(spec);
  const firstMoe = spec.layers.findIndex((l) => l.ffn === 'moe');
  const intExperts = intCodeQuant(spec.quantization) !== null &&
    checkpoint.isCompressed(`model.layers.${firstMoe}.${names.block}experts.0.${names.gate}.weight`);
  let store: ExpertStore = mxfp4 ? new Mxfp4ExpertStore(checkpoint, spec, cfg.quantize ?? null)
    : intExperts ? new CompressedExpertStore(checkpoint, spec, cfg.quantize ?? null)
    : new CheckpointExpertStore(checkpoint, spec, { copyThread: cfg.copyThread ?? true, quantize: cfg.quantize ?? null });
  if (cfg.simulatedLink) store = new SimulatedLinkStore(store, cfg.simulatedLink.gbps, cfg.simulatedLink.latencyUs);
  const off = new Offloader(store, offloaderOptions(spec, model.moeLayers.length, cfg, hooks));
  off.attach(model);
  return off;
}

/**
 * The device expert cache (MoE-Infinity on a GPU): a CudaModel loaded with `loadExperts: false`, every
 * routed expert in pinned host memory, `cfg`'s budget of device slots filled on a copy stream.
 */
export function attachDeviceOffloader(loaded: LoadedModel<CudaModel>, cfg: OffloadConfig, cuda?: CudaAddon,
    hooks: OffloadHooks = {}): Offloader<CudaBuffer> {
  const { spec, model, checkpoint } = loaded;
  const cu = cuda ?? (loadNative() as unknown as CudaAddon);
  // Slots in the tables' layout: bf16, --quantize's, or an FP8 checkpoint's blocks as shipped.
  const store = new PinnedExpertStore(cu, spec, new CheckpointSource(checkpoint), model.expertQuant, model.quantizedAtLoad);
  store.computeStreams = model.computeStreams();
  model.setExpertInputOrders(store.inputOrders);
  const off = new Offloader<CudaBuffer>(store, offloaderOptions(spec, model.numMoeLayers, cfg, hooks));
  off.attachTables(model.expertTables());
  model.hooks = off;
  return off;
}

function offloaderOptions(spec: ModelSpec, numLayers: number, cfg: OffloadConfig, hooks: OffloadHooks) {
  return {
    numLayers, numExperts: spec.moe.numExperts, topK: spec.moe.router.topK,
    policy: cfg.policy, modelId: offloadModelId(spec),
    ...(cfg.budgetBytes !== undefined && cfg.budgetBytes > 0 ? { budgetBytes: cfg.budgetBytes } : {}),
    ...(cfg.fraction !== undefined ? { fraction: cfg.fraction } : {}),
    ...(cfg.prefetch !== undefined ? { prefetch: cfg.prefetch } : {}),
    ...(cfg.prefetchWindowBytes !== undefined ? { prefetchWindowBytes: cfg.prefetchWindowBytes } : {}),
    ...(cfg.prefetchMinProbability !== undefined ? { prefetchMinProbability: cfg.prefetchMinProbability } : {}),
    ...(cfg.combine !== undefined ? { combine: cfg.combine } : {}),
    ...(cfg.traceDir ? { traceDir: cfg.traceDir } : {}),
    trace: {
      ...(cfg.traceMaxFileBytes !== undefined ? { maxFileBytes: cfg.traceMaxFileBytes } : {}),
      ...(cfg.traceMaxFiles !== undefined ? { maxFiles: cfg.traceMaxFiles } : {}),
      ...(cfg.traceSample !== undefined ? { sampleRate: cfg.traceSample } : {}),
      ...(hooks.warn ? { warn: hooks.warn } : {}),
    },
    ...(cfg.eamCapacity ? { eamCapacity: cfg.eamCapacity } : {}),
  };
}
