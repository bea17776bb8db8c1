// Continuous batching: decides, step by step, which sequences run and which of their tokens,
// under a token budget, a sequence limit and the KV blocks free. Decodes go first, then a running
// prefill continues in chunks, then waiting sequences are admitted FIFO; when a decode finds no
// block the youngest running sequence is preempted and later recomputed from prompt + output.
// A paused sequence (its client stopped reading) is not stepped and keeps its blocks, and is the
// first to give them up when a decode needs one. With prefix caching, a sequence admitted with no
// K/V starts on the cached blocks of its longest cached prefix and computes from there.

import { PagedKvCache, type BlockHash, type SeqId } from './kv-cache.js';
import { StateSlotPool } from './state-cache.js';
import type { EngineStats } from './types.js';

export type { SeqId } from './kv-cache.js';

export interface SchedulerConfig {
  numBlocks: number;
  blockSize: number;
  /** Positions per sequence: prompt + output never exceed this. */
  maxContext: number;
  /** Running sequences at most. */
  maxNumSeqs: number;
  /** Tokens processed in one step at most (decodes + prefill chunks). */
  maxNumBatchedTokens: number;
  /** Automatic prefix caching: the chain root (see KvCacheOptions.prefixCacheKey); absent or null = off. */
  prefixCacheKey?: string | null;
  /**
   * Hybrid models: per-sequence state slots (linear attention) beside the KV blocks; a sequence holds
   * one while running. Absent or 0: none.
   */
  numStateSlots?: number;
}

export interface SequenceInput {
  id: SeqId;
  promptTokenIds: readonly number[];
  maxTokens: number;
  /**
   * Start on cached blocks when admitted (default true; prefix caching must be on). False for a
   * request that needs every position computed (routing reported per prompt position); its own
   * blocks are still offered to the cache.
   */
  usePrefixCache?: boolean;
  /** Tokens of one prefill chunk at most (default: the step's budget); prompt logprobs cap it. */
  maxChunk?: number;
}

/** One sequence's share of a step. */
export interface StepEntry {
  seqId: SeqId;
  /** [n] the tokens processed this step. */
  tokenIds: number[];
  /** Position of tokenIds[0]; the rest follow consecutively. */
  startPosition: number;
  /** Part of a (re)computed prefill; false for a one-token decode. */
  isPrefillChunk: boolean;
  /** The engine samples a token after this entry (a decode, or the last chunk of a prefill). */
  sample: boolean;
  /** isPrefillChunk && sample. */
  completesPrefill: boolean;
  /** [numBlocks(seq)] i32 view of the block table, valid until the next step(). */
  blockTable: Int32Array;
  /** [n] i32 KV slots (block * blockSize + offset) for the new tokens. */
  slots: Int32Array;
  /** The sequence's state slot (hybrid models), -1 without a state cache. */
  stateSlot: number;
}

export interface StepPlan {
  /** Decodes first (oldest first), then prefill chunks (running, then newly admitted). */
  entries: StepEntry[];
  numBatchedTokens: number;
  /** Sequences preempted this step: their K/V is gone; they will be recomputed. */
  preempted: SeqId[];
  /** Prefix cache, over the sequences admitted this step: tokens they held, and tokens found cached. */
  prefixQueriedTokens: number;
  prefixHitTokens: number;
}

/** A request that could not fit in the whole KV cache even alone. */
export class KvCapacityError extends Error {
  readonly code = 'E_KV_CAPACITY';
  override readonly name = 'KvCapacityError';
}

interface Sequence {
  id: SeqId;
  prompt: readonly number[];
  output: number[];
  maxTokens: number;
  /** Admission order; lower is older. */
  arrival: number;
  /** Tokens (of prompt ++ output) whose K/V is in the cache or scheduled this step. */
  numComputed: number;
  /** 'prefill' until a chunk reaches the end of the tokens, and again after a preemption. */
  phase: 'prefill' | 'decode';
  running: boolean;
  numPreemptions: number;
  /** Not stepped (nor admitted) until resumed: its stream's client is not reading. */
  paused: boolean;
  usePrefixCache: boolean;
  maxChunk: number;
  /** Chained hashes of its full blocks so far (filled as needed; tokens never change). */
  hashes: BlockHash[];
  /** Prompt tokens found in the prefix cache at its first admission (null: not admitted yet). */
  cachedTokens: number | null;
}

