// The engine's step loop (runs inside the worker): the scheduler plans a step, the model runs it
// as one batch over the paged KV cache, the sampler picks each sequence's next token, and events
// go out. Requests join and leave between steps. With prefix caching a prefill starts after the
// prompt's cached blocks: its first position is the cached length, and only the rest is computed.
import type { ForwardBatch } from '../model/forward-batch.js';
import type { ForwardModel } from '../model/forward-batch.js';
import type { KvDtype } from '../model/kv-dtype.js';
import type { LoadedModel } from '../model/load.js';
import type { Offloader } from '../offload/offloader.js';
import type { SequenceGrammar } from '../structured/grammar-engine.js';
import { BatchSampler } from './batch-sampler.js';
import { Sampler, SamplingState, rowLogprobs, type SampleResult } from './sampler.js';
import { kvBytesPerBlock, kvCacheNumBlocks } from './kv-cache.js';
import { bitmaskWords } from './token-bitmask.js';
import { Scheduler, type StepPlan } from './scheduler.js';
import type { StepMetrics } from './protocol.js';
import type { EngineEvent, EngineStats, GenerateRequest, ModelInfo, RoutedExperts, TokenLogprob } from './types.js';

/** The expert cache as the step loop sees it (CPU or device slots alike). */
export type StepOffloader = Pick<Offloader, 'beginStep' | 'endStep' | 'finishRequest' | 'dropRequest' | 'stats' | 'takeDelta'> &
  Partial<Pick<Offloader, 'takeTraceDelta'>>;

export interface EngineCoreOptions {
  kvCacheBlocks: number;
  kvCacheGb: number;
  /** Element type of the KV cache (default f32); --kv-cache-gb counts bytes of this type. */
  kvCacheDtype?: KvDtype;
  blockSize: number;
  maxNumSeqs: number;
  maxNumBatchedTokens: number;
  servedModelName: string;
  /** Upper bound for the automatic KV size (bytes). */
  autoKvCapBytes?: number;
  /**
   * Automatic prefix caching: the chain root naming what, besides the tokens, makes a block's K/V
   * (model identity, dtypes); absent or null = off. Refused (off) for models with recurrent state.
   */
  prefixCacheKey?: string | null;
  /** Milliseconds for every timing the core reports (default performance.now; tests pass their own). */
  clock?: () => number;
  /**
   * 'native' (default): one batched native sampler call per step; 'js': the reference sampler row
   * by row (tests compare the two).
   */
  sampler?: 'native' | 'js';
}

interface Running {
  req: GenerateRequest;
  sampling: SamplingState;
  /**
   * The grammar's token bitmask for the next token ([ceil(V/32)] words, bit set = allowed), set
   * before the step by structured outputs; null: unconstrained.
   */
  bitmask: Int32Array | null;
  generated: number;
  /** Positions whose routing was already reported (recomputation after preemption repeats them). */
  routedUpTo: number;
  arrivedAtMs: number;
  /** Start of the first step that scheduled it (null: still waiting). */
  scheduledAtMs: number | null;
  /** Prompt tokens found in the prefix cache when it was first scheduled. */
  cachedTokens: number;
  /** When its first and latest generated tokens were sampled (null: none yet). */
  firstTokenAtMs: number | null;
  lastTokenAtMs: number;
  /** Structured output: the grammar every sampled token must follow (disposed when the request ends). */
  grammar: SequenceGrammar | null;
  /** Prompt logprobs (req.promptLogprobs): per prompt position, filled as its prefill runs; else null. */
  promptLps: (TokenLogprob | null)[] | null;
}

/** A prompt position whose logits score the prompt token `next` of request r (prompt logprobs). */
interface PromptRow { row: number; r: Running; next: number }

/** Logits floats one step may hold for prompt logprobs (64 MiB): caps such a request's prefill chunks. */
const PROMPT_LOGPROB_FLOATS = 16 << 20;

