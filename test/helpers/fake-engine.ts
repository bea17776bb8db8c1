// TEST DOUBLE, not a model: a fake EngineClient that "generates" deterministic tokens derived from
// the prompt ids and seed on a timer, and a tiny byte-level TextCodec. Used only by server tests.

import type { EngineEvent, EngineStats, GenerateRequest, ModelInfo, TokenLogprob } from '../../src/engine/types.js';
import type { EngineClient, TextCodec } from '../../src/server/deps.js';

// ---------- FakeCodec: ids 0..7 are special tokens, id 8 + b is the byte b ----------

const SPECIALS = ['<pad>', '<s>', '</s>', '<|system|>', '<|user|>', '<|assistant|>', '<|end|>', '<|tool|>'];
export const BOS = 1;
export const EOS = 2;
const BYTE0 = 8;
export const FAKE_VOCAB = BYTE0 + 256;

export class FakeCodec implements TextCodec {
  readonly eosTokenIds = [EOS];

  encode(text: string, addSpecialTokens: boolean): number[] {
    const out: number[] = addSpecialTokens ? [BOS] : [];
    // Special-token strings in the text (the chat template's markers) become their ids.
    let i = 0;
    outer: while (i < text.length) {
      if (text[i] === '<') {
        for (let s = 0; s < SPECIALS.length; s++) {
          if (text.startsWith(SPECIALS[s]!, i)) {
            out.push(s);
            i += SPECIALS[s]!.length;
            continue outer;
          }
        }
      }
      const cp = text.codePointAt(i)!;
      const ch = String.fromCodePoint(cp);
      for (const b of Buffer.from(ch, 'utf8')) out.push(BYTE0 + b);
      i += ch.length;
    }
    return out;
  }

  decode(ids: number[], skipSpecialTokens: boolean): string {
    const d = this.createDetokenizer([], skipSpecialTokens);
    let s = '';
    for (const id of ids) s += d.push(id);
    return s + d.flush();
  }

  applyChatTemplate(messages: { role: string; content: string }[], addGenerationPrompt: boolean): string {
    let s = '<s>';
    for (const m of messages) {
      const marker = SPECIALS.indexOf(`<|${m.role === 'developer' ? 'system' : m.role}|>`);
      if (marker < 0) throw new Error(`role ${m.role} is not supported by this template`);
      s += `${SPECIALS[marker]}${m.content}<|end|>`;
    }
    return addGenerationPrompt ? `${s}<|assistant|>` : s;
  }

  // Bytes need no context: the prompt ids change nothing here.
  createDetokenizer(_promptTokenIds: number[], skipSpecialTokens: boolean): { push(id: number): string; flush(): string } {
    let dec = new TextDecoder('utf-8');
    return {
      push(id: number): string {
        if (id < BYTE0) {
          // A special token ends any pending partial character.
          const pending = dec.decode();
          dec = new TextDecoder('utf-8');
          return pending + (skipSpecialTokens ? '' : SPECIALS[id] ?? '');
        }
        return dec.decode(Uint8Array.of(id - BYTE0), { stream: true });
      },
      flush(): string {
        return dec.decode();
      },
    };
  }
}

// ---------- FakeEngine ----------

/** Output alphabet: mostly ASCII, some multi-byte characters so detokenizer boundaries get exercised. */
const ALPHABET = [...'abcdefghijklmnopqrstuvwxyz      ', 'é', '€', '.', ','];

function mix(h: number, v: number): number {
  h = Math.imul(h ^ v, 0x9e3779b1);
  return (h ^ (h >>> 15)) >>> 0;
}

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    return s / 4294967296;
  };
}

export interface FakeEngineOptions {
  /** Delay between token events (ms). 0 = next macrotask. */
  tokenIntervalMs?: number;
  /** Tokens emitted per 'tokens' event. */
  tokensPerEvent?: number;
  /** Requests generating at once; the rest wait (and count in stats().waiting). */
  maxRunning?: number;
  /** Emit eos after this many generated tokens (otherwise the fake never stops by itself). */
  eosAfter?: number;
  /**
   * Scripted output: the exact ids each request generates, in order (choice = the index after the
   * last '-' of the engine request id); the request ends with 'length' when the script or
   * maxTokens runs out. No eos logic: the script is the whole truth. For tests with a real codec.
   */
  script?: (req: GenerateRequest, choice: number) => number[];
  info?: Partial<ModelInfo>;
  /** Record pause/resume calls but keep generating (tokens that were in flight when a pause came). */
  ignorePause?: boolean;
}

