// The bf16 and fp8 (e4m3, static per-kv-head scales) KV cache: the write's rounding against an
// independent nearest-value search over every e4m3 code, and paged attention over a bf16 / fp8 cache
// against a float64 reference on the dequantised cache (GQA, MQA, MLA latent, sliding window, long
// decodes), bit-identical to the f32 kernel on an f32 cache holding the same dequantised values.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import type { AttentionOptions } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import { kvCacheNumBlocks, kvBytesPerBlock } from '../src/engine/kv-cache.js';
import {
  allocKvArray, bf16ToF32, f32ToBf16, fp8ToF32, kvDecode, kvEncode, resolveKvDtype, type KvArray, type KvDtype,
} from '../src/model/kv-dtype.js';
import { fileSeed } from './helpers/seed.js';

const native = loadNative();
const seedBase = fileSeed(0, 'base added to each case seed');
const rng = (seed: number) => mulberry32(seedBase + seed);

function uniform(n: number, r: () => number, amp = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() * 2 - 1) * amp;
  return a;
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

// ------------------------------------------------------------------ the element conversions

/** Every finite e4m3 value, from an independent decoding of the bit fields (float64). */
const E4M3: { code: number; value: number }[] = [];
for (let code = 0; code < 256; code++) {
  const e = (code >> 3) & 15, m = code & 7, sgn = code & 0x80 ? -1 : 1;
  if (e === 15 && m === 7) continue; // NaN
  E4M3.push({ code, value: sgn * (e === 0 ? m / 8 * 2 ** -6 : (1 + m / 8) * 2 ** (e - 7)) });
}

/** Nearest e4m3 code by search (ties to the even code), saturating at +-448. */
function nearestE4m3(x: number): number {
  let best = E4M3[0]!;
  let bestErr = Infinity;
  for (const c of E4M3) {
    if (Math.sign(c.value) !== Math.sign(x) && c.value !== 0) continue;
    const err = Math.abs(c.value - x);
    if (err < bestErr || (err === bestErr && (c.code & 1) === 0)) {
      best = c;
      bestErr = err;
    }
  }
  // -0 and +0: the sign follows x.
  if (best.value === 0) return x < 0 || Object.is(x, -0) ? 0x80 : 0;
  return best.code;
}

function edgeValues(r: () => number): Float32Array {
  const xs: number[] = [0, -0, 448, -448, 449, 463.99, 464, 465, 1e6, -1e30, 2 ** -6, 2 ** -9, 2 ** -10,
    1.5 * 2 ** -10, 3 * 2 ** -10, 0.9 * 2 ** -9, 1.0625, 1.1875, -1.0625, 240, 241, 232, 248];
  for (const c of E4M3) {
    xs.push(c.value);
    const next = E4M3.find((d) => d.value > c.value && Math.sign(d.value) === Math.sign(c.value || 1));
    if (next) xs.push((c.value + next.value) / 2); // exact ties
  }
  for (let i = 0; i < 2000; i++) xs.push((r() * 2 - 1) * 2 ** (Math.floor(r() * 24) - 12));
  return Float32Array.from(xs);
}

test('kvCacheWrite to fp8 stores the nearest e4m3 of x / scale (ties to even, saturating at 448)', () => {
  const r = rng(1);
  const xs = edgeValues(r);
  for (const scale of [1, 0.0625, 0.37]) {
    const cache = new Uint8Array(xs.length);
    native.kvCacheWrite(xs, null, xs.length, Int32Array.from(xs.keys()), cache, null, 1, 1, 0, 0,
      Float32Array.of(scale), null);
    for (let i = 0; i < xs.length; i++) {
      const want = nearestE4m3(Math.fround(xs[i]! / Math.fround(scale)));
      assert.equal(cache[i], want, `x ${xs[i]} scale ${scale}: code 0x${cache[i]!.toString(16)}, expected 0x${want.toString(16)}`);
      assert.equal(kvEncode('fp8', xs[i]!, scale), want, `kvEncode(${xs[i]}, ${scale})`);
    }
  }
  // Decoding is the bit-field value (the table above).
  for (const c of E4M3) assert.equal(fp8ToF32(c.code), c.value);
});

test('kvCacheWrite to bf16 rounds to nearest even like the convert op', () => {
  const r = rng(2);
  const xs = edgeValues(r);
  const cache = new Uint16Array(xs.length);
  native.kvCacheWrite(xs, null, xs.length, Int32Array.from(xs.keys()), cache, null, 1, 1, 0, 0);
  const viaConvert = new Uint16Array(xs.length);
  native.convert(xs, 'f32', viaConvert, 'bf16');
  assert.deepEqual(cache, viaConvert);
  for (let i = 0; i < xs.length; i++) {
    assert.equal(f32ToBf16(xs[i]!), cache[i]);
    const back = bf16ToF32(cache[i]!);
    assert.ok(Math.abs(back - xs[i]!) <= Math.abs(xs[i]!) * 2 ** -8, `bf16 of ${xs[i]} is ${back}`);
  }
});

