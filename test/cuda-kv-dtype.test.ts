// The bf16 / fp8 KV cache on the device: cudaKvCacheWrite stores the same bits as the CPU's
// kvCacheWrite, cudaPagedAttention over the stored type matches the CPU kernel on the same cache
// (itself bit-identical to f32 on the dequantised values, attention-kv-dtype.test.ts), and the device
// model with a bf16 / fp8 cache stays within the CPU's bounds of HF's goldens. On the real GPU when
// there is one (skipped otherwise), always on the emulator of the cuda* ops.
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { mulberry32 } from '../src/engine/rng.js';
import { allocKvArray, kvDtypeBytes, type KvDtype } from '../src/model/kv-dtype.js';
import { loadCudaModel } from '../src/model/load.js';
import { loadNative, packageRoot, type CudaAddon, type CudaBuffer, type NativeAddon } from '../src/native/index.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { needsCudaDevice } from './helpers/cuda-skip.js';
import { kvFidelityOf } from './helpers/kv-fidelity.js';
import { fileSeed } from './helpers/seed.js';

const native = loadNative();
const seedBase = fileSeed(0, 'base added to each case seed');

function uniform(n: number, r: () => number, amp = 1): Float32Array {
  return Float32Array.from({ length: n }, () => (r() * 2 - 1) * amp);
}

const backends: [string, () => CudaAddon, string | false][] = [
  ['emulator', () => createCudaEmulator(), false],
  ['gpu', () => native as NativeAddon & CudaAddon, needsCudaDevice],
];

function upload(cu: CudaAddon, data: ArrayBufferView): CudaBuffer {
  const b = cu.cudaBuffer(Math.max(16, data.byteLength));
  cu.cudaCopyToDevice(b, 0, data);
  return b;
}

function download<T extends ArrayBufferView>(cu: CudaAddon, out: T, b: CudaBuffer): T {
  cu.cudaSynchronize();
  cu.cudaCopyToHost(out, b, 0);
  return out;
}

interface Case {
  name: string; heads: number; kvHeads: number; dk: number; dv: number; mla: boolean; window: number;
  seqs: [number, number][]; // [qLen, ctxLen]
  sinks?: boolean;           // gpt-oss: a sink logit per head
}
const CASES: Case[] = [
  { name: 'GQA prefill+decode', heads: 8, kvHeads: 2, dk: 64, dv: 64, mla: false, window: 0, seqs: [[37, 37], [1, 90], [5, 21]] },
  { name: 'MHA sliding window', heads: 4, kvHeads: 4, dk: 32, dv: 48, mla: false, window: 19, seqs: [[40, 60], [1, 77]] },
  { name: 'MLA latent (V from the K cache)', heads: 16, kvHeads: 1, dk: 96, dv: 64, mla: true, window: 0, seqs: [[12, 30], [1, 45]] },
  { name: 'long decode (split-K)', heads: 16, kvHeads: 4, dk: 64, dv: 64, mla: false, window: 0, seqs: [[1, 1500], [2, 700]] },
  { name: 'sinks, sliding window', heads: 8, kvHeads: 2, dk: 64, dv: 64, mla: false, window: 7, seqs: [[20, 20], [1, 50]], sinks: true },
  { name: 'sinks, long decode (split-K)', heads: 16, kvHeads: 4, dk: 64, dv: 64, mla: false, window: 0, seqs: [[1, 1500], [2, 700]], sinks: true },
];