export class EngineCore {
  readonly scheduler: Scheduler;
  readonly cache: unknown;
  readonly info: ModelInfo;
  readonly numBlocks: number;
  /** Element type of the KV cache, and the bytes one block takes over every layer. */
  readonly kvDtype: KvDtype;
  readonly kvBytesPerBlock: number;
  /** Hybrid models: state slots (one per running sequence, maxNumSeqs of them) and the bytes of one. */
  readonly numStateSlots: number;
  readonly stateBytesPerSlot: number;
  private readonly sampler: Sampler | BatchSampler;
  private readonly requests = new Map<string, Running>();
  private readonly eos: Set<number>;
  private readonly blockSize: number;
  private readonly clock: () => number;
  /** Grow-only host logits [rows, vocab] lent to every forward (ForwardBatch.logitsOut). */
  private logitsBuf = new Float32Array(0);
  /** Why prefix caching is off although it was asked for (null: on, or not asked for). */
  readonly prefixCachingRefused: string | null = null;

  constructor(readonly loaded: LoadedModel<ForwardModel>, opts: EngineCoreOptions, readonly offloader: StepOffloader | null = null) {
    const { spec, model } = loaded;
    this.blockSize = opts.blockSize;
    this.clock = opts.clock ?? (() => performance.now());
    const kvDtype = opts.kvCacheDtype ?? 'f32';
    if (!model.kvDtypes.includes(kvDtype)) {
      throw new RangeError(`--kv-cache-dtype ${kvDtype} is not supported on ${model.device}; ` +
        `use ${model.kvDtypes.join(' or ')}`);
    }
    const sizing = { numCaches: model.numCaches, elementsPerToken: model.cacheFloatsPerToken(), dtype: kvDtype,
      blockSize: opts.blockSize };
    // Hybrid models: the state cache (maxNumSeqs slots, so that admission is bounded by the sequence
    // limit as before) comes out of the same memory budget as the KV blocks.
    this.stateBytesPerSlot = model.stateBytesPerSlot ?? 0;
    this.numStateSlots = this.stateBytesPerSlot > 0 ? opts.maxNumSeqs : 0;
    const stateBytes = this.numStateSlots * this.stateBytesPerSlot;
    let kvGib = opts.kvCacheGb;
    if (stateBytes > 0 && kvGib > 0) {
      kvGib -= stateBytes / 2 ** 30;
      if (kvGib <= 0) {
        throw new RangeError(`--kv-cache-gb ${opts.kvCacheGb} does not hold the state cache of ${spec.modelType} ` +
          `(${this.numStateSlots} sequences x ${(this.stateBytesPerSlot / 2 ** 20).toFixed(2)} MiB of linear-attention ` +
          'state); raise --kv-cache-gb or lower --max-num-seqs');
      }
    }
    const autoCap = opts.autoKvCapBytes ?? 2 ** 30;
    const numBlocks = kvCacheNumBlocks(sizing, { blocks: opts.kvCacheBlocks, gib: kvGib,
      maxNumSeqs: opts.maxNumSeqs, maxContext: spec.maxContext,
      autoCapBytes: Math.max(kvBytesPerBlock(sizing), autoCap - stateBytes) });
    this.numBlocks = numBlocks;
    this.kvDtype = kvDtype;
    this.kvBytesPerBlock = kvBytesPerBlock(sizing);
    this.cache = model.allocateKvCache(numBlocks, opts.blockSize, kvDtype);
    if (this.numStateSlots > 0) model.allocateStateCache!(this.numStateSlots);
    let prefixCacheKey = opts.prefixCacheKey ?? null;
    if (prefixCacheKey !== null && spec.recurrentState) {
      // NOTE: a cached prefix would restore the attention layers' K/V but not the linear layers'
      // state at that position; until that state can be snapshotted per block, no reuse.
      this.prefixCachingRefused = `prefix caching is off: ${spec.modelType} keeps recurrent state (linear attention layers) ` +
        'that KV blocks alone cannot restore';
      prefixCacheKey = null;
    }
    this.scheduler = new Scheduler({
      numBlocks, blockSize: opts.blockSize, maxContext: spec.maxContext,
      maxNumSeqs: opts.maxNumSeqs, maxNumBatchedTokens: opts.maxNumBatchedTokens, prefixCacheKey,
      numStateSlots: this.numStateSlots,
    });
    this.sampler = opts.sampler === 'js' ? new Sampler(spec.vocabSize) : new BatchSampler(spec.vocabSize);
    this.eos = new Set(spec.eosTokenIds);
    this.info = {
      name: opts.servedModelName, architecture: spec.modelType, maxContext: spec.maxContext,
      vocabSize: spec.vocabSize, eosTokenIds: spec.eosTokenIds,
      numMoeLayers: model.numMoeLayers, numExperts: spec.moe.numExperts, topK: spec.moe.router.topK,
      promptLogprobs: !this.logitsOnDevice(),
    };
  }

