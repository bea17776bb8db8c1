// Shared state of one server instance: dependencies, options, the in-flight set used by drain,
// and the per-request record that becomes the request's log line.

import type { FastifyBaseLogger, FastifyRequest } from 'fastify';
import type { Metrics } from '../metrics/registry.js';
import type { EngineClient, TextCodec } from './deps.js';
import type { Generation } from './generation.js';
import { GrammarChecker } from '../structured/grammar-checker.js';
import type { ReasoningParserName } from './reasoning.js';
import type { ToolCallParserName } from './tool-calls.js';
import { DEFAULT_MAX_QUEUED_SEQUENCES, DEFAULT_MAX_SEQUENCES_PER_REQUEST, type SequenceLimits } from './request-params.js';
import { DEFAULT_MAX_PROMPTS_PER_REQUEST } from './schemas.js';

export interface ServerOptions {
  engine: EngineClient;
  codec: TextCodec;
  servedModelName: string;
  apiKey?: string | undefined;
  /**
   * Sequences (engine requests: prompts x n) that may wait for a running slot, a new request's own
   * included: a request that does not fit now gets 429, one that never could gets 400 (default 256).
   */
  maxQueuedSequences?: number;
  /** @deprecated the old name of maxQueuedSequences (it always counted sequences, wrongly called requests). */
  maxQueuedRequests?: number;
  /** Prompts in one /v1/completions request at most (default 128). */
  maxPromptsPerRequest?: number;
  /** Sequences (prompts x n) of one request at most (default 256). */
  maxSequencesPerRequest?: number;
  maxModelLen: number;
  logger: FastifyBaseLogger;
  metrics: Metrics;
  /** Put prompt text in the request log lines (off by default: prompts are user data). */
  logPrompts: boolean;
  /** Largest accepted request body in bytes (default 4 MiB). */
  bodyLimit?: number;
  /**
   * A stream whose client stops reading pauses its sequences; still unread after this long, it is
   * aborted (KV freed) with a log line (default 120 s, --stream-stall-timeout).
   */
  streamStallTimeoutMs?: number;
  /** Bytes one stream may queue in the process beyond the socket's buffers before it is aborted (default 4 MiB). */
  streamBufferLimitBytes?: number;
  /** Seconds sent in Retry-After with 429 and 503 (default 1). */
  retryAfterSeconds?: number;
  /** Chat: how reasoning text is split into reasoning_content (null/absent = it is content). */
  reasoningParser?: ReasoningParserName | null;
  /** Chat: how the model's tool-call text is parsed into tool_calls (null/absent = no tool calls). */
  toolCallParser?: ToolCallParserName | null;
}

/** What one generation request contributes to its log line. */
export interface RequestRecord {
  route: string;
  /** The cmpl-/chatcmpl- id the client sees. */
  completionId?: string;
  promptTokens?: number;
  completionTokens?: number;
  ttftMs?: number | null;
  finishReasons?: string[];
  n?: number;
  stream?: boolean;
  prompt?: unknown;
  error?: string;
  /** Set once the line is written (a stream the client dropped never 'finish'es). */
  logged?: boolean;
}

export class ServerContext {
  draining = false;
  readonly active = new Set<Generation>();
  private idleWaiters: (() => void)[] = [];
  readonly records = new WeakMap<FastifyRequest, RequestRecord>();
  readonly retryAfter: string;
  readonly limits: SequenceLimits;
  /** Checks structured-output grammars off the main thread (started on first use). */
  readonly grammarChecker = new GrammarChecker();

  constructor(readonly opts: ServerOptions) {
    this.retryAfter = String(opts.retryAfterSeconds ?? 1);
    this.limits = {
      maxPromptsPerRequest: opts.maxPromptsPerRequest ?? DEFAULT_MAX_PROMPTS_PER_REQUEST,
      maxSequencesPerRequest: opts.maxSequencesPerRequest ?? DEFAULT_MAX_SEQUENCES_PER_REQUEST,
      maxQueuedSequences: opts.maxQueuedSequences ?? opts.maxQueuedRequests ?? DEFAULT_MAX_QUEUED_SEQUENCES,
    };
  }

  track(g: Generation): void {
    this.active.add(g);
    void g.done.then(() => this.untrack(g));
  }

  untrack(g: Generation): void {
    if (!this.active.delete(g)) return;
    if (this.active.size === 0) {
      const ws = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of ws) w();
    }
  }

  /** Resolves when nothing is in flight (at once if nothing is). */
  idle(): Promise<void> {
    if (this.active.size === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }
}
