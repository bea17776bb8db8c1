// The paged KV block allocator: slot mapping, block tables, refcounted sharing, a random
// alloc/free soak against a plain model that must never see a block handed out twice, and the
// prefix cache (chained block hashes, verified hits, LRU eviction with leaves first).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { PagedKvCache } from '../src/engine/kv-cache.js';
import { Rng } from '../src/engine/rng.js';
import { testSeed } from './helpers/seed.js';

test('append maps positions to block * blockSize + offset and grows the block table', () => {
  const cache = new PagedKvCache({ numBlocks: 8, blockSize: 4, maxBlocksPerSeq: 5 });
  assert.equal(cache.blocksNeeded('a', 6), 2);
  assert.ok(cache.canAppend('a', 6));
  const s1 = cache.append('a', 6);
  const t = Array.from(cache.blockTable('a'));
  assert.equal(t.length, 2);
  assert.deepEqual(Array.from(s1), [0, 1, 2, 3, 4, 5].map((p) => t[Math.floor(p / 4)]! * 4 + (p % 4)));
  assert.equal(cache.numTokens('a'), 6);
  // Two more tokens fill the second block; the ninth takes a third.
  assert.equal(cache.blocksNeeded('a', 2), 0);
  const s2 = cache.append('b', 3);
  const s3 = cache.append('a', 3);
  const ta = Array.from(cache.blockTable('a'));
  assert.equal(ta.length, 3);
  assert.deepEqual(Array.from(s3), [6, 7, 8].map((p) => ta[Math.floor(p / 4)]! * 4 + (p % 4)));
  const all = [...s1, ...s2, ...s3];
  assert.equal(new Set(all).size, all.length, 'slots are unique');
  assert.equal(cache.numUsedBlocks, 4);
  assert.equal(cache.usage(), 0.5);
  // out: slots written into a caller's buffer.
  const out = new Int32Array(4).fill(-7);
  assert.equal(cache.append('b', 2, out), out);
  assert.deepEqual(Array.from(out.subarray(2)), [-7, -7]);
  assert.equal(cache.free('a'), 3);
  assert.equal(cache.numUsedBlocks, 2, "b's 5 tokens remain");
  assert.equal(cache.free('a'), 0, 'freeing twice is a no-op');
  cache.checkInvariants();
});

test('canAppend honours free blocks and the per-sequence width; errors say why', () => {
  const cache = new PagedKvCache({ numBlocks: 4, blockSize: 2, maxBlocksPerSeq: 3 });
  assert.ok(cache.canAppend('a', 6));
  assert.ok(!cache.canAppend('a', 7), 'wider than maxBlocksPerSeq');
  assert.equal(cache.appendableTokens('a'), 6);
  cache.append('a', 5);
  assert.equal(cache.appendableTokens('a'), 1);
  assert.equal(cache.appendableTokens('b'), 2);
  assert.ok(!cache.canAppend('b', 3));
  assert.throws(() => cache.append('b', 3), {
    name: 'RangeError',
    message: 'cannot append 3 tokens to sequence b holding 0: needs 2 blocks, 1 free, at most 3 per sequence',
  });
  assert.equal(cache.numUsedBlocks, 3, 'a failed append allocates nothing');
  assert.throws(() => cache.append('b', -1), { name: 'RangeError', message: 'nTokens is -1, expected a non-negative integer' });
  assert.throws(() => new PagedKvCache({ numBlocks: 0, blockSize: 16, maxBlocksPerSeq: 1 }), {
    name: 'RangeError', message: 'numBlocks is 0, expected a positive integer',
  });
  cache.checkInvariants();
});

test('fillBlockTables packs rows [numSeqs, maxBlocksPerSeq] with padding', () => {
  const cache = new PagedKvCache({ numBlocks: 10, blockSize: 2, maxBlocksPerSeq: 4 });
  cache.append('x', 3);
  cache.append('y', 8);
  const out = new Int32Array(3 * 4).fill(123);
  cache.fillBlockTables(['y', 'ghost', 'x'], out);
  assert.deepEqual(Array.from(out.subarray(0, 4)), Array.from(cache.blockTable('y')));
  assert.deepEqual(Array.from(out.subarray(4, 8)), [-1, -1, -1, -1]);
  assert.deepEqual(Array.from(out.subarray(8, 12)), [...cache.blockTable('x'), -1, -1]);
  assert.throws(() => cache.fillBlockTables(['x', 'y'], new Int32Array(7)), {
    name: 'RangeError', message: 'out.length is 7, expected at least 8',
  });
});

