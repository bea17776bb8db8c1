// The serve bench's aggregate decode rate (bench/decode-rate.ts) against independent references: a
// 1 ms grid count for the busy time, and hand-counted synthetic step schedules.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { cpuMsWithin, decodeRate, unionLengthMs, type Arrivals } from '../bench/decode-rate.js';

test('unionLengthMs equals a 1 ms grid count of covered instants over random integer intervals', () => {
  let a = 12345;
  const rand = (n: number) => { a = (a * 1103515245 + 12345) >>> 0; return a % n; };
  for (let trial = 0; trial < 50; trial++) {
    const iv: [number, number][] = Array.from({ length: 1 + rand(8) }, () => {
      const s = rand(200);
      return [s, s + rand(60)];
    });
    let grid = 0;
    for (let t = 0; t < 300; t++) if (iv.some(([x, y]) => t >= x && t < y)) grid++;
    assert.equal(unionLengthMs(iv), grid, JSON.stringify(iv));
  }
});

/** Client c's prefill ends at step `firstStep[c]`; then one token per 100 ms step, `n` tokens in all. */
function schedule(firstStep: number[], n: number): Arrivals[] {
  return firstStep.map((s, client) => ({ client, round: 0, arrivalsMs: Array.from({ length: n }, (_, i) => 100 * (s + i)) }));
}

test('decodeRate: staggered prefills, then all four streams decode one token per 100 ms step', () => {
  const r = decodeRate(schedule([1, 2, 3, 4], 10), 100);
  // 4 x 9 tokens after the first ones; some stream decodes from 100 ms to 1300 ms.
  assert.equal(r.decodeTokens, 36);
  assert.equal(r.decodeBusyS, 1.2);
  assert.ok(Math.abs(r.decodeTokPerS - 30) < 1e-9);
  // All four decode from 400 ms (client 3's first token) to 1000 ms (client 0's last): steps at
  // 500..1000 ms, 6 x 4 tokens in 0.6 s = 4 streams x 10 steps/s.
  assert.equal(r.steadyFromMs, 400);
  assert.equal(r.steadyToMs, 1000);
  assert.equal(r.steadyTokens, 24);
  assert.ok(Math.abs(r.steadyTokPerS - 40) < 1e-9, String(r.steadyTokPerS));
});

test('decodeRate: streams that never decode together (a cache that holds one) have no steady window', () => {
  const r = decodeRate(schedule([1, 20], 10), 100);
  assert.equal(r.decodeTokens, 18);
  assert.equal(r.decodeBusyS, 1.8);  // two disjoint 0.9 s spans; the gap between them is not decoding
  assert.ok(Math.abs(r.decodeTokPerS - 10) < 1e-9);
  assert.ok(Number.isNaN(r.steadyTokPerS));
  assert.equal(r.steadyTokens, 0);
  // A window shorter than the minimum is empty too.
  assert.ok(Number.isNaN(decodeRate(schedule([1, 9], 10), 200).steadyTokPerS));
  assert.equal(decodeRate(schedule([1, 9], 10), 100).steadyTokens, 2);
});

test('decodeRate: chunks of several tokens and closed-loop rounds', () => {
  const reqs: Arrivals[] = [
    // Client 0: round 0 gets 1 token at 0 ms then chunks of 2 at 100 and 200; round 1 from 300 to 600.
    { client: 0, round: 0, arrivalsMs: [0, 100, 100, 200, 200] },
    { client: 0, round: 1, arrivalsMs: [300, 400, 500, 600] },
    // Client 1: one request, first token at 150 ms, ends at 700.
    { client: 1, round: 0, arrivalsMs: [150, 250, 700] },
    // A request that failed before its first token adds nothing.
    { client: 2, round: 0, arrivalsMs: [] },
  ];
  const r = decodeRate(reqs, 0);
  assert.equal(r.decodeTokens, 4 + 3 + 2);
  assert.equal(r.decodeBusyS, 0.7);  // [0,200] u [150,700] u [300,600] = [0,700]
  // Window: latest first-request first token 150 ms, earliest last-request end 600 ms (client 0);
  // non-first tokens in (150, 600]: 200, 200, 400, 500, 600 (client 0), 250 (client 1).
  assert.equal(r.steadyFromMs, 150);
  assert.equal(r.steadyToMs, 600);
  assert.equal(r.steadyTokens, 6);
});

test('cpuMsWithin: CPU inside intervals, interpolated between samples', () => {
  // A process that uses 1 CPU ms per wall ms from 0 to 100, then 2 per ms to 200.
  const samples: [number, number][] = [[0, 0], [50, 50], [100, 100], [150, 200], [200, 300]];
  assert.equal(cpuMsWithin(samples, [[10, 20]]), 10);
  assert.equal(cpuMsWithin(samples, [[90, 160], [180, 190]]), 10 + 100 + 20 + 20);
  assert.ok(Number.isNaN(cpuMsWithin(samples, [[150, 250]])));
  assert.equal(cpuMsWithin(samples, []), 0);
});
