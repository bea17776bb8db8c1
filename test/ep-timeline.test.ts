// The ep bench's pipeline timeline (bench/ep-timeline.ts) on the mixtral fixture over 2 in-process
// ranks: at PN 2 every MoE layer has each chunk's dispatch, expert GEMM and combine, in pipeline
// order, the comm thread runs one op at a time, the instrumentation leaves nothing behind, and the
// spans render as a timeline plot.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';

import { COMM_LANE, MAIN_LANE, PIPELINE_COLORS, PIPELINE_PHASES, recordPipeline } from '../bench/ep-timeline.js';
import { startExpertRanks } from '../src/dist/expert-ranks.js';
import { loadModel } from '../src/model/load.js';
import { MoeLayer } from '../src/moe/moe-layer.js';
import { packageRoot } from '../src/native/index.js';
import { timelineChart } from '../src/plot/charts.js';
import { renderPlot } from '../src/plot/render.js';
import { DirectRunner } from './helpers/model-runner.js';

test('recordPipeline: each chunk\'s dispatch, expert GEMM and combine per MoE layer, in pipeline order', async () => {
  const dir = path.join(packageRoot(), 'test', 'fixtures', 'mixtral');
  const ranks = startExpertRanks(dir, 2, false, 60_000);
  try {
    await ranks.ready;
    const { model } = loadModel(dir, { fast: false, comm: ranks.comm, loadExpert: (_l, e) => ranks.comm.ownsExpert(e) });
    try {
      model.setPipelineChunks(2);
      const runner = new DirectRunner(model, 16, 8);
      const prompt = Array.from({ length: 12 }, (_, i) => 3 + i);
      const L = model.moeLayers.length;
      const spans = recordPipeline(model, ranks.comm, () => { runner.step([runner.newSeq()], [prompt], false); });
      for (let l = 0; l < L; l++) {
        const of = (lane: string, phase: string) => spans.filter((s) => s.group === `MoE layer ${l}` && s.lane === lane && s.phase === phase);
        const dispatch = of(COMM_LANE, 'dispatch'), combine = of(COMM_LANE, 'combine'), gemm = of(MAIN_LANE, 'expert GEMM');
        assert.deepEqual([dispatch, gemm, combine].map((x) => x.map((s) => s.label)), [['0', '1'], ['0', '1'], ['0', '1']], `layer ${l}`);
        for (const c of [0, 1]) {
          // A chunk's GEMMs start after its rows arrived and end before its combine was queued.
          assert.ok(gemm[c]!.startMs >= dispatch[c]!.endMs - 0.05, `layer ${l} chunk ${c}: GEMM after its dispatch`);
          assert.ok(combine[c]!.startMs >= gemm[c]!.endMs - 0.05, `layer ${l} chunk ${c}: combine after its GEMM`);
        }
        const comm = spans.filter((s) => s.group === `MoE layer ${l}` && s.lane === COMM_LANE).sort((a, b) => a.startMs - b.startMs);
        for (let i = 1; i < comm.length; i++) assert.ok(comm[i]!.startMs >= comm[i - 1]!.endMs - 1e-9, 'one op at a time on the comm thread');
        assert.ok(spans.every((s) => s.endMs >= s.startMs && s.startMs >= 0));
      }
      // Nothing left patched: the instance methods are the prototype's again.
      for (const moe of model.moeLayers) assert.equal(Object.prototype.hasOwnProperty.call(moe, 'forward'), false);
      assert.equal(model.moeLayers[0]!.forward, MoeLayer.prototype.forward);
      assert.equal(Object.prototype.hasOwnProperty.call(ranks.comm, 'dispatchChunk'), false);
      const r = await renderPlot(timelineChart({ title: 'pipeline', spans, phases: PIPELINE_PHASES, colors: PIPELINE_COLORS,
        xTitle: 'time from the MoE layer start (ms)', laneTitle: 'thread', machine: 'test', date: new Date(0) }));
      assert.ok(r.textBoxes.some((b) => b.role === 'axis-title' && b.text === 'thread'));
      for (const p of ['dispatch', 'expert GEMM', 'combine']) assert.ok(r.svg.includes(`>${p}</text>`), `legend holds ${p}`);
    } finally {
      model.dispose();
    }
  } finally {
    await ranks.stop();
  }
});
