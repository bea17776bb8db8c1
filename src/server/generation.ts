// One HTTP generation request as a set of engine requests (one per prompt x n): turns engine token
// events into per-choice text (streaming detokenizer + stop strings), counts, timings and metrics.

import type { EngineEvent, GenerateRequest, RoutedExperts, SamplingParams, TokenLogprob } from '../engine/types.js';
import type { Metrics } from '../metrics/registry.js';
import type { GrammarSpec } from '../structured/grammar-spec.js';
import type { EngineClient, TextCodec } from './deps.js';
import { StopMatcher } from './stop-strings.js';

export interface GenerationParams {
  maxTokens: number;
  sampling: SamplingParams; // seed here is the request's seed; choice i gets seed + i
  n: number;
  stop: string[];
  stopTokenIds: number[];
  ignoreEos: boolean;
  minTokens: number;
  skipSpecialTokens: boolean;
  returnRoutedExperts: boolean;
  /** Prompt logprobs with this many alternatives (completions' echo with logprobs); absent or null: off. */
  promptLogprobs?: number | null;
  /** Structured output: the grammar every choice follows (already checked). */
  grammar?: GrammarSpec;
}

/** New output of one choice since its previous delta. */
export interface ChoiceDelta {
  text: string;
  tokenIds: number[];
  logprobs: TokenLogprob[];
  routedExperts: RoutedExperts;
  /** With the first token, when requested: per prompt position (the first: null). */
  promptLogprobs?: (TokenLogprob | null)[];
}

export type ChoiceFinishReason = 'stop' | 'length';

export interface ChoiceState {
  readonly index: number;
  readonly promptIndex: number;
  readonly engineId: string;
  readonly promptTokenIds: number[];
  text: string;
  tokenIds: number[];
  logprobs: TokenLogprob[];
  routedExperts: RoutedExperts;
  finishReason: ChoiceFinishReason | null;
  /** The stop string or stop token id that ended the choice (vLLM's stop_reason). */
  stopReason: string | number | null;
  /** Prompt tokens the engine found in its prefix cache for this choice (known from its first token). */
  cachedTokens: number;
  /** Prompt logprobs when requested (from the first token on), else null. */
  promptLogprobs: (TokenLogprob | null)[] | null;
}

export interface GenerationListener {
  onDelta?(choice: ChoiceState, delta: ChoiceDelta): void;
  onChoiceEnd?(choice: ChoiceState, tail: ChoiceDelta): void;
}

export type GenerationOutcome =
  | { status: 'ok' }
  | { status: 'error'; message: string }
  | { status: 'aborted'; why: string };

interface ChoiceRun extends ChoiceState {
  detok: { push(id: number): string; flush(): string };
  matcher: StopMatcher;
  engineDone: boolean;
  firstTokenAt: number;
  lastTokenAt: number;
}

export interface GenerationDeps {
  engine: EngineClient;
  codec: TextCodec;
  metrics: Metrics;
}

export class Generation {
  readonly choices: ChoiceRun[] = [];
  readonly done: Promise<GenerationOutcome>;
  private resolve!: (o: GenerationOutcome) => void;
  private outcome: GenerationOutcome | null = null;
  private readonly stopIds: Set<number>;
  /** Paused by backpressure (see pause()). */
  paused = false;
  /** Time to the first token of any choice, ms (for the request log line). */
  ttftMs: number | null = null;

  constructor(
    private readonly deps: GenerationDeps,
    readonly requestId: string,
    readonly prompts: number[][],
    private readonly params: GenerationParams,
    private readonly listener: GenerationListener,
    private readonly arrivedAt: number = performance.now(),
  ) {
    this.done = new Promise((r) => (this.resolve = r));
    this.stopIds = new Set(params.stopTokenIds);
    if (!params.ignoreEos) for (const id of deps.codec.eosTokenIds) this.stopIds.add(id);
    prompts.forEach((promptTokenIds, p) => {
      for (let i = 0; i < params.n; i++) {
        const index = p * params.n + i;
        this.choices.push({
          index, promptIndex: p, engineId: `${requestId}-${index}`, promptTokenIds,
          text: '', tokenIds: [], logprobs: [], routedExperts: [], finishReason: null, stopReason: null, cachedTokens: 0,
          promptLogprobs: null,
          detok: deps.codec.createDetokenizer(promptTokenIds, params.skipSpecialTokens),
          matcher: new StopMatcher(params.stop),
          engineDone: false, firstTokenAt: 0, lastTokenAt: 0,
        });
      }
    });
  }

