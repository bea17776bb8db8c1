// The device expert cache (MoE-Infinity on a GPU: every routed expert in pinned host memory, a budget
// of device slots filled on a copy stream) never changes the numbers: each fixture run with the
// cache at 25% and 50% under eam (with prefetching), lru and lfu gives the resident device model's
// logits bit for bit. Runs on the GPU when present and always on the emulator of the cuda* ops, also
// with its side streams held back until ordered (withLazyStreams), which is where a missing wait shows;
// and a load that evicts a slot waits for compute still queued on it (every compute stream), and
// disposing the cache leaves no copy queued.
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadCudaModel } from '../src/model/load.js';
import { mulberry32 } from '../src/engine/rng.js';
import { loadNative, packageRoot, type CudaAddon, type CudaBuffer, type CudaStream } from '../src/native/index.js';
import type { SlotWeights } from '../src/offload/expert-store.js';
import { attachDeviceOffloader, type OffloadConfig } from '../src/offload/setup.js';
import { readTrace } from '../src/offload/trace-file.js';
import { createCudaEmulator, lazyWorkLeftOnDispose, withLazyStreams } from './helpers/cuda-emu.js';
import { runAll } from './helpers/model-runner.js';
import { emulatorSkip, needsCudaDevice } from './helpers/cuda-skip.js';
import { testSeed } from './helpers/seed.js';

const native = loadNative();

const backends: { label: string; cuda: () => CudaAddon | undefined; skip: string | false }[] = [
  { label: 'emulator', cuda: () => createCudaEmulator(), skip: emulatorSkip },
  // The copy stream's work held back until something orders it: a missing wait reads an unfilled slot.
  { label: 'emulator, lazy streams', cuda: () => withLazyStreams(createCudaEmulator()), skip: emulatorSkip },
  {
    label: 'gpu', cuda: () => undefined,
    skip: needsCudaDevice,
  },
];

for (const b of backends) {
  for (const name of ['mixtral', 'qwen2_moe', 'deepseek_v3', 'longcat_flash', 'glm4_moe', 'minimax_m2', 'gpt_oss', 'qwen3_next',
    'qwen3_5_moe_text']) {
    test(`device expert cache (${b.label}) on ${name}: 25% and 50% under eam, lru, lfu equal resident, bit for bit`, { skip: b.skip }, async () => {
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
          await off.save();
          assert.equal((await readTrace(traceDir)).steps.length, got.logits.length);
        } finally {
          off.dispose();
          loaded.model.dispose();
        }
      }
    });
  }
}

// A load into a slot must wait for compute already queued that still reads the slot (the slot's old
// expert): the copy stream waits on a mark recorded on every compute stream. The model's own flow
// syncs the compute stream (routing to the host) before each load, so the runs above cannot see a
// missing wait; here a GroupGemm reading the slot is queued on each of the model's streams (main,
// and ScMoE's side stream), then another expert is loaded into the same slot.
test('device expert cache (emulator, lazy streams): a load into a slot waits for queued compute still reading it, on every compute stream; dispose leaves no copy queued', { skip: emulatorSkip }, (t) => {
  const dir = path.join(packageRoot(), 'test', 'fixtures', 'longcat_flash');
  const cu = withLazyStreams(createCudaEmulator());
  const loaded = loadCudaModel(dir, { device: 0, loadExperts: false, cuda: cu });
  const off = attachDeviceOffloader(loaded, { policy: 'lru', fraction: 0.25, prefetch: false }, cu);
  const bufs: { dispose(): void }[] = [];
  const buffer = (bytes: number) => { const b = cu.cudaBuffer(bytes); bufs.push(b); return b; };
  const slot: SlotWeights<CudaBuffer> = { gateUp: null, down: null };
  let disposed = false;
  try {
    const streams = loaded.model.computeStreams();
    assert.equal(streams.length, 2, 'longcat_flash computes on a main and a side stream');
    const H = loaded.spec.hidden, I = loaded.spec.moe.intermediate, R = 5;
    const table = new cu.CudaExpertTable(1, H, I);
    bufs.push(table);
    const rand = mulberry32(testSeed(t));
    const xs = new Uint16Array(R * H);
    native.convert(Float32Array.from({ length: R * H }, () => rand() * 2 - 1), 'f32', xs, 'bf16');
    const x = buffer(R * H * 2), offsets = buffer(8);
    cu.cudaCopyToDevice(x, 0, xs);
    cu.cudaCopyToDevice(offsets, 0, Int32Array.from([0, R]));
    /** y [R, H] of the expert in the slot, by a GroupGemm queued on `st` and read back after `between`. */
    const ffn = (st: CudaStream | null, between: () => void): Float32Array => {
      const y = buffer(R * H * 4), hs = buffer(R * I * 2);
      cu.cudaGroupGemmFfn(x, offsets, table, R, hs, y, null, st);
      between();
      st?.synchronize();
      const out = new Float32Array(R * H);
      cu.cudaCopyToHost(out, y, 0);
      return out;
    };
    const load = (expert: number) => off.store.wait(off.store.submit(0, expert, slot, 0));
    load(1);
    table.set(0, slot.gateUp!, slot.down!);
    const expert1 = ffn(null, () => {});
    load(0);
    const expert0 = ffn(null, () => {});
    assert.notDeepEqual(expert0, expert1, 'two experts give different outputs');
    streams.forEach((st, i) => {
      load(0);
      // Queued on st, not run yet: then expert 1 is loaded into the slot it reads (an eviction).
      const got = ffn(st, () => load(1));
      assert.deepEqual(got, expert0, `stream ${i}: the queued GEMM read expert 0, not the expert loaded after it`);
      assert.deepEqual(ffn(st, () => {}), expert1, `stream ${i}: the slot then holds expert 1`);
    });
    // Disposed with a load still queued: the store finishes its copies before it lets go of the copy
    // stream (they would still write the slot and read pinned memory that is being freed).
    off.store.submit(0, 2, slot, 0);
    off.dispose();
    disposed = true;
    assert.equal(lazyWorkLeftOnDispose(cu), 0, 'work left queued on a disposed stream');
  } finally {
    for (const b of bufs) b.dispose();
    slot.gateUp?.dispose();
    slot.down?.dispose();
    if (!disposed) off.dispose();
    loaded.model.dispose();
  }
});
