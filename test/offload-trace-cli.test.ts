// `expertd trace summary | heatmap | replay` on a synthetic trace folder with known structure:
// the clusters found are the prompt families, the heatmap holds each layer's expert shares, replay prints
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

/** Per layer, the share of the layer's routed tokens each expert got, summed from the raw steps. */
function sharesOf(only?: string): number[][] {
  const c = Array.from({ length: 6 }, () => new Array<number>(32).fill(0));
  for (const st of trace.steps) for (const r of st.requests) {
    if (only !== undefined && r.id !== only) continue;
    r.layers.forEach((row, l) => { for (let i = 0; i < row.length; i += 2) c[l]![row[i]!]! += row[i + 1]!; });
  }
  return c.map((row) => { const s = row.reduce((x, y) => x + y, 0); return row.map((v) => v / s); });
}

/** The heatmap's cells as its .vl.json spec holds them: [layer][expert]. */
function specCells(file: string): { cells: number[][]; title: string } {
  const spec = JSON.parse(fs.readFileSync(file, 'utf8')) as { title: { text: string }; data: { values: { row: number; col: number; value: number }[] } };
  const cells = Array.from({ length: 6 }, () => new Array<number>(32).fill(NaN));
  for (const v of spec.data.values) cells[v.row]![v.col] = v.value;
  return { cells, title: spec.title.text };
}

function assertClose(got: number[][], want: number[][]): void {
  got.forEach((row, l) => row.forEach((v, e) => assert.ok(Math.abs(v - want[l]![e]!) < 1e-6, `layer ${l} expert ${e}: ${v} vs ${want[l]![e]}`)));
}

test('heatmap: a PNG and its Vega-Lite spec of every layer\'s expert shares, titled with the model', async () => {
  const out = path.join(dir, 'heat.png');
  const { code, out: printed } = await capture(() => traceCommand(['heatmap', '--trace-dir', dir, '--out', out, '--json']));
  assert.equal(code, 0);
  const info = JSON.parse(printed) as { out: string; spec: string; format: string; width: number; height: number };
  assert.deepEqual([info.out, info.spec, info.format], [out, path.join(dir, 'heat.vl.json'), 'png']);
  const png = PNG.sync.read(fs.readFileSync(out));
  assert.deepEqual([png.width, png.height], [info.width, info.height]);
  assert.ok(png.width > 32 * 4 && png.height > 6 * 8, `${png.width}x${png.height}`);
  assert.equal(fs.existsSync(path.join(dir, 'heat.svg')), false, 'only the asked format');
  const { cells, title } = specCells(info.spec);
  assertClose(cells, sharesOf());
  assert.match(title, new RegExp(`Expert activation: ${trace.meta.model}, 24 requests`));
});

test('heatmap --request ID --format svg: one request\'s matrix, labelled axes and colour legend as SVG text', async () => {
  const id = trace.steps[0]!.requests[0]!.id;
  const base = path.join(dir, 'one');
  const { code } = await capture(() => traceCommand(['heatmap', '--trace-dir', dir, '--out', base, '--request', id, '--format', 'svg']));
  assert.equal(code, 0);
  const svg = fs.readFileSync(`${base}.svg`, 'utf8');
  for (const t of ['MoE layer', 'expert', 'share of the layer&#39;s routed tokens', `request ${id}`])
    assert.ok(svg.includes(t) || svg.includes(t.replace('&#39;', "'")), `the SVG holds '${t}'`);
  const { cells } = specCells(`${base}.vl.json`);
  const want = sharesOf(id);
  assert.notDeepEqual(want, sharesOf(), 'one request differs from the whole trace');
  assertClose(cells, want);
  await assert.rejects(traceCommand(['heatmap', '--trace-dir', dir, '--out', base, '--request', 'no-such-id']),
    (e: Error) => e instanceof UsageError && /--request no-such-id is not in the trace at .* \(24 requests, e\.g\. /.test(e.message));
  await assert.rejects(traceCommand(['heatmap', '--trace-dir', dir, '--out', `${base}.png`, '--format', 'svg']),
    /ends in \.png but --format is svg/);
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