export interface SequenceInfo {
  state: 'waiting' | 'running';
  paused: boolean;
  numComputed: number;
  outputTokenIds: readonly number[];
  numPreemptions: number;
  /** Prompt tokens found in the prefix cache at its first admission (0 before it). */
  cachedTokens: number;
}

export class Scheduler {
  readonly cache: PagedKvCache;
  /** The state cache's slots (hybrid models), or null. */
  readonly states: StateSlotPool | null;
  readonly config: Readonly<SchedulerConfig>;
  private readonly seqs = new Map<SeqId, Sequence>();
  /** FIFO by arrival; preempted sequences go back in arrival order. */
  private waiting: Sequence[] = [];
  /**
   * Sorted by arrival, so the youngest is last.
   * NOTE: every running sequence is older than every waiting one that is not paused (admission is
   * FIFO among the unpaused and preemption moves the youngest to the front); the no-starvation
   * argument rests on it. Paused sequences step aside: they wait in arrival order, skipped.
   */
  private running: Sequence[] = [];
  private paused = 0;
  private nextArrival = 0;
  private preemptions = 0;
  private prefixQueried = 0;
  private prefixHits = 0;

  constructor(config: SchedulerConfig) {
    for (const key of ['numBlocks', 'blockSize', 'maxContext', 'maxNumSeqs', 'maxNumBatchedTokens'] as const) {
      const v = config[key];
      if (!Number.isInteger(v) || v < 1) throw new RangeError(`${key} is ${v}, expected a positive integer`);
    }
    if (config.maxContext < 2) throw new RangeError(`maxContext is ${config.maxContext}, expected at least 2`);
    if (config.maxNumBatchedTokens < config.maxNumSeqs) {
      // Otherwise the decodes alone could exceed the budget and the youngest would stall.
      throw new RangeError(`maxNumBatchedTokens is ${config.maxNumBatchedTokens}, expected at least ` +
        `maxNumSeqs (${config.maxNumSeqs})`);
    }
    this.config = { ...config };
    this.cache = new PagedKvCache({
      numBlocks: config.numBlocks,
      blockSize: config.blockSize,
      // K/V is kept for at most maxContext - 1 tokens: the last sampled one is never processed.
      maxBlocksPerSeq: Math.ceil((config.maxContext - 1) / config.blockSize),
      prefixCacheKey: config.prefixCacheKey ?? null,
    });
    this.states = config.numStateSlots ? new StateSlotPool(config.numStateSlots) : null;
  }

  /** Prefix cache totals since the start: tokens of admitted sequences looked up, and found. */
  get prefixCacheTotals(): { queriedTokens: number; hitTokens: number } {
    return { queriedTokens: this.prefixQueried, hitTokens: this.prefixHits };
  }

  get numRunning(): number {
    return this.running.length;
  }

  get numWaiting(): number {
    return this.waiting.length;
  }

  /** Sequences paused (running with their blocks, or waiting). */
  get numPaused(): number {
    return this.paused;
  }

  get preemptionsTotal(): number {
    return this.preemptions;
  }

  /** The scheduler's part of the engine's stats (and of the metrics). */
  stats(): EngineStats {
    return {
      running: this.running.length, waiting: this.waiting.length, kvBlocksTotal: this.cache.numBlocks,
      kvBlocksUsed: this.cache.numUsedBlocks, preemptionsTotal: this.preemptions,
      ...(this.states ? { stateSlotsTotal: this.states.numSlots, stateSlotsUsed: this.states.numUsed } : {}),
    };
  }

  has(id: SeqId): boolean {
    return this.seqs.has(id);
  }

