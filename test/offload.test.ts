// Offloading pieces one by one: the EAM and its similarity against a float64 reference, the
// bounded collection (replacement, atomic persistence, other-model files), matching and batch
// prediction, the cache's eviction policies and pins, prefetch priorities, and the checkpoint
// store + offloader driving the real grouped-GEMM kernel bit for bit against a resident table.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, type ExpertTable } from '../src/native/index.js';
import { openCheckpoint, writeSafetensors, type TensorToWrite } from '../src/model/safetensors.js';
import type { ModelSpec } from '../src/model/spec.js';
import { ExpertActivationMatrix, eamSimilarity } from '../src/offload/eam.js';
import { EamCollection, EAM_COLLECTION_FILE } from '../src/offload/eam-collection.js';
import { ActivationTracker, bestMatch } from '../src/offload/predictor.js';
import { ExpertCache, slotsFor } from '../src/offload/expert-cache.js';
import { planPrefetch, prefetchPriority } from '../src/offload/prefetcher.js';
import { CheckpointExpertStore } from '../src/offload/expert-store.js';
import { Offloader } from '../src/offload/offloader.js';
import { readTrace } from '../src/offload/trace-file.js';
import { mulberry32 } from '../src/engine/rng.js';
import { fileSeed } from './helpers/seed.js';

const seedBase = fileSeed(0, 'base added to each case seed');
const rng = (seed: number) => mulberry32(seedBase + seed);

const tmpDir = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-offload-'));

/** Random routing [T, k] with distinct experts per token. */
function randomIds(r: () => number, T: number, k: number, E: number, pool?: number[]): Int32Array {
  const ids = new Int32Array(T * k);
  const choices = pool ?? [...Array(E).keys()];
  for (let t = 0; t < T; t++) {
    const c = [...choices];
    for (let j = 0; j < k; j++) ids[t * k + j] = c.splice(Math.floor(r() * c.length), 1)[0]!;
  }
  return ids;
}

/** float64 reference: per-layer cosine averaged over the layers a has seen. */
function refSimilarity(a: Float32Array, b: Float32Array, L: number, E: number): number {
  let sum = 0;
  let seen = 0;
  for (let l = 0; l < L; l++) {
    let aa = 0, bb = 0, ab = 0;
    for (let e = 0; e < E; e++) {
      const x = a[l * E + e]!, y = b[l * E + e]!;
      aa += x * x; bb += y * y; ab += x * y;
    }
    if (aa === 0) continue;
    seen++;
    sum += bb === 0 ? 0 : ab / Math.sqrt(aa * bb);
  }
  return seen ? sum / seen : 0;
}

test('EAM counts routed ids per (layer, expert) and normalises rows', () => {
  const r = rng(1);
  for (const [L, E, k, T] of [[1, 4, 1, 1], [3, 8, 2, 17], [5, 64, 6, 40]] as const) {
    const m = new ExpertActivationMatrix(L, E);
    const ref = new Float64Array(L * E);
    for (let l = 0; l < L; l++) {
      const ids = randomIds(r, T, k, E);
      m.addIds(l, ids, k);
      for (const e of ids) ref[l * E + e]!++;
    }
    assert.deepEqual(Array.from(m.counts), Array.from(ref));
    assert.equal(m.total(), L * T * k);
    const n = m.normalised();
    for (let l = 0; l < L; l++) {
      let s = 0;
      for (let e = 0; e < E; e++) {
        s += n[l * E + e]!;
        assert.ok(Math.abs(n[l * E + e]! - ref[l * E + e]! / (T * k)) < 1e-6);
      }
      assert.ok(Math.abs(s - 1) < 1e-5);
    }
  }
  const m = new ExpertActivationMatrix(2, 4);
  m.addIds(1, Int32Array.from([0, 1, 2, 3, -1, 3]), 2, 1, 3); // rows 1..2 only, -1 ignored
  assert.deepEqual(Array.from(m.counts), [0, 0, 0, 0, 0, 0, 1, 2]);
  assert.equal(m.layersSeen(), 1);
  assert.throws(() => m.addIds(2, new Int32Array(2), 2), { name: 'RangeError', message: 'layer is 2, expected an integer in [0, 1]' });
  assert.throws(() => new ExpertActivationMatrix(2, 4, new Float32Array(7)), { name: 'RangeError', message: 'counts.length is 7, expected 8 (2 x 4)' });
});

