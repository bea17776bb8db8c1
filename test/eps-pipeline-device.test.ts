// EPS-MoE's pipeline on the device engine with expert parallelism (emulated devices, NCCL as the
// loopback group): each chunk's dispatch and combine on a comm stream, its GroupGemm on the compute
// stream, ordered by events. Bit-identical to one device for every PN; with rank 0's compute stream
// held back (lazy) until an event or a host copy orders it, a combine queued before its chunk's
// GroupGemm (a missing event wait) reads unwritten rows.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';

import { loadCudaModel } from '../src/model/load.js';
import { startDeviceExpertRanks } from '../src/dist/expert-ranks.js';
import { packageRoot } from '../src/native/index.js';
import { createCudaEmulator, withLazyStreams } from './helpers/cuda-emu.js';
import { runAll } from './helpers/model-runner.js';

for (const name of ['qwen2_moe', 'longcat_flash', 'gpt_oss', 'qwen3_next']) {
  test(`${name} on 2 emulated devices: PN 2, 3 and 64 equal one device bit for bit, with a lazy compute stream too`, async () => {
    const dir = path.join(packageRoot(), 'test', 'fixtures', name);
    const single = loadCudaModel(dir, { device: 0, cuda: createCudaEmulator() });
    const want = runAll(single.model, null);
    single.model.dispose();
    // Eager, then rank 0's compute stream held back with its comm stream eager. NOTE: not every
    // stream lazy: the emulated NCCL group's collectives run at the call, not in stream order.
    for (const lazy of [null, 1]) {
      const cuda = lazy ? withLazyStreams(createCudaEmulator(), { lazyCount: lazy }) : createCudaEmulator();
      const ranks = startDeviceExpertRanks(dir, 2, cuda, path.join(packageRoot(), 'dist', 'test', 'helpers', 'cuda-emu.js'), 60_000);
      try {
        await ranks.ready;
        const loaded = loadCudaModel(dir, { device: 0, cuda, ep: ranks.comm });
        try {
          for (const pn of lazy ? [3] : [2, 3, 64]) {
            loaded.model.setPipelineChunks(pn);
            const got = runAll(loaded.model, null);
            assert.deepEqual(got.tokens, want.tokens, `${name} PN ${pn}${lazy ? ' lazy' : ''}: greedy tokens`);
            got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${name} PN ${pn}${lazy ? ' lazy' : ''}: logits of step ${i}`));
            assert.deepEqual(new Set(loaded.model.layerPlans().map((p) => p.chunks)), new Set([pn]));
          }
        } finally {
          loaded.model.dispose();
        }
      } finally {
        await ranks.stop();
      }
    }
  });
}
