// One EPS-MoE prefill step as a timeline per MoE layer (rank 0): each chunk's dispatch and combine
// on the comm thread, its expert GEMMs on the main thread, and where the main thread waited. Read
// from the step itself by wrapping the comm object's calls (bench-only instrumentation).
//
// Main-thread spans are host timestamps. The comm thread runs its collectives one at a time in
// queue order (native/comm/comm_queue.cc), and each op reports the seconds it took there: op i is
// placed at max(its queue time, the end of op i-1) for that long.
import { performance } from 'node:perf_hooks';

import type { ExpertComm, Inflight } from '../src/moe/comm.js';
import type { MoeModel } from '../src/model/model.js';
import type { CommGroup, CommOp } from '../src/native/types.js';
import type { Span } from '../src/plot/charts.js';

export const PIPELINE_PHASES = ['counts exchange', 'dispatch', 'expert GEMM', 'combine', 'main thread waits'];
/** Communication in warm colours, compute in blue, waiting in grey. */
export const PIPELINE_COLORS = ['#f2cf5b', '#f58518', '#4c78a8', '#e45756', '#bab0ac'];
export const MAIN_LANE = 'rank 0 main thread';
export const COMM_LANE = 'rank 0 comm thread';

interface QueuedOp { layer: number; phase: 'dispatch' | 'combine'; chunk: number; queuedAt: number; seconds: number | null }

/**
 * Runs `step` (one forward step) with rank 0's comm and MoE layers instrumented; returns the spans of
 * every MoE layer, times in ms from that layer's start. NOTE: reaches the group of a GroupExpertComm
 * through its private `group` field; a rename there shows up here as a TypeError, not wrong data.
 */
export function recordPipeline(model: MoeModel, comm: ExpertComm, step: () => void): Omit<Span, 'column'>[] {
  const group = (comm as unknown as { group?: CommGroup }).group;
  if (!group || typeof group.all2allvAsync !== 'function') throw new TypeError('recordPipeline needs a GroupExpertComm (its group)');
  const main: { layer: number; phase: string; chunk: number | null; start: number; end: number }[] = [];
  const ops: QueuedOp[] = [];
  const layerStart: number[] = [];
  let layer = -1;
  let tag: { phase: 'dispatch' | 'combine'; chunk: number } | null = null;
  const gemmFrom = new Map<number, number>();

  const restore: (() => void)[] = [];
  const patch = <T extends object, K extends keyof T>(obj: T, key: K, wrap: (orig: T[K]) => T[K]) => {
    // NOTE: methods live on prototypes; the wrapper is an own property, deleted afterwards, so that
    // a later prototype patch (ep.ts's MoE timer) is not shadowed by a stale copy.
    const own = Object.prototype.hasOwnProperty.call(obj, key);
    const orig = obj[key];
    obj[key] = wrap(orig);
    restore.push(() => { if (own) obj[key] = orig; else delete obj[key]; });
  };
  try {
    model.moeLayers.forEach((moe, l) => {
      patch(moe, 'forward', (orig) => function (this: unknown, ...args: Parameters<typeof orig>) {
        layer = l;
        layerStart[l] = performance.now();
        gemmFrom.clear();
        return orig.apply(moe, args);
      } as typeof orig);
    });
    patch(group, 'all2allvAsync', (orig) => (...args: Parameters<typeof orig>): CommOp => {
      const queuedAt = performance.now();
      const op = orig.apply(group, args);
      const rec: QueuedOp = { layer, phase: tag?.phase ?? 'dispatch', chunk: tag?.chunk ?? -1, queuedAt, seconds: null };
      ops.push(rec);
      return {
        done: () => op.done(),
        wait: (timeoutMs: number) => { const s = op.wait(timeoutMs); rec.seconds = s; return s; },
      };
    });
    for (const name of ['all2allv', 'all2allCounts'] as const) {
      patch(group, name, (orig) => ((...args: unknown[]) => {
        const t0 = performance.now();
        try {
          return (orig as (...a: unknown[]) => unknown).apply(group, args);
        } finally {
          main.push({ layer, phase: 'counts exchange', chunk: null, start: t0, end: performance.now() });
        }
      }) as typeof orig);
    }
    const waited = (inflight: Inflight<void>, after?: () => void): Inflight<void> => ({
      wait: () => {
        const t0 = performance.now();
        inflight.wait();
        main.push({ layer, phase: 'main thread waits', chunk: null, start: t0, end: performance.now() });
        after?.();
      },
    });
    patch(comm, 'dispatchChunk', (orig) => ((routes, c, xPerm, x, hidden) => {
      tag = { phase: 'dispatch', chunk: c };
      try {
        return waited(orig.call(comm, routes, c, xPerm, x, hidden), () => gemmFrom.set(c, performance.now()));
      } finally { tag = null; }
    }) as typeof orig);
    patch(comm, 'combineChunk', (orig) => ((routes, c, yLocal, yPerm, hidden) => {
      // The chunk's expert GEMMs ran from the return of its dispatch's wait to here.
      const from = gemmFrom.get(c);
      if (from !== undefined) main.push({ layer, phase: 'expert GEMM', chunk: c, start: from, end: performance.now() });
      tag = { phase: 'combine', chunk: c };
      try {
        return waited(orig.call(comm, routes, c, yLocal, yPerm, hidden));
      } finally { tag = null; }
    }) as typeof orig);
    step();
  } finally {
    for (const r of restore.reverse()) r();
  }
  const spans: Omit<Span, 'column'>[] = [];
  const rel = (l: number, t: number) => t - layerStart[l]!;
  for (const m of main) {
    if (m.layer < 0) continue;
    spans.push({ group: `MoE layer ${m.layer}`, lane: MAIN_LANE, phase: m.phase, label: m.chunk === null ? '' : String(m.chunk),
      startMs: rel(m.layer, m.start), endMs: rel(m.layer, m.end) });
  }
  let commFree = 0;
  for (const op of ops) {
    if (op.seconds === null || op.layer < 0) continue;
    const start = Math.max(op.queuedAt, commFree);
    commFree = start + op.seconds * 1000;
    spans.push({ group: `MoE layer ${op.layer}`, lane: COMM_LANE, phase: op.phase, label: String(op.chunk),
      startMs: rel(op.layer, start), endMs: rel(op.layer, commFree) });
  }
  return spans;
}
