// Paged KV-cache block allocator: fixed-size blocks, a free list, a block table per sequence and
// the slot mapping the attention kernels write new K/V to. Bookkeeping only; the K/V memory
// itself lives with the device. Blocks are refcounted so prefix caching can share them. Also the
// cache's size in bytes of its element type (--kv-cache-dtype) and the block count it gives.
import { kvDtypeBytes, type KvDtype } from '../model/kv-dtype.js';

/** Identifies a sequence (one choice of one request). */
export type SeqId = string;

export interface KvCacheOptions {
  numBlocks: number;
  /** Tokens per block (16 by default in the engine). */
  blockSize: number;
  /** Width of a block-table row: ceil(maxContext / blockSize). */
  maxBlocksPerSeq: number;
}

interface SeqBlocks {
  /** [maxBlocksPerSeq] i32, valid in [0, numBlocks). */
  table: Int32Array;
  numBlocks: number;
  /** Tokens whose K/V have a slot (written or about to be written this step). */
  numTokens: number;
}

export class PagedKvCache {
  readonly numBlocks: number;
  readonly blockSize: number;
  readonly maxBlocksPerSeq: number;
  /** [numBlocks] i32: owners per block; 0 = on the free list. */
  private readonly refCounts: Int32Array;
  /** [numBlocks] i32: a stack of free block ids in [0, numFree). */
  private readonly freeList: Int32Array;
  private numFree: number;
  private readonly seqs = new Map<SeqId, SeqBlocks>();

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
    this.freeList = new Int32Array(this.numBlocks);
    // Popped from the top: block 0 is handed out first.
    for (let i = 0; i < this.numBlocks; i++) this.freeList[i] = this.numBlocks - 1 - i;
    this.numFree = this.numBlocks;
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
      s = { table: new Int32Array(this.maxBlocksPerSeq), numBlocks: 0, numTokens: 0 };
      this.seqs.set(seq, s);
    }
    const need = this.blocksFor(s.numTokens + nTokens);
    while (s.numBlocks < need) {
      const block = this.freeList[--this.numFree]!;
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
   * choice): each block gains an owner, and seq appends after them without writing into them.
   */
  attachPrefix(seq: SeqId, blocks: ArrayLike<number>): void {
    if (this.seqs.has(seq)) throw new Error(`sequence ${seq} already holds blocks`);
    if (blocks.length > this.maxBlocksPerSeq) {
      throw new RangeError(`blocks.length is ${blocks.length}, expected at most ${this.maxBlocksPerSeq}`);
    }
    for (let i = 0; i < blocks.length; i++) {
      const b = blocks[i]!;
      if (!Number.isInteger(b) || b < 0 || b >= this.numBlocks || this.refCounts[b] === 0) {
        throw new RangeError(`blocks[${i}] is ${b}, expected a block in use`);
      }
    }
    const s: SeqBlocks = { table: new Int32Array(this.maxBlocksPerSeq), numBlocks: blocks.length,
      numTokens: blocks.length * this.blockSize };
    for (let i = 0; i < blocks.length; i++) {
      s.table[i] = blocks[i]!;
      this.refCounts[blocks[i]!]!++;
    }
    this.seqs.set(seq, s);
  }

  /** Drops seq's claim on its blocks (O(blocks)); unknown sequences are a no-op. */
  free(seq: SeqId): number {
    const s = this.seqs.get(seq);
    if (!s) return 0;
    this.seqs.delete(seq);
    let released = 0;
    for (let i = s.numBlocks - 1; i >= 0; i--) {
      const b = s.table[i]!;
      if (--this.refCounts[b]! === 0) {
        this.freeList[this.numFree++] = b;
        released++;
      }
    }
    return released;
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
    for (let i = 0; i < this.numFree; i++) {
      const b = this.freeList[i]!;
      if (onFreeList[b]) throw new Error(`block ${b} is on the free list twice`);
      onFreeList[b] = 1;
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
