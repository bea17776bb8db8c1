// Expert parallelism in one process (--expert-parallel N on the CPU): rank 0 in this thread, ranks
// 1..N-1 in worker threads, a loopback group between them. Each rank holds only its slice of the
// routed experts; every fixture's logits and routing equal the single-rank model's bit for bit
// (f32 and bf16, each against one rank in its mode), with 2 and 3 ranks (uneven slices), through
// prompts, batched steps and decoding.
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';

import { loadCudaModel, loadModel } from '../src/model/load.js';
import { expertSlice } from '../src/moe/ep-comm.js';
import { startDeviceExpertRanks, startExpertRanks } from '../src/dist/expert-ranks.js';
import { packageRoot } from '../src/native/index.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { startDaemon, stopDaemon } from './helpers/daemon.js';
import { runAll } from './helpers/model-runner.js';
import { testSeed } from './helpers/seed.js';

test('expertSlice splits experts contiguously, sizes differing by at most one', () => {
  assert.deepEqual([0, 1, 2].map((r) => expertSlice(8, 3, r)), [[0, 3], [3, 6], [6, 8]]);
  assert.deepEqual([0, 1].map((r) => expertSlice(60, 2, r)), [[0, 30], [30, 60]]);
  assert.deepEqual(expertSlice(4, 4, 3), [3, 4]);
});

// Every fixture, in both compute modes: bf16 is compared with one rank in bf16 (the same kernels
// on the same rows, so the same bits). One test per fixture keeps the one-rank reference of each
// mode loaded once for both world sizes.
const fixtures = readdirSync(path.join(packageRoot(), 'test', 'fixtures'), { withFileTypes: true })
  .filter((d) => d.isDirectory()).map((d) => d.name).sort();

test('the EP fixture list is every fixture', () => {
  assert.deepEqual(fixtures, ['deepseek_v2', 'deepseek_v3', 'glm4_moe', 'gpt_oss', 'longcat_flash', 'minimax_m2', 'mixtral', 'olmoe',
    'qwen2_moe', 'qwen3_5_moe_text', 'qwen3_moe', 'qwen3_next']);
});