interface Job {
  req: GenerateRequest;
  onEvent: (ev: EngineEvent) => void;
  /** Pending output bytes of the current character. */
  pending: number[];
  generated: number;
  rand: () => number;
  timer: NodeJS.Timeout | null;
  promptSent: boolean;
  lastToken: number;
  scripted: number[] | null;
  /** Fail with an engine error after this many tokens. */
  failAfter?: number;
  /** Backpressure: no tokens until resumed. */
  paused: boolean;
}

export class FakeEngine implements EngineClient {
  readonly info: ModelInfo;
  readonly requests: GenerateRequest[] = [];
  readonly aborted: string[] = [];
  /** Every pause / resume call, in order: ['pause', id] or ['resume', id]. */
  readonly flowCalls: ['pause' | 'resume', string][] = [];
  currentState: 'loading' | 'ready' | 'draining' | 'failed' = 'ready';
  /** Set to fail the next request after this many tokens, with an internal message. */
  failNextAfter: number | null = null;
  private running = new Map<string, Job>();
  private queue: Job[] = [];
  private jobs = new Map<string, Job>();
  private preemptions = 0;

  constructor(private readonly opts: FakeEngineOptions = {}) {
    this.info = {
      name: 'fake-moe', architecture: 'FakeMoeForCausalLM', maxContext: 256, vocabSize: FAKE_VOCAB,
      eosTokenIds: [EOS], numMoeLayers: 2, numExperts: 4, topK: 2, ...opts.info,
    };
  }

  generate(req: GenerateRequest, onEvent: (ev: EngineEvent) => void): void {
    if (this.currentState !== 'ready') throw new Error(`engine is ${this.currentState}`);
    if (this.running.has(req.id) || this.queue.some((j) => j.req.id === req.id)) throw new Error(`duplicate id ${req.id}`);
    this.requests.push(req);
    // Greedy ignores the seed; sampling with a seed is reproducible; without one it is not.
    let h = 0x12345;
    for (const id of req.promptTokenIds) h = mix(h, id);
    if (req.sampling.temperature > 0) h = mix(h, req.sampling.seed ?? Math.floor(Math.random() * 2 ** 31));
    const scripted = this.opts.script ? this.opts.script(req, Number(req.id.slice(req.id.lastIndexOf('-') + 1))) : null;
    const job: Job = { req, onEvent, pending: [], generated: 0, rand: rng(h), timer: null, promptSent: false, lastToken: -1, scripted, paused: false };
    if (this.failNextAfter !== null) {
      job.failAfter = this.failNextAfter;
      this.failNextAfter = null;
    }
    this.jobs.set(req.id, job);
    this.queue.push(job);
    this.schedule();
  }

  abort(id: string): void {
    this.aborted.push(id);
    const job = this.running.get(id);
    const qi = this.queue.findIndex((j) => j.req.id === id);
    const target = job ?? (qi >= 0 ? this.queue[qi] : undefined);
    if (!target) return;
    if (job) {
      if (job.timer) clearTimeout(job.timer);
      this.running.delete(id);
    } else {
      this.queue.splice(qi, 1);
    }
    // Like a worker: the finished event arrives asynchronously.
    setImmediate(() => {
      target.onEvent({ type: 'finished', id, reason: 'abort', promptTokens: target.req.promptTokenIds.length, completionTokens: target.generated });
      this.schedule();
    });
  }

  pause(ids: readonly string[]): void {
    for (const id of ids) {
      const job = this.running.get(id) ?? this.queue.find((j) => j.req.id === id);
      if (!job) continue;
      this.flowCalls.push(['pause', id]);
      if (this.opts.ignorePause) continue;
      job.paused = true;
      if (job.timer) { clearTimeout(job.timer); job.timer = null; }
    }
  }

  resume(ids: readonly string[]): void {
    for (const id of ids) {
      const job = this.running.get(id) ?? this.queue.find((j) => j.req.id === id);
      if (!job) continue;
      this.flowCalls.push(['resume', id]);
      if (!job.paused) continue;
      job.paused = false;
      if (this.running.has(id)) this.step(job);
    }
  }

  /** Tokens generated so far by a request (running or finished). */
  generatedOf(id: string): number {
    return this.jobs.get(id)?.generated ?? 0;
  }

  stats(): EngineStats {
    return { running: this.running.size, waiting: this.queue.length, kvBlocksTotal: 64, kvBlocksUsed: this.running.size * 4, preemptionsTotal: this.preemptions };
  }

  state(): 'loading' | 'ready' | 'draining' | 'failed' {
    return this.currentState;
  }

  /** Count a preemption (for the metrics test). */
  preempt(): void {
    this.preemptions++;
  }

  private schedule(): void {
    const max = this.opts.maxRunning ?? Infinity;
    while (this.running.size < max && this.queue.length > 0) {
      const job = this.queue.shift()!;
      this.running.set(job.req.id, job);
      if (!job.paused) this.step(job);
    }
  }

