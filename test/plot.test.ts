// Every plot kind of src/plot rendered from small fixed data: the PNG decodes at the SVG's size and
// has dark (text) pixels inside the boxes vega laid out for the axis titles and the legend, the
// SVG holds the axis titles as text, and the same plot rendered without its font fails that check.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { PNG } from 'pngjs';
import type { TopLevelSpec } from 'vega-lite';

import { heatmapChart, seriesChart, timelineChart, wantsLog, type Span } from '../src/plot/charts.js';
import { plotFiles, renderPlot, writePlot, type RenderedPlot, type TextBox } from '../src/plot/render.js';

const DATE = new Date('2026-12-01T12:00:00Z');
const meta = { machine: 'test machine', date: DATE };

const kinds: { name: string; spec: TopLevelSpec; axisTitles: string[]; legendTitle: string }[] = [
  {
    name: 'line, log y',
    spec: seriesChart({
      ...meta, title: 'Expert FFN', x: [1, 8, 64], xTitle: 'tokens per step', yTitle: 'throughput (GFLOP/s)', legendTitle: 'kernel',
      series: [{ name: 'group GEMM', values: [2, 30, 400], lo: [1.8, 28, 380], hi: [2.2, 33, 420] },
        { name: 'bf16 peak (measured)', values: [900, 900, 900], dashed: true }],
    }),
    axisTitles: ['tokens per step', 'throughput (GFLOP/s)'], legendTitle: 'kernel',
  },
  {
    name: 'grouped bars',
    spec: seriesChart({
      ...meta, title: 'tokens/s', kind: 'bar', x: ['prefill 512', 'decode b1'], xTitle: 'workload', yTitle: 'speed (tokens/s)', legendTitle: 'engine',
      series: [{ name: 'expertd', values: [900, 30] }, { name: 'HF bf16', values: [400, null] }],
    }),
    axisTitles: ['workload', 'speed (tokens/s)'], legendTitle: 'engine',
  },
  {
    name: 'heatmap',
    spec: heatmapChart({
      ...meta, title: 'Expert activation', rowTitle: 'MoE layer', colTitle: 'expert', colorTitle: 'share of routed tokens', colorFormat: '.0%',
      cells: [[0.5, 0.25, 0.25, 0], [0, 0, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]],
    }),
    axisTitles: ['MoE layer', 'expert'], legendTitle: 'share of routed tokens',
  },
  {
    name: 'timeline',
    spec: timelineChart({
      ...meta, title: 'pipeline', xTitle: 'time from the layer start (ms)', laneTitle: 'thread', phases: ['dispatch', 'expert GEMM', 'combine'],
      spans: ([[0, 'comm thread', 'dispatch', 0, 1], [0, 'main thread', 'expert GEMM', 1, 3], [0, 'comm thread', 'combine', 3, 4],
        [1, 'comm thread', 'dispatch', 4, 5], [1, 'main thread', 'expert GEMM', 5, 7], [1, 'comm thread', 'combine', 7, 8]] as const)
        .map(([l, lane, phase, a, b]): Span => ({ group: `MoE layer ${l}`, lane, phase, label: '0', startMs: a, endMs: b })),
    }),
    axisTitles: ['time from the layer start (ms)', 'thread'], legendTitle: 'phase',
  },
];

/** Dark pixels (luminance < 110, i.e. text, not grid lines or light fills) inside a box. */
function darkPixels(png: PNG, b: TextBox): number {
  let n = 0;
  for (let y = Math.max(0, Math.floor(b.y1)); y < Math.min(png.height, Math.ceil(b.y2)); y++)
    for (let x = Math.max(0, Math.floor(b.x1)); x < Math.min(png.width, Math.ceil(b.x2)); x++) {
      const i = (y * png.width + x) * 4;
      if (0.299 * png.data[i]! + 0.587 * png.data[i + 1]! + 0.114 * png.data[i + 2]! < 110) n++;
    }
  return n;
}

