// Fast-mode bf16 DenseGemm and GroupGemm on AMX tiles (the 'amx' level on a CPU with AMX) and on
// vdpbf16ps (the 'noamx' level) against float64 references over the same bf16 operands, at row
// counts that cross the 16-row tiles and 32-row groups and K that is not a multiple of the 32-k
// tile step; every row bit-identical alone, inside 17 rows and inside 100. On a CPU without AMX
// the AMX-only checks skip and say so; the rest runs on whatever path the CPU has.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import type { ExpertTable, NativeAddon, PackedWeight } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import { fileSeed } from './helpers/seed.js';
import { bitsEqual, compare, refGemm, roundBf16, silu, uniform } from './helpers/gemm-ref.js';

const native: NativeAddon = loadNative();
// AMX is opt-in ('auto' is 'amx' only under EXPERTD_AMX=1): ask for it to learn whether it can run.
native.setSimdLevel('amx');
const hasAmx = native.capabilities().amxTiles;
native.setSimdLevel('auto');
const NO_AMX = hasAmx ? false : `this CPU (or its OS) has no AMX bf16 tiles (simd ${native.capabilities().simd}): the AMX path cannot run here`;
const LEVELS = ['amx', 'noamx'] as const;

// GroupGemm rounds h to bf16 in f32 where the reference rounds its f64 h: elements within ~1e-6 of
// a rounding boundary land one bf16 ulp apart (see gemm.test.ts), ~1e-5 in normalised L2.
const TOL_GROUP = 1e-4;

let seedCounter = fileSeed(0xa3c0, 'first case seed');
function freshRand(): { rand: () => number; seed: number } {
  const seed = seedCounter++;
  return { rand: mulberry32(seed), seed };
}