  private nextToken(job: Job): number {
    if (job.pending.length === 0) {
      const ch = ALPHABET[Math.floor(job.rand() * ALPHABET.length)]!;
      job.pending = [...Buffer.from(ch, 'utf8')];
    }
    return BYTE0 + job.pending.shift()!;
  }

  private step(job: Job): void {
    const interval = this.opts.tokenIntervalMs ?? 0;
    const tick = () => {
      if (!this.running.has(job.req.id) || job.paused) return;
      const { req } = job;
      const ids: number[] = [];
      const lps: TokenLogprob[] = [];
      let finish: 'stop' | 'length' | null = null;
      let stopTokenId: number | undefined;
      const per = this.opts.tokensPerEvent ?? 1;
      const failAfter = job.failAfter;
      // Alternatives: other ids near the token (scripted runs: anywhere in the vocabulary).
      const addLogprob = (id: number, alt: (k: number) => number) => {
        if (req.sampling.logprobs == null) return;
        const lp = -Math.round(job.rand() * 300) / 100;
        const top = [{ tokenId: id, logprob: lp }];
        for (let k = 1; k < req.sampling.logprobs; k++) top.push({ tokenId: alt(k), logprob: lp - k });
        lps.push({ tokenId: id, logprob: lp, top: top.slice(0, req.sampling.logprobs) });
      };
      for (let i = 0; i < per && finish === null; i++) {
        if (failAfter !== undefined && job.generated >= failAfter) break;
        if (job.scripted) {
          if (job.scripted.length === 0) { finish = 'length'; break; }
          const id = job.scripted[job.generated]!;
          ids.push(id);
          addLogprob(id, (k) => (id + 97 * k) % this.info.vocabSize);
          job.generated++;
          if (job.generated >= Math.min(job.scripted.length, req.maxTokens)) finish = 'length';
          continue;
        }
        let id = this.nextToken(job);
        if (this.opts.eosAfter !== undefined && job.generated === this.opts.eosAfter && !req.ignoreEos && job.generated >= req.minTokens) id = EOS;
        ids.push(id);
        job.generated++;
        job.lastToken = id;
        addLogprob(id, (k) => BYTE0 + 97 + ((id + k) % 26));
        const isStop = (id === EOS && !req.ignoreEos) || req.stopTokenIds.includes(id);
        if (isStop && job.generated > req.minTokens) { finish = 'stop'; stopTokenId = id; }
        else if (job.generated >= req.maxTokens) finish = 'length';
      }
      if (ids.length > 0) {
        const ev: EngineEvent = { type: 'tokens', id: req.id, tokenIds: ids };
        if (lps.length > 0) ev.logprobs = lps;
        // Prompt logprobs with the first token: each prompt token after the first, with alternatives.
        if (req.promptLogprobs != null && job.generated === ids.length) {
          ev.promptLogprobs = req.promptTokenIds.map((id, j) => (j === 0 ? null : {
            tokenId: id, logprob: -(j % 7) / 4,
            top: Array.from({ length: req.promptLogprobs! }, (_, k) => ({ tokenId: k === 0 ? id : (id + 31 * k) % this.info.vocabSize, logprob: -(j % 7) / 4 - k })),
          }));
        }
        if (req.returnRoutedExperts) {
          // Positions processed this step: the whole prompt first, then each fed-back token.
          const positions = job.promptSent ? ids.length : req.promptTokenIds.length + ids.length - 1;
          job.promptSent = true;
          ev.routedExperts = Array.from({ length: positions }, (_, p) =>
            Array.from({ length: this.info.numMoeLayers }, (_, l) => [(p + l) % this.info.numExperts, (p + l + 1) % this.info.numExperts]));
        }
        job.onEvent(ev);
      }
      if (!this.running.has(job.req.id) || job.paused) return; // aborted or paused from inside onEvent
      if (failAfter !== undefined && job.generated >= failAfter) {
        this.running.delete(req.id);
        job.onEvent({ type: 'finished', id: req.id, reason: 'error', error: 'CUDA error: an illegal memory access (internal detail)', promptTokens: req.promptTokenIds.length, completionTokens: job.generated });
        this.schedule();
        return;
      }
      if (finish !== null) {
        this.running.delete(req.id);
        const fin: EngineEvent = { type: 'finished', id: req.id, reason: finish, promptTokens: req.promptTokenIds.length, completionTokens: job.generated };
        if (stopTokenId !== undefined) fin.stopTokenId = stopTokenId;
        job.onEvent(fin);
        this.schedule();
        return;
      }
      job.timer = setTimeout(tick, interval);
    };
    job.timer = setTimeout(tick, interval);
  }
}
