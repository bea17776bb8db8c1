// The paged KV block allocator: slot mapping, block tables, refcounted sharing, and a random
// alloc/free soak against a plain model that must never see a block handed out twice.
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
    name: 'RangeError', message: `blocks[0] is ${full[0]}, expected a block in use`,
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
  // Reach in and duplicate a free block: the check must notice.
  const freeList = (cache as unknown as { freeList: Int32Array }).freeList;
  freeList[1] = freeList[0]!;
  assert.throws(() => cache.checkInvariants(), /on the free list twice/);
});