test('shared prefix blocks are refcounted and freed by their last owner', () => {
  const cache = new PagedKvCache({ numBlocks: 6, blockSize: 4, maxBlocksPerSeq: 6 });
  cache.append('parent', 10);              // blocks: 2 full + 1 partial
  const full = cache.blockTable('parent').slice(0, 2);
  cache.attachPrefix('child', full);
  assert.equal(cache.numTokens('child'), 8);
  assert.deepEqual(Array.from(full, (b) => cache.refCount(b)), [2, 2]);
  assert.equal(cache.numUsedBlocks, 3);
  const childSlots = cache.append('child', 2);   // goes to a fresh block, not into shared ones
  const fresh = cache.blockTable('child')[2]!;
  assert.ok(!Array.from(cache.blockTable('parent')).includes(fresh));
  assert.deepEqual(Array.from(childSlots), [fresh * 4, fresh * 4 + 1]);
  assert.equal(cache.free('parent'), 1, 'only the unshared partial block returns');
  assert.deepEqual(Array.from(full, (b) => cache.refCount(b)), [1, 1]);
  cache.checkInvariants();
  assert.equal(cache.free('child'), 3);
  assert.equal(cache.numUsedBlocks, 0);
  assert.throws(() => cache.attachPrefix('z', [full[0]!]), {
    name: 'RangeError', message: `blocks[0] is ${full[0]}, expected a block in use or in the prefix cache`,
  });
  cache.checkInvariants();
});

test('random alloc/free/share soak never hands out a block or slot twice', (t) => {
  const rng = new Rng(testSeed(t, 2025));
  const rand = (n: number): number => Math.floor(rng.nextFloat() * n);
  const blockSize = 4;
  const cache = new PagedKvCache({ numBlocks: 64, blockSize, maxBlocksPerSeq: 24 });
  // The model: each live sequence's blocks and token count, and how many sequences hold a slot.
  const model = new Map<string, { blocks: number[]; tokens: number }>();
  const slotHolders = new Map<number, number>();
  const slotsOf = (m: { blocks: number[]; tokens: number }): number[] =>
    Array.from({ length: m.tokens }, (_, p) => m.blocks[Math.floor(p / blockSize)]! * blockSize + (p % blockSize));
  let nextId = 0, appends = 0, refusals = 0, shares = 0;
  for (let step = 0; step < 20_000; step++) {
    const ids = [...model.keys()];
    const op = rng.nextFloat();
    if (op < 0.62 || ids.length === 0) {
      const id = ids.length > 0 && rng.nextFloat() < 0.7 ? ids[rand(ids.length)]! : `s${nextId++}`;
      const n = 1 + rand(rng.nextFloat() < 0.2 ? 40 : 4);
      const m = model.get(id) ?? { blocks: [], tokens: 0 };
      const needBlocks = Math.ceil((m.tokens + n) / blockSize) - m.blocks.length;
      const used = new Set([...model.values()].flatMap((x) => x.blocks)).size;
      const fits = m.blocks.length + needBlocks <= 24 && needBlocks <= 64 - used;
      assert.equal(cache.canAppend(id, n), fits);
      if (!fits) {
        assert.throws(() => cache.append(id, n), RangeError);
        refusals++;
        continue;
      }
      const slots = cache.append(id, n);
      for (const slot of slots) {
        assert.equal(slotHolders.get(slot) ?? 0, 0, `slot ${slot} handed out while held`);
        slotHolders.set(slot, 1);
      }
      m.blocks = Array.from(cache.blockTable(id));
      m.tokens += n;
      model.set(id, m);
      appends++;
    } else if (op < 0.72) {
      // Share the full blocks of a live sequence with a new one.
      const src = model.get(ids[rand(ids.length)]!)!;
      const nFull = Math.floor(src.tokens / blockSize);
      const k = rand(nFull + 1);
      const id = `s${nextId++}`;
      cache.attachPrefix(id, src.blocks.slice(0, k));
      const m = { blocks: src.blocks.slice(0, k), tokens: k * blockSize };
      for (const slot of slotsOf(m)) slotHolders.set(slot, slotHolders.get(slot)! + 1);
      model.set(id, m);
      shares++;
    } else {
      const id = ids[rand(ids.length)]!;
      const m = model.get(id)!;
      for (const slot of slotsOf(m)) slotHolders.set(slot, slotHolders.get(slot)! - 1);
      cache.free(id);
      model.delete(id);
    }
    if (step % 97 === 0) cache.checkInvariants();
    // Block counts and refcounts agree with the model.
    const owners = new Map<number, number>();
    for (const m of model.values()) for (const b of m.blocks) owners.set(b, (owners.get(b) ?? 0) + 1);
    assert.equal(cache.numUsedBlocks, owners.size);
    if (step % 13 === 0) for (const [b, c] of owners) assert.equal(cache.refCount(b), c);
  }
  console.log(`soak: ${appends} appends, ${refusals} refusals, ${shares} shares`);
  assert.ok(appends > 5000 && refusals > 500 && shares > 1000, `${appends} appends, ${refusals} refusals, ${shares} shares`);
  for (const id of [...model.keys()]) cache.free(id);
  assert.equal(cache.numUsedBlocks, 0);
  cache.checkInvariants();
});

