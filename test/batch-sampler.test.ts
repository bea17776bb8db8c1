// The native batched sampler against the JS sampler (the reference): the same logits, options and
// seeds give the same tokens step after step (penalties fed by the drawn tokens), logprobs agree to
// f32 rounding, the grammar bitmask masks first, and bad arguments are exact RangeErrors.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { BatchSampler } from '../src/engine/batch-sampler.js';
import { mulberry32 } from '../src/engine/rng.js';
import { Sampler, SamplingState, bitmaskWords, fastExp, type SampleResult } from '../src/engine/sampler.js';
import type { SamplingParams } from '../src/engine/types.js';
import { loadNative } from '../src/native/index.js';
import { SAMPLING_CASES as CASES } from './helpers/sampling-cases.js';
import { testSeed } from './helpers/seed.js';

function params(over: Partial<SamplingParams> = {}): SamplingParams {
  return {
    temperature: 1, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0,
    frequencyPenalty: 0, logprobs: null, ...over,
  };
}

/** Logits with the awkward parts real rows have: a peaked head, ties, -Infinity, a flat tail. */
function makeLogits(rand: () => number, rows: number, V: number, step: number): Float32Array {
  const x = new Float32Array(rows * V);
  for (let r = 0; r < rows; r++) {
    const kind = (r + step) % 4;
    for (let i = 0; i < V; i++) {
      let v = (rand() - 0.5) * 6;
      if (kind === 1) v = Math.round(v * 2) / 2;                  // many exact ties
      if (kind === 2 && i % 97 === 0) v = -Infinity;              // masked entries
      if (kind === 3) v = (rand() - 0.5) * 0.01;                  // near-flat: a wide nucleus
      x[r * V + i] = v;
    }
    if (kind === 0) x[r * V + Math.floor(rand() * V)] = 12;      // one peaked token
  }
  return x;
}

function assertSame(got: SampleResult, want: SampleResult, where: string): void {
  assert.equal(got.tokenId, want.tokenId, `${where}: token`);
  assert.equal(got.logprob === undefined, want.logprob === undefined, `${where}: logprob presence`);
  if (want.logprob !== undefined) {
    assert.ok(Math.abs(got.logprob! - want.logprob) <= 1e-7 * (1 + Math.abs(want.logprob)),
      `${where}: logprob ${got.logprob} vs ${want.logprob}`);
  }
  assert.equal(got.top === undefined, want.top === undefined, `${where}: top presence`);
  if (want.top) {
    assert.deepEqual(got.top!.map((t) => t.tokenId), want.top.map((t) => t.tokenId), `${where}: top ids`);
    want.top.forEach((t, j) => assert.ok(Math.abs(got.top![j]!.logprob - t.logprob) <= 1e-7 * (1 + Math.abs(t.logprob)),
      `${where}: top[${j}] ${got.top![j]!.logprob} vs ${t.logprob}`));
  }
}

/**
 * Runs `steps` steps of one batch through both samplers with the same seeds and compares every
 * result; the drawn tokens feed both states' penalties.
 */
function compare(V: number, cases: Partial<SamplingParams>[], steps: number, seed: number,
  masks?: (step: number, row: number) => Int32Array | null): void {
  const rand = mulberry32(seed);
  const prompt = Array.from({ length: 30 }, () => Math.floor(rand() * V));
  const js = new Sampler(V);
  const native = new BatchSampler(V);
  const mk = (c: Partial<SamplingParams>, i: number): SamplingState =>
    new SamplingState(params({ ...c, seed: seed + i }), prompt, V, i % 3);
  const ref = cases.map(mk);
  const nat = cases.map(mk);
  for (let step = 0; step < steps; step++) {
    const logits = makeLogits(rand, cases.length, V, step);
    const rowMasks = cases.map((_, r) => masks?.(step, r) ?? null);
    const got = native.sample(logits, nat, rowMasks);
    for (let r = 0; r < cases.length; r++) {
      const want = js.sample(logits.subarray(r * V, (r + 1) * V), ref[r]!, rowMasks[r]);
      assertSame(got[r]!, want, `V ${V} step ${step} case ${JSON.stringify(cases[r])}`);
      ref[r]!.addOutputToken(want.tokenId);
      nat[r]!.addOutputToken(got[r]!.tokenId);
    }
    for (let r = 0; r < cases.length; r++) assert.deepEqual(nat[r]!.rng.getState(), ref[r]!.rng.getState());
  }
}

for (const level of ['auto', 'scalar'] as const) {
  const simd = (): void => { loadNative().setSimdLevel(level); };
  test(`same seeds, same tokens as the JS sampler with every option (V = 1000, 8 steps, ${level} SIMD)`, (t) => {
    simd();
    try {
      compare(1000, CASES, 8, testSeed(t, 17));
    } finally {
      loadNative().setSimdLevel('auto');
    }
  });

  test(`same tokens at a 152K vocabulary (one step over every case, ${level} SIMD)`, (t) => {
    simd();
    try {
      compare(152_064, CASES, 1, testSeed(t, 91));
    } finally {
      loadNative().setSimdLevel('auto');
    }
  });
}

