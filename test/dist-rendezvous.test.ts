// The rendezvous through the group's store (src/dist/rendezvous.ts) over a real StoreServer on
// loopback: every rank publishes its identity and finds the same verdict (the difference named with
// both values), a rank that never publishes is named after the timeout, and rank 0's NCCL unique id
// reaches every other rank byte for byte (made once, by rank 0 only).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import type { RankIdentity } from '../src/dist/identity.js';
import { exchangeNcclId, GROUP_KEY, publishAndCheck } from '../src/dist/rendezvous.js';
import { StoreClient, StoreServer } from '../src/dist/store.js';

function identity(rank: number, over: Partial<RankIdentity['compat']> = {}): RankIdentity {
  return {
    rank, nodeRank: 0, configSha256: 'c'.repeat(64), tensorsSha256: 't'.repeat(64),
    compat: { computeDtype: 'f32', blockSize: 16, expertParallel: 1, maxModelLen: 4096, deviceKind: 'cpu', expertKernel: 'auto',
      quantize: 'none', expertdVersion: '0.1.0', expertPlacement: 'contiguous', ...over },
  };
}

/** A store with the group's prefix set (as the front does) and one client per rank. */
async function group(n: number) {
  const server = await StoreServer.listen('127.0.0.1', 0);
  const clients = await Promise.all(Array.from({ length: n + 1 }, () => StoreClient.connect('127.0.0.1', server.port, 5000)));
  await clients[n]!.set(GROUP_KEY, 'expertd-test');
  return {
    ranks: clients.slice(0, n),
    async close() { for (const c of clients) await c.close(); await server.close(); },
  };
}

test('every rank publishes its identity and all reach the same verdict: agreement, or the first difference named', async () => {
  const g = await group(3);
  try {
    const deadline = performance.now() + 5000;
    const ok = await Promise.all(g.ranks.map((c, r) => publishAndCheck(c, identity(r), 3, deadline)));
    assert.deepEqual(ok, [0, 1, 2].map(() => ({ prefix: 'expertd-test', refused: null })));
  } finally {
    await g.close();
  }
  const h = await group(3);
  try {
    const deadline = performance.now() + 5000;
    const placement = JSON.stringify([1, 0, 1, 0]);
    const got = await Promise.all(h.ranks.map((c, r) => publishAndCheck(c, identity(r, r === 2 ? { expertPlacement: placement } : {}), 3, deadline)));
    for (const v of got) assert.equal(v.refused, `rank 2 (node 0) differs from rank 0 (node 0) in expertPlacement: ${JSON.stringify(placement)} vs "contiguous"`);
  } finally {
    await h.close();
  }
});

test('a rank that never publishes is named after the timeout (no hang)', async () => {
  const g = await group(3);
  try {
    const deadline = performance.now() + 300;
    const t0 = performance.now();
    const both = await Promise.allSettled([publishAndCheck(g.ranks[0]!, identity(0), 3, deadline), publishAndCheck(g.ranks[2]!, identity(2), 3, deadline)]);
    for (const b of both) {
      assert.equal(b.status, 'rejected');
      assert.match(((b as PromiseRejectedResult).reason as Error).message, /^rank\(s\) 1 did not publish their identity to the store within 0\.\d+ s$/);
      assert.equal(((b as PromiseRejectedResult).reason as { code: string }).code, 'E_STORE_TIMEOUT');
    }
    assert.ok(performance.now() - t0 < 3000);
  } finally {
    await g.close();
  }
});

test('the NCCL unique id: rank 0 makes it once and every other rank reads the same bytes; a missing rank 0 is a timeout', async () => {
  const g = await group(3);
  try {
    let made = 0;
    const make = () => { made++; return Uint8Array.from({ length: 128 }, (_, i) => (i * 7 + 3) & 255); };
    // The readers first: they wait for rank 0's id.
    const ids = await Promise.all([1, 2, 0].map((r) => exchangeNcclId(g.ranks[r]!, 'expertd-test/moe', r, make, 5000)));
    assert.equal(made, 1);
    for (const id of ids) assert.deepEqual(Array.from(id), Array.from(make()));
    await assert.rejects(exchangeNcclId(g.ranks[1]!, 'other', 1, make, 200),
      { code: 'E_STORE_TIMEOUT', message: 'rank 1: rank 0 did not publish the NCCL unique id within 0.2 s' });
  } finally {
    await g.close();
  }
});