test('EAM similarity is the per-layer cosine averaged over the layers seen (float64 reference)', () => {
  const r = rng(2);
  for (let trial = 0; trial < 30; trial++) {
    const L = 1 + Math.floor(r() * 6);
    const E = 2 + Math.floor(r() * 30);
    const a = new ExpertActivationMatrix(L, E);
    const b = new ExpertActivationMatrix(L, E);
    const seenA = 1 + Math.floor(r() * L); // a is partial: only its first layers
    for (let i = 0; i < L * E; i++) {
      if (Math.floor(i / E) < seenA && r() < 0.4) a.counts[i] = Math.floor(r() * 9);
      if (r() < 0.5) b.counts[i] = Math.floor(r() * 9);
    }
    const got = eamSimilarity(a, b);
    const want = refSimilarity(a.counts, b.counts, L, E);
    assert.ok(Math.abs(got - want) < 1e-5, `trial ${trial}: ${got} vs ${want}`);
  }
  const a = new ExpertActivationMatrix(2, 3, Float32Array.from([1, 0, 0, 0, 0, 0]));
  assert.equal(eamSimilarity(a, a), 1); // layer 1 unseen: not averaged in
  assert.equal(eamSimilarity(a, new ExpertActivationMatrix(2, 3, Float32Array.from([0, 5, 0, 1, 1, 1]))), 0);
});

test('collection replaces the least-matched (then oldest) entry when full', () => {
  const c = new EamCollection(1, 4, 3);
  const eam = (e: number) => new ExpertActivationMatrix(1, 4, Float32Array.from([0, 1, 2, 3].map((i) => (i === e ? 1 : 0))));
  for (let e = 0; e < 3; e++) c.add(eam(e));
  c.recordMatch(0);
  c.recordMatch(0);
  c.recordMatch(2);
  assert.equal(c.add(eam(3)), 1); // entry 1 has no match
  assert.equal(c.add(eam(1)), 1); // the new entry 1 has none either and is the newest... but 2 has 1 match
  assert.equal(c.replaced, 2);
  assert.equal(c.add(new ExpertActivationMatrix(1, 4)), -1); // empty EAMs are not stored
  assert.throws(() => c.add(new ExpertActivationMatrix(2, 4)), /EAM is 2x4, the collection holds 1x4/);
});

test('collection persists atomically and reloads; another model or a corrupt file is ignored with a warning', () => {
  const dir = tmpDir();
  const r = rng(3);
  const c = new EamCollection(3, 5, 10, 'demo');
  for (let i = 0; i < 7; i++) {
    const m = new ExpertActivationMatrix(3, 5);
    for (let j = 0; j < 15; j++) m.counts[j] = Math.floor(r() * 4);
    m.counts[0] = 1;
    c.add(m);
  }
  c.recordMatch(4);
  c.save(dir);
  assert.deepEqual(fs.readdirSync(dir), [EAM_COLLECTION_FILE]); // no temporary left behind
  const warnings: string[] = [];
  const warn = (m: string) => warnings.push(m);
  const back = EamCollection.load(dir, 3, 5, { model: 'demo', warn });
  assert.equal(back.size, 7);
  for (let i = 0; i < 7; i++) assert.deepEqual(Array.from(back.entries[i]!.eam.counts), Array.from(c.entries[i]!.eam.counts));
  assert.deepEqual(back.entries.map((e) => e.matches), [0, 0, 0, 0, 1, 0, 0]);
  assert.equal(warnings.length, 0);
  // A smaller capacity keeps the most-matched entries.
  assert.ok(EamCollection.load(dir, 3, 5, { capacity: 2, model: 'demo', warn }).entries.some((e) => e.matches === 1));
  assert.equal(EamCollection.load(dir, 4, 5, { warn }).size, 0);
  assert.match(warnings[0]!, /not of this model .*ignoring it/);
  assert.equal(EamCollection.load(dir, 3, 5, { model: 'other', warn }).size, 0);
  assert.equal(warnings.length, 2);
  fs.writeFileSync(path.join(dir, EAM_COLLECTION_FILE), Buffer.from('EXPEAM01garbage'));
  assert.equal(EamCollection.load(dir, 3, 5, { warn }).size, 0);
  assert.match(warnings[2]!, /cannot read .*starting with an empty EAM collection/);
  assert.equal(EamCollection.load(tmpDir(), 3, 5, { warn }).size, 0); // no file: empty, no warning
  assert.equal(warnings.length, 3);
});

