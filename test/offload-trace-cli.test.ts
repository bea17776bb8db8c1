// `expertd trace summary | heatmap | replay` on a synthetic trace folder with known structure:
// the clusters found are the prompt families, the PNG decodes to the right size, replay prints
// every policy, and usage errors are clear.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { PNG } from 'pngjs';

import { traceCommand, traceHelp, similarityStructure, requestEams } from '../src/cli/trace.js';
import { UsageError } from '../src/cli/options.js';
import { syntheticTrace, DEFAULT_SYNTHETIC } from '../src/offload/synthetic-trace.js';
import { TraceWriter } from '../src/offload/trace-writer.js';
import { fileSeed } from './helpers/seed.js';

async function capture(fn: () => Promise<number>): Promise<{ code: number; out: string }> {
  const lines: string[] = [];
  const orig = console.log;
  console.log = (...a: unknown[]) => { lines.push(a.join(' ')); };
  try {
    const code = await fn();
    return { code, out: lines.join('\n') };
  } finally {
    console.log = orig;
  }
}

const opts = { ...DEFAULT_SYNTHETIC, seed: fileSeed(DEFAULT_SYNTHETIC.seed), requests: 24, families: 3, numLayers: 6, numExperts: 32, decodeTokens: 8 };
const trace = syntheticTrace(opts);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-trace-cli-'));
const w = new TraceWriter(dir, trace.meta);
for (const s of trace.steps) w.append(s);
await w.close();

test('summary finds the prompt families as clusters (within >> across)', async () => {
  const { code, out } = await capture(() => traceCommand(['summary', '--trace-dir', dir, '--clusters', '3', '--json']));
  assert.equal(code, 0);
  const s = JSON.parse(out) as { requests: number; layers: { tokens: number }[]; similarity: { sizes: number[]; withinMean: number; acrossMean: number } };
  assert.equal(s.requests, 24);
  assert.equal(s.layers.length, 6);
  const tokensPerLayer = trace.steps.reduce((a, st) => a + st.requests.reduce((b, r) => b + r.layers[0]!.filter((_, i) => i % 2).reduce((x, y) => x + y, 0), 0), 0);
  assert.equal(s.layers[0]!.tokens, tokensPerLayer);
  assert.ok(s.similarity.withinMean > 0.7 && s.similarity.acrossMean < 0.4, JSON.stringify(s.similarity));
  // Clusters equal the families (ids carry the family).
  const eams = requestEams(trace);
  const ids = [...eams.keys()];
  const st = similarityStructure([...eams.values()], 3);
  const famSizes = [0, 1, 2].map((f) => ids.filter((id) => id.endsWith(`-f${f}`)).length).sort();
  assert.deepEqual([...st.sizes].sort(), famSizes);
  const text = await capture(() => traceCommand(['summary', '--trace-dir', dir]));
  assert.match(text.out, /24 requests \(24 finished\); no EAM collection saved/);
  assert.match(text.out, /layer {3}0: +\d+ tokens/);
});

test('heatmap writes a PNG of one row per layer and one column per expert', async () => {
  const out = path.join(dir, 'heat.png');
  const { code } = await capture(() => traceCommand(['heatmap', '--trace-dir', dir, '--out', out, '--cell', '4']));
  assert.equal(code, 0);
  const png = PNG.sync.read(fs.readFileSync(out));
  assert.equal(png.width, 32 * 4 + 2);
  assert.equal(png.height, 6 * 5 + 2);
  // Every layer's most popular expert is drawn in the darkest color.
  const dark = (x: number, y: number) => png.data[(y * png.width + x) * 4]! === 8;
  for (let l = 0; l < 6; l++) {
    const y = 1 + l * 5 + 1;
    assert.ok([...Array(32).keys()].some((e) => dark(1 + e * 4 + 1, y)), `layer ${l}`);
  }
});

test('replay prints every policy; Belady has the fewest misses', async () => {
  const { code, out } = await capture(() => traceCommand(['replay', '--trace-dir', dir, '--capacity', '0.25', '--json']));
  assert.equal(code, 0);
  const res = JSON.parse(out) as { policy: string; misses: number; hitRate: number }[];
  assert.deepEqual(res.map((r) => r.policy), ['eam', 'lru', 'lfu', 'belady']);
  const b = res.find((r) => r.policy === 'belady')!;
  for (const r of res) assert.ok(r.misses >= b.misses);
  const text = await capture(() => traceCommand(['replay', '--trace-dir', dir, '--policy', 'lru']));
  assert.match(text.out, /\| lru \| \d+\.\d% \|/);
});

test('usage errors are clear', async () => {
  await assert.rejects(traceCommand([]), (e: Error) => e instanceof UsageError && /summary, heatmap or replay/.test(e.message));
  await assert.rejects(traceCommand(['bogus']), /unknown trace subcommand 'bogus'/);
  await assert.rejects(traceCommand(['summary']), /--trace-dir DIR is required/);
  await assert.rejects(traceCommand(['replay', '--trace-dir', dir, '--policy', 'fifo']), /'fifo' is not one of eam, lru, lfu, belady, all/);
  await assert.rejects(traceCommand(['heatmap', '--trace-dir', dir]), /--out FILE.png is required/);
  await assert.rejects(traceCommand(['summary', '--trace-dir', path.join(dir, 'nope')]), /does not exist/);
  await assert.rejects(traceCommand(['summary', '--trace-dir', os.tmpdir()]), /holds no routing trace/);
  assert.match(traceHelp, /expertd trace replay/);
});