// ------------------------------------------------------------------ attention over the stored type

interface Shape {
  heads: number; kvHeads: number; dk: number; dv: number; blockSize: number;
  mla?: { vOffset: number };
  slidingWindow?: number;
}
interface Seq { qLen: number; ctxLen: number }

/** A paged cache of `dtype` written by kvCacheWrite, and an f32 cache of its dequantised values. */
interface World {
  shape: Shape;
  seqs: Seq[];
  dtype: KvDtype;
  kCache: KvArray;
  vCache: KvArray;
  kDeq: Float32Array; // same layout, f32: the values kCache holds
  vDeq: Float32Array;
  kScales: Float32Array;
  vScales: Float32Array;
  tables: number[][];
  maxBlocks: number;
  q: Float32Array;
  qStart: number[];
  rows: number;
}

function buildWorld(shape: Shape, seqs: Seq[], dtype: KvDtype, seed: number, amp: number): World {
  const r = rng(seed);
  const { kvHeads, dk, dv, blockSize } = shape;
  const vStride = shape.mla ? dk : dv;
  const perSeq = seqs.map((s) => Math.ceil(s.ctxLen / blockSize));
  const maxBlocks = Math.max(1, ...perSeq) + 1;
  const numBlocks = perSeq.reduce((a, b) => a + b, 0) + 3;
  const ids = [...Array(numBlocks).keys()].reverse();
  const kCache = allocKvArray(dtype, numBlocks * blockSize * kvHeads * dk);
  const vCache = shape.mla ? kCache : allocKvArray(dtype, numBlocks * blockSize * kvHeads * vStride);
  // Per-head scales around amp / 448 (so values use the e4m3 range), different per head.
  const kScales = Float32Array.from({ length: kvHeads }, (_, h) => amp / 300 * (1 + h / 3));
  const vScales = Float32Array.from({ length: kvHeads }, (_, h) => amp / 200 * (1 + h / 5));
  const tables: number[][] = [];
  let next = 0;
  for (const s of seqs) {
    const table = ids.slice(next, next + Math.ceil(s.ctxLen / blockSize));
    next += table.length;
    tables.push(table);
    const ks = uniform(s.ctxLen * kvHeads * dk, r, amp);
    const vs = uniform(s.ctxLen * kvHeads * dv, r, amp);
    const slots = new Int32Array(s.ctxLen);
    for (let j = 0; j < s.ctxLen; j++) slots[j] = table[Math.floor(j / blockSize)]! * blockSize + (j % blockSize);
    native.kvCacheWrite(ks, shape.mla ? null : vs, s.ctxLen, slots, kCache, shape.mla ? null : vCache,
      kvHeads, dk, shape.mla ? 0 : dv, shape.mla ? 0 : vStride, kScales, shape.mla ? null : vScales);
  }
  const deq = (c: KvArray, scales: Float32Array, width: number) => {
    const out = new Float32Array(c.length);
    for (let i = 0; i < c.length; i++) out[i] = kvDecode(dtype, c[i]!, scales[Math.floor(i / width) % kvHeads]!);
    return out;
  };
  const kDeq = deq(kCache, kScales, dk);
  const vDeq = shape.mla ? kDeq : deq(vCache, vScales, vStride);
  const qStart: number[] = [];
  let rows = 0;
  for (const s of seqs) {
    qStart.push(rows);
    rows += s.qLen;
  }
  const q = uniform(rows * shape.heads * dk, r, 3 / amp);
  return { shape, seqs, dtype, kCache, vCache, kDeq, vDeq, kScales, vScales, tables, maxBlocks, q, qStart, rows };
}