/** The boxes that must hold text: every axis title and the legend's title and labels. */
function textProblems(r: RenderedPlot, axisTitles: string[], legendTitle: string): string[] {
  const png = PNG.sync.read(r.png);
  const problems: string[] = [];
  const want = (role: string, text?: string) => r.textBoxes.filter((b) => b.role === role && (text === undefined || b.text === text));
  for (const t of axisTitles) {
    const boxes = want('axis-title', t);
    if (boxes.length === 0) problems.push(`no axis title '${t}' laid out`);
    for (const b of boxes) if (darkPixels(png, b) < 20) problems.push(`axis title '${t}' drew ${darkPixels(png, b)} dark pixels`);
  }
  const lt = want('legend-title', legendTitle);
  if (lt.length === 0) problems.push(`no legend title '${legendTitle}' laid out`);
  for (const b of lt) if (darkPixels(png, b) < 20) problems.push(`legend title drew ${darkPixels(png, b)} dark pixels`);
  const labels = want('legend-label');
  if (labels.length === 0) problems.push('no legend labels laid out');
  for (const b of labels) if (darkPixels(png, b) < 5) problems.push(`legend label '${b.text}' drew ${darkPixels(png, b)} dark pixels`);
  return problems;
}

for (const k of kinds) {
  test(`plot ${k.name}: PNG at the SVG's size, text where the axis titles and legend are, titles in the SVG`, async () => {
    const r = await renderPlot(k.spec);
    const png = PNG.sync.read(r.png);
    const m = /<svg[^>]* width="(\d+)" height="(\d+)"/.exec(r.svg);
    assert.ok(m, 'the SVG states its size');
    assert.equal(png.width, Number(m[1]));
    assert.equal(png.height, Number(m[2]));
    assert.ok(png.width >= 300 && png.height >= 150, `${png.width}x${png.height}`);
    assert.deepEqual(textProblems(r, k.axisTitles, k.legendTitle), []);
    for (const t of [...k.axisTitles, k.legendTitle, 'test machine · 2026-12-01 12:00 UTC'])
      assert.match(r.svg, new RegExp(`<text[^>]*>${t.replace(/[()]/g, '\\$&')}</text>`), `the SVG holds '${t}' as text`);
  });
}

test('a plot whose font is missing fails the text check (no system fonts to fall back on)', async () => {
  const k = kinds[0]!;
  const r = await renderPlot(k.spec, { fontFiles: [] });
  const problems = textProblems(r, k.axisTitles, k.legendTitle);
  assert.ok(problems.some((p) => /axis title 'tokens per step' drew 0 dark pixels/.test(p)), problems.join('; '));
});

test('PNG scale multiplies the size and the text boxes', async () => {
  const k = kinds[2]!;
  const [one, two] = [await renderPlot(k.spec), await renderPlot(k.spec, { scale: 2 })];
  assert.equal(two.width, one.width * 2);
  assert.equal(two.height, one.height * 2);
  assert.deepEqual(textProblems(two, k.axisTitles, k.legendTitle), []);
});

test('writePlot writes .png, .svg and the .vl.json spec side by side', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-plot-'));
  try {
    const out = await writePlot(path.join(dir, 'sub', 'p.png'), kinds[1]!.spec);
    assert.deepEqual(out.png, path.join(dir, 'sub', 'p.png'));
    assert.deepEqual(plotFiles(path.join(dir, 'q.svg')), { png: path.join(dir, 'q.png'), svg: path.join(dir, 'q.svg'), spec: path.join(dir, 'q.vl.json') });
    const png = PNG.sync.read(fs.readFileSync(out.png));
    assert.equal(png.width, out.width);
    assert.match(fs.readFileSync(out.svg, 'utf8'), /^<svg /);
    const spec = JSON.parse(fs.readFileSync(out.spec, 'utf8')) as { $schema: string; data: { values: unknown[] } };
    assert.match(spec.$schema, /vega-lite/);
    assert.equal(spec.data.values.length, 3, 'the data rides inline (null points left out)');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('log axes where the values span two decades or more, linear otherwise', () => {
  assert.equal(wantsLog([1, 50], 'auto'), false);
  assert.equal(wantsLog([1, 100], 'auto'), true);
  assert.equal(wantsLog([0, 1000], 'auto'), false, 'zero cannot sit on a log axis');
  assert.equal(wantsLog([1, 2], true), true);
  const yScale = (s: TopLevelSpec) => JSON.stringify((s as unknown as { layer: { encoding: { y: { scale: unknown } } }[] }).layer[0]!.encoding.y.scale);
  assert.match(yScale(kinds[0]!.spec), /"type":"log"/);
  assert.doesNotMatch(yScale(seriesChart({ ...meta, title: 't', x: ['a', 'b'], xTitle: 'x (s)', yTitle: 'y (s)', series: [{ name: 's', values: [1, 3] }] })), /log/);
});