  /**
   * Queues a request; returns an immediate 'finished' event when it cannot run at all. grammar:
   * its compiled structured-output matcher (req.grammar), owned by the core from here on.
   */
  add(req: GenerateRequest, grammar: SequenceGrammar | null = null): EngineEvent | null {
    const ev = this.admit(req, grammar);
    if (ev) grammar?.dispose();
    return ev;
  }

  private admit(req: GenerateRequest, grammar: SequenceGrammar | null): EngineEvent | null {
    const fail = (msg: string): EngineEvent => ({
      type: 'finished', id: req.id, reason: 'error', error: msg,
      promptTokens: req.promptTokenIds.length, completionTokens: 0,
    });
    const V = this.info.vocabSize;
    for (const id of req.promptTokenIds)
      if (!Number.isInteger(id) || id < 0 || id >= V) return fail(`prompt token id ${id} is outside the vocabulary (0..${V - 1})`);
    const promptLogprobs = req.promptLogprobs ?? null;
    if (promptLogprobs !== null) {
      if (!Number.isInteger(promptLogprobs) || promptLogprobs < 0 || promptLogprobs > 20)
        return fail(`promptLogprobs is ${promptLogprobs}, expected an integer 0..20 or null`);
      if (this.logitsOnDevice())
        return fail('prompt logprobs (echo with logprobs) are computed by the CPU engine only; this one samples on the device');
    }
    let sampling: SamplingState;
    try {
      sampling = new SamplingState(req.sampling, req.promptTokenIds, V);
      // Routing is reported, and prompt logprobs computed, for every prompt position: such a request
      // computes them all, in chunks whose logits rows fit PROMPT_LOGPROB_FLOATS.
      this.scheduler.addSequence({ id: req.id, promptTokenIds: req.promptTokenIds, maxTokens: req.maxTokens,
        usePrefixCache: !req.returnRoutedExperts && promptLogprobs === null,
        ...(promptLogprobs !== null ? { maxChunk: Math.max(1, Math.floor(PROMPT_LOGPROB_FLOATS / V)) } : {}) });
    } catch (e) {
      return fail((e as Error).message);
    }
    if (req.grammar && !grammar) return fail('the request has a grammar but no compiled matcher was given');
    this.requests.set(req.id, {
      req, sampling, bitmask: grammar ? new Int32Array(bitmaskWords(this.info.vocabSize)) : null, generated: 0, routedUpTo: 0,
      arrivedAtMs: this.clock(), scheduledAtMs: null, cachedTokens: 0, firstTokenAtMs: null, lastTokenAtMs: 0,
      grammar, promptLps: promptLogprobs === null ? null : new Array<TokenLogprob | null>(req.promptTokenIds.length).fill(null),
    });
    return null;
  }

  abort(id: string): EngineEvent | null {
    const r = this.requests.get(id);
    if (!r) return null;
    this.scheduler.abort(id);
    this.requests.delete(id);
    r.grammar?.dispose();
    this.offloader?.dropRequest(id);
    return {
      type: 'finished', id, reason: 'abort', promptTokens: r.req.promptTokenIds.length, completionTokens: r.generated,
      cachedTokens: r.cachedTokens, ...phases(r),
    };
  }

  /**
   * Stops stepping a request (its stream's client is not reading): it keeps its KV blocks unless a
   * decode needs them. False when the request is unknown (already finished).
   */
  pause(id: string): boolean {
    return this.requests.has(id) && this.scheduler.pause(id);
  }

  resume(id: string): boolean {
    return this.requests.has(id) && this.scheduler.resume(id);
  }

  /** Some request could step (paused ones cannot). */
  hasWork(): boolean {
    return this.requests.size > this.scheduler.numPaused;
  }

