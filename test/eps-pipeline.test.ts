// EPS-MoE's pipeline on in-process ranks: a MoE layer's tokens split into PN chunks whose dispatch
// and combine travel on the comm thread while other chunks' expert GEMMs run. Outputs are the same
// bit for bit for every PN (1, 2, 3, 4 and more chunks than tokens), on every fixture, with 1 to 3
// ranks, with either expert kernel, and through the daemon.
import assert from 'node:assert/strict';
import { readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { loadModel } from '../src/model/load.js';
import { startExpertRanks } from '../src/dist/expert-ranks.js';
import { EpsPlanner } from '../src/moe/eps-planner.js';
import { chunkOverheadOf, type PipelineChunks } from '../src/moe/moe-layer.js';
import { packageRoot } from '../src/native/index.js';
import { pipelineChunks } from '../src/cli/resolve.js';
import { startDaemon, stopDaemon } from './helpers/daemon.js';
import { runAll } from './helpers/model-runner.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const fixtures = readdirSync(fixturesDir).filter((f) => statSync(path.join(fixturesDir, f)).isDirectory() &&
  readdirSync(path.join(fixturesDir, f)).includes('config.json'));
// 64 chunks: more chunks than tokens in every step (most chunks empty on some ranks).
const PNS: PipelineChunks[] = [2, 3, 4, 64];

test('every fixture is covered', () => {
  assert.ok(fixtures.length >= 7, `fixtures: ${fixtures.join(', ')}`);
});

for (const name of fixtures) {
  test(`${name}: one rank, PN 1 to more chunks than tokens, bit for bit (f32, and bf16 fast mode)`, () => {
    const dir = path.join(fixturesDir, name);
    for (const fast of [false, true]) {
      const { model } = loadModel(dir, { fast });
      try {
        model.setPipelineChunks(1);
        const want = runAll(model, null);
        for (const pn of PNS) {
          model.setPipelineChunks(pn);
          const got = runAll(model, null);
          assert.deepEqual(got.tokens, want.tokens, `${name} PN ${pn}${fast ? ' fast' : ''}: greedy tokens`);
          got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${name} PN ${pn}${fast ? ' fast' : ''}: logits of step ${i}`));
          assert.deepEqual(new Set(model.layerPlans().map((p) => p.chunks)), new Set([pn]), 'the plan records PN');
        }
      } finally {
        model.dispose();
      }
    }
  });
}

for (const name of fixtures) {
  test(`${name}: 2 and 3 expert ranks, every PN, equal one rank bit for bit (f32)`, async () => {
    const dir = path.join(fixturesDir, name);
    const single = loadModel(dir, { fast: false });
    single.model.setPipelineChunks(1);
    const want = runAll(single.model, null);
    single.model.dispose();
    for (const world of [2, 3]) {
      const ranks = startExpertRanks(dir, world, false, 60_000);
      try {
        await ranks.ready;
                const loaded = loadModel(dir, { fast: false, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
        try {
          for (const pn of [1, ...PNS]) {
            loaded.model.setPipelineChunks(pn);
            const before = ranks.comm.bytesSent;
            const got = runAll(loaded.model, null);
            assert.deepEqual(got.tokens, want.tokens, `${name} x${world} PN ${pn}: greedy tokens`);
            got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${name} x${world} PN ${pn}: logits of step ${i}`));
            assert.ok(ranks.comm.bytesSent > before, 'rows went to the other ranks');
          }
          const d = ranks.comm.takeDelta();
          assert.ok(d.seconds > 0 && d.hidden !== null && d.hidden >= 0 && d.hidden <= 1, `hidden share ${d.hidden}`);
        } finally {
          loaded.model.dispose();
        }
      } finally {
        await ranks.stop();
      }
    }
  });
}

test('DenseGemm experts too: every PN equals PN 1 bit for bit over 2 ranks (qwen2_moe, shared expert)', async () => {
  const dir = path.join(fixturesDir, 'qwen2_moe');
  const ranks = startExpertRanks(dir, 2, false, 60_000);
  try {
    await ranks.ready;
        const loaded = loadModel(dir, { fast: false, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
    try {
      loaded.model.setExpertKernel('dense');
      loaded.model.setPipelineChunks(1);
      const want = runAll(loaded.model, null);
      for (const pn of [3, 64]) {
        loaded.model.setPipelineChunks(pn);
        const got = runAll(loaded.model, null);
        got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `dense PN ${pn}: logits of step ${i}`));
        assert.deepEqual(loaded.model.layerPlans()[0], { chunks: pn, kernel: 'dense' });
      }
    } finally {
      loaded.model.dispose();
    }
  } finally {
    await ranks.stop();
  }
});

