// Rank 0's side of in-process expert parallelism (--expert-parallel N on the CPU): starts ranks
// 1..N-1 as worker threads (src/dist/expert-rank.ts), joins their loopback group, and returns the
// comm the model's MoE layers dispatch through. Every forward on rank 0 lets each expert rank serve
// one step; stop() ends them.
import path from 'node:path';
import { Worker } from 'node:worker_threads';

import { parseModelConfig } from '../model/config.js';
import { loadNative, type CudaAddon } from '../native/index.js';
import { DeviceExpertComm } from '../moe/device-ep.js';
import { checkPlacement, contiguousPlacement, GroupExpertComm, type ExpertPlacement } from '../moe/ep-comm.js';
import type { ExpertRankData } from './expert-rank.js';
import type { QuantizeSpec } from '../model/quantize.js';

export interface ExpertRanks<C extends { dispose(): void } = GroupExpertComm> {
  comm: C;
  /** Which rank owns each routed expert: rank 0 keeps (loads) only placement.experts[0]. */
  placement: ExpertPlacement;
  /** Resolves when every expert rank has loaded its experts; rejects if one fails. */
  ready: Promise<void>;
  /** Called once if an expert rank fails after it was ready (the engine must stop). */
  onFailure: ((message: string) => void) | null;
  stop(): Promise<void>;
}

let groupSeq = 0;

/** `placement`: which rank owns each expert (default: contiguous slices). */
export function startExpertRanks(modelDir: string, worldSize: number, fast: boolean, joinTimeoutMs = 600_000,
                                 placement?: ExpertPlacement, quantize: QuantizeSpec | null = null): ExpertRanks {
  const group = `expertd-ep-${process.pid}-${Date.now()}-${groupSeq++}`;
  return launch(modelDir, worldSize, { group, fast, joinTimeoutMs, quantize }, placement, (control, P) =>
    new GroupExpertComm(loadNative().loopbackJoin(group, worldSize, 0, joinTimeoutMs), P, control));
}

/**
 * Expert parallelism over CUDA devices in one process: rank r on device r (or, with `standIn`, each
 * rank on its own emulator of the cuda* ops, tests), the all2all over NCCL. `quantize`: each rank
 * quantizes its own experts at load (--quantize), as rank 0's model must.
 */
export function startDeviceExpertRanks(modelDir: string, worldSize: number, cuda: CudaAddon, standIn?: string,
                                       joinTimeoutMs = 600_000, placement?: ExpertPlacement,
                                       quantize: QuantizeSpec | null = null): ExpertRanks<DeviceExpertComm> {
  const ncclId = cuda.cudaNcclUniqueId();
  return launch(modelDir, worldSize, { group: '', fast: true, joinTimeoutMs, quantize, device: { ncclId, ...(standIn ? { standIn } : {}) } },
    placement, (control, P) => new DeviceExpertComm(cuda, cuda.cudaNcclJoin(ncclId, worldSize, 0, joinTimeoutMs), P, control));
}

function launch<C extends { dispose(): void }>(modelDir: string, worldSize: number,
    base: Pick<ExpertRankData, 'group' | 'fast' | 'joinTimeoutMs' | 'device' | 'quantize'>, given: ExpertPlacement | undefined,
    join: (control: Int32Array, placement: ExpertPlacement) => C): ExpertRanks<C> {
  if (!Number.isInteger(worldSize) || worldSize < 2) throw new RangeError(`worldSize is ${worldSize}, expected an integer >= 2`);
  const spec = parseModelConfig(path.resolve(modelDir));
  const E = spec.moe.numExperts;
  if (worldSize > E) throw new RangeError(`--expert-parallel ${worldSize}: the model has only ${E} routed experts`);
  const placement = given ? checkPlacement(given, E, worldSize) : contiguousPlacement(E, worldSize);
  const control = new Int32Array(new SharedArrayBuffer(8));
  const exits: Promise<void>[] = [];
  let stopping = false;
  const ranks: ExpertRanks<C> = {
    comm: null as unknown as C, placement, ready: Promise.resolve(),
    onFailure: null,
    async stop() {
      if (stopping) return;
      stopping = true;
      // The stop flag, then a bump of the step counter: a rank about to wait sees a changed value
      // (Atomics.wait returns at once) and then the flag, however the two threads interleave.
      Atomics.store(control, 1, 1);
      Atomics.add(control, 0, 1);
      Atomics.notify(control, 0);
      // Leaving the group also fails a collective an expert rank may be blocked in.
      ranks.comm?.dispose();
      await Promise.all(exits);
    },
  };
  const readies: Promise<void>[] = [];
  for (let rank = 1; rank < worldSize; rank++) {
    const data: ExpertRankData = { ...base, modelDir, rank, worldSize, control, owner: Array.from(placement.owner) };
    const w = new Worker(new URL('./expert-rank.js', import.meta.url), { workerData: data });
    exits.push(new Promise<void>((resolve) => w.once('exit', () => resolve())));
    readies.push(new Promise<void>((resolve, reject) => {
      let ready = false;
      w.on('message', (m: { type: string; message?: string }) => {
        if (m.type === 'ready') { ready = true; resolve(); }
        if (m.type === 'error') {
          const msg = `expert rank ${rank}: ${m.message}`;
          if (!ready) reject(new Error(msg));
          else if (!stopping) ranks.onFailure?.(msg);
        }
      });
      w.on('error', (e) => (ready ? ranks.onFailure?.(`expert rank ${rank}: ${e.message}`) : reject(e)));
      w.on('exit', (code) => {
        if (!ready) reject(new Error(`expert rank ${rank} exited (code ${code}) before it was ready`));
        else if (!stopping) ranks.onFailure?.(`expert rank ${rank} exited (code ${code})`);
      });
    }));
  }
  // Blocks this thread until every rank has joined (they join before loading their experts).
  ranks.comm = join(control, placement);
  ranks.ready = Promise.all(readies).then(() => undefined);
  ranks.ready.catch(() => undefined);
  return ranks;
}