/** Families of requests: family f uses experts from its own set in every layer. */
function familyEam(r: () => number, family: number, L: number, E: number, k: number, T: number): ExpertActivationMatrix {
  const m = new ExpertActivationMatrix(L, E);
  for (let l = 0; l < L; l++) {
    const pool = [0, 1, 2, 3].map((j) => (family * 4 + j + l) % E);
    m.addIds(l, randomIds(r, T, k, E, pool), k);
  }
  return m;
}

test('matching finds the request family and the tracker predicts its coming layers', () => {
  const r = rng(4);
  const L = 6, E = 16, k = 2;
  const c = new EamCollection(L, E, 100);
  for (let i = 0; i < 20; i++) c.add(familyEam(r, i % 4, L, E, k, 30));
  // A partial request of family 2 that has seen layers 0-1 matches a family-2 entry.
  const full = familyEam(r, 2, L, E, k, 30);
  const partial = new ExpertActivationMatrix(L, E);
  partial.counts.set(full.counts.subarray(0, 2 * E));
  const m = bestMatch(c, partial)!;
  assert.equal(m.index % 4, 2);
  assert.ok(m.similarity > 0.8);
  assert.equal(bestMatch(new EamCollection(L, E), partial), null);

  const t = new ActivationTracker(c, 'sum');
  t.beginStep([{ id: 'a', rows: 3 }, { id: 'b', rows: 2 }]);
  const idsA = randomIds(r, 3, k, E, [8, 9, 10, 11]); // family 2, layer 0
  const idsB = randomIds(r, 2, k, E, [0, 1, 2, 3]);   // family 0, layer 0
  const ids = new Int32Array(5 * k);
  ids.set(idsA, 0);
  ids.set(idsB, 3 * k);
  t.onRouted(0, ids, k, 5);
  assert.equal(t.requests.get('a')!.match % 4, 2);
  assert.equal(t.requests.get('b')!.match % 4, 0);
  // Layer 3 prediction: family 2 uses (8..11)+3, family 0 uses (0..3)+3: sum of both rows.
  const row = Array.from(t.prediction.subarray(3 * E, 4 * E));
  for (let e = 0; e < E; e++) {
    const inA = e >= 11 && e <= 14, inB = e >= 3 && e <= 6;
    if (!inA && !inB) assert.equal(row[e], 0, `expert ${e}`);
    else assert.ok(row[e]! > 0.1, `expert ${e}`);
  }
  assert.ok(Math.abs(row.reduce((a, b) => a + b, 0) - 2) < 1e-5); // sum of two distributions
  const tMax = new ActivationTracker(c, 'max');
  tMax.beginStep([{ id: 'a', rows: 3 }, { id: 'b', rows: 2 }]);
  tMax.onRouted(0, ids, k, 5);
  const rowMax = Array.from(tMax.prediction.subarray(3 * E, 4 * E));
  for (let e = 0; e < E; e++) assert.ok(rowMax[e]! <= row[e]! + 1e-7 && (row[e] === 0) === (rowMax[e] === 0));
  // Finishing credits the match and adds the EAM.
  const before = c.entries[t.requests.get('a')!.match]!.matches;
  const idx = t.requests.get('a')!.match;
  t.endStep();
  t.finish('a');
  assert.equal(c.entries[idx]!.matches, before + 1);
  assert.equal(c.size, 21);
});

