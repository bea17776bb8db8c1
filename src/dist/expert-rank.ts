// Worker entry of an expert rank (expert parallelism in one process, ranks 1..N-1): loads the model
// with only its experts (the placement rank 0 passed), joins the loopback group, then serves one step's MoE
// layers each time rank 0 starts a forward, until rank 0 says stop (or the group breaks).
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { parentPort, workerData } from 'node:worker_threads';

import { loadCudaModel, loadModel } from '../model/load.js';
import { loadNative, type CudaAddon } from '../native/index.js';
import { DeviceExpertComm } from '../moe/device-ep.js';
import { GroupExpertComm, placementFromOwners } from '../moe/ep-comm.js';
import type { QuantizeSpec } from '../model/quantize.js';

export interface ExpertRankData {
  modelDir: string;
  rank: number;
  worldSize: number;
  group: string;
  fast: boolean;
  /** --quantize: this rank's experts quantized at load (absent = the checkpoint's precision). */
  quantize?: QuantizeSpec | null;
  /** [steps started, stop], shared with rank 0. */
  control: Int32Array;
  joinTimeoutMs: number;
  /** [E] the rank owning each routed expert (the same table on every rank). */
  owner: number[];
  /**
   * Device ranks: each rank on CUDA device `rank` (or on a stand-in module's emulator, tests), the
   * all2all over NCCL with this unique id.
   */
  device?: { ncclId: Uint8Array; standIn?: string };
}

const d = workerData as ExpertRankData;
const port = parentPort!;
let comm: { dispose(): void } | null = null;

/** Waits for rank 0's steps and serves each one, until rank 0 says stop. */
function serve(step: () => void): void {
  port.postMessage({ type: 'ready' });
  let served = 0;
  for (;;) {
    Atomics.wait(d.control, 0, served);
    // Checked before serving: stop bumps the counter too, and that bump is not a step.
    if (Atomics.load(d.control, 1)) break;
    const started = Atomics.load(d.control, 0);
    while (served < started) {
      step();
      served++;
    }
  }
}

async function main(): Promise<void> {
  const placement = placementFromOwners(d.owner, d.worldSize);
  if (d.device) {
    const cu = d.device.standIn
      ? (await import(pathToFileURL(path.resolve(d.device.standIn)).href) as { createCudaEmulator(): CudaAddon }).createCudaEmulator()
      : loadNative() as unknown as CudaAddon;
    if (!d.device.standIn) cu.cudaSetDevice(d.rank);
    const ep = new DeviceExpertComm(cu, cu.cudaNcclJoin(d.device.ncclId, d.worldSize, d.rank, d.joinTimeoutMs), placement);
    comm = ep;
    const loaded = loadCudaModel(d.modelDir, { device: d.device.standIn ? 0 : d.rank, cuda: cu, ep, quantize: d.quantize ?? null });
    serve(() => loaded.model.serveExperts());
    loaded.model.dispose();
  } else {
    const ep = new GroupExpertComm(loadNative().loopbackJoin(d.group, d.worldSize, d.rank, d.joinTimeoutMs), placement);
    comm = ep;
    const loaded = loadModel(d.modelDir, { fast: d.fast, quantize: d.quantize ?? null, comm: ep, loadExpert: (_layer, e) => ep.ownsExpert(e) });
    serve(() => loaded.model.serveExperts());
    loaded.model.dispose();
  }
  port.postMessage({ type: 'stopped' });
}

main().catch((e: unknown) => {
  port.postMessage({ type: 'error', message: (e as Error).message });
}).finally(() => comm?.dispose());