for (const [label, make, skip] of backends) {
  for (const dtype of ['bf16', 'fp8'] as const) {
    for (const c of CASES) {
      test(`${label}: ${dtype} cache, ${c.name}: cudaKvCacheWrite stores the CPU's bits, cudaPagedAttention ` +
           'matches the CPU kernel on the same cache', { skip }, () => {
        const cu = make();
        const r = mulberry32(seedBase + c.name.length + (dtype === 'fp8' ? 100 : 0));
        const bs = 16, { heads, kvHeads, dk, dv } = c;
        const vStride = c.mla ? dk : dv;
        const maxBlocks = Math.max(...c.seqs.map(([, ctx]) => Math.ceil(ctx / bs)));
        const numBlocks = c.seqs.reduce((a, [, ctx]) => a + Math.ceil(ctx / bs), 0) + 3;
        const slotsN = numBlocks * bs;
        const free = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i);
        const seqInfo = new Int32Array(c.seqs.length * 3), tables = new Int32Array(c.seqs.length * maxBlocks);
        let T = 0, ctxTotal = 0;
        c.seqs.forEach(([qLen, ctx], s) => {
          seqInfo.set([T, qLen, ctx], 3 * s);
          T += qLen;
          ctxTotal += ctx;
          for (let b = 0; b < Math.ceil(ctx / bs); b++) tables[s * maxBlocks + b] = free.pop()!;
        });
        // Every context token's K/V, written through both kernels at its slot.
        const slots = new Int32Array(ctxTotal);
        let n = 0;
        c.seqs.forEach(([, ctx], s) => {
          for (let j = 0; j < ctx; j++) slots[n++] = tables[s * maxBlocks + Math.floor(j / bs)]! * bs + (j % bs);
        });
        const k = uniform(ctxTotal * kvHeads * dk, r, 2), v = uniform(ctxTotal * kvHeads * dv, r, 2);
        const kScales = Float32Array.from({ length: kvHeads }, (_, h) => 2 / 400 * (1 + h / 4));
        const vScales = Float32Array.from({ length: kvHeads }, (_, h) => 2 / 300 * (1 + h / 7));
        const hostK = allocKvArray(dtype, slotsN * kvHeads * dk), hostV = c.mla ? hostK : allocKvArray(dtype, slotsN * kvHeads * vStride);
        native.kvCacheWrite(k, c.mla ? null : v, ctxTotal, slots, hostK, c.mla ? null : hostV, kvHeads, dk,
          c.mla ? 0 : dv, c.mla ? 0 : vStride, kScales, c.mla ? null : vScales);
        const eb = kvDtypeBytes(dtype);
        const devK = cu.cudaBuffer(slotsN * kvHeads * dk * eb);
        const devV = c.mla ? devK : cu.cudaBuffer(slotsN * kvHeads * vStride * eb);
        // Poison: a slot the write skips would show up as a difference.
        cu.cudaFill(devK, 0x55);
        if (!c.mla) cu.cudaFill(devV, 0x55);
        cu.cudaKvCacheWrite(upload(cu, k), c.mla ? null : upload(cu, v), ctxTotal, upload(cu, slots), devK,
          c.mla ? null : devV, kvHeads, dk, c.mla ? 0 : dv, c.mla ? 0 : vStride, slotsN, null, dtype, kScales,
          c.mla ? null : vScales);
        const gotK = download(cu, allocKvArray(dtype, slotsN * kvHeads * dk), devK);
        for (let i = 0; i < ctxTotal; i++) {
          const row = slots[i]! * kvHeads * dk;
          for (let e = 0; e < kvHeads * dk; e++)
            if (gotK[row + e] !== hostK[row + e]) assert.fail(`K slot ${slots[i]} element ${e}: device ${gotK[row + e]}, CPU ${hostK[row + e]}`);
        }
        if (!c.mla) {
          const gotV = download(cu, allocKvArray(dtype, slotsN * kvHeads * vStride), devV);
          for (let i = 0; i < ctxTotal; i++) {
            const row = slots[i]! * kvHeads * vStride;
            for (let e = 0; e < kvHeads * dv; e++) {
              const at = row + Math.floor(e / dv) * vStride + (e % dv);
              if (gotV[at] !== hostV[at]) assert.fail(`V slot ${slots[i]} element ${e}: device ${gotV[at]}, CPU ${hostV[at]}`);
            }
          }
        }
        // Attention over the same cache on both.
        const q = uniform(T * heads * dk, r, 1.5), scale = 1 / Math.sqrt(dk);
        const base = { numSeqs: c.seqs.length, heads, kvHeads, dk, dv, vStride, vOffset: 0, blockSize: bs, maxBlocks, scale,
          slidingWindow: c.window, ...(dtype === 'fp8' ? { kScales, vScales: c.mla ? kScales : vScales } : {}) };
        const sinks = c.sinks ? uniform(heads, r, 4) : null;
        const want = new Float32Array(T * heads * dv).fill(NaN);
        native.pagedAttention(q, hostK, hostV, seqInfo, tables, { ...base, sinks }, want);
        const out = cu.cudaBuffer(T * heads * dv * 4);
        cu.cudaFill(out, 0xff);
        cu.cudaPagedAttention(upload(cu, q), devK, devV, upload(cu, seqInfo), upload(cu, tables), {
          ...base, kvDtype: dtype, totalTokens: T, maxContext: Math.max(...c.seqs.map(([, ctx]) => ctx)), numBlocks,
          ...(sinks ? { sinks: upload(cu, sinks) } : {}),
        }, out);
        const got = download(cu, new Float32Array(T * heads * dv), out);
        let maxAbs = 0, err = 0, ref = 0;
        for (let i = 0; i < got.length; i++) {
          assert.ok(Number.isFinite(got[i]), `out[${i}] is ${got[i]}`);
          maxAbs = Math.max(maxAbs, Math.abs(got[i]! - want[i]!));
          err += (got[i]! - want[i]!) ** 2;
          ref += want[i]! ** 2;
        }
        // f32 arithmetic in a different order (device) vs the CPU's, on identical inputs.
        assert.ok(maxAbs <= 2e-5 && Math.sqrt(err / ref) <= 1e-5, `maxAbs ${maxAbs} relL2 ${Math.sqrt(err / ref)}`);
      });
    }
  }

  test(`${label}: fp8 scales and the dtype are checked with exact messages`, { skip }, () => {
    const cu = make();
    const b = cu.cudaBuffer(4096), s = upload(cu, Int32Array.of(0));
    const cases: [() => void, string, string][] = [
      [() => cu.cudaKvCacheWrite(b, null, 1, s, b, null, 2, 8, 0, 0, 4, null, 'int8' as KvDtype), 'TypeError', "kvDtype must be 'f32', 'bf16' or 'fp8'"],
      [() => cu.cudaKvCacheWrite(b, null, 1, s, b, null, 2, 8, 0, 0, 4, null, 'fp8'), 'TypeError',
        'kScales must be a Float32Array [kvHeads] for an fp8 cache'],
      [() => cu.cudaKvCacheWrite(b, null, 1, s, b, null, 2, 8, 0, 0, 4, null, 'fp8', Float32Array.of(1, -1)), 'RangeError',
        'kScales[1] is -1.000000, expected a finite number > 0'],
      [() => cu.cudaKvCacheWrite(b, null, 1, s, b, null, 2, 8, 0, 0, 4, null, 'fp8', Float32Array.of(1)), 'RangeError',
        'kScales.length is 1, expected at least kvHeads = 2'],
      [() => cu.cudaKvCacheWrite(b, null, 1, s, b.view(1, 1000), null, 2, 8, 0, 0, 4, null, 'bf16'), 'RangeError',
        'kCache must start 2-byte aligned'],
    ];
    for (const [fn, name, message] of cases) {
      assert.throws(fn, (e: Error) => e.name === name && e.message === message, `expected ${name}: ${message}`);
    }
  });
}

