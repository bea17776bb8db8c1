// `npm run bench -- selftest`: checks the bench's own machinery (statistics, tables, the plot
// writer, the probe and the OpenBLAS peer) so that a wrong number cannot hide behind a table.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

import { PNG } from 'pngjs';

import { seriesChart } from '../src/plot/charts.js';
import { writePlot } from '../src/plot/render.js';
import { fmt, markdownTable, measure, median, percentile, stats } from './harness.js';
import { runOpenBlasPeer } from './peers/openblas.js';
import { runProbe } from './probe/probe.js';

type Check = [string, () => void | Promise<void>];

const checks: Check[] = [
  ['percentile, median and stats', () => {
    assert.equal(median([5, 1, 3]), 3);
    assert.equal(median([4, 1, 3, 2]), 2.5);
    assert.equal(percentile([10, 20, 30, 40, 50], 0), 10);
    assert.equal(percentile([10, 20, 30, 40, 50], 1), 50);
    assert.equal(percentile([10, 20, 30, 40, 50], 0.25), 20);
    assert.ok(Math.abs(percentile(Array.from({ length: 101 }, (_, i) => i), 0.99) - 99) < 1e-9);
    const s = stats([3, 1, 2, 10]);
    assert.deepEqual([s.samples, s.medianMs, s.minMs, s.maxMs, s.meanMs], [4, 2.5, 1, 10, 4]);
    assert.throws(() => percentile([1], 1.5), { name: 'RangeError' });
    assert.throws(() => stats([]), { name: 'RangeError' });
  }],
  ['measure runs warm-up + reps, before() each time, and times only the reps', () => {
    let calls = 0;
    let befores = 0;
    const times = measure(() => { calls++; }, { warmup: 2, reps: 5, before: () => { befores++; } });
    assert.equal(times.length, 5);
    assert.equal(calls, 7);
    assert.equal(befores, 7);
    const slow = measure(() => { const t = performance.now(); while (performance.now() - t < 3); }, { warmup: 0, reps: 2 });
    assert.ok(slow.every((t) => t >= 2.5), `timed ${slow.join(', ')} ms for 3 ms of work`);
  }],
  ['markdown table and number formatting', () => {
    assert.equal(fmt(1234.5), '1235');
    assert.equal(fmt(12.345), '12.3');
    assert.equal(fmt(0.012345), '0.0123');
    assert.equal(fmt(NaN), '-');
    const t = markdownTable(['op', 'ms'], [['a|b', 1.5], ['c', null]]).split('\n');
    assert.equal(t.length, 4);
    assert.equal(t[0], '| op   |   ms |');
    assert.equal(t[1], '|:-----|-----:|');
    assert.equal(t[2], '| a\\|b | 1.50 |');
    assert.equal(t[3], '| c    |    - |');
  }],
  ['plots: a bench chart writes a decodable PNG, its SVG with the axis titles and its Vega-Lite spec', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'expertd-chart-'));
    try {
      const w = await writePlot(path.join(dir, 'c.png'), seriesChart({
        title: 'Test 1', x: [1, 8, 64], xTitle: 'tokens per step', yTitle: 'throughput (GFLOP/s)',
        series: [{ name: 'a', values: [1, 10, 100] }, { name: 'b', values: [2, null, 50], dashed: true }],
      }));
      const png = PNG.sync.read(readFileSync(w.png));
      assert.equal(png.width, w.width);
      const colors = new Set<string>();
      for (let i = 0; i < png.data.length; i += 4) colors.add(`${png.data[i]},${png.data[i + 1]},${png.data[i + 2]}`);
      assert.ok(colors.size > 20, 'lines, text and grid drawn');
      const svg = readFileSync(w.svg, 'utf8');
      for (const t of ['tokens per step', 'throughput (GFLOP/s)']) assert.ok(svg.includes(`>${t}</text>`), `SVG holds '${t}'`);
      assert.match(readFileSync(w.spec, 'utf8'), /"type": "log"/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }],
  ['probe: compiles, runs and reports plausible limits', () => {
    const l = runProbe({ quick: true });
    console.log(`  probe (quick): ${fmt(l.readBandwidthGBps)} GB/s, f32 ${fmt(l.peakF32Gflops)} GFLOP/s, ` +
      `bf16 ${l.peakBf16Gflops === null ? 'n/a' : fmt(l.peakBf16Gflops)} GFLOP/s, L3 ${l.l3Bytes} B`);
    assert.ok(l.readBandwidthGBps > 0.5 && l.readBandwidthGBps < 5000);
    assert.ok(l.peakF32Gflops > 0.5 && l.peakF32Gflops < 1e6);
    assert.ok(l.threads >= 1 && l.l3Bytes > 0);
    if (l.peakBf16Gflops !== null) assert.ok(l.peakBf16Gflops > l.peakF32Gflops * 0.8, 'bf16 dot does 2 products per lane');
  }],
  ['OpenBLAS peer: per-expert loop matches a float64 reference', () => {
    const base = { h: 64, inter: 96, reps: 2, warmup: 1, flushBytes: 1 << 20 };
    const run = runOpenBlasPeer([
      { id: 'f', dtype: 'f32', counts: [3, 0, 1, 5], ...base },
      { id: 'b', dtype: 'bf16', counts: [0, 2, 2, 0], ...base },
      { id: 'z', dtype: 'f32', counts: [0, 0, 0, 0], ...base },
    ]);
    if (!run.info.available) {
      console.log(`  peer: ${run.info.reason} (${run.info.error}); skipped`);
      return;
    }
    console.log(`  peer: ${run.info.config}, core ${run.info.corename}, sbgemm ${run.info.sbgemm}`);
    const f = run.results.get('f')!;
    assert.equal(f.timesMs?.length, 2);
    assert.ok(f.checkRelErr! < 1e-4, `f32 error ${f.checkRelErr}`);
    const b = run.results.get('b')!;
    if (run.info.sbgemm) assert.ok(b.checkRelErr! < 3e-2, `bf16 error ${b.checkRelErr}`);
    else assert.equal(b.error, 'this OpenBLAS has no cblas_sbgemm');
    assert.equal(run.results.get('z')!.timesMs?.length, 2);
  }],
];

export async function runSelftest(argv: string[]): Promise<void> {
  if (argv.length) throw new RangeError(`selftest takes no flags, got ${argv.join(' ')}`);
  let failed = 0;
  for (const [i, [name, fn]] of checks.entries()) {
    try {
      await fn();
      console.log(`ok ${i + 1} - ${name}`);
    } catch (err) {
      failed++;
      console.log(`not ok ${i + 1} - ${name}\n  ${err instanceof Error ? err.message.split('\n').join('\n  ') : String(err)}`);
    }
  }
  console.log(`# ${checks.length - failed}/${checks.length} passed`);
  if (failed) process.exitCode = 1;
}