function run(w: World, stored: boolean): Float32Array {
  const s = w.shape;
  const seqInfo = new Int32Array(w.seqs.length * 3);
  const tables = new Int32Array(w.seqs.length * w.maxBlocks).fill(-1);
  w.seqs.forEach((sq, i) => {
    seqInfo.set([w.qStart[i]!, sq.qLen, sq.ctxLen], 3 * i);
    tables.set(w.tables[i]!, i * w.maxBlocks);
  });
  const o: AttentionOptions = {
    numSeqs: w.seqs.length, heads: s.heads, kvHeads: s.kvHeads, dk: s.dk, dv: s.dv, blockSize: s.blockSize,
    maxBlocks: w.maxBlocks, scale: 1 / Math.sqrt(s.dk),
  };
  if (s.mla) { o.vStride = s.dk; o.vOffset = s.mla.vOffset; }
  if (s.slidingWindow) o.slidingWindow = s.slidingWindow;
  if (stored && w.dtype === 'fp8') { o.kScales = w.kScales; o.vScales = s.mla ? w.kScales : w.vScales; }
  const out = new Float32Array(w.rows * s.heads * s.dv).fill(NaN);
  native.pagedAttention(w.q, stored ? w.kCache : w.kDeq, stored ? w.vCache : w.vDeq, seqInfo, tables, o, out);
  return out;
}

/** float64 attention of every row over the dequantised cache, gathered through the block tables. */
function checkReference(w: World, out: Float32Array, label: string): void {
  const s = w.shape;
  const vStride = s.mla ? s.dk : s.dv;
  const group = s.heads / s.kvHeads;
  let maxAbs = 0, errSq = 0, refSq = 0;
  w.seqs.forEach((sq, seq) => {
    const slot = (j: number) => w.tables[seq]![Math.floor(j / s.blockSize)]! * s.blockSize + (j % s.blockSize);
    for (let i = 0; i < sq.qLen; i++) {
      const pos = sq.ctxLen - sq.qLen + i;
      const lo = s.slidingWindow ? Math.max(0, pos - s.slidingWindow + 1) : 0;
      for (let h = 0; h < s.heads; h++) {
        const kvh = Math.floor(h / group);
        const qOff = (w.qStart[seq]! + i) * s.heads * s.dk + h * s.dk;
        const scores: number[] = [];
        let m = -Infinity;
        for (let j = lo; j <= pos; j++) {
          const kOff = (slot(j) * s.kvHeads + kvh) * s.dk;
          let d = 0;
          for (let x = 0; x < s.dk; x++) d += w.q[qOff + x]! * w.kDeq[kOff + x]!;
          scores.push(d / Math.sqrt(s.dk));
          m = Math.max(m, d / Math.sqrt(s.dk));
        }
        const ref = new Float64Array(s.dv);
        let sum = 0;
        for (let j = lo; j <= pos; j++) {
          const p = Math.exp(scores[j - lo]! - m);
          sum += p;
          const vOff = (slot(j) * s.kvHeads + kvh) * vStride + (s.mla?.vOffset ?? 0);
          for (let x = 0; x < s.dv; x++) ref[x] += p * w.vDeq[vOff + x]!;
        }
        const off = ((w.qStart[seq]! + i) * s.heads + h) * s.dv;
        for (let x = 0; x < s.dv; x++) {
          const want = ref[x]! / sum, got = out[off + x]!;
          assert.ok(Number.isFinite(got), `${label}: out[seq ${seq}, row ${i}, head ${h}, ${x}] is ${got}`);
          maxAbs = Math.max(maxAbs, Math.abs(got - want));
          errSq += (got - want) ** 2;
          refSq += want * want;
        }
      }
    }
  });
  // The f32 kernel's tolerance of attention.test.ts, relative to the values' amplitude.
  const amp = Math.sqrt(refSq / Math.max(1, out.length));
  const relL2 = Math.sqrt(errSq / Math.max(refSq, 1e-30));
  assert.ok(relL2 <= 1e-5 && maxAbs <= 2e-5 * Math.max(1, amp * 4),
    `${label}: maxAbs ${maxAbs.toExponential(2)} relL2 ${relL2.toExponential(2)}`);
}

const MIXED: Seq[] = [{ qLen: 37, ctxLen: 37 }, { qLen: 1, ctxLen: 5 }, { qLen: 1, ctxLen: 100 }];
const SHAPES: [string, Shape, Seq[]][] = [
  ['GQA 8/2 d64 bs4', { heads: 8, kvHeads: 2, dk: 64, dv: 64, blockSize: 4 }, MIXED],
  ['MQA 16/1 d64', { heads: 16, kvHeads: 1, dk: 64, dv: 64, blockSize: 16 }, MIXED],
  ['odd dims dk 40 dv 24', { heads: 6, kvHeads: 3, dk: 40, dv: 24, blockSize: 16 }, MIXED],
  ['MLA latent dk 80 dv 64 vOffset 16', { heads: 4, kvHeads: 1, dk: 80, dv: 64, blockSize: 4, mla: { vOffset: 16 } }, MIXED],
  ['sliding window 33', { heads: 4, kvHeads: 2, dk: 64, dv: 64, blockSize: 16, slidingWindow: 33 },
    [...MIXED, { qLen: 5, ctxLen: 60 }]],
  ['long decodes (split-K, several 512-key segments)', { heads: 8, kvHeads: 2, dk: 64, dv: 64, blockSize: 16 },
    [{ qLen: 40, ctxLen: 700 }, { qLen: 1, ctxLen: 1300 }]],
];