test('checkInvariants catches a corrupted free list', () => {
  const cache = new PagedKvCache({ numBlocks: 4, blockSize: 2, maxBlocksPerSeq: 4 });
  cache.append('a', 3);
  // Reach in and link the free queue back to a block already in it: the check must notice.
  const nextFree = (cache as unknown as { nextFree: Int32Array }).nextFree;
  const first = nextFree[4]!;
  nextFree[nextFree[first]!] = first;
  assert.throws(() => cache.checkInvariants(), /free queue's links disagree at block/);
});

/** A sequence's tokens as the cache reads them. */
const at = (tokens: readonly number[]) => (p: number): number => tokens[p]!;

/** Appends tokens to seq and offers its full blocks, as the scheduler does; returns its chain. */
function write(cache: PagedKvCache, seq: string, tokens: readonly number[], hashes: string[] = []): string[] {
  cache.append(seq, tokens.length - cache.numTokens(seq));
  cache.hashBlocks(hashes, at(tokens), tokens.length);
  cache.cacheFullBlocks(seq, hashes, at(tokens));
  return hashes;
}

test('prefix cache: full blocks are found by a later sequence with the same prefix, even after they are freed', () => {
  const cache = new PagedKvCache({ numBlocks: 8, blockSize: 4, maxBlocksPerSeq: 8, prefixCacheKey: 'model A' });
  assert.ok(cache.prefixCaching);
  const a = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14];        // 2 full blocks + 2 tokens
  const ha = write(cache, 'a', a);
  assert.equal(ha.length, 2);
  assert.equal(cache.numCachedBlocks, 2, 'the partial third block is not named');
  const blocksA = Array.from(cache.blockTable('a'));
  // Same 10 tokens: both full blocks; diverging inside the second block: the first only.
  const find = (tokens: number[]) => cache.findCachedPrefix(cache.hashBlocks([], at(tokens), tokens.length), at(tokens), 99);
  assert.deepEqual(find(a), blocksA.slice(0, 2));
  assert.deepEqual(find([5, 6, 7, 8, 9, 10, 99, 12, 13]), blocksA.slice(0, 1));
  assert.deepEqual(find([4, 6, 7, 8, 9, 10, 11, 12]), [], 'a different first block breaks the chain');
  assert.equal(cache.findCachedPrefix(ha, at(a), 1).length, 1, 'maxBlocks caps the match');
  // Freed, the named blocks stay cached (and count as free).
  cache.free('a');
  assert.equal(cache.numFreeBlocks, 8);
  assert.equal(cache.numCachedBlocks, 2);
  assert.deepEqual(find(a), blocksA.slice(0, 2));
  // A new sequence attaches them (taking them off the free queue) and appends after them.
  const prefix = find(a);
  assert.ok(cache.canAttach(prefix, 4));
  cache.attachPrefix('b', prefix);
  assert.equal(cache.numTokens('b'), 8);
  assert.equal(cache.numFreeBlocks, 6);
  const slots = cache.append('b', 2);
  assert.ok(!prefix.includes(Math.floor(slots[0]! / 4)), 'new tokens go to a fresh block');
  cache.checkInvariants();
  // Another model (root key) never finds them.
  const other = new PagedKvCache({ numBlocks: 8, blockSize: 4, maxBlocksPerSeq: 8, prefixCacheKey: 'model B' });
  assert.notDeepEqual(other.hashBlocks([], at(a), 8), ha);
  // Off: nothing is named or found.
  const off = new PagedKvCache({ numBlocks: 8, blockSize: 4, maxBlocksPerSeq: 8 });
  assert.ok(!off.prefixCaching);
  off.append('a', 10);
  off.cacheFullBlocks('a', ha, at(a));
  assert.deepEqual(off.findCachedPrefix(ha, at(a), 99), []);
  assert.throws(() => off.hashBlocks([], at(a), 8), /prefix caching is off/);
});