test('a vocabulary that is not a multiple of 32 and a grammar bitmask applied first', (t) => {
  const V = 1001;
  const words = bitmaskWords(V);
  const seed = testSeed(t, 5);
  const rand = mulberry32(seed ^ 0x5bd1e995);
  // Random masks that allow ~1/8 of the tokens, always including the last (partial) word's ones.
  const masks = (step: number, row: number): Int32Array | null => {
    if ((step + row) % 3 === 0) return null;
    const m = new Int32Array(words);
    for (let i = 0; i < words; i++) {
      let bits = 0;
      for (let j = 0; j < 32; j++) if (rand() < 0.125) bits |= 1 << j;
      m[i] = bits;
    }
    m[words - 1]! |= 1 << ((V - 1) % 32);
    return m;
  };
  compare(V, CASES, 6, seed, masks);

  // Only the allowed token can come out, whatever its logit; logprobs see -Infinity elsewhere.
  const native = new BatchSampler(V);
  const logits = new Float32Array(V).fill(3);
  logits[900] = -50;
  const m = new Int32Array(words);
  m[Math.floor(900 / 32)] = 1 << (900 % 32);
  for (const c of [{ temperature: 0 }, { temperature: 1.5, topP: 0.3 }]) {
    const [res] = native.sample(logits, [new SamplingState(params({ ...c, seed: 1, logprobs: 2 }), [], V)], [m]);
    assert.equal(res!.tokenId, 900);
    assert.equal(res!.logprob, 0);
    // As in the JS sampler: masked tokens are listed after it, at -Infinity.
    assert.deepEqual(res!.top, [{ tokenId: 900, logprob: 0 }, { tokenId: 0, logprob: -Infinity }]);
  }
});

test('rows sample independently: a row\'s tokens do not depend on the others in the batch', (t) => {
  const V = 4096;
  const seed = testSeed(t, 23);
  const rand = mulberry32(seed);
  const logits = makeLogits(rand, 3, V, 0);
  const p = params({ temperature: 0.9, topP: 0.9, seed: 77 });
  const alone = new BatchSampler(V).sample(logits.subarray(V, 2 * V), [new SamplingState(p, [], V)]);
  const batch = new BatchSampler(V).sample(logits, [0, 1, 2].map(() => new SamplingState(p, [], V)));
  assert.equal(batch[1]!.tokenId, alone[0]!.tokenId);
  assert.deepEqual(new BatchSampler(V).sample(new Float32Array(0), []), []);
});

test('bad arguments are exact RangeErrors and TypeErrors', () => {
  const native = loadNative();
  const V = 8;
  const s = new BatchSampler(V);
  assert.throws(() => s.sample(new Float32Array(V), [new SamplingState(params(), [], V)], [new Int32Array(2)]),
    { name: 'RangeError', message: 'bitmasks[0].length is 2, expected 1' });
  assert.throws(() => s.sample(new Float32Array(V - 1), [new SamplingState(params(), [], V)]),
    { name: 'RangeError', message: 'logits.length is 7, expected at least 8 (1 rows of 8)' });
  const args = {
    params: Float64Array.from([1, 1, 0, 0, 1, 0, 0, -1]), rngState: Uint32Array.from([1, 2, 3, 4]),
    biasOffsets: Int32Array.from([0, 1]), biasIds: Int32Array.from([3]), biasValues: Float32Array.from([1]),
    seenOffsets: Int32Array.from([0, 0]), seenIds: new Int32Array(0),
    countOffsets: Int32Array.from([0, 0]), countIds: new Int32Array(0), countValues: new Int32Array(0),
  };
  const out = {
    tokenIds: new Int32Array(1), logprobs: new Float64Array(1), topIds: new Int32Array(20),
    topLogprobs: new Float64Array(20), topCounts: new Int32Array(1),
  };
  native.sampleBatch(new Float32Array(V), 1, V, args, out);   // valid
  const bad = (over: object, message: string, name = 'RangeError'): void =>
    assert.throws(() => native.sampleBatch(new Float32Array(V), 1, V, { ...args, ...over }, out), { name, message });
  bad({ params: Float64Array.from([1, 1.5, 0, 0, 1, 0, 0, -1]) },
    'batch.params[1] (topP of row 0) is 1.5, expected in (0, 1]');
  bad({ params: Float64Array.from([1, 1, 0, 0, 1, 0, 0, 21]) },
    'batch.params[7] (numTopLogprobs of row 0) is 21, expected an integer -1..20');
  bad({ biasIds: Int32Array.from([8]) }, 'batch.biasIds[0] is 8, expected 0..7');
  bad({ seenOffsets: Int32Array.from([0, 2]) }, 'batch.seenIds.length is 0, expected at least 2');
  bad({ rngState: new Uint32Array(4) }, 'batch.rngState of row 0 is all zero, which xoshiro128** cannot leave');
  bad({ bitmask: new Int32Array(1), bitmaskRows: Int32Array.from([1]) }, 'batch.bitmaskRows[0] is 1, expected -1..0');
  bad({ rngState: new Int32Array(4) }, 'batch.rngState must be a Uint32Array', 'TypeError');
});