  stats(): EngineStats {
    const used = this.numBlocks - this.scheduler.cache.numFreeBlocks;
    return {
      running: this.scheduler.numRunning, waiting: this.scheduler.numWaiting,
      kvBlocksTotal: this.numBlocks, kvBlocksUsed: used, preemptionsTotal: this.scheduler.preemptionsTotal,
      kvBytesTotal: this.numBlocks * this.kvBytesPerBlock, kvBytesUsed: used * this.kvBytesPerBlock,
      ...(this.scheduler.states ? {
        stateSlotsTotal: this.numStateSlots, stateSlotsUsed: this.scheduler.states.numUsed,
        stateBytesTotal: this.numStateSlots * this.stateBytesPerSlot,
        stateBytesUsed: this.scheduler.states.numUsed * this.stateBytesPerSlot,
      } : {}),
    };
  }

  /** Runs one step; returns its events and metrics (null when there was nothing to run). */
  step(): { events: EngineEvent[]; metrics: StepMetrics } | null {
    const t0 = this.clock();
    let plan = this.scheduler.step();
    // A plan that only preempted (its one decode was the youngest) admits on the next try.
    while (plan.entries.length === 0 && plan.preempted.length > 0) plan = this.scheduler.step();
    if (plan.entries.length === 0) return null;
    const queueTimesMs: number[] = [];
    for (const e of plan.entries) {
      const r = this.requests.get(e.seqId);
      if (r && r.scheduledAtMs === null) {
        r.scheduledAtMs = t0;
        // A first admission starts right after its cached prefix.
        r.cachedTokens = e.startPosition;
        queueTimesMs.push(t0 - r.arrivedAtMs);
      }
    }
    const { batch, promptRows } = this.buildBatch(plan);
    this.offloader?.beginStep(plan.entries.map((e) => ({ id: e.seqId, rows: e.tokenIds.length })));
    let result;
    try {
      result = this.loaded.model.forward(batch, this.cache, this.blockSize);
    } catch (e) {
      this.offloader?.endStep();
      throw e;
    }
    const sampledAtMs = this.clock(); // the host has the logits: this step's tokens exist from here
    const samples = this.sampleStep(plan, result.logits);
    this.scorePromptRows(promptRows, batch.logitRows.length - promptRows.length, result.logits);
    const events: EngineEvent[] = [];
    let row = 0;
    let logitIndex = 0;
    let prefillTokens = 0;
    let decodeTokens = 0;
    for (const entry of plan.entries) {
      const r = this.requests.get(entry.seqId)!;
      const n = entry.tokenIds.length;
      if (entry.isPrefillChunk) prefillTokens += n; else decodeTokens += n;
      const routed = r.req.returnRoutedExperts ? this.routedFor(r, entry.startPosition, n, row, result.routedIds) : undefined;
      row += n;
      if (!entry.sample) {
        if (routed) events.push({ type: 'tokens', id: r.req.id, tokenIds: [], routedExperts: routed });
        continue;
      }
      const s = samples[logitIndex++]!;
      r.sampling.addOutputToken(s.tokenId);
      r.generated++;
      r.firstTokenAtMs ??= sampledAtMs;
      r.lastTokenAtMs = sampledAtMs;
      const ev: EngineEvent = { type: 'tokens', id: r.req.id, tokenIds: [s.tokenId] };
      if (r.generated === 1) ev.cachedTokens = r.cachedTokens;
      if (r.generated === 1 && r.promptLps) ev.promptLogprobs = r.promptLps;
      if (s.logprob !== undefined) {
        const lp: TokenLogprob = { tokenId: s.tokenId, logprob: s.logprob, top: s.top ?? [] };
        ev.logprobs = [lp];
      }
      if (routed) ev.routedExperts = routed;
      events.push(ev);
      const reachedLimit = this.scheduler.appendToken(r.req.id, s.tokenId);
      let grammarDone = false;
      if (r.grammar) {
        if (!r.grammar.accept(s.tokenId)) {
          if (!reachedLimit) this.scheduler.finish(r.req.id);
          this.requests.delete(r.req.id);
          this.offloader?.finishRequest(r.req.id);
          r.grammar.dispose();
          events.push({
            type: 'finished', id: r.req.id, reason: 'error', error: `the grammar rejected sampled token ${s.tokenId}`,
            promptTokens: r.req.promptTokenIds.length, completionTokens: r.generated, ...phases(r),
          });
          continue;
        }
        grammarDone = r.grammar.terminated;
      }
      // A finished grammar stops the sequence even under ignore_eos / min_tokens: nothing else may follow.
      const stopHit = grammarDone || (r.generated >= r.req.minTokens &&
        ((!r.req.ignoreEos && this.eos.has(s.tokenId)) || r.req.stopTokenIds.includes(s.tokenId)));
      if (stopHit || reachedLimit) {
        if (!reachedLimit) this.scheduler.finish(r.req.id);
        this.requests.delete(r.req.id);
        r.grammar?.dispose();
        this.offloader?.finishRequest(r.req.id);
        const fin: EngineEvent = {
          type: 'finished', id: r.req.id, reason: stopHit ? 'stop' : 'length',
          promptTokens: r.req.promptTokenIds.length, completionTokens: r.generated, cachedTokens: r.cachedTokens, ...phases(r),
        };
        if (stopHit) fin.stopTokenId = s.tokenId;
        events.push(fin);
      }
    }
    // After sampling, so requests that finished this step are recorded with it.
    this.offloader?.endStep();
    const comm = this.loaded.model.takeCommDelta?.() ?? null;
    const metrics: StepMetrics = {
      prefillTokens, decodeTokens, durationMs: this.clock() - t0, preemptions: plan.preempted.length,
      kernelChoices: this.loaded.model.kernelChoices(),
      ...(this.loaded.model.layerPlans ? { layerPlans: this.loaded.model.layerPlans() } : {}),
      ...(comm ? { all2all: comm } : {}),
      queueTimesMs,
      ...(this.scheduler.cache.prefixCaching
        ? { prefixCache: { queriedTokens: plan.prefixQueriedTokens, hitTokens: plan.prefixHitTokens } } : {}),
      expertTokens: expertTokenCounts(result.routedIds, this.info.numExperts + (this.loaded.spec.moe.zeroExperts ?? 0)),
    };
    if (this.offloader) {
      const st = this.offloader.stats();
      metrics.expertCache = { delta: this.offloader.takeDelta(), occupancy: st.occupancy, layerHitRate: st.layerHitRate };
      const trace = this.offloader.takeTraceDelta?.();
      if (trace) metrics.trace = trace;
    }
    return { events, metrics };
  }