  get promptTokens(): number {
    return this.prompts.reduce((s, p) => s + p.length, 0);
  }

  /**
   * Prompt tokens served from the prefix cache, for usage.prompt_tokens_details.cached_tokens: per
   * prompt (counted once, as in prompt_tokens) the fewest any of its n choices found, so a prompt
   * that one choice had to compute counts as computed.
   */
  get cachedTokens(): number {
    let sum = 0;
    for (let p = 0; p < this.prompts.length; p++) {
      let min = Infinity;
      for (const c of this.choices) if (c.promptIndex === p) min = Math.min(min, c.cachedTokens);
      if (Number.isFinite(min)) sum += min;
    }
    return sum;
  }

  get completionTokens(): number {
    return this.choices.reduce((s, c) => s + c.tokenIds.length, 0);
  }

  /** Engine requests not yet finished (for drain bookkeeping). */
  get engineIds(): string[] {
    return this.choices.filter((c) => !c.engineDone).map((c) => c.engineId);
  }

  start(): void {
    const { params } = this;
    for (const c of this.choices) {
      if (this.outcome) break;
      const i = c.index % params.n;
      const req: GenerateRequest = {
        id: c.engineId,
        promptTokenIds: c.promptTokenIds,
        maxTokens: params.maxTokens,
        sampling: { ...params.sampling, seed: params.sampling.seed === undefined ? undefined : params.sampling.seed + i },
        stopTokenIds: params.stopTokenIds,
        ignoreEos: params.ignoreEos,
        minTokens: params.minTokens,
        returnRoutedExperts: params.returnRoutedExperts,
      };
      if (params.grammar) req.grammar = params.grammar;
      if (params.promptLogprobs != null) req.promptLogprobs = params.promptLogprobs;
      if (req.sampling.seed === undefined) delete req.sampling.seed;
      try {
        this.deps.engine.generate(req, (ev) => this.onEvent(c, ev));
      } catch (err) {
        c.engineDone = true;
        this.fail({ status: 'error', message: `engine refused request: ${(err as Error)?.message ?? String(err)}` });
      }
    }
  }

  /** Backpressure: the engine stops stepping this request's unfinished sequences until resume(). */
  pause(): void {
    if (this.paused || this.outcome) return;
    this.paused = true;
    this.deps.engine.pause(this.engineIds);
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    if (!this.outcome) this.deps.engine.resume(this.engineIds);
  }

  /** Cancels every unfinished engine request (client gone, shutdown). */
  abort(why: string): void {
    this.fail({ status: 'aborted', why });
  }

  private fail(outcome: GenerationOutcome): void {
    if (this.outcome) return;
    this.outcome = outcome;
    for (const c of this.choices) if (!c.engineDone) this.deps.engine.abort(c.engineId);
    this.resolve(outcome);
  }

  private onEvent(c: ChoiceRun, ev: EngineEvent): void {
    if (c.engineDone) return;
    if (ev.type === 'tokens') this.onTokens(c, ev);
    else this.onFinished(c, ev);
  }

