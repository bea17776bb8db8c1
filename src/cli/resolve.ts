// Turns the model flags into engine options: the demo model when no --model is given, the compute
// dtype from the CPU when 'auto'.
import path from 'node:path';

import { parseModelConfig } from '../model/config.js';
import { ensureDemoModel } from '../model/demo.js';
import { loadNative } from '../native/index.js';
import type { EngineOptions } from '../engine/protocol.js';
import type { ParsedFlags } from './options.js';

export function resolveEngineOptions(flags: ParsedFlags, servedModelName?: string): EngineOptions & { isDemo: boolean } {
  const given = String(flags['model'] ?? '');
  const isDemo = given === '';
  const modelDir = isDemo ? ensureDemoModel() : path.resolve(given);
  // Fail fast, before a worker starts, on a config we cannot serve (names what is supported).
  parseModelConfig(modelDir);
  let dtype = String(flags['compute-dtype'] ?? 'auto');
  if (dtype === 'auto') dtype = loadNative().capabilities().bf16Dot ? 'bf16' : 'f32';
  return {
    modelDir, isDemo,
    computeDtype: dtype as 'f32' | 'bf16',
    kvCacheBlocks: Number(flags['kv-cache-blocks'] ?? 0),
    kvCacheGb: Number(flags['kv-cache-gb'] ?? 0),
    blockSize: Number(flags['block-size'] ?? 16),
    maxNumSeqs: Number(flags['max-num-seqs'] ?? 16),
    maxNumBatchedTokens: Number(flags['max-num-batched-tokens'] ?? 512),
    threads: Number(flags['threads'] ?? 0),
    servedModelName: servedModelName || (isDemo ? 'expertd-demo' : path.basename(modelDir)),
  };
}