test('with an empty collection the tracker falls back to the request rows, then global frequency', () => {
  const L = 3, E = 4, k = 1;
  const t = new ActivationTracker(new EamCollection(L, E), 'sum');
  t.beginStep([{ id: 'x', rows: 2 }]);
  assert.deepEqual(Array.from(t.prediction), new Array(L * E).fill(0.25)); // nothing known: uniform
  t.onRouted(0, Int32Array.from([1, 1]), k, 2);
  t.onRouted(1, Int32Array.from([2, 3]), k, 2);
  t.endStep();
  t.beginStep([{ id: 'y', rows: 1 }]);
  t.onRouted(0, Int32Array.from([0]), k, 1);
  // y: own row at layer 0; global frequency (x + y) at layer 1; uniform at layer 2 (never seen).
  assert.deepEqual(Array.from(t.prediction), [1, 0, 0, 0, 0, 0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]);
});

test('cache evicts by LRU, LFU and predicted reuse, never a pinned slot', () => {
  const L = 4, E = 4;
  const fill = (c: ExpertCache, keys: Array<[number, number]>) => {
    for (const [l, e] of keys) {
      c.beginLayer(l);
      if (c.access(l, e) < 0) {
        const s = c.victim();
        const old = c.evict(s);
        void old;
        c.insert(l, e, s, false);
      }
    }
  };
  const lru = new ExpertCache({ numSlots: 4, numLayers: L, numExperts: E, policy: 'lru' });
  fill(lru, [[0, 0], [1, 1], [2, 2], [3, 3], [0, 0]]);
  lru.beginLayer(1);
  lru.access(1, 1); // pinned now
  assert.equal(lru.slotKey[lru.victim()], 2 * E + 2); // least recent unpinned
  const lfu = new ExpertCache({ numSlots: 4, numLayers: L, numExperts: E, policy: 'lfu' });
  fill(lfu, [[0, 0], [0, 0], [1, 1], [1, 1], [2, 2], [3, 3], [3, 3], [2, 2], [2, 2]]);
  lfu.beginLayer(0);
  assert.equal(lfu.slotKey[lfu.victim()], 0 * E + 0); // (0,0) and (1,1) have 2 uses, (0,0) is older... and layer 0
  const pred = new Float32Array(L * E);
  const eam = new ExpertCache({ numSlots: 4, numLayers: L, numExperts: E, policy: 'eam', prediction: pred, protectLayers: 1, protectBoost: 2 });
  fill(eam, [[0, 0], [1, 1], [2, 2], [3, 3]]);
  pred.fill(0.25);
  eam.beginLayer(1); // distances from layer 1: layer 2 -> 1, 3 -> 2, 0 -> 3 (boosted x2), 1 -> 4
  assert.equal(eam.slotKey[eam.victim()], 1 * E + 1);
  pred[1 * E + 1] = 1; pred[3 * E + 3] = 0.01;
  assert.equal(eam.slotKey[eam.victim()], 3 * E + 3);
  assert.ok(Math.abs(eam.reuseScore(0, 0, true) - 2 * (0.25 + 1e-8) * (1 - 3 / 5)) < 1e-9);
  // Pins: with every slot pinned there is no victim.
  eam.beginLayer(2);
  for (const [l, e] of [[0, 0], [1, 1], [2, 2], [3, 3]] as const) eam.access(l, e);
  assert.equal(eam.victim(), -1);
  assert.equal(eam.hitRate(), 4 / 8);
  assert.throws(() => new ExpertCache({ numSlots: 3, numLayers: L, numExperts: E, policy: 'lru' }), /numSlots is 3, expected an integer in \[4, 16\]/);
  assert.equal(slotsFor({ numLayers: 32, numExperts: 8, expertBytes: 1000, fraction: 0.25 }), 64);
  assert.equal(slotsFor({ numLayers: 32, numExperts: 8, expertBytes: 1000, budgetBytes: 10_500 }), 10);
  assert.equal(slotsFor({ numLayers: 32, numExperts: 8, expertBytes: 1000, budgetBytes: 10 }), 8); // one layer at least
  assert.equal(slotsFor({ numLayers: 2, numExperts: 8, expertBytes: 1000, fraction: 5 }), 16);
});