function withLevel<T>(level: (typeof LEVELS)[number], fn: () => T): T {
  native.setSimdLevel(level);
  try {
    return fn();
  } finally {
    native.setSimdLevel('auto');
  }
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
/** Random bf16 weight [n, k] of magnitude < scale: bits to pack and exact values. */
function bf16Weight(rand: () => number, n: number, k: number, scale: number) {
  const bits = new Uint16Array(n * k), values = new Float64Array(n * k);
  for (let i = 0; i < n * k; i++) {
    f32[0] = roundBf16((rand() * 2 - 1) * scale);
    bits[i] = u32[0]! >>> 16;
    values[i] = f32[0]!;
  }
  return { bits, values };
}

// ---------------------------------------------------------------------------------------------
// DenseGemm.

const MS = [1, 3, 16, 17, 33, 100];
// n: 40 = 3 blocks (a group of 3, or 2 + 1 for tall groups), 72 = 5 blocks, 200 = 13; k: 18 is
// only a tail, 37 odd (an even 38 run: 1 step + 6), 64 two whole steps, 72 and 200 steps + tail 8.
const NK = [[40, 72], [72, 200], [200, 37], [72, 18], [40, 64]] as const;

/**
 * y = x W^T (+ bias) (+ y0) over bf16-rounded x, checked per element against float64 within
 * (k + 4) 2^-23 sum|terms|: the worst case of any order of f32 sums over k exact bf16 products, so
 * a wrong, missing or doubled term (a k tail, a block, a row) fails it, rounding does not.
 */
function denseCase(m: number, n: number, k: number, bias: boolean, accumulate: boolean, label: string): Float32Array {
  const { rand, seed } = freshRand();
  const tag = `${label} m=${m} n=${n} k=${k} bias=${bias} acc=${accumulate} seed=${seed}`;
  const { bits, values } = bf16Weight(rand, n, k, 1);
  const w = native.packWeight(bits, 'bf16', n, k);
  const x = uniform(rand, m * k);
  const b = bias ? uniform(rand, n) : null;
  const y0 = uniform(rand, m * n);
  const y = new Float32Array(m * n + 7).fill(NaN);
  if (accumulate) y.set(y0);
  native.denseGemm(x, m, w, y, b, accumulate, true);
  w.dispose();
  const ref = refGemm(x, m, values, n, k, true);
  for (let r = 0; r < m; r++)
    for (let j = 0; j < n; j++) {
      let mag = 0;
      for (let c = 0; c < k; c++) mag += Math.abs(roundBf16(x[r * k + c]!) * values[j * k + c]!);
      let want = ref[r * n + j]!;
      if (b) { want += b[j]!; mag += Math.abs(b[j]!); }
      if (accumulate) { want += y0[r * n + j]!; mag += Math.abs(y0[r * n + j]!); }
      const got = y[r * n + j]!;
      const bound = (k + 4) * 2 ** -23 * mag;
      if (!(Math.abs(got - want) <= bound))
        assert.fail(`${tag}: y[${r}][${j}] = ${got}, float64 ${want}, bound ${bound.toExponential(2)}`);
    }
  for (let i = m * n; i < y.length; i++) assert.ok(Number.isNaN(y[i]!), `${tag}: wrote past the end at ${i}`);
  return y.subarray(0, m * n);
}

test('fast-mode denseGemm matches float64 per element on AMX tiles and on vdpbf16ps', () => {
  for (const level of LEVELS)
    withLevel(level, () => {
      assert.equal(native.capabilities().amxTiles, level === 'amx' && hasAmx);
      for (const m of MS)
        for (const [n, k] of NK)
          denseCase(m, n, k, m % 2 === 1, m % 3 === 1, level);
    });
});

test('AMX really runs: fast-mode denseGemm differs from vdpbf16ps in the low bits', { skip: NO_AMX }, () => {
  // The two instructions round differently (see gemm_kernels.h), so equal outputs over 100 x 72
  // sums of 200 terms would mean the AMX path never ran.
  const { rand } = freshRand();
  const n = 72, k = 200, m = 100;
  const w = native.packWeight(bf16Weight(rand, n, k, 1).bits, 'bf16', n, k);
  const x = uniform(rand, m * k);
  const a = new Float32Array(m * n), b = new Float32Array(m * n);
  withLevel('amx', () => native.denseGemm(x, m, w, a, null, false, true));
  withLevel('noamx', () => native.denseGemm(x, m, w, b, null, false, true));
  let differ = 0;
  for (let i = 0; i < a.length; i++) differ += a[i] !== b[i] ? 1 : 0;
  assert.ok(differ > 0, 'AMX and vdpbf16ps outputs are bit-identical: the AMX path did not run');
  w.dispose();
});

test('fast-mode denseGemm rows are bit-identical alone, inside 17 rows and inside 100 (AMX and vdpbf16ps), on 1 or 2 threads', () => {
  for (const level of LEVELS)
    withLevel(level, () => {
      for (const [n, k] of [[72, 200], [40, 64], [200, 37]] as const) {
        const { rand } = freshRand();
        const w = native.packWeight(bf16Weight(rand, n, k, 1).bits, 'bf16', n, k);
        const bias = uniform(rand, n);
        const m = 100;
        const x = uniform(rand, m * k);
        const full = new Float32Array(m * n), one = new Float32Array(m * n);
        native.denseGemm(x, m, w, full, bias, false, true);
        const before = native.capabilities().threads;
        native.setNumThreads(1);
        try {
          native.denseGemm(x, m, w, one, bias, false, true);
        } finally {
          native.setNumThreads(before);
        }
        bitsEqual(one, full, `${level} n=${n} k=${k} 1 vs ${before} threads`);
        for (let r = 0; r < m; r++) {
          const y = new Float32Array(n);
          native.denseGemm(x.subarray(r * k, (r + 1) * k), 1, w, y, bias, false, true);
          bitsEqual(y, full.subarray(r * n, (r + 1) * n), `${level} n=${n} k=${k} row ${r} alone`);
        }
        // Windows of 17 put each row at other places of the 16-row tiles and 32-row groups.
        for (const r0 of [0, 9, 40, 83]) {
          const y = new Float32Array(17 * n);
          native.denseGemm(x.subarray(r0 * k, (r0 + 17) * k), 17, w, y, bias, false, true);
          bitsEqual(y, full.subarray(r0 * n, (r0 + 17) * n), `${level} n=${n} k=${k} rows ${r0}..${r0 + 16}`);
        }
        w.dispose();
      }
    });
});

// ---------------------------------------------------------------------------------------------
// GroupGemm (gate/up with the fused SiLU(gate) * up epilogue, h in bf16, then down).

interface Experts { table: ExpertTable; weights: PackedWeight[]; vals: { gate: Float64Array; up: Float64Array; down: Float64Array }[] }

function makeExperts(rand: () => number, e: number, h: number, inter: number): Experts {
  const table = new native.ExpertTable(e, h, inter);
  const weights: PackedWeight[] = [];
  const vals: Experts['vals'] = [];
  for (let i = 0; i < e; i++) {
    const g = bf16Weight(rand, inter, h, 2 / Math.sqrt(h)), u = bf16Weight(rand, inter, h, 2 / Math.sqrt(h));
    const d = bf16Weight(rand, h, inter, 2 / Math.sqrt(inter));
    const gu = native.packGateUp(g.bits, u.bits, 'bf16', inter, h);
    const dn = native.packWeight(d.bits, 'bf16', h, inter);
    table.set(i, gu, dn);
    weights.push(gu, dn);
    vals.push({ gate: g.values, up: u.values, down: d.values });
  }
  return { table, weights, vals };
}

function dispose(ex: Experts): void {
  ex.table.dispose();
  for (const w of ex.weights) w.dispose();
}

function offsetsFrom(counts: number[]): Int32Array {
  const o = new Int32Array(counts.length + 1);
  for (let i = 0; i < counts.length; i++) o[i + 1] = o[i]! + counts[i]!;
  return o;
}

/** Fast-mode reference: x and h rounded to bf16, sums in float64. */
function refFfn(x: Float32Array, offsets: Int32Array, ex: Experts, h: number, inter: number): Float64Array {
  const rows = offsets[offsets.length - 1]!;
  const y = new Float64Array(rows * h);
  for (let e = 0; e + 1 < offsets.length; e++) {
    const r0 = offsets[e]!, r1 = offsets[e + 1]!;
    if (r1 === r0) continue;
    const xs = x.subarray(r0 * h, r1 * h);
    const g = refGemm(xs, r1 - r0, ex.vals[e]!.gate, inter, h, true);
    const u = refGemm(xs, r1 - r0, ex.vals[e]!.up, inter, h, true);
    const hh = new Float64Array(g.length);
    for (let i = 0; i < g.length; i++) hh[i] = roundBf16(silu(g[i]!) * u[i]!);
    y.set(refGemm(hh, r1 - r0, ex.vals[e]!.down, h, inter, false), r0 * h);
  }
  return y;
}

test('fast-mode groupGemmFfn matches float64 on AMX tiles and on vdpbf16ps (m 1..100 per expert, H and I off the 32-k step)', () => {
  // (H, I): H = 72 / 200 are the gate/up k with a tail of 8, I = 40 / 72 the down projection's
  // k (tails 8 and 8) and 3 / 5 gate/up block pairs.
  for (const level of LEVELS)
    withLevel(level, () => {
      for (const [h, inter] of [[72, 40], [200, 72]] as const)
        for (const m of MS) {
          const { rand, seed } = freshRand();
          const counts = [m, 0, m === 1 ? 1 : 17, 3];
          const ex = makeExperts(rand, counts.length, h, inter);
          const offsets = offsetsFrom(counts);
          const rows = offsets[counts.length]!;
          const x = uniform(rand, rows * h);
          const y = new Float32Array(rows * h + h).fill(NaN);
          native.groupGemmFfn(x, offsets, ex.table, y, true);
          compare(y.subarray(0, rows * h), refFfn(x, offsets, ex, h, inter), TOL_GROUP,
            `${level} H=${h} I=${inter} counts=${counts} seed=${seed}`);
          for (let i = rows * h; i < y.length; i++) assert.ok(Number.isNaN(y[i]!), `wrote past the end at ${i}`);
          dispose(ex);
        }
    });
});

test('fast-mode groupGemmFfn rows are bit-identical alone, inside 17 rows and inside 100 (AMX and vdpbf16ps)', () => {
  for (const level of LEVELS)
    withLevel(level, () => {
      const { rand } = freshRand();
      const h = 200, inter = 72;
      const ex = makeExperts(rand, 3, h, inter);
      // Expert 1 holds 100 rows (the tile groups of 32, 16 and fewer), expert 2 one row.
      const counts = [5, 100, 1];
      const offsets = offsetsFrom(counts);
      const rows = offsets[3]!;
      const x = uniform(rand, rows * h);
      const full = new Float32Array(rows * h);
      native.groupGemmFfn(x, offsets, ex.table, full, true);
      const e1 = offsets[1]!;
      const only = (e: number, m: number): Int32Array => offsetsFrom(counts.map((_, i) => (i === e ? m : 0)));
      for (let r = 0; r < 100; r++) {
        const y = new Float32Array(h);
        native.groupGemmFfn(x.subarray((e1 + r) * h, (e1 + r + 1) * h), only(1, 1), ex.table, y, true);
        bitsEqual(y, full.subarray((e1 + r) * h, (e1 + r + 1) * h), `${level} expert 1 row ${r} alone`);
      }
      for (const r0 of [0, 9, 40, 83]) {
        const y = new Float32Array(17 * h);
        native.groupGemmFfn(x.subarray((e1 + r0) * h, (e1 + r0 + 17) * h), only(1, 17), ex.table, y, true);
        bitsEqual(y, full.subarray((e1 + r0) * h, (e1 + r0 + 17) * h), `${level} expert 1 rows ${r0}..${r0 + 16}`);
      }
      dispose(ex);
    });
});

test("AMX is opt-in: 'auto' runs vdpbf16ps unless the process started with EXPERTD_AMX=1", () => {
  native.setSimdLevel('auto');
  const optIn = ['1', 'on', 'true'].includes(process.env.EXPERTD_AMX ?? '');
  assert.equal(native.capabilities().amxTiles, optIn && hasAmx);
});
