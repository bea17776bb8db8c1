// Replay of routing traces: Belady's MIN checked against an exhaustive search on small traces,
// no policy beating it, the live offloader's policies replayed on structured synthetic traces,
// and the trace file round trip.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { replay, replayBelady } from '../src/offload/replay.js';
import { syntheticTrace, DEFAULT_SYNTHETIC } from '../src/offload/synthetic-trace.js';
import { readTrace, type Trace } from '../src/offload/trace-file.js';
import { TraceWriter } from '../src/offload/trace-writer.js';
import { mulberry32 } from '../src/engine/rng.js';
import { fileSeed } from './helpers/seed.js';

const seedBase = fileSeed(0, 'base added to each case seed');
const rng = (seed: number) => mulberry32(seedBase + seed);

/** A random single-request trace: each step, each layer uses 1..maxPerLayer distinct experts. */
function randomTrace(r: () => number, L: number, E: number, steps: number, maxPerLayer: number): Trace {
  return {
    meta: { numLayers: L, numExperts: E, topK: 1, model: 'random' },
    steps: Array.from({ length: steps }, (_, s) => ({
      step: s,
      requests: [{ id: 'a', layers: Array.from({ length: L }, () => {
        const n = 1 + Math.floor(r() * maxPerLayer);
        const set = new Set<number>();
        while (set.size < n) set.add(Math.floor(r() * E));
        return [...set].sort((x, y) => x - y).flatMap((e) => [e, 1]);
      }) }],
    })),
  };
}

/** Fewest misses any demand-fetching cache of `slots` can have (exhaustive search, memoised). */
function optimalMisses(trace: Trace, slots: number): number {
  const { numLayers: L, numExperts: E } = trace.meta;
  const visits: number[][] = [];
  for (const st of trace.steps) for (let l = 0; l < L; l++) {
    const row = st.requests[0]!.layers[l]!;
    const keys: number[] = [];
    for (let i = 0; i < row.length; i += 2) keys.push(l * E + row[i]!);
    visits.push(keys);
  }
  const memo = new Map<string, number>();
  const go = (v: number, resident: number[]): number => {
    if (v === visits.length) return 0;
    const memoKey = `${v}:${resident.join(',')}`;
    const hit = memo.get(memoKey);
    if (hit !== undefined) return hit;
    const need = visits[v]!;
    const missing = need.filter((k) => !resident.includes(k));
    // Choose which non-needed residents to drop to make room for the missing ones (every choice).
    const room = slots - resident.length;
    const drop = Math.max(0, missing.length - room);
    const droppable = resident.filter((k) => !need.includes(k));
    let best = Infinity;
    const choose = (start: number, chosen: number[]) => {
      if (chosen.length === drop) {
        const next = [...resident.filter((k) => !chosen.includes(k)), ...missing].sort((a, b) => a - b);
        best = Math.min(best, missing.length + go(v + 1, next));
        return;
      }
      for (let i = start; i < droppable.length; i++) choose(i + 1, [...chosen, droppable[i]!]);
    };
    choose(0, []);
    memo.set(memoKey, best);
    return best;
  };
  return go(0, []);
}

test('Belady matches an exhaustive search for the fewest misses on small traces', () => {
  const r = rng(1);
  for (let trial = 0; trial < 25; trial++) {
    const L = 2 + Math.floor(r() * 2);
    const E = 3;
    const trace = randomTrace(r, L, E, 4 + Math.floor(r() * 4), 2);
    const cap = [0.5, 0.67][trial % 2]!;
    const res = replayBelady(trace, cap);
    assert.equal(res.misses, optimalMisses(trace, res.slots), `trial ${trial} (${L} layers, ${res.slots} slots)`);
    assert.equal(res.hits + res.misses, res.accesses);
  }
});

test('no policy has fewer demand misses than Belady; everything hits with a full cache', () => {
  const r = rng(2);
  for (let trial = 0; trial < 6; trial++) {
    const trace = randomTrace(r, 4, 6, 30, 3);
    for (const cap of [0.25, 0.5, 0.75]) {
      const b = replay(trace, { policy: 'belady', capacity: cap });
      for (const policy of ['eam', 'lru', 'lfu'] as const) {
        const res = replay(trace, { policy, capacity: cap });
        assert.equal(res.slots, b.slots);
        assert.equal(res.accesses, b.accesses);
        assert.ok(res.misses >= b.misses, `${policy} ${cap}: ${res.misses} < belady ${b.misses}`);
      }
    }
    for (const policy of ['eam', 'lru', 'lfu', 'belady'] as const) {
      const full = replay(trace, { policy, capacity: 1 });
      const distinct = new Set(trace.steps.flatMap((s) => s.requests[0]!.layers.flatMap((row, l) => row.filter((_, i) => i % 2 === 0).map((e) => l * 6 + e)))).size;
      assert.equal(full.misses, distinct, policy); // compulsory misses only
    }
  }
});

test('on structured traces (prompt families) the EAM policy beats LRU and LFU and stays under Belady', () => {
  const trace = syntheticTrace({ ...DEFAULT_SYNTHETIC, seed: seedBase + DEFAULT_SYNTHETIC.seed, requests: 30, familySkew: 1.2 });
  const at = (policy: 'eam' | 'lru' | 'lfu' | 'belady') => replay(trace, { policy, capacity: 0.25 }).hitRate;
  const eam = at('eam'), lru = at('lru'), lfu = at('lfu'), belady = at('belady');
  assert.ok(eam > lru + 0.05 && eam > lfu, `eam ${eam} lru ${lru} lfu ${lfu}`);
  assert.ok(eam <= belady, `eam ${eam} belady ${belady}`);
  // Prefetching adds loads but removes demand misses.
  const pf = replay(trace, { policy: 'eam', capacity: 0.25, prefetch: true });
  assert.ok(pf.hitRate > eam && pf.loads >= pf.misses && pf.prefetchUsed > 0, JSON.stringify(pf));
});

test('trace files round trip; a torn last line is dropped with a warning', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-trace-'));
  const trace = syntheticTrace({ ...DEFAULT_SYNTHETIC, seed: seedBase + DEFAULT_SYNTHETIC.seed, requests: 3, numLayers: 2, numExperts: 8, topK: 2, familySetSize: 4 });
  const w = new TraceWriter(dir, trace.meta);
  for (const s of trace.steps) w.append(s);
  await w.close();
  assert.deepEqual(await readTrace(dir), trace);
  fs.appendFileSync(path.join(dir, 'trace-000001.jsonl'), '{"step": 99, "requ');
  const warnings: string[] = [];
  assert.equal((await readTrace(dir, { warn: (m) => warnings.push(m) })).steps.length, trace.steps.length);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /trace-000001\.jsonl:\d+: skipped a torn last line/);
  await assert.rejects(readTrace(path.join(dir, 'nope')), /holds no routing trace/);
  // Another model's trace is moved aside, not mixed.
  new TraceWriter(dir, { ...trace.meta, numExperts: 16 });
  assert.ok(fs.readdirSync(dir).some((f) => f.endsWith('.old')));
  await assert.rejects(readTrace(dir), /holds no routing trace/);
});
