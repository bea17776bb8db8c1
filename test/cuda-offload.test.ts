// The device expert cache (MoE-Infinity on a GPU: every routed expert in pinned host memory, a budget
// of device slots filled on a copy stream) never changes the numbers: each fixture run with the
// cache at 25% and 50% under eam (with prefetching), lru and lfu gives the resident device model's
// logits bit for bit. Runs on the GPU when present and always on the emulator of the cuda* ops, also
// with its side streams held back until ordered (withLazyStreams), which is where a missing wait shows.
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadCudaModel } from '../src/model/load.js';
import { packageRoot, type CudaAddon } from '../src/native/index.js';
import { attachDeviceOffloader, type OffloadConfig } from '../src/offload/setup.js';
import { readTrace } from '../src/offload/trace-file.js';
import { createCudaEmulator, withLazyStreams } from './helpers/cuda-emu.js';
import { runAll } from './helpers/model-runner.js';
import { needsCudaDevice } from './helpers/cuda-skip.js';

const backends: { label: string; cuda: () => CudaAddon | undefined; skip: string | false }[] = [
  { label: 'emulator', cuda: () => createCudaEmulator(), skip: false },
  // The copy stream's work held back until something orders it: a missing wait reads an unfilled slot.
  { label: 'emulator, lazy streams', cuda: () => withLazyStreams(createCudaEmulator()), skip: false },
  {
    label: 'gpu', cuda: () => undefined,
    skip: needsCudaDevice,
  },
];

for (const b of backends) {
  for (const name of ['mixtral', 'qwen2_moe', 'deepseek_v3', 'longcat_flash']) {
    test(`device expert cache (${b.label}) on ${name}: 25% and 50% under eam, lru, lfu equal resident, bit for bit`, { skip: b.skip }, () => {
      const dir = path.join(packageRoot(), 'test', 'fixtures', name);
      const cuda = b.cuda();
      const on = cuda ? { cuda } : {};
      const resident = loadCudaModel(dir, { device: 0, ...on });
      const want = runAll(resident.model, null);
      resident.model.dispose();
      const configs: Array<{ label: string; cfg: OffloadConfig }> = [
        ...(['eam', 'lru', 'lfu'] as const).map((policy) => ({ label: `${policy} 25%`, cfg: { policy, fraction: 0.25 } })),
        { label: 'eam 50%', cfg: { policy: 'eam', fraction: 0.5, prefetchMinProbability: 0 } },
      ];
      for (const { label, cfg } of configs) {
        const traceDir = mkdtempSync(path.join(os.tmpdir(), 'expertd-cuda-offload-'));
        const loaded = loadCudaModel(dir, { device: 0, loadExperts: false, ...on });
        const off = attachDeviceOffloader(loaded, { ...cfg, traceDir }, cuda);
        try {
          assert.throws(() => loaded.model.setExpertKernel('dense'), /needs every expert resident/);
          const got = runAll(loaded.model, off);
          assert.deepEqual(got.tokens, want.tokens, `${name} ${label}: greedy tokens`);
          got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${name} ${label}: logits of step ${i}`));
          const st = off.stats();
          assert.ok(st.slots < st.totalExperts, `${label}: the cache must be smaller than the model (${st.slots}/${st.totalExperts})`);
          assert.ok(st.misses > 0 && st.hits > 0, `${label}: ${JSON.stringify(st)}`);
          assert.ok(off.cache.evictions > 0, `${label}: no eviction happened`);
          assert.ok(st.bytesLoaded >= st.misses * off.store.expertBytes, `${label}: bytes loaded`);
          if (cfg.policy === 'eam') assert.ok(st.prefetchLoads > 0, `${label}: the prefetch path must run: ${JSON.stringify(st)}`);
          assert.equal(st.collectionSize, 3);
          off.save();
          assert.equal(readTrace(traceDir).steps.length, got.logits.length);
        } finally {
          off.dispose();
          loaded.model.dispose();
        }
      }
    });
  }
}
