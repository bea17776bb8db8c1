// Paged KV-cache block allocator: fixed-size blocks, a free queue, a block table per sequence and
// the slot mapping the attention kernels write new K/V to. Bookkeeping only; the K/V memory
// itself lives with the device. Blocks are refcounted so prefix caching can share them: a full
// block is named by a hash chained over its tokens and stays cached after it is freed, until the
// allocator needs it (least recently freed first, a sequence's last blocks before its first). Also
// the cache's size in bytes of its element type (--kv-cache-dtype) and the block count it gives.
import { createHash } from 'node:crypto';

import { kvDtypeBytes, type KvDtype } from '../model/kv-dtype.js';

/** Identifies a sequence (one choice of one request). */
export type SeqId = string;

/** A full block's name: base64url sha256 over its parent's name and its token ids. */
export type BlockHash = string;

export interface KvCacheOptions {
  numBlocks: number;
  /** Tokens per block (16 by default in the engine). */
  blockSize: number;
  /** Width of a block-table row: ceil(maxContext / blockSize). */
  maxBlocksPerSeq: number;
  /**
   * Automatic prefix caching when a string (absent or null: off). The string is the chain's root:
   * whatever, besides the tokens, changes what a block holds (model identity, compute and KV dtypes),
   * so that blocks are only ever reused by what would have computed them bit for bit.
   */
  prefixCacheKey?: string | null;
}

interface SeqBlocks {
  /** [maxBlocksPerSeq] i32, valid in [0, numBlocks). */
  table: Int32Array;
  numBlocks: number;
  /** Tokens whose K/V have a slot (written or about to be written this step). */
  numTokens: number;
  /** Leading blocks already offered to the prefix cache (registered, or found there). */
  numHashed: number;
}

const NONE = -1;

export class PagedKvCache {
  readonly numBlocks: number;
  readonly blockSize: number;
  readonly maxBlocksPerSeq: number;
  /** The prefix cache's chain root (null: prefix caching off). */
  readonly prefixRoot: BlockHash | null;
  /** [numBlocks] i32: owners per block; 0 = in the free queue. */
  private readonly refCounts: Int32Array;
  /**
   * The free queue, a doubly linked list over block ids with sentinel numBlocks: [numBlocks + 1] i32
   * each. Blocks are taken from the front. Freed blocks without a hash go to the front (reused
   * first, as a stack); freed cached blocks go to the back, so the least recently freed cached
   * block is evicted first.
   */
  private readonly nextFree: Int32Array;
  private readonly prevFree: Int32Array;
  private numFree: number;
  private readonly seqs = new Map<SeqId, SeqBlocks>();
  /** Per block: its hash while it is in the prefix cache, else null. */
  private readonly blockHashes: (BlockHash | null)[];
  /** Per cached block: the hash of the block before it in its chain (the root for a first block). */
  private readonly blockParents: (BlockHash | null)[];
  /** [numBlocks, blockSize] i32: each cached block's tokens, compared on every hit (no collision can alias). */
  private readonly blockTokens: Int32Array;
  private readonly cached = new Map<BlockHash, number>();
  private evictions = 0;

  constructor(opts: KvCacheOptions) {
    for (const key of ['numBlocks', 'blockSize', 'maxBlocksPerSeq'] as const) {
      const v = opts[key];
      if (!Number.isInteger(v) || v < 1) throw new RangeError(`${key} is ${v}, expected a positive integer`);
    }
    if (opts.numBlocks * opts.blockSize > 2 ** 31 - 1) {
      throw new RangeError(`numBlocks * blockSize is ${opts.numBlocks * opts.blockSize}, expected < 2^31 (slots are i32)`);
    }
    this.numBlocks = opts.numBlocks;
    this.blockSize = opts.blockSize;
    this.maxBlocksPerSeq = opts.maxBlocksPerSeq;
    this.refCounts = new Int32Array(this.numBlocks);
    const N = this.numBlocks;
    this.nextFree = new Int32Array(N + 1);
    this.prevFree = new Int32Array(N + 1);
    // Block 0 is handed out first.
    for (let i = 0; i <= N; i++) {
      this.nextFree[i] = i === N ? 0 : i + 1;
      this.prevFree[i] = i === 0 ? N : i - 1;
    }
    this.numFree = N;
    const key = opts.prefixCacheKey ?? null;
    this.prefixRoot = key === null ? null : createHash('sha256').update('expertd prefix cache v1\0').update(key).digest('base64url');
    this.blockHashes = new Array<BlockHash | null>(key === null ? 0 : N).fill(null);
    this.blockParents = new Array<BlockHash | null>(key === null ? 0 : N).fill(null);
    this.blockTokens = new Int32Array(key === null ? 0 : N * this.blockSize);
  }

