// What every rank publishes at rendezvous: the model's identity (cheap hashes of config.json and
// of the safetensors headers, which name every tensor with its shape and dtype) and the flags
// that must agree across the group; and the check that names the first difference.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

import type { EngineOptions } from '../engine/protocol.js';
import { quantizeKey } from '../model/quantize.js';

export interface RankIdentity {
  rank: number;
  nodeRank: number;
  /** sha256 of config.json's bytes. */
  configSha256: string;
  /** sha256 over every *.safetensors file's header (length prefix + JSON), files in name order. */
  tensorsSha256: string;
  /** Flags that change numerics, shapes or the collectives: they must be equal on every rank. */
  compat: RankCompat;
}

export interface RankCompat {
  computeDtype: string;
  blockSize: number;
  expertParallel: number;
  maxModelLen: number;
  deviceKind: string;
  expertKernel: string;
  /** --quantize: 'none' or format/group, '/dense' with --quantize-dense, '/lm_head' with --quantize-lm-head. */
  quantize: string;
  expertdVersion: string;
  /** --expert-placement's table (each expert's owner rank) as JSON, or 'contiguous' (the default). */
  expertPlacement: string;
}

function sha256(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Reads only the header of each shard: a few KiB per file, whatever the checkpoint's size. */
export function tensorsHash(modelDir: string): string {
  const files = fs.readdirSync(modelDir).filter((f) => f.endsWith('.safetensors')).sort();
  const h = createHash('sha256');
  for (const f of files) {
    const fd = fs.openSync(path.join(modelDir, f), 'r');
    try {
      const len = Buffer.alloc(8);
      if (fs.readSync(fd, len, 0, 8, 0) !== 8) throw new Error(`${f}: shorter than a safetensors header`);
      const n = Number(len.readBigUInt64LE(0));
      if (n > 100 * 1024 * 1024) throw new Error(`${f}: safetensors header of ${n} bytes is not plausible`);
      const header = Buffer.alloc(n);
      fs.readSync(fd, header, 0, n, 8);
      h.update(f).update(len).update(header);
    } finally {
      fs.closeSync(fd);
    }
  }
  return h.digest('hex');
}

export function rankIdentity(o: EngineOptions, maxModelLen: number, rank: number, nodeRank: number, version: string): RankIdentity {
  return {
    rank, nodeRank,
    configSha256: sha256(fs.readFileSync(path.join(o.modelDir, 'config.json'))),
    tensorsSha256: tensorsHash(o.modelDir),
    compat: {
      computeDtype: o.computeDtype,
      blockSize: o.blockSize,
      expertParallel: o.expertParallel ?? 1,
      maxModelLen,
      deviceKind: (o.device ?? 'cpu').split(':')[0]!,
      expertKernel: o.expertKernel ?? 'auto',
      quantize: quantizeKey(o.quantize),
      expertdVersion: version,
      expertPlacement: o.expertPlacement ? JSON.stringify(o.expertPlacement) : 'contiguous',
    },
  };
}

/**
 * null when every rank agrees with rank 0; else one sentence naming the first rank and field that
 * differ and both values.
 */
export function checkIdentities(ids: readonly RankIdentity[]): string | null {
  const sorted = [...ids].sort((a, b) => a.rank - b.rank);
  const ref = sorted[0];
  if (!ref) return null;
  const where = (r: RankIdentity) => `rank ${r.rank} (node ${r.nodeRank})`;
  for (const r of sorted.slice(1)) {
    if (r.configSha256 !== ref.configSha256)
      return `${where(r)} loads another model than ${where(ref)}: config.json sha256 ${r.configSha256.slice(0, 12)} vs ${ref.configSha256.slice(0, 12)}`;
    if (r.tensorsSha256 !== ref.tensorsSha256)
      return `${where(r)} loads other tensors than ${where(ref)}: safetensors headers sha256 ${r.tensorsSha256.slice(0, 12)} vs ${ref.tensorsSha256.slice(0, 12)}`;
    for (const key of Object.keys(ref.compat) as (keyof RankCompat)[]) {
      if (r.compat[key] !== ref.compat[key])
        return `${where(r)} differs from ${where(ref)} in ${key}: ${JSON.stringify(r.compat[key])} vs ${JSON.stringify(ref.compat[key])}`;
    }
  }
  return null;
}