for (const name of fixtures) {
  test(`${name}: 2 and 3 expert ranks equal one rank, bit for bit (f32 and bf16)`, async () => {
    const dir = path.join(packageRoot(), 'test', 'fixtures', name);
    let f32Logits: Float32Array[] = [];
    for (const fast of [false, true]) {
      const mode = fast ? 'bf16' : 'f32';
      const single = loadModel(dir, { fast });
      const want = runAll(single.model, null);
      single.model.dispose();
      // The bf16 reference must really be the other mode, or the bf16 half would test f32 twice.
      if (fast) assert.notDeepEqual(want.logits, f32Logits, `${name}: bf16 logits differ from f32`);
      else f32Logits = want.logits;
      for (const world of [2, 3]) {
        const ranks = startExpertRanks(dir, world, fast, 60_000);
        try {
          await ranks.ready;
                    const loaded = loadModel(dir, { fast, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
          try {
            const got = runAll(loaded.model, null);
            assert.deepEqual(got.tokens, want.tokens, `${name} ${mode} x${world}: greedy tokens`);
            got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${name} ${mode} x${world}: logits of step ${i}`));
            assert.ok(ranks.comm.bytesSent > 0, 'rows went to the other ranks');
          } finally {
            loaded.model.dispose();
          }
        } finally {
          await ranks.stop();
        }
      }
    }
  });
}

test('an expert rank that cannot load fails startup with its reason', async () => {
  const ranks = startExpertRanks(path.join(packageRoot(), 'test', 'fixtures', 'mixtral'), 2, false, 60_000);
  await ranks.ready;
  await ranks.stop();
  assert.throws(() => startExpertRanks(path.join(packageRoot(), 'test', 'fixtures', 'mixtral'), 9, false), /only 8 routed experts/);
  assert.throws(() => startExpertRanks(path.join(packageRoot(), 'test', 'fixtures', 'mixtral'), 1, false), /expected an integer >= 2/);
});

test('GroupExpertComm and DeviceExpertComm: every rank routing rows to every expert gets each row back in place (2-4 ranks)', async (t) => {
  const seed = testSeed(t, 0, 'base of each rank\'s routing seed');
  for (const [world, device] of [[2, false], [3, false], [4, false], [2, true], [3, true]] as [number, boolean][]) {
    const group = `ep-comm-test-${process.pid}-${world}-${device}`;
    const ncclId = device ? createCudaEmulator().cudaNcclUniqueId() : undefined;
    const results = await Promise.all(Array.from({ length: world }, (_, rank) => new Promise<{ ok: boolean; checked?: number; error?: string }>((resolve, reject) => {
      const w = new Worker(new URL('./helpers/ep-rank-worker.js', import.meta.url), {
        workerData: { group, world, rank, E: 7, Z: device ? 0 : 2, H: device ? 8 : 5, steps: 6, seed, ...(ncclId ? { ncclId } : {}) },
      });
      w.once('message', resolve);
      w.once('error', reject);
    })));
    results.forEach((r, rank) => assert.ok(r.ok, `world ${world}${device ? ' (device)' : ''} rank ${rank}: ${r.error}`));
    assert.ok(results.every((r) => (r.checked ?? 0) > 0));
  }
});

test('expertd serve --expert-parallel 2 answers as one rank, counts all2all bytes, drains and exits 0', async () => {
  const run = async (extra: string[]) => {
    const d = await startDaemon(extra);
    try {
      const texts = await Promise.all(['The weather today', 'Once upon a time', 'Hello'].map((prompt) =>
        d.client.completions.create({ model: 'expertd-demo', prompt, max_tokens: 8, temperature: 0 }).then((c) => c.choices[0]!.text)));
      const metrics = await (await fetch(`${d.base}/metrics`)).text();
      return { texts, metrics, exit: await stopDaemon(d) };
    } catch (e) {
      d.proc.kill('SIGKILL');
      throw e;
    }
  };
  const ep = await run(['--expert-parallel', '2']);
  const one = await run([]);
  assert.deepEqual(ep.texts, one.texts);
  assert.equal(ep.exit, 0);
  const bytes = /^expertd_all2all_bytes_total (\S+)$/m.exec(ep.metrics);
  assert.ok(bytes && Number(bytes[1]) > 0, 'all2all bytes counted');
  assert.match(one.metrics, /^expertd_all2all_bytes_total 0$/m);
  // Rank 0 computes its own experts between dispatch and combine: some of the window is busy.
  const overlap = /^expertd_comm_overlap_ratio (\S+)$/m.exec(ep.metrics);
  assert.ok(overlap && Number(overlap[1]) > 0 && Number(overlap[1]) <= 1, `overlap ratio ${overlap?.[1]}`);
});

for (const name of ['qwen2_moe', 'longcat_flash', 'gpt_oss', 'qwen3_next', 'qwen3_5_moe_text']) {
  test(`${name} on devices (emulated, NCCL as loopback): 2 expert ranks equal one device, bit for bit`, async () => {
    const dir = path.join(packageRoot(), 'test', 'fixtures', name);
    const single = loadCudaModel(dir, { device: 0, cuda: createCudaEmulator() });
    const want = runAll(single.model, null);
    single.model.dispose();
    const cuda = createCudaEmulator();
    const ranks = startDeviceExpertRanks(dir, 2, cuda, path.join(packageRoot(), 'dist', 'test', 'helpers', 'cuda-emu.js'), 60_000);
    try {
      await ranks.ready;
      const loaded = loadCudaModel(dir, { device: 0, cuda, ep: ranks.comm });
      try {
        const got = runAll(loaded.model, null);
        assert.deepEqual(got.tokens, want.tokens, `${name}: greedy tokens`);
        got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${name}: logits of step ${i}`));
        assert.ok(ranks.comm.bytesSent > 0, 'rows went to the other rank');
      } finally {
        loaded.model.dispose();
      }
    } finally {
      await ranks.stop();
    }
  });
}