  /** Automatic prefix caching is on. */
  get prefixCaching(): boolean {
    return this.prefixRoot !== null;
  }

  /** Blocks in the prefix cache (in use or free). */
  get numCachedBlocks(): number {
    return this.cached.size;
  }

  /** Cached blocks whose hash was dropped to make room, since the start. */
  get evictionsTotal(): number {
    return this.evictions;
  }

  get numFreeBlocks(): number {
    return this.numFree;
  }

  get numUsedBlocks(): number {
    return this.numBlocks - this.numFree;
  }

  /** Fraction of blocks in use, 0..1 (the KV usage metric). */
  usage(): number {
    return this.numUsedBlocks / this.numBlocks;
  }

  hasSequence(seq: SeqId): boolean {
    return this.seqs.has(seq);
  }

  /** Tokens of seq that hold a slot (0 for an unknown sequence). */
  numTokens(seq: SeqId): number {
    return this.seqs.get(seq)?.numTokens ?? 0;
  }

  /** Blocks needed to hold `tokens` tokens. */
  blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.blockSize);
  }

  /** New blocks that appending nTokens to seq would take. */
  blocksNeeded(seq: SeqId, nTokens: number): number {
    const s = this.seqs.get(seq);
    const have = s?.numBlocks ?? 0;
    return Math.max(0, this.blocksFor((s?.numTokens ?? 0) + nTokens) - have);
  }

  canAppend(seq: SeqId, nTokens: number): boolean {
    const s = this.seqs.get(seq);
    const total = this.blocksFor((s?.numTokens ?? 0) + nTokens);
    return total <= this.maxBlocksPerSeq && total - (s?.numBlocks ?? 0) <= this.numFree;
  }

  /** Most tokens that can be appended to seq with the blocks free now. */
  appendableTokens(seq: SeqId): number {
    const s = this.seqs.get(seq);
    const numTokens = s?.numTokens ?? 0;
    const blocks = Math.min(this.maxBlocksPerSeq, (s?.numBlocks ?? 0) + this.numFree);
    return Math.max(0, blocks * this.blockSize - numTokens);
  }

  /**
   * Gives seq slots for nTokens more tokens (allocating blocks as needed; creates seq if new).
   * @returns [nTokens] i32 slots (block * blockSize + offset) for positions
   *   numTokens(seq) .. numTokens(seq) + nTokens - 1, written into `out` when given.
   */
  append(seq: SeqId, nTokens: number, out?: Int32Array): Int32Array {
    if (!Number.isInteger(nTokens) || nTokens < 0) {
      throw new RangeError(`nTokens is ${nTokens}, expected a non-negative integer`);
    }
    if (!this.canAppend(seq, nTokens)) {
      const s = this.seqs.get(seq);
      throw new RangeError(`cannot append ${nTokens} tokens to sequence ${seq} holding ${s?.numTokens ?? 0}: ` +
        `needs ${this.blocksNeeded(seq, nTokens)} blocks, ${this.numFree} free, ` +
        `at most ${this.maxBlocksPerSeq} per sequence`);
    }
    let s = this.seqs.get(seq);
    if (!s) {
      s = { table: new Int32Array(this.maxBlocksPerSeq), numBlocks: 0, numTokens: 0, numHashed: 0 };
      this.seqs.set(seq, s);
    }
    const need = this.blocksFor(s.numTokens + nTokens);
    while (s.numBlocks < need) {
      const block = this.nextFree[this.numBlocks]!;
      this.unlinkFree(block);
      this.evict(block);
      this.refCounts[block] = 1;
      s.table[s.numBlocks++] = block;
    }
    const slots = out ?? new Int32Array(nTokens);
    if (slots.length < nTokens) throw new RangeError(`out.length is ${slots.length}, expected at least ${nTokens}`);
    const bs = this.blockSize;
    for (let i = 0; i < nTokens; i++) {
      const pos = s.numTokens + i;
      slots[i] = s.table[Math.floor(pos / bs)]! * bs + (pos % bs);
    }
    s.numTokens += nTokens;
    return slots;
  }

  /**
   * Starts a new sequence on existing full blocks (a cached prefix, or the prompt of a sibling
   * choice): each block gains an owner (a cached block that was free leaves the free queue), and
   * seq appends after them without writing into them.
   */
  attachPrefix(seq: SeqId, blocks: ArrayLike<number>): void {
    if (this.seqs.has(seq)) throw new Error(`sequence ${seq} already holds blocks`);
    if (blocks.length > this.maxBlocksPerSeq) {
      throw new RangeError(`blocks.length is ${blocks.length}, expected at most ${this.maxBlocksPerSeq}`);
    }
    for (let i = 0; i < blocks.length; i++) {
      const b = blocks[i]!;
      if (!Number.isInteger(b) || b < 0 || b >= this.numBlocks || (this.refCounts[b] === 0 && !this.isCached(b))) {
        throw new RangeError(`blocks[${i}] is ${b}, expected a block in use or in the prefix cache`);
      }
    }
    const s: SeqBlocks = { table: new Int32Array(this.maxBlocksPerSeq), numBlocks: blocks.length,
      numTokens: blocks.length * this.blockSize, numHashed: 0 };
    for (let i = 0; i < blocks.length; i++) {
      const b = blocks[i]!;
      s.table[i] = b;
      if (this.refCounts[b]!++ === 0) this.unlinkFree(b);
    }
    // Leading blocks that are cached need no registering again.
    while (s.numHashed < s.numBlocks && this.isCached(s.table[s.numHashed]!)) s.numHashed++;
    this.seqs.set(seq, s);
  }

  /**
   * Extends `hashes` (a sequence's chain, block i's hash at i) to the full blocks among its first
   * numTokens tokens; tokenAt(p) is the token at position p. Returns `hashes`.
   */
  hashBlocks(hashes: BlockHash[], tokenAt: (position: number) => number, numTokens: number): BlockHash[] {
    if (this.prefixRoot === null) throw new Error('prefix caching is off');
    const bs = this.blockSize;
    const ids = new Int32Array(bs);
    for (let i = hashes.length; (i + 1) * bs <= numTokens; i++) {
      for (let j = 0; j < bs; j++) ids[j] = tokenAt(i * bs + j);
      const parent = i === 0 ? this.prefixRoot : hashes[i - 1]!;
      hashes.push(createHash('sha256').update(parent).update(new Uint8Array(ids.buffer)).digest('base64url'));
    }
    return hashes;
  }

  /**
   * The cached blocks holding the longest prefix of a sequence: block i is hashes[i]'s block, its
   * tokens equal tokenAt(i * blockSize ..) and its parent is hashes[i - 1], for every i < the
   * returned length (at most maxBlocks). Empty when prefix caching is off. Changes nothing.
   */
  findCachedPrefix(hashes: readonly BlockHash[], tokenAt: (position: number) => number, maxBlocks: number): number[] {
    const out: number[] = [];
    if (this.prefixRoot === null) return out;
    const bs = this.blockSize;
    const n = Math.min(hashes.length, maxBlocks, this.maxBlocksPerSeq);
    for (let i = 0; i < n; i++) {
      const b = this.cached.get(hashes[i]!);
      if (b === undefined || this.blockParents[b] !== (i === 0 ? this.prefixRoot : hashes[i - 1])) break;
      let same = true;
      for (let j = 0; j < bs && same; j++) same = this.blockTokens[b * bs + j] === tokenAt(i * bs + j);
      if (!same) break;
      out.push(b);
    }
    return out;
  }

  /**
   * Whether a new sequence fits on `prefix` (blocks from findCachedPrefix) plus nTokens more: the
   * new blocks, and the cached prefix blocks that are free now, must all come out of the free queue.
   */
  canAttach(prefix: readonly number[], nTokens: number): boolean {
    const total = this.blocksFor(prefix.length * this.blockSize + nTokens);
    let taken = total - prefix.length;
    for (const b of prefix) if (this.refCounts[b] === 0) taken++;
    return total <= this.maxBlocksPerSeq && taken <= this.numFree;
  }

  /**
   * Offers seq's full blocks (by numTokens(seq), so tokens scheduled this step count) to the prefix
   * cache under hashes[i] (its chain from hashBlocks, covering them). A block whose hash is already
   * cached in another block stays unnamed. No-op when prefix caching is off.
   * NOTE: a block may be found by another sequence as soon as it is registered, in the same step:
   * every attention writes the step's K/V to the cache before any of the step reads it.
   */
  cacheFullBlocks(seq: SeqId, hashes: readonly BlockHash[], tokenAt: (position: number) => number): void {
    const s = this.seqs.get(seq);
    if (!s || this.prefixRoot === null) return;
    const bs = this.blockSize;
    const full = Math.floor(s.numTokens / bs);
    if (hashes.length < full) throw new RangeError(`hashes.length is ${hashes.length}, expected at least ${full}`);
    for (; s.numHashed < full; s.numHashed++) {
      const i = s.numHashed;
      const b = s.table[i]!;
      const h = hashes[i]!;
      if (this.blockHashes[b] !== null || this.cached.has(h)) continue;
      this.cached.set(h, b);
      this.blockHashes[b] = h;
      this.blockParents[b] = i === 0 ? this.prefixRoot : hashes[i - 1]!;
      for (let j = 0; j < bs; j++) this.blockTokens[b * bs + j] = tokenAt(i * bs + j);
    }
  }

  /** Drops seq's claim on its blocks (O(blocks)); unknown sequences are a no-op. */
  free(seq: SeqId): number {
    const s = this.seqs.get(seq);
    if (!s) return 0;
    this.seqs.delete(seq);
    let released = 0;
    // Last block first: of one sequence's cached blocks the leaves are evicted before their parents.
    for (let i = s.numBlocks - 1; i >= 0; i--) {
      const b = s.table[i]!;
      if (--this.refCounts[b]! === 0) {
        if (this.isCached(b)) this.linkFree(b, this.prevFree[this.numBlocks]!);
        else this.linkFree(b, this.numBlocks);
        released++;
      }
    }
    return released;
  }

  private isCached(block: number): boolean {
    return this.prefixRoot !== null && this.blockHashes[block] !== null;
  }

  /** Takes a cached block's hash away before the block is reused. */
  private evict(block: number): void {
    if (!this.isCached(block)) return;
    this.cached.delete(this.blockHashes[block]!);
    this.blockHashes[block] = null;
    this.blockParents[block] = null;
    this.evictions++;
  }

  private unlinkFree(block: number): void {
    const p = this.prevFree[block]!;
    const n = this.nextFree[block]!;
    this.nextFree[p] = n;
    this.prevFree[n] = p;
    this.nextFree[block] = NONE;
    this.prevFree[block] = NONE;
    this.numFree--;
  }

  /** Inserts block into the free queue after `after` (the sentinel numBlocks: at the front). */
  private linkFree(block: number, after: number): void {
    const n = this.nextFree[after]!;
    this.nextFree[after] = block;
    this.prevFree[block] = after;
    this.nextFree[block] = n;
    this.prevFree[n] = block;
    this.numFree++;
  }

  /** [numBlocks(seq)] i32 view of seq's block table; valid until seq's blocks change. */
  blockTable(seq: SeqId): Int32Array {
    const s = this.seqs.get(seq);
    return s ? s.table.subarray(0, s.numBlocks) : new Int32Array(0);
  }

  /**
   * Packs the block tables of seqs, in order, into out [seqs.length, maxBlocksPerSeq] i32,
   * padding each row with `pad`.
   */
  fillBlockTables(seqs: readonly SeqId[], out: Int32Array, pad = -1): void {
    const width = this.maxBlocksPerSeq;
    if (out.length < seqs.length * width) {
      throw new RangeError(`out.length is ${out.length}, expected at least ${seqs.length * width}`);
    }
    seqs.forEach((seq, row) => {
      const s = this.seqs.get(seq);
      const n = s?.numBlocks ?? 0;
      if (s) out.set(s.table.subarray(0, n), row * width);
      out.fill(pad, row * width + n, (row + 1) * width);
    });
  }

  refCount(block: number): number {
    return this.refCounts[block] ?? 0;
  }

  /**
   * Recounts everything from the block tables and throws on any inconsistency (a block owned
   * but free, free twice, or a refcount that does not match). O(numBlocks + tables): tests.
   */
  checkInvariants(): void {
    const owners = new Int32Array(this.numBlocks);
    for (const [seq, s] of this.seqs) {
      if (s.numBlocks !== this.blocksFor(s.numTokens)) {
        throw new Error(`sequence ${seq}: ${s.numBlocks} blocks for ${s.numTokens} tokens`);
      }
      for (let i = 0; i < s.numBlocks; i++) owners[s.table[i]!]!++;
    }
    const onFreeList = new Uint8Array(this.numBlocks);
    const N = this.numBlocks;
    let walked = 0;
    for (let b = this.nextFree[N]!; b !== N; b = this.nextFree[b]!) {
      if (b < 0 || b > N) throw new Error(`the free queue links to ${b}`);
      if (onFreeList[b]) throw new Error(`block ${b} is on the free list twice`);
      if (this.prevFree[this.nextFree[b]!] !== b) throw new Error(`the free queue's links disagree at block ${b}`);
      onFreeList[b] = 1;
      if (++walked > N) break;
    }
    if (walked !== this.numFree) throw new Error(`the free queue holds ${walked} blocks, numFree is ${this.numFree}`);
    if (this.prefixRoot !== null) {
      for (const [h, b] of this.cached) {
        if (this.blockHashes[b] !== h) throw new Error(`cached hash ${h} names block ${b}, which holds ${this.blockHashes[b]}`);
      }
      const named = this.blockHashes.filter((h) => h !== null).length;
      if (named !== this.cached.size) throw new Error(`${named} blocks have a hash, ${this.cached.size} are cached`);
    }
    for (let b = 0; b < this.numBlocks; b++) {
      if (owners[b] !== this.refCounts[b]) {
        throw new Error(`block ${b}: refcount ${this.refCounts[b]}, owned by ${owners[b]} sequences`);
      }
      if ((owners[b] === 0) !== (onFreeList[b] === 1)) {
        throw new Error(`block ${b}: ${owners[b]} owners but ${onFreeList[b] ? '' : 'not '}on the free list`);
      }
    }
  }
}

