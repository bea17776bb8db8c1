// The quant bench's split of decode reps by the machine's read-bandwidth state (bench/quant.ts
// byBandwidthState), on hand-made reps whose medians are counted here.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import type { Cell } from '../bench/harness.js';
import { byBandwidthState, type FormatRun } from '../bench/quant.js';

/** A format's decode b1 reps: [tok/s, GB/s of the probes beside]; every step reads `bytes`. */
function run(format: string, reps: [number, number][], bytes: number): FormatRun {
  return {
    format,
    decode: { 1: { tokPerS: reps.map((r) => r[0]), bytesPerStep: reps.map(() => bytes), besideGBps: reps.map((r) => r[1]) } },
  } as unknown as FormatRun;
}

test('byBandwidthState: two levels of probes -> each format against bf16 on the reps of its own state', () => {
  // bf16 reads 1 GB a step; int4 0.25 GB. Slow probes 35-36 GB/s, fast 55-57: split at 46.
  const bf16 = run('bf16', [[33, 35], [50, 55], [34, 36], [51, 57]], 1e9);
  const int4 = run('int4', [[120, 35], [130, 35], [170, 56]], 0.25e9);
  const rows: Cell[][] = [], notes: string[] = [], verdicts: string[] = [];
  byBandwidthState('m', [bf16, int4], rows, notes, verdicts);
  assert.deepEqual(notes, ['m: probes 35-57 GB/s, split at 46']);
  const row = (state: string, format: string) => rows.find((r) => String(r[1]).startsWith(state) && r[2] === format);
  // slow: bf16 reps 33 and 34 (median 33.5; 33/35 and 34/36 of their probes: 94%); int4 120 and 130 (median 125): 125 / 33.5 = 3.73x.
  assert.deepEqual(row('slow', 'bf16')!.slice(4, 8), [2, 33.5, '94%', '-']);
  assert.equal(row('slow', 'int4')![4], 2);
  assert.equal(row('slow', 'int4')![5], 125);
  assert.equal(row('slow', 'int4')![7], '3.73x');
  // fast: int4 170 tok/s x 0.25 GB = 42.5 GB/s of a 56 GB/s probe = 76%; against bf16's 50.5: 3.37x.
  assert.equal(row('fast', 'int4')![6], '76%');
  assert.equal(row('fast', 'int4')![7], '3.37x');
  assert.equal(verdicts.length, 2);
  assert.match(verdicts[0]!, /^m, slow .* reps \(2 vs bf16's 2\): decode b1 int4 >= 2.8x bf16: 3.73x -> PASS; >= 75% of the probes beside: 8[0-9]% -> PASS$/);
  assert.match(verdicts[1]!, /^m, fast .* reps \(1 vs bf16's 2\): decode b1 int4 >= 2.8x bf16: 3.37x -> PASS; >= 75% of the probes beside: 76% -> PASS$/);
});

test('byBandwidthState: probes within 1.25x of each other are one state, and nothing is split', () => {
  const rows: Cell[][] = [], notes: string[] = [], verdicts: string[] = [];
  byBandwidthState('m', [run('bf16', [[33, 35], [34, 43]], 1e9), run('int8', [[60, 36]], 0.5e9)], rows, notes, verdicts);
  assert.deepEqual([rows, notes, verdicts], [[], [], []]);
});

test('byBandwidthState: a state with no bf16 rep gives the format\'s rate without a ratio', () => {
  const rows: Cell[][] = [], notes: string[] = [], verdicts: string[] = [];
  byBandwidthState('m', [run('bf16', [[33, 35]], 1e9), run('fp8', [[100, 56]], 0.5e9)], rows, notes, verdicts);
  assert.equal(rows.length, 2);
  assert.deepEqual(verdicts, ['m, fast (>= 45.5 GB/s) reps (1): decode b1 fp8 >= 75% of the probes beside: 89% -> PASS']);
});

test('byBandwidthState: the probes\' core round trips, where measured, are noted per state', () => {
  const withTrips = (fr: FormatRun, trips: (number | null)[]) => {
    (fr.decode['1'] as { besideRoundTripNs?: (number | null)[] }).besideRoundTripNs = trips;
    return fr;
  };
  const bf16 = withTrips(run('bf16', [[33, 35], [50, 55], [34, 36]], 1e9), [50, 310, null]);
  const int4 = withTrips(run('int4', [[120, 35], [170, 56]], 0.25e9), [60, 330]);
  const rows: Cell[][] = [], notes: string[] = [], verdicts: string[] = [];
  byBandwidthState('m', [bf16, int4], rows, notes, verdicts);
  // slow: 50 and 60 (the null left out) -> 55; fast: 310 and 330 -> 320.
  assert.deepEqual(notes, ['m: probes 35-56 GB/s, split at 45.5, core round trip beside them 55 ns (slow) and 320 ns (fast)']);
  // Without a round trip on one side, no note of them.
  const notes2: string[] = [];
  byBandwidthState('m', [withTrips(run('bf16', [[33, 35], [50, 55]], 1e9), [50, null])], [], notes2, []);
  assert.deepEqual(notes2, ['m: probes 35-55 GB/s, split at 45']);
});