  /** Every sampling entry's next token: one native call over the step's logits rows. */
  private sampleStep(plan: StepPlan, logits: Float32Array): SampleResult[] {
    const V = this.info.vocabSize;
    const states: SamplingState[] = [];
    const masks: (Int32Array | null)[] = [];
    let anyMask = false;
    for (const e of plan.entries) {
      if (!e.sample) continue;
      const r = this.requests.get(e.seqId)!;
      states.push(r.sampling);
      // NOTE: eos is allowed only where the grammar accepts, so a constrained output ends complete.
      if (r.grammar) r.grammar.fillMask(r.bitmask!);
      masks.push(r.bitmask);
      if (r.bitmask) anyMask = true;
    }
    if (this.sampler instanceof BatchSampler) {
      const model = this.loaded.model;
      const device = model.sampleLogits ? model.sampleLogits.bind(model) : undefined;
      return this.sampler.sample(logits, states, anyMask ? masks : undefined, device);
    }
    const sampler = this.sampler;
    return states.map((st, i) => sampler.sample(logits.subarray(i * V, (i + 1) * V), st, masks[i]));
  }

  private routedFor(r: Running, start: number, n: number, row: number, routedIds: Int32Array[]): RoutedExperts | undefined {
    const k = this.info.topK;
    const out: RoutedExperts = [];
    for (let i = 0; i < n; i++) {
      if (start + i < r.routedUpTo) continue;
      const perLayer: number[][] = [];
      for (const ids of routedIds) perLayer.push(Array.from(ids.subarray((row + i) * k, (row + i + 1) * k)));
      out.push(perLayer);
    }
    r.routedUpTo = Math.max(r.routedUpTo, start + n);
    return out.length ? out : undefined;
  }