test('prefetch priority follows the paper and the plan respects the window and residency', () => {
  assert.equal(prefetchPriority(0.5, 3, 3, 8), 0);
  assert.ok(Math.abs(prefetchPriority(0.5, 5, 3, 8) - (0.5 + 1e-8) * (1 - 2 / 9)) < 1e-12);
  const L = 4, E = 4;
  const pred = new Float32Array(L * E);
  pred[1 * E + 2] = 0.9; pred[2 * E + 1] = 0.9; pred[3 * E + 0] = 0.95; pred[2 * E + 3] = 0.0001; pred[0 * E + 0] = 1;
  const c = new ExpertCache({ numSlots: 8, numLayers: L, numExperts: E, policy: 'eam', prediction: pred });
  const plan = planPrefetch(c, pred, 0, 2 * 100 + 50, 100);
  assert.deepEqual(plan.map((p) => [p.layer, p.expert]), [[1, 2], [2, 1]]); // nearer layer first; window = 2
  c.insert(1, 2, 0, true);
  assert.deepEqual(planPrefetch(c, pred, 0, 1000, 100).map((p) => [p.layer, p.expert]), [[2, 1], [3, 0]]);
  assert.equal(planPrefetch(c, pred, 3, 1000, 100).length, 0);
});

// --- store + offloader against the real kernels

const H = 32, I = 48;

