// Shared state of one server instance: dependencies, options, the in-flight set used by drain,
// and the per-request record that becomes the request's log line.

import type { FastifyBaseLogger, FastifyRequest } from 'fastify';
import type { Metrics } from '../metrics/registry.js';
import type { EngineClient, TextCodec } from './deps.js';
import type { Generation } from './generation.js';

export interface ServerOptions {
  engine: EngineClient;
  codec: TextCodec;
  servedModelName: string;
  apiKey?: string | undefined;
  /** More engine requests than this waiting -> 429. */
  maxQueuedRequests: number;
  maxModelLen: number;
  logger: FastifyBaseLogger;
  metrics: Metrics;
  /** Put prompt text in the request log lines (off by default: prompts are user data). */
  logPrompts: boolean;
  /** Largest accepted request body in bytes (default 4 MiB). */
  bodyLimit?: number;
  /** Seconds sent in Retry-After with 429 and 503 (default 1). */
  retryAfterSeconds?: number;
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

  constructor(readonly opts: ServerOptions) {
    this.retryAfter = String(opts.retryAfterSeconds ?? 1);
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