  private onTokens(c: ChoiceRun, ev: Extract<EngineEvent, { type: 'tokens' }>): void {
    // After a stop string matched (or the request failed), later tokens are the engine catching up.
    if (c.finishReason !== null || this.outcome) return;
    if (ev.cachedTokens !== undefined) c.cachedTokens = ev.cachedTokens;
    const now = performance.now();
    const m = this.deps.metrics;
    const delta: ChoiceDelta = { text: '', tokenIds: [], logprobs: [], routedExperts: [] };
    if (this.params.returnRoutedExperts && ev.routedExperts) {
      for (const pos of ev.routedExperts) { c.routedExperts.push(pos); delta.routedExperts.push(pos); }
    }
    if (ev.promptLogprobs) delta.promptLogprobs = c.promptLogprobs = ev.promptLogprobs;
    let stopped: string | null = null;
    for (let i = 0; i < ev.tokenIds.length && stopped === null; i++) {
      const id = ev.tokenIds[i]!;
      const position = c.tokenIds.length; // 0-based index of this generated token
      c.tokenIds.push(id);
      delta.tokenIds.push(id);
      const lp = ev.logprobs?.[i];
      if (lp) { c.logprobs.push(lp); delta.logprobs.push(lp); }
      // NOTE: eos/stop-token text is never part of the output (vLLM semantics); the engine ends on it.
      if (position >= this.params.minTokens && this.stopIds.has(id)) continue;
      const r = c.matcher.push(c.detok.push(id), position + 1 >= this.params.minTokens);
      delta.text += r.text;
      stopped = r.stopped;
    }
    c.text += delta.text;
    const count = delta.tokenIds.length;
    m.generationTokens.inc(count);
    if (c.firstTokenAt === 0 && count > 0) {
      c.firstTokenAt = now;
      m.timeToFirstToken.observe((now - this.arrivedAt) / 1000);
      if (this.ttftMs === null) this.ttftMs = now - this.arrivedAt;
    } else if (count > 0) {
      const per = (now - c.lastTokenAt) / 1000 / count;
      for (let i = 0; i < count; i++) m.interTokenLatency.observe(per);
    }
    if (count > 0) c.lastTokenAt = now;
    if (stopped !== null) {
      c.finishReason = 'stop';
      c.stopReason = stopped;
      this.deps.engine.abort(c.engineId); // its 'finished' (abort) still arrives and closes the books
      this.listener.onDelta?.(c, delta);
      this.listener.onChoiceEnd?.(c, { text: '', tokenIds: [], logprobs: [], routedExperts: [] });
      this.maybeComplete();
      return;
    }
    if (delta.text !== '' || count > 0 || delta.routedExperts.length > 0) this.listener.onDelta?.(c, delta);
  }

  private onFinished(c: ChoiceRun, ev: Extract<EngineEvent, { type: 'finished' }>): void {
    c.engineDone = true;
    const m = this.deps.metrics;
    m.promptTokens.inc(c.promptTokenIds.length);
    m.e2eLatency.observe((performance.now() - this.arrivedAt) / 1000);
    if (c.finishReason !== null) {
      m.recordFinished(c.finishReason); // ended by a stop string; the engine saw an abort
      return;
    }
    m.recordFinished(ev.reason);
    if (this.outcome) return;
    if (ev.reason === 'error') {
      this.fail({ status: 'error', message: ev.error ?? 'engine error' });
      return;
    }
    if (ev.reason === 'abort') {
      this.fail({ status: 'error', message: 'the engine aborted the request' });
      return;
    }
    // The detokenizer may still hold an incomplete character; the stop matcher a possible prefix.
    const tail: ChoiceDelta = { text: '', tokenIds: [], logprobs: [], routedExperts: [] };
    const r = c.matcher.push(c.detok.flush(), true);
    tail.text = r.text;
    if (r.stopped !== null) {
      c.finishReason = 'stop';
      c.stopReason = r.stopped;
    } else {
      tail.text += c.matcher.flush();
      c.finishReason = ev.reason;
      c.stopReason = ev.reason === 'stop' ? ev.stopTokenId ?? null : null;
    }
    c.text += tail.text;
    this.listener.onChoiceEnd?.(c, tail);
    this.maybeComplete();
  }

  private maybeComplete(): void {
    if (this.outcome) return;
    if (this.choices.every((c) => c.finishReason !== null)) {
      this.outcome = { status: 'ok' };
      this.resolve(this.outcome);
    }
  }
}