function expertCheckpoint(dir: string, L: number, E: number, fused: boolean, seed: number): ModelSpec {
  const r = rng(seed);
  const t: TensorToWrite[] = [];
  const bf = (n: number) => {
    const a = new Uint16Array(n);
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    for (let i = 0; i < n; i++) { f[0] = (r() * 2 - 1) * 0.3; a[i] = u[0]! >>> 16; }
    return a;
  };
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.mlp.experts.`;
    if (fused) {
      t.push({ name: `${p}gate_up_proj`, dtype: 'BF16', shape: [E, 2 * I, H], data: bf(E * 2 * I * H) });
      t.push({ name: `${p}down_proj`, dtype: 'BF16', shape: [E, H, I], data: bf(E * H * I) });
    } else {
      for (let e = 0; e < E; e++)
        for (const [n, shape] of [['gate_proj', [I, H]], ['up_proj', [I, H]], ['down_proj', [H, I]]] as const)
          t.push({ name: `${p}${e}.${n}.weight`, dtype: 'BF16', shape: [...shape], data: bf(I * H) });
    }
  }
  writeSafetensors(path.join(dir, 'model.safetensors'), t);
  return {
    modelType: 'qwen3_moe', hidden: H, layers: Array.from({ length: L }, () => ({ ffn: 'moe' as const })),
    moe: { numExperts: E, intermediate: I, router: { topK: 2 } },
  } as unknown as ModelSpec;
}

/** Fully resident tables packed from the checkpoint the same way the model loader does. */
function residentTables(dir: string, L: number, E: number, fused: boolean): ExpertTable[] {
  const n = loadNative();
  const ck = openCheckpoint(dir);
  return Array.from({ length: L }, (_, l) => {
    const table = new n.ExpertTable(E, H, I);
    const p = `model.layers.${l}.mlp.experts.`;
    for (let e = 0; e < E; e++) {
      let gate: Uint16Array, up: Uint16Array, down: Uint16Array;
      if (fused) {
        const gu = ck.loadWeightBf16OrNative(`${p}gate_up_proj`).data as Uint16Array;
        const dn = ck.loadWeightBf16OrNative(`${p}down_proj`).data as Uint16Array;
        gate = gu.subarray(e * 2 * I * H, e * 2 * I * H + I * H);
        up = gu.subarray(e * 2 * I * H + I * H, (e + 1) * 2 * I * H);
        down = dn.subarray(e * H * I, (e + 1) * H * I);
      } else {
        gate = ck.loadWeightBf16OrNative(`${p}${e}.gate_proj.weight`).data as Uint16Array;
        up = ck.loadWeightBf16OrNative(`${p}${e}.up_proj.weight`).data as Uint16Array;
        down = ck.loadWeightBf16OrNative(`${p}${e}.down_proj.weight`).data as Uint16Array;
      }
      const gu = n.packGateUp(gate, up, 'bf16', I, H);
      const dw = n.packWeight(down, 'bf16', H, I);
      table.set(e, gu, dw);
      gu.dispose();
      dw.dispose();
    }
    return table;
  });
}

for (const fused of [false, true]) {
  test(`offloader (${fused ? 'fused' : 'per-expert'} checkpoint) gives the resident outputs bit for bit under every policy`, async () => {
    const n = loadNative();
    const L = 4, E = 8, k = 2;
    const dir = tmpDir();
    const spec = expertCheckpoint(dir, L, E, fused, 11);
    const resident = residentTables(dir, L, E, fused);
    const r = rng(12);
    // Steps of a few requests; routing drawn from per-request families so that prediction matters.
    const steps = Array.from({ length: 24 }, (_, s) => Array.from({ length: L }, () => {
      const T = s % 6 === 0 ? 5 : 2;
      return randomIds(r, T, k, E, s % 2 ? [0, 1, 2, 3] : [2, 3, 4, 5, 6, 7]);
    }));
    const x = new Float32Array(8 * k * H).map(() => r() * 2 - 1);
    for (const policy of ['eam', 'lru', 'lfu'] as const) {
      for (const fast of [false, true]) {
        const traceDir = tmpDir();
        const store = new CheckpointExpertStore(openCheckpoint(dir), spec);
        const off = new Offloader(store, { numLayers: L, numExperts: E, topK: k, policy, fraction: 0.25, traceDir, modelId: 'test', prefetch: policy === 'eam' });
        assert.equal(off.cache.numSlots, 8);
        const tables = Array.from({ length: L }, () => new n.ExpertTable(E, H, I));
        off.attachTables(tables);
        let accesses = 0;
        steps.forEach((layers, s) => {
          const T = layers[0]!.length / k;
          off.beginStep([{ id: `r${s % 3}`, rows: T }]);
          layers.forEach((ids, l) => {
            const counts = new Int32Array(E);
            for (const e of ids) counts[e]!++;
            const offsets = new Int32Array(E + 1);
            for (let e = 0; e < E; e++) offsets[e + 1] = offsets[e]! + counts[e]!;
            off.onRouted(l, ids, counts, T);
            off.ensureResident(l, counts, tables[l]!);
            for (let e = 0; e < E; e++) assert.equal(tables[l]!.has(e) || counts[e] === 0, true);
            accesses += counts.filter((c) => c > 0).length;
            const rows = T * k;
            const want = new Float32Array(rows * H).fill(NaN);
            const got = new Float32Array(rows * H).fill(NaN);
            n.groupGemmFfn(x.subarray(0, rows * H), offsets, resident[l]!, want, fast);
            n.groupGemmFfn(x.subarray(0, rows * H), offsets, tables[l]!, got, fast);
            assert.deepEqual(new Uint32Array(got.buffer), new Uint32Array(want.buffer), `${policy} fast=${fast} step ${s} layer ${l}`);
          });
          off.endStep();
          if (s % 3 === 2) off.finishRequest(`r${s % 3}`);
        });
        const st = off.stats();
        assert.equal(st.hits + st.misses, accesses);
        assert.equal(st.bytesLoaded, (st.demandLoads + st.prefetchLoads) * store.expertBytes);
        assert.equal(st.misses, st.demandLoads);
        assert.ok(st.prefetchUsed + st.prefetchWasted <= st.prefetchLoads);
        assert.equal(store.expertBytes, 3 * H * I * 2);
        if (policy !== 'eam') assert.equal(st.prefetchLoads, 0);
        else assert.ok(st.prefetchLoads > 0, 'the prefetch path must run');
        assert.ok(st.hits > 0 && st.misses > 0, JSON.stringify(st));
        assert.equal(st.occupancy, 1);
        const d = off.takeDelta();
        assert.equal(d.hits, st.hits);
        assert.equal(off.takeDelta().hits, 0);
        await off.save();
        const trace = await readTrace(traceDir);
        assert.equal(trace.steps.length, steps.length);
        assert.equal(trace.meta.numExperts, E);
        assert.equal(EamCollection.load(traceDir, L, E, { model: 'test' }).size, off.collection.size);
        off.dispose();
        for (const t of tables) t.dispose();
      }
    }
    for (const t of resident) t.dispose();
  });
}