export interface KvSizing {
  /** Caches (attentions) in the model. */
  numCaches: number;
  /** Elements per token per cache: [k, v]. */
  elementsPerToken: [number, number];
  dtype: KvDtype;
  blockSize: number;
}

/**
 * Bytes of one block over every cache: elements x the dtype's bytes (fp8's static per-head scales
 * are per cache, not per block, and are left out).
 */
export function kvBytesPerBlock(s: KvSizing): number {
  const [kf, vf] = s.elementsPerToken;
  return s.numCaches * s.blockSize * (kf + vf) * kvDtypeBytes(s.dtype);
}

/**
 * Blocks of the cache: `blocks` when given, else as many as `gib` GiB holds, else enough for
 * maxNumSeqs full contexts within autoCapBytes (1 GiB by default). Counted in bytes of the dtype, so
 * the same GiB holds 2x the f32 blocks in bf16 and 4x in fp8.
 */
export function kvCacheNumBlocks(s: KvSizing, o: { blocks: number; gib: number; maxNumSeqs: number;
  maxContext: number; autoCapBytes?: number }): number {
  const bytesPerBlock = kvBytesPerBlock(s);
  let numBlocks = o.blocks;
  if (!numBlocks && o.gib > 0) numBlocks = Math.floor((o.gib * 2 ** 30) / bytesPerBlock);
  if (!numBlocks) {
    const want = o.maxNumSeqs * Math.ceil(o.maxContext / s.blockSize);
    numBlocks = Math.max(1, Math.min(want, Math.floor((o.autoCapBytes ?? 2 ** 30) / bytesPerBlock)));
  }
  if (numBlocks < 1) throw new RangeError('the KV cache must hold at least one block; raise --kv-cache-gb');
  return numBlocks;
}