/** One batch of rows through both samplers, states built by mk(row); compares every result. */
function compareRows(V: number, logits: Float32Array, mk: (row: number) => Partial<SamplingParams>, where: string): void {
  const rows = logits.length / V;
  const js = new Sampler(V);
  const states = (): SamplingState[] => Array.from({ length: rows }, (_, r) => new SamplingState(params(mk(r)), [], V));
  const ref = states();
  const got = new BatchSampler(V).sample(logits, states());
  for (let r = 0; r < rows; r++) {
    assertSame(got[r]!, js.sample(logits.subarray(r * V, (r + 1) * V), ref[r]!), `${where} row ${r} ${JSON.stringify(mk(r))}`);
  }
}

// The native sampler's partial selection (AVX-512) keeps only the candidates near the max and finds
// top-p's cutoff among them; these rows are the ones it takes: a trained model's peaked head over a
// long tail (the sampler bench's rows), at both vocabularies, with every truncation knob.
for (const level of ['auto', 'scalar'] as const) {
  test(`peaked rows over a long tail: the partial selection keeps the JS sampler's set (${level} SIMD)`, (t) => {
    loadNative().setSimdLevel(level);
    try {
      const seed = testSeed(t, 31);
      const rand = mulberry32(seed);
      for (const V of [32_000, 152_064]) {
        const rows = 24;
        const x = new Float32Array(rows * V);
        for (let i = 0; i < x.length; i++) x[i] = (rand() + rand() + rand() + rand() - 2) * 3.5;
        for (let r = 0; r < rows; r++) {
          for (let j = 0; j < 1 + (r % 12); j++) x[r * V + Math.floor(rand() * V)] = 7 + j * (r % 3 === 0 ? 0.25 : 1);
          if (r % 5 === 4) x[r * V + 11] = x[r * V + 12] = x[r * V + 13] = 19;   // a tie at the max
        }
        const knobs: Partial<SamplingParams>[] = [
          { temperature: 0.8, topP: 0.9 }, { temperature: 1, topP: 0.5 }, { temperature: 1.2, topP: 0.99 },
          { temperature: 0.7, topP: 0.95, minP: 0.05 }, { temperature: 0.8, minP: 0.1 }, { temperature: 1, topK: 20 },
          { temperature: 0.9, topK: 40, topP: 0.9 }, { temperature: 1.5 }, { temperature: 0.6, topP: 0.3, logprobs: 5 },
        ];
        compareRows(V, x, (r) => ({ ...knobs[r % knobs.length]!, seed: seed + r }), `V ${V}`);
      }
    } finally {
      loadNative().setSimdLevel('auto');
    }
  });
}

// top_p chosen so that its target lands on a nucleus boundary, to the last bits: where the kept set
// then hangs on the rounding of the sum (the JS sampler sums in index order, the vector pass does
// not), the native sampler must fall back to the JS order rather than guess. A few heavy tokens over a
// tail of thousands make the sums' last bits differ between orders; 24 seeds per row draw from each
// kept set, so a token kept by one sampler and not the other shows.
test('top_p exactly at a nucleus boundary: the same kept set as the JS sampler', (t) => {
  const seed = testSeed(t, 41);
  const rand = mulberry32(seed);
  const V = 4099;
  const draws = 24;
  for (let row = 0; row < 12; row++) {
    const one = new Float32Array(V);
    for (let i = 0; i < V; i++) one[i] = -4 + rand() * 3;
    const heavy = 6;
    for (let j = 0; j < heavy; j++) one[37 + 613 * j] = (rand() - 0.5) * 0.3;
    let max = -Infinity;
    for (const v of one) max = Math.max(max, v);
    // The JS sampler's weights, total (index order) and nucleus masses from the top.
    const w = Array.from(one, (v) => fastExp(v - max));
    let total = 0;
    for (const v of w) total += v;
    const sorted = [...w].sort((a, b) => b - a);
    const k = 1 + (row % (heavy - 1));
    let mass = 0;
    for (let j = 0; j < k; j++) mass += sorted[j]!;
    const p0 = mass / (total * (1 - 1e-6));
    for (const ulps of [-2, -1, 0, 1, 2]) {
      const topP = p0 + ulps * p0 * Number.EPSILON;
      const x = new Float32Array(draws * V);
      for (let d = 0; d < draws; d++) x.set(one, d * V);
      compareRows(V, x, (d) => ({ temperature: 1, topP, seed: seed + 1000 * row + d }), `row ${row} k ${k} ulps ${ulps}`);
    }
  }
});
