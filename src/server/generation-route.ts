// The life of a completions / chat-completions request once its prompts are tokenized: admission
// (engine state, queue limit), the engine requests, SSE or JSON output, client disconnect -> abort.

import { randomUUID } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { TokenLogprob } from '../engine/types.js';
import type { RequestRecord, ServerContext } from './context.js';
import { ChatChoiceOutput, type ChatParsing } from './chat-output.js';
import { ApiError } from './errors.js';
import { IncrementalDetokenizer } from '../model/incremental-detokenizer.js';
import { Generation, type ChoiceDelta, type ChoiceState, type GenerationParams } from './generation.js';
import { checkSequenceCount } from './request-params.js';
import { SseStream, type SseFlowControl } from './sse.js';

/** Defaults of --stream-stall-timeout (as ms) and of the bytes a stream may queue in the process. */
export const DEFAULT_STREAM_STALL_TIMEOUT_MS = 120_000;
export const DEFAULT_STREAM_BUFFER_LIMIT_BYTES = 4 << 20;

export type EndpointKind = 'completion' | 'chat';

export interface PreparedGeneration {
  kind: EndpointKind;
  prompts: number[][];
  /** The prompt as text, per prompt (echo). */
  promptTexts: string[];
  params: GenerationParams;
  stream: boolean;
  includeUsage: boolean;
  /** vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries its choice's usage so far. */
  continuousUsage?: boolean;
  returnTokenIds: boolean;
  echo: boolean;
  /** max_tokens 0 (completions, with echo): the one token the engine generates is not returned. */
  scoreOnly?: boolean;
  /** Whether the echoed prompt text shows special tokens (decoded token-id prompts) or not (text prompts). */
  echoSpecialTokens?: boolean;
  /** Completions: top-n count; chat: top_logprobs count; null when logprobs are off. */
  logprobs: number | null;
  /** Chat: reasoning and tool-call parsing of the output (absent: all text is content). */
  chatParsing?: ChatParsing;
}

/** 503 once the engine as a whole is down (a device fault, a lost data-parallel rank), with its reason. */
function engineFailed(ctx: ServerContext): ApiError {
  const why = ctx.opts.engine.failureMessage;
  return new ApiError(503, 'overloaded_error', `The engine has failed and cannot serve requests${why ? `: ${why}` : '.'}`,
    null, 'engine_failed', { 'retry-after': ctx.retryAfter });
}

/**
 * Refuses work the engine cannot take now: not ready, shutting down, or not enough room in the
 * queue for all of this request's sequences (checkSequenceCount already refused what never fits).
 */
export function admit(ctx: ServerContext, sequences: number): void {
  const retry = { 'retry-after': ctx.retryAfter };
  if (ctx.draining) throw new ApiError(503, 'overloaded_error', 'The server is shutting down; retry on another instance.', null, 'server_shutting_down', retry);
  const state = ctx.opts.engine.state();
  if (state === 'loading') throw new ApiError(503, 'overloaded_error', 'The model is still loading; retry shortly.', null, 'model_loading', retry);
  if (state === 'draining') throw new ApiError(503, 'overloaded_error', 'The engine is draining; retry on another instance.', null, 'server_shutting_down', retry);
  if (state === 'failed') throw engineFailed(ctx);
  const waiting = ctx.opts.engine.stats().waiting;
  const limit = ctx.limits.maxQueuedSequences;
  // NOTE: counted in sequences (prompts x n), not requests: one request may bring hundreds.
  if (waiting + sequences > limit) {
    throw new ApiError(429, 'rate_limit_error',
      `The server is overloaded: ${waiting} sequences are waiting and this request adds ${sequences}, more than the ${limit} the queue holds. Retry later.`,
      null, 'queue_full', retry);
  }
}

interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** As OpenAI reports it: prompt tokens whose K/V came from the prefix cache. */
  prompt_tokens_details: { cached_tokens: number };
}

/**
 * Formats logprobs and their token strings. A token's string is the text it adds after the ids
 * before it (the prompt's last ids, then the choice's earlier tokens), as the streamed text has it:
 * an IncrementalDetokenizer per choice (and special-token setting) over the request's codec.
 * Decoded alone, a SentencePiece word piece would lose its leading space (Llama, Mistral, Mixtral). A
 * token that leaves a character incomplete (a byte-fallback or byte-level piece of one) adds '' and
 * the token that completes it adds the rest, so a choice's token strings (and their `bytes`) join to
 * its text and `text_offset` points into it. An alternative's string is what it would have added
 * (decoded alone where that is empty).
 */