// The device engine with a bf16 / fp8 cache: the CPU's bounds of HF's goldens (models.test.ts), with
// its family bounds (gpt_oss over fp8: 18%).
const BOUNDS: Record<'bf16' | 'fp8', { max: number; mean: number }> = {
  bf16: { max: 0.05, mean: 0.02 },
  fp8: { max: 0.13, mean: 0.12 },
};
// qwen3_next, qwen3_5_moe_text: the hybrid families' bf16 bounds of models.test.ts (a recurrent state
// carries an early rounding to every later position).
const MAX_BY_FAMILY: Record<'bf16' | 'fp8', Record<string, number>> = {
  bf16: { qwen3_next: 0.06, qwen3_5_moe_text: 0.08 }, fp8: { gpt_oss: 0.18 },
};
const MEAN_BY_FAMILY: Record<'bf16' | 'fp8', Record<string, number>> = { bf16: { qwen3_next: 0.06, qwen3_5_moe_text: 0.04 }, fp8: {} };
const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const fixtures = readdirSync(fixturesDir).filter((d) => existsSync(path.join(fixturesDir, d, 'golden.json'))).sort();
for (const [label, make, skip] of backends) {
  for (const dtype of ['bf16', 'fp8'] as const) {
    test(`${label}: device model with a ${dtype} KV cache on every fixture: within the CPU's ${dtype} KV bounds of HF`, { skip }, () => {
      for (const name of fixtures) {
        const dir = path.join(fixturesDir, name);
        const { model } = loadCudaModel(dir, { device: 0, ...(label === 'emulator' ? { cuda: make() } : {}) });
        try {
          const r = kvFidelityOf(model, dir, dtype);
          assert.ok(r.maxConsistent <= (MAX_BY_FAMILY[dtype][name] ?? BOUNDS[dtype].max), `${name}: routing-consistent logits off by ${(100 * r.maxConsistent).toFixed(2)}%`);
          assert.ok(r.mean <= (MEAN_BY_FAMILY[dtype][name] ?? BOUNDS[dtype].mean), `${name}: logits off by ${(100 * r.mean).toFixed(2)}% on average`);
        } finally {
          model.dispose();
        }
      }
    });
  }
}