  private buildBatch(plan: StepPlan): { batch: ForwardBatch; promptRows: PromptRow[] } {
    const T = plan.numBatchedTokens;
    const S = plan.entries.length;
    const tokenIds = new Int32Array(T);
    const positions = new Int32Array(T);
    const slots = new Int32Array(T);
    const seqInfo = new Int32Array(S * 3);
    const maxBlocks = Math.max(1, ...plan.entries.map((e) => e.blockTable.length));
    const blockTables = new Int32Array(S * maxBlocks);
    const stateSlots = this.numStateSlots > 0 ? new Int32Array(S) : null;
    const logitRows: number[] = [];
    const promptRows: PromptRow[] = [];
    let row = 0;
    plan.entries.forEach((e, s) => {
      const n = e.tokenIds.length;
      for (let i = 0; i < n; i++) {
        tokenIds[row + i] = e.tokenIds[i]!;
        positions[row + i] = e.startPosition + i;
      }
      slots.set(e.slots, row);
      seqInfo[s * 3] = row;
      seqInfo[s * 3 + 1] = n;
      seqInfo[s * 3 + 2] = e.startPosition + n;
      blockTables.set(e.blockTable, s * maxBlocks);
      if (stateSlots) stateSlots[s] = e.stateSlot;
      if (e.sample) logitRows.push(row + n - 1);
      // Prompt logprobs: the rows of prompt positions whose next token is a prompt token not yet
      // scored (a recomputation after preemption repeats none), after the sampling rows.
      const r = this.requests.get(e.seqId);
      if (r?.promptLps && e.isPrefillChunk) {
        for (let i = 0; i < n; i++) {
          const next = e.startPosition + i + 1;
          if (next < r.promptLps.length && r.promptLps[next] === null) promptRows.push({ row: row + i, r, next });
        }
      }
      row += n;
    });
    for (const p of promptRows) logitRows.push(p.row);
    const logitsOnDevice = this.logitsOnDevice();
    // NOTE: the logits are read only within this step (sampling), so one buffer serves every step;
    // a step with prompt-logprob rows gets one of its own (up to 64 MiB more), not kept.
    const logitsFloats = logitRows.length * this.info.vocabSize;
    let logitsOut = this.logitsBuf;
    if (promptRows.length > 0) logitsOut = new Float32Array(logitsFloats);
    else if (!logitsOnDevice && this.logitsBuf.length < logitsFloats) logitsOut = this.logitsBuf = new Float32Array(logitsFloats);
    const batch: ForwardBatch = {
      tokenIds, positions, numSeqs: S, seqInfo, blockTables, maxBlocks, slots, logitRows: Int32Array.from(logitRows),
      ...(stateSlots ? { stateSlots } : {}), ...(logitsOnDevice ? { logitsOnDevice } : { logitsOut }),
    };
    return { batch, promptRows };
  }

  /** The native sampler runs where the logits are when the model can (the device engine). */
  private logitsOnDevice(): boolean {
    return this.sampler instanceof BatchSampler && this.loaded.model.sampleLogits !== undefined;
  }

  /** Scores this step's prompt-logprob rows, whose logits follow the sampling rows' from row `first`, into promptLps. */
  private scorePromptRows(promptRows: PromptRow[], first: number, logits: Float32Array): void {
    const V = this.info.vocabSize;
    promptRows.forEach((p, k) => {
      const at = (first + k) * V;
      p.r.promptLps![p.next] = rowLogprobs(logits.subarray(at, at + V), p.r.req.promptTokenIds[p.next]!, p.r.req.promptLogprobs ?? 0);
    });
  }
}

/**
 * vLLM's per-request phases: prefill from the first scheduling to the first token (chunks and any
 * preemption included), decode from the first token to the last. None before a first token.
 */
function phases(r: Running): { prefillMs: number; decodeMs: number } | Record<string, never> {
  if (r.firstTokenAtMs === null || r.scheduledAtMs === null) return {};
  return { prefillMs: r.firstTokenAtMs - r.scheduledAtMs, decodeMs: r.lastTokenAtMs - r.firstTokenAtMs };
}

function expertTokenCounts(routedIds: Int32Array[], E: number): number[][] {
  return routedIds.map((ids) => {
    const c = new Array<number>(E).fill(0);
    for (let i = 0; i < ids.length; i++) c[ids[i]!]!++;
    return c;
  });
}