class LogprobFormatter {
  private readonly alone = new Map<number, string>();
  private readonly offset = new Map<number, number>(); // completions text_offset per choice
  /** Per choice and skip_special_tokens setting ("index:skip"): the detokenizer its tokens went through. */
  private readonly detoks = new Map<string, IncrementalDetokenizer>();

  constructor(private readonly ctx: ServerContext, private readonly topN: number,
              private readonly skipSpecialTokens: boolean, private readonly echoSpecialTokens = false) {}

  private decode(ids: number[], skipSpecial = this.skipSpecialTokens): string {
    return this.ctx.opts.codec.decode(ids, skipSpecial);
  }

  /** A token decoded alone: an alternative whose text in context is empty. */
  private tokenAlone(id: number): string {
    let s = this.alone.get(id);
    if (s === undefined) this.alone.set(id, s = this.decode([id]));
    return s;
  }

  /**
   * Each logprob's token string and its alternatives', advancing the choice's detokenizer. `start`:
   * the ids the choice's first token follows (read when the detokenizer is made). `skipSpecial`:
   * false for echoed prompt tokens, whose text echo shows with special tokens.
   */
  private strings(choice: number, start: () => number[], ids: number[], alts: (i: number) => number[],
                  skipSpecial = this.skipSpecialTokens): { token: string; alts: string[] }[] {
    const key = `${choice}:${skipSpecial}`;
    let d = this.detoks.get(key);
    if (!d) this.detoks.set(key, d = new IncrementalDetokenizer((x) => this.decode(x, skipSpecial), start()));
    const detok = d;
    return ids.map((id, i) => {
      const altStrings = alts(i).map((a) => (a === id ? null : detok.peek(a) || this.tokenAlone(a)));
      const token = detok.push(id);
      return { token, alts: altStrings.map((a) => a ?? token) };
    });
  }

  /**
   * OpenAI completions shape. Echoed prompt positions carry the prompt logprobs when the engine
   * gave them (the first position: null), else null.
   */
  completion(c: ChoiceState, lps: TokenLogprob[], echoIds: number[] = [], promptLps: (TokenLogprob | null)[] | null = null) {
    const tokens: string[] = [];
    const tokenLogprobs: (number | null)[] = [];
    const top: (Record<string, number> | null)[] = [];
    const textOffset: number[] = [];
    let off = this.offset.get(c.index) ?? 0;
    // Echoed tokens come first, from the start of the text, as the echo text shows them (see
    // completions.ts); the generated ones follow the prompt.
    const echoed = echoIds.length === 0 ? [] : this.strings(c.index, () => [], echoIds,
      (j) => promptLps?.[j]?.top.slice(0, this.topN).map((a) => a.tokenId) ?? [], !this.echoSpecialTokens);
    echoed.forEach(({ token: t, alts }, j) => {
      const lp = promptLps?.[j] ?? null;
      tokens.push(t);
      tokenLogprobs.push(lp ? lp.logprob : null);
      top.push(lp ? this.topDict(t, lp, alts) : null);
      textOffset.push(off);
      off += t.length;
    });
    const strings = this.strings(c.index, () => c.promptTokenIds, lps.map((lp) => lp.tokenId),
      (i) => lps[i]!.top.slice(0, this.topN).map((a) => a.tokenId));
    lps.forEach((lp, i) => {
      const { token: t, alts } = strings[i]!;
      tokens.push(t);
      tokenLogprobs.push(lp.logprob);
      top.push(this.topDict(t, lp, alts));
      textOffset.push(off);
      off += t.length;
    });
    this.offset.set(c.index, off);
    return { tokens, token_logprobs: tokenLogprobs, top_logprobs: top, text_offset: textOffset };
  }

  /** A completions top_logprobs entry: the alternatives, and (vLLM semantics) the token itself, so up to n + 1. */
  private topDict(t: string, lp: TokenLogprob, alts: string[]): Record<string, number> {
    const d: Record<string, number> = {};
    lp.top.slice(0, this.topN).forEach((alt, j) => { d[alts[j]!] = alt.logprob; });
    if (!(t in d)) d[t] = lp.logprob;
    return d;
  }