for (const dtype of ['bf16', 'fp8'] as const) {
  for (const [name, shape, seqs] of SHAPES) {
    test(`pagedAttention over a ${dtype} cache: ${name}: float64 reference on the dequantised cache, ` +
         'bit-identical to an f32 cache of the same values', () => {
      // amp 0.05: fp8 values near the bottom of e4m3's range without scales; the scales lift them.
      for (const amp of [1, 0.05]) {
        const w = buildWorld(shape, seqs, dtype, 7 + name.length, amp);
        forEachSimd((level) => {
          const stored = run(w, true);
          const label = `${dtype} ${name} amp ${amp} [${level}]`;
          assert.ok(bitEqual(stored, run(w, false)), `${label}: differs from the f32 kernel on the dequantised cache`);
          checkReference(w, stored, label);
        });
      }
    });
  }
}

test('fp8 / bf16 caches: exact argument errors', () => {
  const shape = { heads: 2, kvHeads: 2, dk: 8, dv: 8, blockSize: 4 };
  const w = buildWorld(shape, [{ qLen: 1, ctxLen: 3 }], 'fp8', 3, 1);
  const seqInfo = Int32Array.of(0, 1, 3);
  const tables = Int32Array.from({ length: w.maxBlocks }, (_, i) => w.tables[0]![i] ?? -1);
  const opts = (extra: Partial<AttentionOptions>): AttentionOptions => ({
    numSeqs: 1, heads: 2, kvHeads: 2, dk: 8, dv: 8, blockSize: 4, maxBlocks: w.maxBlocks, scale: 0.3, ...extra,
  });
  const out = new Float32Array(16);
  const cases: [() => void, string, string][] = [
    [() => native.pagedAttention(w.q, w.kCache, w.vCache, seqInfo, tables, opts({ vScales: w.vScales }), out),
      'TypeError', 'opts.kScales must be a Float32Array [kvHeads] for an fp8 (Uint8Array) cache'],
    [() => native.pagedAttention(w.q, w.kCache, w.vCache, seqInfo, tables, opts({ kScales: w.kScales, vScales: Float32Array.of(1) }), out),
      'RangeError', 'opts.vScales.length is 1, expected at least kvHeads = 2'],
    [() => native.pagedAttention(w.q, w.kCache, w.vCache, seqInfo, tables, opts({ kScales: Float32Array.of(1, 0), vScales: w.vScales }), out),
      'RangeError', 'opts.kScales[1] is 0.000000, expected a finite number > 0'],
    [() => native.pagedAttention(w.q, w.kCache, new Uint16Array(w.vCache.length), seqInfo, tables, opts({}), out),
      'TypeError', 'vCache holds bf16, expected fp8 like kCache'],
    [() => native.pagedAttention(w.q, new Int32Array(8) as unknown as Float32Array, w.vCache, seqInfo, tables, opts({}), out),
      'TypeError', 'kCache must be a Float32Array (f32), Uint16Array (bf16) or Uint8Array (fp8 e4m3)'],
    [() => native.kvCacheWrite(new Float32Array(16), null, 1, Int32Array.of(0), new Uint8Array(64), null, 2, 8, 0, 0),
      'TypeError', 'kScales must be a Float32Array [kvHeads] for an fp8 (Uint8Array) cache'],
    [() => native.kvCacheWrite(new Float32Array(16), new Float32Array(16), 1, Int32Array.of(0), new Uint8Array(64), new Uint8Array(64),
      2, 8, 8, 8, Float32Array.of(1, 1), Float32Array.of(1, NaN)), 'RangeError', 'vScales[1] is nan, expected a finite number > 0'],
    [() => native.kvCacheWrite(new Float32Array(16), new Float32Array(16), 1, Int32Array.of(0), new Uint16Array(64), new Float32Array(64),
      2, 8, 8, 8), 'TypeError', 'vCache holds f32, expected bf16 like kCache'],
  ];
  for (const [fn, name, message] of cases) {
    assert.throws(fn, (e: Error & { code?: string }) => {
      assert.equal(e.message, message);
      assert.equal(e.name, name, message);
      assert.equal(e.code, 'E_INVALID_ARG');
      return true;
    }, `expected ${name}: ${message}`);
  }
});

// ------------------------------------------------------------------ sizing