test('prefix cache: a hit is verified token for token and parent for parent, so no hash can alias', () => {
  const cache = new PagedKvCache({ numBlocks: 8, blockSize: 2, maxBlocksPerSeq: 8, prefixCacheKey: 'k' });
  const a = [1, 2, 3, 4, 5, 6];
  const ha = write(cache, 'a', a);
  // Pretend another sequence's blocks hashed like a's (a collision): its tokens differ, so no hit.
  assert.deepEqual(cache.findCachedPrefix(ha, at([1, 2, 3, 9, 5, 6]), 3).length, 1);
  // Hashes out of chain order: the second block's parent is not the first hash given.
  assert.deepEqual(cache.findCachedPrefix([ha[1]!, ha[1]!], at([3, 4, 3, 4]), 2), []);
  // A block whose hash is already cached elsewhere stays unnamed (one block per hash).
  const hb = write(cache, 'b', [1, 2, 3, 4]);
  assert.deepEqual(hb, ha.slice(0, 2));
  assert.equal(cache.numCachedBlocks, 3);
  cache.free('a');
  cache.free('b');
  cache.checkInvariants();
  assert.equal(cache.numCachedBlocks, 3, "b's duplicate blocks went back unnamed");
});

test('prefix cache: eviction takes unnamed blocks first, then the least recently freed, last block before first', () => {
  const cache = new PagedKvCache({ numBlocks: 6, blockSize: 2, maxBlocksPerSeq: 6, prefixCacheKey: 'k' });
  const x = [1, 2, 3, 4, 5];       // blocks x0 x1 named, x2 partial
  const y = [7, 8, 9, 10];         // blocks y0 y1 named
  write(cache, 'x', x);
  write(cache, 'y', y);
  const [x0, x1, x2] = Array.from(cache.blockTable('x'));
  const [y0, y1] = Array.from(cache.blockTable('y'));
  cache.free('x');                 // x freed first: x1 then x0 are the oldest cached
  cache.free('y');
  assert.equal(cache.numFreeBlocks, 6);
  const order: number[] = [];
  for (let i = 0; i < 6; i++) {
    cache.append(`z${i}`, 1);
    order.push(cache.blockTable(`z${i}`)[0]!);
  }
  const never = [0, 1, 2, 3, 4, 5].find((b) => ![x0, x1, x2, y0, y1].includes(b))!;
  // Unnamed first (x's partial block, freed last onto the front; then the never-used one), then x1, x0, y1, y0.
  assert.deepEqual(order, [x2, never, x1, x0, y1, y0]);
  assert.equal(cache.numCachedBlocks, 0);
  assert.equal(cache.evictionsTotal, 4);
  cache.checkInvariants();
});

test('prefix cache: a hit refreshes its blocks (freed again, they are the most recently used)', () => {
  const cache = new PagedKvCache({ numBlocks: 4, blockSize: 2, maxBlocksPerSeq: 4, prefixCacheKey: 'k' });
  const p = [1, 2];
  const q = [3, 4];
  write(cache, 'p', p);
  write(cache, 'q', q);
  cache.free('p');
  cache.free('q');                 // LRU: p's block, then q's
  const hp = cache.hashBlocks([], at(p), 2);
  const hit = cache.findCachedPrefix(hp, at(p), 1);
  cache.attachPrefix('p2', hit);
  cache.free('p2');                // p's block is now the most recent
  cache.append('w', 6);            // the 2 never-used blocks, then q's (evicted), not p's
  assert.deepEqual(cache.findCachedPrefix(hp, at(p), 1), hit);
  assert.deepEqual(cache.findCachedPrefix(cache.hashBlocks([], at(q), 2), at(q), 1), []);
  cache.checkInvariants();
});
