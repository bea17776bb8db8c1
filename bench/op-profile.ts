// Per-op timing of a whole model without touching its code: wraps the addon's hot functions
// (the model calls them through loadNative()) with timers, keyed by op and shape, and reports
// time shares and, for weight-reading ops, the bandwidth they reach. For `e2e --profile`.
import { performance } from 'node:perf_hooks';

import type { ExpertTable, NativeAddon, PackedWeight } from '../src/native/index.js';
import { fmt, markdownTable, pct, type Cell } from './harness.js';

interface Entry { calls: number; ms: number; bytes: number }

const HOT = ['denseGemm', 'groupGemmFfn', 'route', 'permute', 'unpermuteCombine', 'rmsNorm', 'rope', 'embedding',
  'pagedAttention', 'kvCacheWrite', 'siluMul', 'softmax', 'topN', 'convert', 'sampleBatch',
  // Gated DeltaNet (hybrid models)
  'causalConv1dBatch', 'gatedDeltaRuleBatch', 'gatedRmsNorm'] as const;

export class OpProfiler {
  private readonly entries = new Map<string, Entry>();
  private readonly originals = new Map<string, unknown>();
  enabled = false;
  /** Wall time of the profiled region, to tell op time from time spent in JS between ops. */
  regionMs = 0;

  /** expertBytes: bytes of one expert's gate+up+down for a table, by its expert count. */
  constructor(private readonly n: NativeAddon, private readonly expertBytes: (numExperts: number) => number) {}

  install(): void {
    const n = this.n as unknown as Record<string, (...a: unknown[]) => unknown>;
    for (const name of HOT) {
      const orig = n[name];
      if (typeof orig !== 'function' || this.originals.has(name)) continue;
      this.originals.set(name, orig);
      const self = this;
      n[name] = function (this: unknown, ...args: unknown[]) {
        if (!self.enabled) return orig.apply(this, args);
        const t0 = performance.now();
        const r = orig.apply(this, args);
        self.add(name, args, performance.now() - t0);
        return r;
      };
    }
  }

  uninstall(): void {
    const n = this.n as unknown as Record<string, unknown>;
    for (const [name, f] of this.originals) n[name] = f;
    this.originals.clear();
  }

  /** Per op key: calls, total ms and weight bytes read since the last reset. */
  snapshot(): ReadonlyMap<string, Readonly<Entry>> {
    return this.entries;
  }

  reset(): void {
    this.entries.clear();
    this.regionMs = 0;
  }

  private add(name: string, args: unknown[], ms: number): void {
    let key = name;
    let bytes = 0;
    if (name === 'denseGemm') {
      const w = args[2] as PackedWeight;
      key = `denseGemm [${w.n}, ${w.k}]`;
      bytes = w.sizeBytes;
    } else if (name === 'groupGemmFfn') {
      const offsets = args[1] as Int32Array;
      const table = args[2] as ExpertTable;
      let active = 0;
      for (let e = 0; e + 1 < offsets.length; e++) if (offsets[e + 1]! > offsets[e]!) active++;
      key = `groupGemmFfn E=${table.numExperts}`;
      bytes = active * this.expertBytes(table.numExperts);
    }
    const e = this.entries.get(key) ?? { calls: 0, ms: 0, bytes: 0 };
    e.calls++;
    e.ms += ms;
    e.bytes += bytes;
    this.entries.set(key, e);
  }

  /** A table of ops by total time; `steps` divides into per-step figures. */
  table(steps: number, bandwidthGBps: number): string {
    const opMs = [...this.entries.values()].reduce((a, e) => a + e.ms, 0);
    const rows: Cell[][] = [...this.entries.entries()].sort((a, b) => b[1].ms - a[1].ms).map(([k, e]) => {
      const gbps = e.bytes ? e.bytes / (e.ms / 1e3) / 1e9 : null;
      return [k, e.calls / steps, e.ms / steps, pct(e.ms / this.regionMs), e.bytes ? e.bytes / steps / 1e6 : null,
        gbps, gbps ? pct(gbps / bandwidthGBps) : '-'];
    });
    rows.push(['(between ops: JS, allocation, argmax)', '-', (this.regionMs - opMs) / steps, pct(1 - opMs / this.regionMs), null, null, '-']);
    return markdownTable(['op', 'calls/step', 'ms/step', 'share', 'MB/step', 'GB/s', 'of bw'], rows,
      ['left', 'right', 'right', 'right', 'right', 'right', 'right']) +
      `\n\nstep: ${fmt(this.regionMs / steps)} ms`;
  }
}
