// Paged attention and KV cache writes against a float64 reference that gathers K/V through the
// block tables: GQA/MQA/MLA shapes, block sizes, mixed prefill+decode batches, sliding windows,
// bit-exact batching/chunking/split-K invariance, and exact argument errors.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import type { AttentionOptions } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import { fileSeed } from './helpers/seed.js';

const native = loadNative();

const seedBase = fileSeed(0, 'base added to each case seed');
const rng = (seed: number) => mulberry32(seedBase + seed);

function uniform(n: number, r: () => number, amp = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() * 2 - 1) * amp;
  return a;
}

function shuffle<T>(a: T[], r: () => number): T[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

interface Shape {
  heads: number; kvHeads: number; dk: number; dv: number; blockSize: number;
  /** MLA: V is read from the K cache at [vOffset, vOffset + dv) of each dk-wide row. */
  mla?: { vOffset: number };
  slidingWindow?: number;
  /** extra floats at the end of each q row (qRowStride = heads * dk + qPad) */
  qPad?: number;
  /** gpt-oss attention sinks: [heads] logits in the softmax denominator only */
  sinks?: Float32Array;
}

/** One sequence: qLen new tokens at the end of a context of ctxLen keys. */
interface Seq { qLen: number; ctxLen: number }

/** A paged cache holding every sequence's K/V (written with kvCacheWrite at scrambled blocks). */
interface World {
  shape: Shape;
  seqs: Seq[];
  k: Float32Array[];  // per sequence [ctxLen, kvHeads, dk]
  v: Float32Array[];  // per sequence [ctxLen, kvHeads, dv] (MLA: unused)
  kCache: Float32Array; // [numBlocks, blockSize, kvHeads, dk]
  vCache: Float32Array; // [numBlocks, blockSize, kvHeads, vStride] (MLA: kCache)
  tables: number[][];   // per sequence, its block ids
  maxBlocks: number;
  q: Float32Array;      // [rows, qRowStride]
  qStart: number[];
  rows: number;
}

function vStrideOf(s: Shape): number { return s.mla ? s.dk : s.dv; }
function qRowStrideOf(s: Shape): number { return s.heads * s.dk + (s.qPad ?? 0); }

function buildWorld(shape: Shape, seqs: Seq[], seed: number, rowGap = 0): World {
  const r = rng(seed);
  const { kvHeads, dk, dv, blockSize } = shape;
  const vStride = vStrideOf(shape);
  const perSeq = seqs.map((s) => Math.ceil(s.ctxLen / blockSize));
  const maxBlocks = Math.max(1, ...perSeq) + 1;
  const numBlocks = perSeq.reduce((a, b) => a + b, 0) + 3;
  const ids = shuffle([...Array(numBlocks).keys()], r);
  const kCache = new Float32Array(numBlocks * blockSize * kvHeads * dk).fill(NaN);
  const vCache = shape.mla ? kCache : new Float32Array(numBlocks * blockSize * kvHeads * vStride).fill(NaN);
  const tables: number[][] = [];
  const k: Float32Array[] = [];
  const v: Float32Array[] = [];
  let next = 0;
  for (const s of seqs) {
    const table = ids.slice(next, next + Math.ceil(s.ctxLen / blockSize));
    next += table.length;
    tables.push(table);
    const ks = uniform(s.ctxLen * kvHeads * dk, r);
    const vs = uniform(s.ctxLen * kvHeads * dv, r);
    k.push(ks);
    v.push(vs);
    const slots = new Int32Array(s.ctxLen);
    for (let j = 0; j < s.ctxLen; j++) slots[j] = table[Math.floor(j / blockSize)]! * blockSize + (j % blockSize);
    native.kvCacheWrite(ks, shape.mla ? null : vs, s.ctxLen, slots, kCache, shape.mla ? null : vCache,
      kvHeads, dk, shape.mla ? 0 : dv, shape.mla ? 0 : vStride);
  }
  const qStart: number[] = [];
  let rows = 0;
  for (const s of seqs) {
    qStart.push(rows);
    rows += s.qLen + rowGap;
  }
  // Sharper than unit scores so the softmax is far from uniform.
  const q = uniform(rows * qRowStrideOf(shape), r, 3);
  return { shape, seqs, k, v, kCache, vCache, tables, maxBlocks, q, qStart, rows };
}

function optsOf(w: World, numSeqs: number): AttentionOptions {
  const s = w.shape;
  const o: AttentionOptions = {
    numSeqs, heads: s.heads, kvHeads: s.kvHeads, dk: s.dk, dv: s.dv, blockSize: s.blockSize,
    maxBlocks: w.maxBlocks, scale: 1 / Math.sqrt(s.dk),
  };
  if (s.mla) { o.vStride = s.dk; o.vOffset = s.mla.vOffset; }
  if (s.slidingWindow) o.slidingWindow = s.slidingWindow;
  if (s.qPad) o.qRowStride = qRowStrideOf(s);
  if (s.sinks) o.sinks = s.sinks;
  return o;
}

function packSeqs(w: World, which: { seq: number; qFrom: number; qLen: number; ctxLen: number; qStart: number }[]) {
  const seqInfo = new Int32Array(which.length * 3);
  const tables = new Int32Array(which.length * w.maxBlocks).fill(-1);
  which.forEach((c, i) => {
    seqInfo.set([c.qStart, c.qLen, c.ctxLen], 3 * i);
    tables.set(w.tables[c.seq]!, i * w.maxBlocks);
  });
  return { seqInfo, tables };
}

/** Runs the whole world in one call; out rows follow q rows. */
function runAll(w: World): Float32Array {
  const { seqInfo, tables } = packSeqs(w, w.seqs.map((s, i) => ({
    seq: i, qFrom: 0, qLen: s.qLen, ctxLen: s.ctxLen, qStart: w.qStart[i]!,
  })));
  const out = new Float32Array(w.rows * w.shape.heads * w.shape.dv).fill(NaN);
  native.pagedAttention(w.q, w.kCache, w.vCache, seqInfo, tables, optsOf(w, w.seqs.length), out);
  return out;
}

/** float64 reference for q row (seq, i), head h -> [dv]. */
function reference(w: World, seq: number, i: number, h: number): Float64Array {
  const s = w.shape;
  const { qLen, ctxLen } = w.seqs[seq]!;
  const group = s.heads / s.kvHeads;
  const kvh = Math.floor(h / group);
  const pos = ctxLen - qLen + i;
  const lo = s.slidingWindow ? Math.max(0, pos - s.slidingWindow + 1) : 0;
  const qOff = (w.qStart[seq]! + i) * qRowStrideOf(s) + h * s.dk;
  const k = w.k[seq]!;
  const scores: number[] = [];
  let m = -Infinity;
  for (let j = lo; j <= pos; j++) {
    let d = 0;
    for (let x = 0; x < s.dk; x++) d += w.q[qOff + x]! * k[(j * s.kvHeads + kvh) * s.dk + x]!;
    d /= Math.sqrt(s.dk);
    scores.push(d);
    m = Math.max(m, d);
  }
  const out = new Float64Array(s.dv);
  let sum = 0;
  for (let j = lo; j <= pos; j++) {
    const p = Math.exp(scores[j - lo]! - m);
    sum += p;
    for (let x = 0; x < s.dv; x++) {
      const val = s.mla
        ? k[(j * s.kvHeads + kvh) * s.dk + s.mla.vOffset + x]!
        : w.v[seq]![(j * s.kvHeads + kvh) * s.dv + x]!;
      out[x] += p * val;
    }
  }
  // gpt-oss (HF eager_attention_forward): the sink joins the softmax over [scores, sink] and is dropped.
  if (s.sinks) sum += Math.exp(s.sinks[h]! - m);
  for (let x = 0; x < s.dv; x++) out[x] /= sum;
  return out;
}

// f32 with f32 accumulation over up to a few hundred keys of |v| <= 1.
const TOL = { maxAbs: 2e-5, relL2: 1e-5 };

/** Compares every `every`-th query row of each sequence (and its last) with the reference. */
function checkAgainstReference(w: World, out: Float32Array, label: string, every = 1): void {
  const s = w.shape;
  let maxAbs = 0;
  let errSq = 0;
  let refSq = 0;
  w.seqs.forEach((sq, seq) => {
    for (let i = 0; i < sq.qLen; i++) {
      if (i % every !== 0 && i !== sq.qLen - 1) continue;
      for (let h = 0; h < s.heads; h++) {
        const ref = reference(w, seq, i, h);
        const off = ((w.qStart[seq]! + i) * s.heads + h) * s.dv;
        for (let x = 0; x < s.dv; x++) {
          const got = out[off + x]!;
          assert.ok(Number.isFinite(got), `${label}: out[seq ${seq}, row ${i}, head ${h}, ${x}] is ${got}`);
          const e = Math.abs(got - ref[x]!);
          maxAbs = Math.max(maxAbs, e);
          errSq += e * e;
          refSq += ref[x]! * ref[x]!;
        }
      }
    }
  });
  const relL2 = Math.sqrt(errSq / Math.max(refSq, 1e-30));
  assert.ok(maxAbs <= TOL.maxAbs && relL2 <= TOL.relL2,
    `${label}: maxAbs ${maxAbs.toExponential(2)} relL2 ${relL2.toExponential(2)} exceed ${JSON.stringify(TOL)}`);
}

function bitEqual(a: Float32Array, b: Float32Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

function forEachSimd(fn: (level: string) => void): void {
  try {
    for (const level of ['auto', 'avx2', 'scalar'] as const) fn(native.setSimdLevel(level));
  } finally {
    native.setSimdLevel('auto');
  }
}

// The mixed batch of the brief: one prefill of 37 tokens and decodes with contexts 5 and 100.
const MIXED: Seq[] = [{ qLen: 37, ctxLen: 37 }, { qLen: 1, ctxLen: 5 }, { qLen: 1, ctxLen: 100 }];

const SHAPES: [string, Shape][] = [
  ['MHA 4/4 d64', { heads: 4, kvHeads: 4, dk: 64, dv: 64, blockSize: 16 }],
  ['GQA 8/2 d64 bs4', { heads: 8, kvHeads: 2, dk: 64, dv: 64, blockSize: 4 }],
  ['MQA 16/1 d64', { heads: 16, kvHeads: 1, dk: 64, dv: 64, blockSize: 16 }],
  ['DeepSeek dk192 dv128 bs4', { heads: 4, kvHeads: 4, dk: 192, dv: 128, blockSize: 4 }],
  ['MLA latent dk80 dv64', { heads: 8, kvHeads: 1, dk: 80, dv: 64, blockSize: 16, mla: { vOffset: 0 } }],
  ['MLA latent vOffset 16 bs4', { heads: 4, kvHeads: 1, dk: 80, dv: 64, blockSize: 4, mla: { vOffset: 16 } }],
  ['odd dims dk 40 dv 24, padded q rows', { heads: 6, kvHeads: 3, dk: 40, dv: 24, blockSize: 16, qPad: 7 }],
];

for (const [name, shape] of SHAPES) {
  test(`pagedAttention matches the float64 reference: ${name}, mixed prefill + decodes`, () => {
    const w = buildWorld(shape, MIXED, 11 + name.length);
    forEachSimd((level) => checkAgainstReference(w, runAll(w), `${name} [${level}]`));
  });
}

test('pagedAttention: chunked-context prefill and long decodes (keys beyond one 512-key segment)', () => {
  const shape: Shape = { heads: 8, kvHeads: 2, dk: 64, dv: 64, blockSize: 16 };
  // A prefill chunk of 40 tokens at the end of a 700-token context, and a decode at 1300.
  const w = buildWorld(shape, [{ qLen: 40, ctxLen: 700 }, { qLen: 1, ctxLen: 1300 }, { qLen: 3, ctxLen: 3 }], 5);
  forEachSimd((level) => checkAgainstReference(w, runAll(w), `long [${level}]`));
});

test('pagedAttention: sliding window (HF semantics: window keys including the query itself)', () => {
  for (const [win, bs] of [[7, 4], [16, 16], [33, 16]] as const) {
    const shape: Shape = { heads: 4, kvHeads: 2, dk: 64, dv: 64, blockSize: bs, slidingWindow: win };
    const w = buildWorld(shape, [...MIXED, { qLen: 5, ctxLen: 60 }], 77 + win);
    forEachSimd((level) => checkAgainstReference(w, runAll(w), `window ${win} bs ${bs} [${level}]`));
  }
});

test('pagedAttention: attention sinks (gpt-oss), with and without a sliding window, split-K decodes', () => {
  // Sinks around the scores' scale and far above it (a sink that takes most of the mass).
  const sinks = Float32Array.from([0.5, -1.25, 3, 40]);
  for (const win of [0, 5]) {
    const shape: Shape = { heads: 4, kvHeads: 2, dk: 64, dv: 64, blockSize: 4, sinks, ...(win ? { slidingWindow: win } : {}) };
    const w = buildWorld(shape, [...MIXED, { qLen: 2, ctxLen: 1300 }], 91 + win);
    forEachSimd((level) => checkAgainstReference(w, runAll(w), `sinks window ${win} [${level}]`));
    // Without sinks the result differs (the sinks really reach the kernel).
    const plain = runAll({ ...w, shape: { ...shape, sinks: undefined } });
    assert.ok(!bitEqual(plain, runAll(w)));
  }
  const w = buildWorld({ heads: 4, kvHeads: 2, dk: 64, dv: 64, blockSize: 4 }, MIXED, 3);
  const { seqInfo, tables } = packSeqs(w, [{ seq: 0, qFrom: 0, qLen: 37, ctxLen: 37, qStart: 0 }]);
  const out = new Float32Array(w.rows * 4 * 64);
  assert.throws(() => native.pagedAttention(w.q, w.kCache, w.vCache, seqInfo, tables,
    { ...optsOf(w, 1), sinks: new Float32Array(3) }, out), /opts\.sinks\.length is 3, expected heads = 4/);
});

test('pagedAttention: blocks outside every window may be freed (-1) without changing the result', () => {
  const shape: Shape = { heads: 4, kvHeads: 2, dk: 64, dv: 64, blockSize: 4, slidingWindow: 9 };
  const w = buildWorld(shape, [{ qLen: 1, ctxLen: 100 }, { qLen: 6, ctxLen: 50 }], 9);
  const full = runAll(w);
  // Seq 0's query at 99 sees keys 91..99 (blocks 22..24); seq 1's first query at 44 sees 36.. (block 9..).
  w.tables[0] = w.tables[0]!.map((id, b) => (b < 22 ? -1 : id));
  w.tables[1] = w.tables[1]!.map((id, b) => (b < 9 ? -1 : id));
  const freed = runAll(w);
  assert.ok(bitEqual(full, freed));
  checkAgainstReference(w, freed, 'freed blocks');
});

test('pagedAttention: each sequence gives bit-identical results alone and in a mixed batch', () => {
  const shape: Shape = { heads: 8, kvHeads: 2, dk: 64, dv: 64, blockSize: 16 };
  const seqs: Seq[] = [{ qLen: 37, ctxLen: 37 }, { qLen: 1, ctxLen: 5 }, { qLen: 1, ctxLen: 100 },
    { qLen: 1, ctxLen: 1200 }, { qLen: 20, ctxLen: 900 }];
  const w = buildWorld(shape, seqs, 21);
  forEachSimd((level) => {
    const batch = runAll(w);
    seqs.forEach((sq, i) => {
      const { seqInfo, tables } = packSeqs(w, [{ seq: i, qFrom: 0, qLen: sq.qLen, ctxLen: sq.ctxLen, qStart: w.qStart[i]! }]);
      const alone = new Float32Array(batch.length).fill(NaN);
      native.pagedAttention(w.q, w.kCache, w.vCache, seqInfo, tables, optsOf(w, 1), alone);
      const n = sq.qLen * shape.heads * shape.dv;
      const off = w.qStart[i]! * shape.heads * shape.dv;
      assert.ok(bitEqual(batch.subarray(off, off + n), alone.subarray(off, off + n)), `seq ${i} [${level}]`);
    });
  });
});

test('pagedAttention: chunked prefill is bit-identical to one-shot prefill', () => {
  for (const shape of [
    { heads: 8, kvHeads: 2, dk: 64, dv: 64, blockSize: 16 },
    { heads: 4, kvHeads: 1, dk: 80, dv: 64, blockSize: 4, mla: { vOffset: 0 } },
    { heads: 4, kvHeads: 4, dk: 64, dv: 64, blockSize: 16, slidingWindow: 150 },
  ] as Shape[]) {
    const total = 700;
    const w = buildWorld(shape, [{ qLen: total, ctxLen: total }], 31);
    forEachSimd((level) => {
      const oneShot = runAll(w);
      const chunked = new Float32Array(oneShot.length).fill(NaN);
      let done = 0;
      for (const len of [200, 1, 300, 198, 1]) {
        // The engine's view: this chunk's q rows, a context that ends with the chunk.
        const { seqInfo, tables } = packSeqs(w, [{ seq: 0, qFrom: done, qLen: len, ctxLen: done + len, qStart: done }]);
        native.pagedAttention(w.q, w.kCache, w.vCache, seqInfo, tables, optsOf(w, 1), chunked);
        done += len;
      }
      assert.equal(done, total);
      assert.ok(bitEqual(oneShot, chunked), `chunked != one-shot [${level}] ${JSON.stringify(shape)}`);
    });
    checkAgainstReference(w, runAll(w), 'chunk reference', 37);
  }
});

test('pagedAttention: every prefill row is bit-identical to decoding it alone (tiled prefill == decode)', () => {
  // Group sizes that do not fill the 4-row score and P.V register blocks, odd dk (score
  // accumulator tail), dv with a 16-wide tail and past one 64-wide P.V chunk, MLA, a window.
  for (const shape of [
    { heads: 6, kvHeads: 2, dk: 37, dv: 72, blockSize: 16 },
    { heads: 5, kvHeads: 1, dk: 64, dv: 200, blockSize: 4 },
    { heads: 16, kvHeads: 4, dk: 64, dv: 64, blockSize: 16 },
    { heads: 2, kvHeads: 2, dk: 130, dv: 24, blockSize: 8, qPad: 3 },
    { heads: 4, kvHeads: 1, dk: 80, dv: 64, blockSize: 4, mla: { vOffset: 16 } },
    { heads: 8, kvHeads: 2, dk: 64, dv: 64, blockSize: 16, slidingWindow: 21 },
  ] as Shape[]) {
    const total = 75;
    const w = buildWorld(shape, [{ qLen: total, ctxLen: total }], 41);
    forEachSimd((level) => {
      const prefill = runAll(w);
      const decoded = new Float32Array(prefill.length).fill(NaN);
      for (let i = 0; i < total; i++) {
        const { seqInfo, tables } = packSeqs(w, [{ seq: 0, qFrom: i, qLen: 1, ctxLen: i + 1, qStart: i }]);
        native.pagedAttention(w.q, w.kCache, w.vCache, seqInfo, tables, optsOf(w, 1), decoded);
      }
      assert.ok(bitEqual(prefill, decoded), `prefill != decode [${level}] ${JSON.stringify(shape)}`);
    });
    checkAgainstReference(w, runAll(w), `tiled prefill ${JSON.stringify(shape)}`);
  }
});

test('pagedAttention: split-K decode (several threads) is bit-identical to one thread', () => {
  const before = native.capabilities().threads;
  try {
    const shape: Shape = { heads: 8, kvHeads: 2, dk: 64, dv: 64, blockSize: 16 };
    const w = buildWorld(shape, [{ qLen: 1, ctxLen: 2100 }, { qLen: 2, ctxLen: 1500 }], 41);
    forEachSimd((level) => {
      native.setNumThreads(4);
      const many = runAll(w);
      native.setNumThreads(1);
      const one = runAll(w);
      assert.ok(bitEqual(many, one), `split-K [${level}]`);
      checkAgainstReference(w, many, `split-K [${level}]`);
    });
  } finally {
    native.setNumThreads(before);
  }
});

test('pagedAttention leaves rows outside every sequence untouched (NaN poison stays)', () => {
  const shape: Shape = { heads: 4, kvHeads: 2, dk: 64, dv: 64, blockSize: 16 };
  const w = buildWorld(shape, MIXED, 3, 2);  // two unused q rows after each sequence
  const out = runAll(w);
  checkAgainstReference(w, out, 'gaps');
  const rowFloats = shape.heads * shape.dv;
  w.seqs.forEach((s, i) => {
    const gap = (w.qStart[i]! + s.qLen) * rowFloats;
    assert.ok(out.subarray(gap, gap + 2 * rowFloats).every(Number.isNaN), `gap after seq ${i}`);
  });
});

test('kvCacheWrite writes K and V rows at their slots and skips negative slots', () => {
  const kvHeads = 2, dk = 8, dv = 4, vStride = 6, numSlots = 10;
  const r = rng(5);
  const k = uniform(3 * kvHeads * dk, r);
  const v = uniform(3 * kvHeads * dv, r);
  const kCache = new Float32Array(numSlots * kvHeads * dk).fill(NaN);
  const vCache = new Float32Array(numSlots * kvHeads * vStride).fill(NaN);
  native.kvCacheWrite(k, v, 3, Int32Array.from([7, -1, 0]), kCache, vCache, kvHeads, dk, dv, vStride);
  assert.deepEqual(kCache.subarray(7 * kvHeads * dk, 8 * kvHeads * dk), k.subarray(0, kvHeads * dk));
  assert.deepEqual(kCache.subarray(0, kvHeads * dk), k.subarray(2 * kvHeads * dk, 3 * kvHeads * dk));
  for (let h = 0; h < kvHeads; h++) {
    assert.deepEqual(vCache.subarray((7 * kvHeads + h) * vStride, (7 * kvHeads + h) * vStride + dv),
      v.subarray(h * dv, (h + 1) * dv));
    assert.ok(Number.isNaN(vCache[(7 * kvHeads + h) * vStride + dv]!), 'v padding untouched');
  }
  let written = 0;
  for (const x of kCache) if (!Number.isNaN(x)) written++;
  assert.equal(written, 2 * kvHeads * dk, 'slot -1 skipped, nothing else written');
});

test('kvCacheWrite and pagedAttention reject bad arguments with exact messages', () => {
  const shape: Shape = { heads: 4, kvHeads: 2, dk: 8, dv: 8, blockSize: 4 };
  const w = buildWorld(shape, [{ qLen: 3, ctxLen: 6 }], 1);
  const good = () => ({ ...packSeqs(w, [{ seq: 0, qFrom: 0, qLen: 3, ctxLen: 6, qStart: 0 }]), opts: optsOf(w, 1) });
  const out = new Float32Array(3 * 4 * 8);
  const call = (mut: (g: ReturnType<typeof good>) => void, o: Float32Array = out, q = w.q) => {
    const g = good();
    mut(g);
    return () => native.pagedAttention(q, w.kCache, w.vCache, g.seqInfo, g.tables, g.opts, o);
  };
  const numBlocks = w.kCache.length / (4 * 2 * 8);
  const cases: [() => void, string, string][] = [
    [call((g) => { g.opts.heads = 5; }), 'RangeError', 'opts.heads is 5, expected a multiple of opts.kvHeads (2)'],
    [call((g) => { g.opts.dk = 2.5; }), 'TypeError', 'opts.dk must be an integer, got 2.500000'],
    [call((g) => { delete (g.opts as Partial<AttentionOptions>).blockSize; }), 'TypeError', 'opts.blockSize is required'],
    [call((g) => { g.opts.vOffset = 4; }), 'RangeError', 'opts.vOffset + opts.dv is 12, expected at most opts.vStride (8)'],
    [call((g) => { g.opts.qRowStride = 31; }), 'RangeError', 'opts.qRowStride is 31, expected at least heads * dk = 32'],
    [call((g) => { g.opts.numSeqs = 2; }), 'RangeError', 'seqInfo.length is 3, expected at least 6'],
    [call((g) => { g.seqInfo[2] = 2; }), 'RangeError', 'seqInfo[0] ctxLen is 2, expected at least qLen (3)'],
    [call((g) => { g.seqInfo[0] = -1; }), 'RangeError', 'seqInfo[0] qStart is -1, expected at least 0'],
    [call((g) => { g.seqInfo[2] = 4 * w.maxBlocks + 1; }), 'RangeError',
      `seqInfo[0] ctxLen is ${4 * w.maxBlocks + 1}, expected at most maxBlocks * blockSize = ${4 * w.maxBlocks}`],
    [call((g) => { g.tables[1] = numBlocks; }), 'RangeError',
      `blockTables[0][1] is ${numBlocks}, expected 0..${numBlocks - 1} (kCache holds ${numBlocks} blocks)`],
    [call((g) => { g.tables[0] = -1; }), 'RangeError',
      `blockTables[0][0] is -1, expected 0..${numBlocks - 1} (kCache holds ${numBlocks} blocks)`],
    [call(() => {}, new Float32Array(10)), 'RangeError', 'out.length is 10, expected at least 96'],
    [call((g) => { g.seqInfo[0] = 1; }, out, w.q.subarray(0, 3 * 32)), 'RangeError', 'q.length is 96, expected at least 128'],
    [call((g) => { (g as { tables: unknown }).tables = new Float32Array(8); }), 'TypeError', 'blockTables must be a Int32Array'],
    [() => native.pagedAttention(w.q, w.kCache, w.vCache.subarray(1), good().seqInfo, good().tables, optsOf(w, 1), out),
      'RangeError', `vCache.length is ${w.vCache.length - 1}, expected at least ${w.vCache.length}`],
    [() => (native.pagedAttention as (...a: unknown[]) => void)(w.q), 'TypeError', 'pagedAttention expects 7 arguments, got 1'],
    [() => native.kvCacheWrite(new Float32Array(16), null, 2, Int32Array.from([0, 5]), new Float32Array(5 * 8), null, 1, 8, 0, 0),
      'RangeError', 'slots[1] is 5, expected less than 5 (kCache holds 5 slots)'],
    [() => native.kvCacheWrite(new Float32Array(16), new Float32Array(8), 2, Int32Array.from([0, 1]), new Float32Array(5 * 8),
      new Float32Array(4), 1, 8, 4, 4), 'RangeError', 'slots[1] is 1, expected less than 1 (vCache holds 1 slots)'],
    [() => native.kvCacheWrite(new Float32Array(15), null, 2, Int32Array.from([0, 1]), new Float32Array(5 * 8), null, 1, 8, 0, 0),
      'RangeError', 'k.length is 15, expected at least 16'],
    [() => native.kvCacheWrite(new Float32Array(16), new Float32Array(8), 2, Int32Array.from([0, 1]), new Float32Array(40), null, 1, 8, 4, 4),
      'TypeError', 'vCache must be given when v is given'],
    [() => native.kvCacheWrite(new Float32Array(16), null, 2, Int32Array.from([0, 1]), new Float32Array(40), null, 1, 8, 4, 3),
      'RangeError', 'vStride is 3, expected at least dv (4)'],
  ];
  for (const [fn, name, message] of cases) {
    assert.throws(fn, (e: Error & { code?: string }) => {
      assert.equal(e.message, message);
      assert.equal(e.name, name, message);
      assert.equal(e.code, 'E_INVALID_ARG');
      return true;
    }, `expected ${name}: ${message}`);
  }
  // The process survives and the good call still works.
  const g = good();
  const o = new Float32Array(out.length).fill(NaN);
  native.pagedAttention(w.q, w.kCache, w.vCache, g.seqInfo, g.tables, g.opts, o);
  assert.ok(o.every(Number.isFinite));
});