test('planner with ranks: only rows leaving this rank travel, and a chunk takes as long as the slowest rank\'s slice', () => {
  // 0.01 ms per row at every calibrated point (powers of two): expert time ~ rows.
  const rows = Array.from({ length: 11 }, (_, i) => 2 ** i);
  const table = { key: 'test', rows, groupMs: rows.map((r) => r * 0.01), denseMs: rows.map((r) => r * 0.02) };
  const slow = { bytesPerMs: 1e5, latencyMs: 0 };
  const p = new EpsPlanner(table, slow, null, 8);
  const slices: [number, number][] = [[0, 2], [2, 4]];
  // Every row stays on rank 0: nothing travels, nothing to overlap.
  assert.equal(p.plan([64, 64, 0, 0], 4096, { slices, self: 0 }).chunks, 1);
  // The same rows seen from rank 1: all of them travel, so chunks pay off.
  const remote = p.plan([64, 64, 0, 0], 4096, { slices, self: 1 });
  assert.ok(remote.chunks > 1, `${remote.chunks} chunk(s)`);
  // Experts: the slowest slice sets a chunk's time (256 rows on rank 1 > 2 rows on rank 0).
  const fast = new EpsPlanner(table, { bytesPerMs: 1e12, latencyMs: 0 }, null, 1);
  const skewed = fast.plan([1, 1, 128, 128], 4096, { slices, self: 0 });
  assert.ok(Math.abs(skewed.totalMs - fast.expertMs('group', [128, 128])) < 1e-4, `${skewed.totalMs}`);
});

test('auto: the planner picks PN per layer and step from the link; a slow simulated link pipelines, outputs unchanged', async () => {
  const dir = path.join(fixturesDir, 'mixtral');
  const ranks = startExpertRanks(dir, 2, false, 60_000);
  try {
    await ranks.ready;
        const loaded = loadModel(dir, { fast: false, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
    try {
      const m = loaded.model;
      m.setPipelineChunks(1);
      const want = runAll(m, null);
      // A cost table where every expert row costs 1 ms: a link of 1 MB/s makes all2all dominate.
      const table = { key: 'test', rows: [1, 1024], groupMs: [1, 1024], denseMs: [2, 2048] };
      for (const layer of m.moeLayers) layer.planner = new EpsPlanner(table);
      ranks.comm.setSimulatedLink(0.001);
      m.setPipelineChunks('auto');
      const got = runAll(m, null);
      got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `auto: logits of step ${i}`));
      // The last step decoded a couple of tokens: PN is capped by the tokens.
      const plans = m.layerPlans();
      assert.ok(plans.every((p) => p.chunks >= 1 && p.chunks <= 8) && plans.some((p) => p.chunks > 1), JSON.stringify(plans));
      // The layers measured the per-chunk overhead: PN 1 and the planner's wish in turn at first.
      const seen = chunkOverheadOf(ranks.comm).recorded();
      assert.ok((seen.get(1) ?? 0) > 0 && [...seen.keys()].some((pn) => pn > 1), JSON.stringify([...seen]));
      const model = ranks.comm.commModel();
      assert.equal(model.bytesPerMs, 1e3);
      const T = 8;
      const counts = Array.from({ length: 8 }, () => T * 2 / 8);
      const pick = new EpsPlanner(table, model, null, 8).plan(counts, m.spec.hidden * 4, { slices: [[0, 4], [4, 8]], self: 0 });
      assert.ok(pick.chunks > 1, `comm-bound layer: ${pick.chunks} chunk(s)`);
    } finally {
      ranks.comm.setSimulatedLink(0);
      loaded.model.dispose();
    }
  } finally {
    await ranks.stop();
  }
});

test('expertd serve --expert-parallel 2 --pipeline-chunks 3 answers as one rank and reports PN, kernel and the hidden all2all share', async () => {
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
  const one = await run(['--expert-kernel', 'group']);
  const ep = await run(['--expert-parallel', '2', '--pipeline-chunks', '3', '--expert-kernel', 'group']);
  assert.deepEqual(ep.texts, one.texts);
  assert.equal(ep.exit, 0);
  const layers = [...ep.metrics.matchAll(/^expertd_moe_pipeline_chunks\{layer="(\d+)",kernel="(\w+)"\} (\S+)$/gm)];
  assert.ok(layers.length > 0, 'a PN gauge per MoE layer');
  for (const m of layers) assert.deepEqual([m[2], m[3]], ['group', '3'], `layer ${m[1]}`);
  const hidden = /^expertd_all2all_hidden_ratio (\S+)$/m.exec(ep.metrics);
  assert.ok(hidden && Number(hidden[1]) >= 0 && Number(hidden[1]) <= 1, `hidden share ${hidden?.[1]}`);
  // One rank: one chunk (auto, nothing to hide), nothing hidden or waited for.
  assert.match(one.metrics, /^expertd_moe_pipeline_chunks\{layer="0",kernel="group"\} 1$/m);
});

test('--pipeline-chunks: auto or an integer from 1 to 256', () => {
  assert.equal(pipelineChunks('auto'), 'auto');
  assert.equal(pipelineChunks('4'), 4);
  assert.equal(pipelineChunks('256'), 256);
  for (const bad of ['0', '257', '2.5', 'x', '']) assert.throws(() => pipelineChunks(bad), { message: `--pipeline-chunks: '${bad}' is not auto or an integer from 1 to 256` });
});

test('ScMoE: the shortcut MoE overlapped with the dense sub-blocks equals running it where it is routed (longcat_flash, 2 ranks)', async () => {
  const dir = path.join(fixturesDir, 'longcat_flash');
  const ranks = startExpertRanks(dir, 2, false, 60_000);
  try {
    await ranks.ready;
        const { model } = loadModel(dir, { fast: false, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
    try {
      model.setPipelineChunks(2);
      model.shortcutOverlap = false;
      const plain = runAll(model, null);
      model.shortcutOverlap = true;
      const overlapped = runAll(model, null);
      overlapped.logits.forEach((l, i) => assert.deepEqual(l, plain.logits[i], `logits of step ${i}`));
    } finally {
      model.dispose();
    }
  } finally {
    await ranks.stop();
  }
});