  /** OpenAI chat shape. */
  chat(c: ChoiceState, lps: TokenLogprob[]) {
    const entry = (token: string, logprob: number) => ({ token, logprob, bytes: [...Buffer.from(token, 'utf8')] });
    const strings = this.strings(c.index, () => c.promptTokenIds, lps.map((lp) => lp.tokenId),
      (i) => lps[i]!.top.slice(0, this.topN).map((a) => a.tokenId));
    return {
      content: lps.map((lp, i) => ({
        ...entry(strings[i]!.token, lp.logprob),
        top_logprobs: lp.top.slice(0, this.topN).map((a, j) => entry(strings[i]!.alts[j]!, a.logprob)),
      })),
    };
  }
}

export async function runGeneration(ctx: ServerContext, request: FastifyRequest, reply: FastifyReply, prep: PreparedGeneration): Promise<unknown> {
  const { opts } = ctx;
  const record = ctx.records.get(request);
  admit(ctx, checkSequenceCount(prep.prompts.length, prep.params.n, ctx.limits));

  const requestId = `${prep.kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replace(/-/g, '')}`;
  const created = Math.floor(Date.now() / 1000);
  const model = opts.servedModelName;
  const lpf = prep.logprobs === null ? null : new LogprobFormatter(ctx, prep.logprobs, prep.params.skipSpecialTokens, prep.echoSpecialTokens ?? false);
  if (record) {
    record.completionId = requestId;
    record.n = prep.params.n;
    record.stream = prep.stream;
    record.promptTokens = prep.prompts.reduce((s, p) => s + p.length, 0);
  }

  const scoreOnly = prep.scoreOnly === true;
  const usage = (g: Generation): Usage => {
    const completion = scoreOnly ? 0 : g.completionTokens;
    return {
      prompt_tokens: g.promptTokens, completion_tokens: completion, total_tokens: g.promptTokens + completion,
      prompt_tokens_details: { cached_tokens: g.cachedTokens },
    };
  };

  let sse: SseStream | null = null;
  const sentFirst = new Set<number>();
  const chatParsing = prep.kind === 'chat' && prep.chatParsing && (prep.chatParsing.reasoning || prep.chatParsing.tools) ? prep.chatParsing : null;
  const chatOutputs = new Map<number, ChatChoiceOutput>();
  const chatOutput = (c: ChoiceState): ChatChoiceOutput => {
    let o = chatOutputs.get(c.index);
    if (!o) chatOutputs.set(c.index, o = new ChatChoiceOutput(chatParsing!, prep.promptTexts[c.promptIndex] ?? ''));
    return o;
  };
  const chunkBase = () => ({
    id: requestId,
    object: prep.kind === 'chat' ? 'chat.completion.chunk' : 'text_completion',
    created,
    model,
  });
  const withUsageNull = (o: Record<string, unknown>) => (prep.includeUsage ? { ...o, usage: null } : o);
  /** A choice's chunk: usage null, or with continuous_usage_stats that choice's tokens so far. */
  const withChoiceUsage = (c: ChoiceState, o: Record<string, unknown>) => {
    if (!prep.continuousUsage) return withUsageNull(o);
    const completion = scoreOnly ? 0 : c.tokenIds.length;
    const promptTokens = c.promptTokenIds.length;
    return { ...o, usage: { prompt_tokens: promptTokens, completion_tokens: completion, total_tokens: promptTokens + completion } };
  };

  /** One streamed choice update; the first one of a choice carries the echo / prompt ids / role. */
  const streamChunk = (c: ChoiceState, d: ChoiceDelta, finishReason: string | null) => {
    let finish = finishReason;
    const first = !sentFirst.has(c.index);
    sentFirst.add(c.index);
    const choice: Record<string, unknown> = { index: c.index };
    let text = d.text;
    if (prep.kind === 'completion') {
      if (scoreOnly) text = '';
      if (first && prep.echo) text = prep.promptTexts[c.promptIndex]! + text;
      choice.text = text;
      choice.logprobs = lpf ? lpf.completion(c, scoreOnly ? [] : d.logprobs, first && prep.echo ? c.promptTokenIds : [], c.promptLogprobs) : null;
    } else if (chatParsing) {
      const o = chatOutput(c);
      const part = o.push(text);
      const delta: Record<string, unknown> = {};
      if (finish !== null) {
        const end = o.finish();
        part.reasoning += end.reasoning;
        part.content += end.content;
        if (end.toolCalls.length) {
          delta.tool_calls = end.toolCalls.map((call, index) => ({ index, ...call }));
          if (finish === 'stop') finish = 'tool_calls';
        }
      }
      if (part.reasoning) delta.reasoning_content = part.reasoning;
      if (part.content) delta.content = part.content;
      const extras = lpf !== null || prep.returnTokenIds || prep.params.returnRoutedExperts;
      if (Object.keys(delta).length === 0 && finish === null && !extras && !first) return;
      choice.delta = delta;
      choice.logprobs = lpf ? lpf.chat(c, d.logprobs) : null;
    } else {
      choice.delta = text === '' ? {} : { content: text };
      choice.logprobs = lpf ? lpf.chat(c, d.logprobs) : null;
    }
    // max_tokens 0: the generated token is not part of the answer, so neither is how it ended.
    if (scoreOnly && finish !== null) finish = 'length';
    choice.finish_reason = finish;
    if (finish !== null) choice.stop_reason = scoreOnly ? null : c.stopReason;
    if (prep.returnTokenIds) {
      if (first) choice.prompt_token_ids = c.promptTokenIds;
      choice.token_ids = scoreOnly ? [] : d.tokenIds;
    }
    if (prep.params.returnRoutedExperts) choice.routed_experts = d.routedExperts;
    sse!.send(withChoiceUsage(c, { ...chunkBase(), choices: [choice] }));
  };

  const generation = new Generation(
    { engine: opts.engine, codec: opts.codec, metrics: opts.metrics },
    requestId,
    prep.prompts,
    prep.params,
    prep.stream
      ? {
          onDelta(c, d) {
            const extras = lpf !== null || prep.returnTokenIds || prep.params.returnRoutedExperts;
            if (d.text !== '' || extras || (!sentFirst.has(c.index) && prep.echo)) streamChunk(c, d, null);
          },
          onChoiceEnd(c, tail) { streamChunk(c, tail, c.finishReason); },
        }
      : {},
    performance.now() - reply.elapsedTime, // TTFT and e2e count from arrival, tokenizing included
  );

  let responded = false;
  /** The response will never finish (client gone or not reading), so onResponse will not log it: do it here. */
  const endUnfinished = (why: string, message: string, level: 'info' | 'warn', extra: Record<string, unknown> = {}) => {
    responded = true;
    generation.abort(why);
    if (record && !record.logged) {
      record.logged = true;
      record.error = why;
      record.completionTokens = generation.completionTokens;
      record.ttftMs = generation.ttftMs === null ? null : Math.round(generation.ttftMs * 10) / 10;
      request.log[level]({ ...logFields(record), ...extra, status: 499, durationMs: Math.round(reply.elapsedTime) }, message);
      opts.metrics.httpRequests.inc({ route: record.route, status: '499' });
    }
  };
  let stallTimer: NodeJS.Timeout | null = null;
  const clearStall = () => {
    if (stallTimer) clearTimeout(stallTimer);
    stallTimer = null;
  };
  const onClose = () => {
    clearStall();
    if (!responded) endUnfinished('client disconnected', 'request aborted by client', 'info');
  };
  // NOTE: the response's 'close' (not the request's, which fires once the body is read) says the client left.
  reply.raw.on('close', onClose);

  if (prep.stream) {
    reply.hijack();
    const stallTimeoutMs = opts.streamStallTimeoutMs ?? DEFAULT_STREAM_STALL_TIMEOUT_MS;
    const bufferLimitBytes = opts.streamBufferLimitBytes ?? DEFAULT_STREAM_BUFFER_LIMIT_BYTES;
    /** A client that does not read loses its request: KV freed, socket closed (an error chunk would only queue). */
    const dropStalled = (why: string, extra: Record<string, unknown>) => {
      clearStall();
      if (responded) return;
      endUnfinished(why, 'stream aborted: the client stopped reading', 'warn', extra);
      reply.raw.destroy();
    };
    // Backpressure: a full socket pauses this request's sequences in the engine (they keep their
    // KV, other requests keep stepping) until it drains; stalled too long, or too much queued, it ends.
    const flow: SseFlowControl = {
      onPause() {
        if (responded) return; // the last chunks of a finished request: nothing left to pause
        request.log.debug({ completionId: requestId, bufferedBytes: sse?.bufferedBytes ?? 0 }, 'stream paused: the client is not reading');
        generation.pause();
        stallTimer ??= setTimeout(() => dropStalled(`client stopped reading for ${stallTimeoutMs / 1000} s`,
          { stallTimeoutMs, bufferedBytes: sse?.bufferedBytes ?? 0 }), stallTimeoutMs);
      },
      onResume() {
        clearStall();
        request.log.debug({ completionId: requestId }, 'stream resumed');
        generation.resume();
      },
      onOverflow(bufferedBytes) {
        dropStalled(`client stopped reading: ${bufferedBytes} bytes queued (limit ${bufferLimitBytes})`, { bufferedBytes, bufferLimitBytes });
      },
    };
    sse = new SseStream(reply.raw, { 'x-request-id': String(request.id) }, flow, bufferLimitBytes);
    if (prep.kind === 'chat') {
      // OpenAI opens every chat choice with a role-only delta.
      for (const c of generation.choices) {
        sentFirst.add(c.index);
        const choice: Record<string, unknown> = { index: c.index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null };
        if (prep.returnTokenIds) choice.prompt_token_ids = c.promptTokenIds;
        sse.send(withChoiceUsage(c, { ...chunkBase(), choices: [choice] }));
      }
    }
  }

  ctx.track(generation);
  generation.start();
  const outcome = await generation.done;
  clearStall();
  if (record) {
    record.completionTokens = generation.completionTokens;
    record.ttftMs = generation.ttftMs === null ? null : Math.round(generation.ttftMs * 10) / 10;
    record.finishReasons = generation.choices.map((c) => c.finishReason ?? outcome.status);
  }
  if (responded) return undefined; // client is gone
  responded = true;

  if (outcome.status !== 'ok') {
    const err = outcome.status === 'error'
      ? new ApiError(500, 'server_error', 'The engine failed while generating this request.', null, 'engine_error')
      : new ApiError(503, 'overloaded_error', 'The server is shutting down and aborted this request.', null, 'server_shutting_down', { 'retry-after': ctx.retryAfter });
    if (record) record.error = outcome.status === 'error' ? outcome.message : outcome.why;
    if (outcome.status === 'error') request.log.error({ engineError: outcome.message }, 'generation failed');
    if (sse) {
      sse.fail(err.body());
      return undefined;
    }
    throw err;
  }

  if (sse) {
    if (prep.includeUsage) sse.send({ ...chunkBase(), choices: [], usage: usage(generation) });
    sse.done();
    return undefined;
  }

  const choices = generation.choices.map((c) => {
    const out: Record<string, unknown> = { index: c.index };
    if (prep.kind === 'completion') {
      out.text = (prep.echo ? prep.promptTexts[c.promptIndex]! : '') + (scoreOnly ? '' : c.text);
      out.logprobs = lpf ? lpf.completion(c, scoreOnly ? [] : c.logprobs, prep.echo ? c.promptTokenIds : [], c.promptLogprobs) : null;
    } else if (chatParsing) {
      const o = chatOutput(c);
      const part = o.push(c.text);
      const end = o.finish();
      const content = part.content + end.content;
      const reasoning = part.reasoning + end.reasoning;
      const message: Record<string, unknown> = { role: 'assistant', content: content === '' && end.toolCalls.length ? null : content };
      if (chatParsing.reasoning) message.reasoning_content = reasoning === '' ? null : reasoning;
      if (end.toolCalls.length) message.tool_calls = end.toolCalls;
      out.message = message;
      out.logprobs = lpf ? lpf.chat(c, c.logprobs) : null;
      out.finish_reason = end.toolCalls.length && c.finishReason === 'stop' ? 'tool_calls' : c.finishReason;
    } else {
      out.message = { role: 'assistant', content: c.text };
      out.logprobs = lpf ? lpf.chat(c, c.logprobs) : null;
    }
    out.finish_reason ??= scoreOnly ? 'length' : c.finishReason;
    out.stop_reason = scoreOnly ? null : c.stopReason;
    if (prep.returnTokenIds) {
      out.prompt_token_ids = c.promptTokenIds;
      out.token_ids = scoreOnly ? [] : c.tokenIds;
    }
    if (prep.params.returnRoutedExperts) out.routed_experts = c.routedExperts;
    return out;
  });
  reply.header('x-request-id', String(request.id));
  return {
    id: requestId,
    object: prep.kind === 'chat' ? 'chat.completion' : 'text_completion',
    created,
    model,
    choices,
    usage: usage(generation),
  };
}

/** The fields of a request record that go into its log line. */
export function logFields(r: RequestRecord): Record<string, unknown> {
  const { logged: _logged, ...rest } = r;
  return rest;
}
