// Worker entry of an expert rank (expert parallelism in one process, ranks 1..N-1): loads the model
// with only its slice of the routed experts, joins the loopback group, then serves one step's MoE
// layers each time rank 0 starts a forward, until rank 0 says stop (or the group breaks).
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';

import { parseModelConfig } from '../model/config.js';
import { loadModel } from '../model/load.js';
import { loadNative } from '../native/index.js';
import { expertSlice, GroupExpertComm } from './ep-comm.js';

export interface ExpertRankData {
  modelDir: string;
  rank: number;
  worldSize: number;
  group: string;
  fast: boolean;
  /** [steps started, stop], shared with rank 0. */
  control: Int32Array;
  joinTimeoutMs: number;
}

const d = workerData as ExpertRankData;
const port = parentPort!;
let comm: GroupExpertComm | null = null;
try {
  const spec = parseModelConfig(path.resolve(d.modelDir));
  const [lo, hi] = expertSlice(spec.moe.numExperts, d.worldSize, d.rank);
  comm = new GroupExpertComm(loadNative().loopbackJoin(d.group, d.worldSize, d.rank, d.joinTimeoutMs), spec.moe.numExperts);
  const loaded = loadModel(d.modelDir, { fast: d.fast, comm, loadExpert: (_layer, e) => e >= lo && e < hi });
  port.postMessage({ type: 'ready' });
  let served = 0;
  for (;;) {
    Atomics.wait(d.control, 0, served);
    // Checked before serving: stop bumps the counter too, and that bump is not a step.
    if (Atomics.load(d.control, 1)) break;
    const started = Atomics.load(d.control, 0);
    while (served < started) {
      loaded.model.serveExperts();
      served++;
    }
  }
  loaded.model.dispose();
  port.postMessage({ type: 'stopped' });
} catch (e) {
  port.postMessage({ type: 'error', message: (e as Error).message });
} finally {
  comm?.dispose();
}