  /**
   * Queues a sequence. Throws RangeError for a prompt that leaves no room in the context and
   * KvCapacityError for one that could never fit in the cache, instead of waiting forever.
   */
  addSequence(input: SequenceInput): void {
    const { id, promptTokenIds, maxTokens } = input;
    const { maxContext, numBlocks, blockSize } = this.config;
    if (this.seqs.has(id)) throw new Error(`sequence ${id} is already scheduled`);
    if (promptTokenIds.length < 1) throw new RangeError(`sequence ${id}: the prompt is empty`);
    if (promptTokenIds.length >= maxContext) {
      throw new RangeError(`sequence ${id}: the prompt has ${promptTokenIds.length} tokens, but the context ` +
        `holds ${maxContext} positions including at least one generated token`);
    }
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new RangeError(`sequence ${id}: maxTokens is ${maxTokens}, expected a positive integer`);
    }
    const finalLength = Math.min(promptTokenIds.length + maxTokens, maxContext);
    const blocks = Math.ceil((finalLength - 1) / blockSize);
    if (blocks > numBlocks) {
      throw new KvCapacityError(`sequence ${id} needs ${blocks} KV blocks (${promptTokenIds.length} prompt + ` +
        `${finalLength - promptTokenIds.length} generated tokens at ${blockSize} per block), but the cache ` +
        `has ${numBlocks} in all; lower max_tokens or give the cache more memory`);
    }
    const seq: Sequence = {
      id, prompt: promptTokenIds, output: [], maxTokens, arrival: this.nextArrival++,
      numComputed: 0, phase: 'prefill', running: false, numPreemptions: 0, paused: false,
      usePrefixCache: input.usePrefixCache ?? true, maxChunk: Math.max(1, input.maxChunk ?? Infinity), hashes: [], cachedTokens: null,
    };
    this.seqs.set(id, seq);
    this.waiting.push(seq);
  }

  /** Plans the next step and allocates its KV slots. */
  step(): StepPlan {
    const { maxNumBatchedTokens, maxNumSeqs } = this.config;
    const scheduled = new Map<SeqId, Int32Array>();   // seq -> [n] slots of its tokens this step
    const preempted: SeqId[] = [];
    let budget = maxNumBatchedTokens;
    let prefixQueriedTokens = 0;
    let prefixHitTokens = 0;

    /** The youngest paused running sequence's index, or -1. */
    const youngestPaused = (): number => {
      let i = this.running.length - 1;
      while (i >= 0 && !this.running[i]!.paused) i--;
      return i;
    };
    const preemptYoungest = (): Sequence => {
      // A paused sequence gives up its blocks first (youngest paused first): it is not stepped anyway.
      const i = youngestPaused();
      // NOTE: decodes are scheduled oldest first, so the youngest is never already in this plan
      // (and a paused one never is).
      const victim = i >= 0 ? this.running.splice(i, 1)[0]! : this.running.pop()!;
      this.cache.free(victim.id);
      this.states?.release(victim.id);
      victim.running = false;
      victim.numComputed = 0;
      victim.phase = 'prefill';
      victim.numPreemptions++;
      this.preemptions++;
      insertByArrival(this.waiting, victim);
      preempted.push(victim.id);
      return victim;
    };
    const schedule = (seq: Sequence, n: number): void => {
      scheduled.set(seq.id, this.cache.append(seq.id, n));
      budget -= n;
      if (this.cache.prefixCaching) {
        // Blocks this step fills are named now, so a sequence admitted after this one can share them.
        const at = (p: number) => this.tokenAt(seq, p);
        this.cache.hashBlocks(seq.hashes, at, seq.numComputed + n);
        this.cache.cacheFullBlocks(seq.id, seq.hashes, at);
      }
    };

    // (a) Decodes, oldest first: one token each; preempt the youngest until the token fits.
    for (const seq of [...this.running]) {
      if (!seq.running || seq.paused || seq.phase !== 'decode' || this.remaining(seq) === 0) continue;
      if (budget < 1) break;
      let self = false;
      while (!self && !this.cache.canAppend(seq.id, 1)) self = preemptYoungest() === seq;
      if (!self) schedule(seq, 1);
    }

    // (b) A running prefill continues, its chunk shrunk to the blocks free. It never evicts:
    // NOTE: at most one running sequence is mid-prefill and it is the youngest, because an
    // admitted chunk stops short of the prompt's end only when it used up the budget or the
    // free blocks, which also stops further admissions. So it waits for decodes to finish, or
    // is itself evicted by the next decode that needs a block.
    for (const seq of [...this.running]) {
      if (!seq.running || seq.paused || seq.phase !== 'prefill' || this.remaining(seq) === 0) continue;
      if (budget < 1) break;
      const n = Math.min(this.remaining(seq), budget, this.cache.appendableTokens(seq.id), seq.maxChunk);
      if (n > 0) schedule(seq, n);
    }

    // (c) Admit waiting sequences FIFO, paused ones skipped; the head blocks the rest so it cannot
    // starve. Not after a preemption: the blocks are short, and re-admitting a victim at once would thrash.
    // A paused running sequence gives up its slot and blocks to a waiting one that needs them, so
    // clients that do not read cannot hold the engine (they are recomputed when resumed).
    const admitting = preempted.length === 0;
    for (let i = 0; admitting && i < this.waiting.length && budget > 0;) {
      const seq = this.waiting[i]!;
      if (seq.paused) { i++; continue; }
      const prefix = this.cachedPrefix(seq);
      const cached = prefix.length * this.config.blockSize;
      const n = Math.min(this.remaining(seq) - cached, budget, seq.maxChunk);
      if (this.running.length >= maxNumSeqs || !this.cache.canAttach(prefix, n) ||
          (this.states !== null && this.states.numFree === 0)) {
        if (youngestPaused() < 0) break;
        preemptYoungest(); // takes the youngest paused one
        i = 0; // the victim joined waiting in arrival order: look again from the front
        continue;
      }
      this.waiting.splice(i, 1);
      seq.running = true;
      insertByArrival(this.running, seq);
      this.states?.allocate(seq.id);
      if (this.cache.prefixCaching && seq.usePrefixCache) {
        prefixQueriedTokens += this.length(seq);
        prefixHitTokens += cached;
      }
      seq.cachedTokens ??= Math.min(cached, seq.prompt.length);
      if (prefix.length > 0) {
        this.cache.attachPrefix(seq.id, prefix);
        seq.numComputed = cached;
      }
      schedule(seq, n);
    }
    this.prefixQueried += prefixQueriedTokens;
    this.prefixHits += prefixHitTokens;

    // Build entries after all allocation, so block-table views are final. Order: decodes, then
    // prefill chunks, each oldest first (admitted sequences are younger than running ones).
    const entries: StepEntry[] = [];
    let numBatchedTokens = 0;
    for (const phase of ['decode', 'prefill'] as const) {
      for (const seq of this.running) {
        const slots = scheduled.get(seq.id);
        if (slots === undefined || seq.phase !== phase) continue;
        entries.push(this.makeEntry(seq, slots));
        numBatchedTokens += slots.length;
      }
    }
    return { entries, numBatchedTokens, preempted, prefixQueriedTokens, prefixHitTokens };
  }

  /**
   * The cached blocks a sequence with no K/V would start on: its longest cached prefix of full
   * blocks, short of its last token (whose logits must be computed), or none.
   */
  private cachedPrefix(seq: Sequence): number[] {
    if (!this.cache.prefixCaching || !seq.usePrefixCache || seq.numComputed !== 0) return [];
    const maxBlocks = Math.floor((this.length(seq) - 1) / this.config.blockSize);
    const at = (p: number) => this.tokenAt(seq, p);
    this.cache.hashBlocks(seq.hashes, at, maxBlocks * this.config.blockSize);
    return this.cache.findCachedPrefix(seq.hashes, at, maxBlocks);
  }

  private makeEntry(seq: Sequence, slots: Int32Array): StepEntry {
    const start = seq.numComputed;
    const n = slots.length;
    const tokenIds = new Array<number>(n);
    for (let i = 0; i < n; i++) tokenIds[i] = this.tokenAt(seq, start + i);
    seq.numComputed += n;
    const sample = seq.numComputed === this.length(seq);
    const isPrefillChunk = seq.phase === 'prefill';
    if (isPrefillChunk && sample) seq.phase = 'decode';
    return {
      seqId: seq.id, tokenIds, startPosition: start, isPrefillChunk, sample,
      completesPrefill: isPrefillChunk && sample, blockTable: this.cache.blockTable(seq.id), slots,
      stateSlot: this.states?.slotOf(seq.id) ?? -1,
    };
  }

  /**
   * Records the token sampled after seq's last entry. Returns true when seq has now reached
   * its maxTokens or the context: it is then finished here and its blocks freed (a later
   * finish() is a no-op), so it can never be handed a position past maxContext.
   */
  appendToken(id: SeqId, tokenId: number): boolean {
    const seq = this.get(id);
    if (!seq.running || seq.numComputed !== this.length(seq)) {
      throw new Error(`sequence ${id} is not waiting for a sampled token`);
    }
    seq.output.push(tokenId);
    if (seq.output.length < seq.maxTokens && this.length(seq) < this.config.maxContext) return false;
    this.remove(id);
    return true;
  }

  /** Removes a finished sequence and frees its blocks at once. */
  finish(id: SeqId): boolean {
    return this.remove(id);
  }

  /** Removes an aborted sequence (waiting or running) and frees its blocks at once. */
  abort(id: SeqId): boolean {
    return this.remove(id);
  }

  /**
   * Stops stepping (and admitting) a sequence until resume(); a running one keeps its blocks.
   * Returns false for an unknown (finished) sequence.
   */
  pause(id: SeqId): boolean {
    const seq = this.seqs.get(id);
    if (!seq) return false;
    if (!seq.paused) { seq.paused = true; this.paused++; }
    return true;
  }

  resume(id: SeqId): boolean {
    const seq = this.seqs.get(id);
    if (!seq) return false;
    if (seq.paused) { seq.paused = false; this.paused--; }
    return true;
  }

  sequenceInfo(id: SeqId): SequenceInfo {
    const seq = this.get(id);
    return {
      state: seq.running ? 'running' : 'waiting', paused: seq.paused, numComputed: seq.numComputed,
      outputTokenIds: seq.output, numPreemptions: seq.numPreemptions, cachedTokens: seq.cachedTokens ?? 0,
    };
  }

  /** Ids in scheduling order: running oldest first, then waiting front to back. */
  order(): { running: SeqId[]; waiting: SeqId[] } {
    return { running: this.running.map((s) => s.id), waiting: this.waiting.map((s) => s.id) };
  }

  private remove(id: SeqId): boolean {
    const seq = this.seqs.get(id);
    if (!seq) return false;
    this.seqs.delete(id);
    this.cache.free(id);
    this.states?.release(id);
    if (seq.paused) this.paused--;
    if (seq.running) this.running.splice(this.running.indexOf(seq), 1);
    else this.waiting.splice(this.waiting.indexOf(seq), 1);
    return true;
  }

  private get(id: SeqId): Sequence {
    const seq = this.seqs.get(id);
    if (!seq) throw new Error(`unknown sequence ${id}`);
    return seq;
  }

  private length(seq: Sequence): number {
    return seq.prompt.length + seq.output.length;
  }

  private remaining(seq: Sequence): number {
    return this.length(seq) - seq.numComputed;
  }

  private tokenAt(seq: Sequence, i: number): number {
    return i < seq.prompt.length ? seq.prompt[i]! : seq.output[i - seq.prompt.length]!;
  }
}

/** Inserts seq into a list sorted by arrival, keeping it sorted. */
function insertByArrival(list: Sequence[], seq: Sequence): void {
  let i = list.length;
  while (i > 0 && list[i - 1]!.arrival > seq.arrival) i--;
  list.splice(i, 0, seq);
}