test('KV sizing counts bytes of the cache dtype: the same GiB holds 2x (bf16) and 4x (fp8) the f32 blocks', () => {
  const base = { numCaches: 10, elementsPerToken: [4 * 64, 4 * 64] as [number, number], blockSize: 16 };
  const o = { blocks: 0, gib: 1, maxNumSeqs: 16, maxContext: 4096 };
  const f32 = kvCacheNumBlocks({ ...base, dtype: 'f32' }, o);
  assert.equal(kvBytesPerBlock({ ...base, dtype: 'f32' }), 10 * 16 * 512 * 4);
  assert.equal(f32, Math.floor(2 ** 30 / (10 * 16 * 512 * 4)));
  const bf16 = kvCacheNumBlocks({ ...base, dtype: 'bf16' }, o), fp8 = kvCacheNumBlocks({ ...base, dtype: 'fp8' }, o);
  assert.equal(bf16, Math.floor(2 ** 30 / (10 * 16 * 512 * 2)));
  assert.equal(fp8, Math.floor(2 ** 30 / (10 * 16 * 512)));
  assert.ok(bf16 >= 2 * f32 && bf16 <= 2 * f32 + 1 && fp8 >= 4 * f32 && fp8 <= 4 * f32 + 3, `${f32} ${bf16} ${fp8}`);
  // MLA's latent (no V) and the automatic size under a byte cap.
  const mla = { numCaches: 2, elementsPerToken: [576, 0] as [number, number], blockSize: 16 };
  const cap = { blocks: 0, gib: 0, maxNumSeqs: 1000, maxContext: 4096, autoCapBytes: 2 ** 24 };
  assert.equal(kvCacheNumBlocks({ ...mla, dtype: 'fp8' }, cap), Math.floor(2 ** 24 / (2 * 16 * 576)));
  assert.equal(kvCacheNumBlocks({ ...mla, dtype: 'bf16' }, cap), Math.floor(2 ** 24 / (2 * 16 * 576 * 2)));
  assert.equal(resolveKvDtype('auto', 'f32'), 'f32');
  assert.equal(resolveKvDtype('auto', 'bf16'), 'bf16');
  assert.equal(resolveKvDtype('fp8', 'f32'), 'fp8');
  assert.throws(() => resolveKvDtype('int4', 'f32'), /--kv-cache-dtype is 'int4', expected auto, f32, bf16 or fp8/);
});

test('engine core: --kv-cache-gb gives 2x / 4x the f32 blocks in bf16 / fp8, stats count bytes of the type, ' +
     'and a bf16 / fp8 engine serves greedy requests', async () => {
  const { EngineCore } = await import('../src/engine/engine-core.js');
  const { loadModel } = await import('../src/model/load.js');
  const { packageRoot } = await import('../src/native/index.js');
  const path = await import('node:path');
  const loaded = loadModel(path.join(packageRoot(), 'test', 'fixtures', 'qwen3_moe'), { fast: true });
  try {
    const [kf, vf] = loaded.model.cacheFloatsPerToken();
    const f32Bytes = loaded.model.numCaches * 4 * (kf + vf) * 4;
    const gib = (200 * f32Bytes) / 2 ** 30; // exactly 200 f32 blocks of 4 tokens
    const blocks: Record<string, number> = {};
    for (const kvCacheDtype of ['f32', 'bf16', 'fp8'] as const) {
      const core = new EngineCore(loaded, {
        kvCacheBlocks: 0, kvCacheGb: gib, kvCacheDtype, blockSize: 4, maxNumSeqs: 4, maxNumBatchedTokens: 64, servedModelName: 't',
      });
      blocks[kvCacheDtype] = core.numBlocks;
      assert.equal(core.kvDtype, kvCacheDtype);
      assert.equal(core.add({ id: 'a', promptTokenIds: [1, 2, 3, 4, 5, 6], maxTokens: 3, sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 } } as never), null);
      const r = core.step()!;
      const s = core.stats();
      assert.equal(s.kvBytesTotal, core.numBlocks * f32Bytes / (kvCacheDtype === 'f32' ? 1 : kvCacheDtype === 'bf16' ? 2 : 4));
      assert.equal(s.kvBytesUsed, s.kvBlocksUsed * s.kvBytesTotal! / s.kvBlocksTotal);
      assert.ok(s.kvBlocksUsed >= 2, `${kvCacheDtype}: the prompt holds blocks`);
      assert.ok(r.events.some((e) => e.type === 'tokens'), `${kvCacheDtype}: a token came out`);
    }
    assert.deepEqual(blocks, { f32: 200, bf16: 400, fp8: 800 });
  } finally {
    loaded.model.dispose();
  }
});
