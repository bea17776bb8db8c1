// The HTTP front's grammar check (main thread side): asks the checker thread whether a request's
// grammar parses, so an invalid schema, regex or grammar is a 400 that says why, before admission.
import { Worker } from 'node:worker_threads';

import type { CheckRequest, CheckResult } from './grammar-check-worker.js';
import type { GrammarSpec } from './grammar-spec.js';

/** A check that takes longer than this (a pathological grammar) is refused, and the thread replaced. */
export const DEFAULT_GRAMMAR_CHECK_TIMEOUT_MS = 10_000;

export class GrammarChecker {
  private worker: Worker | null = null;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve(error: string | null): void; timer: NodeJS.Timeout }>();

  constructor(private readonly timeoutMs = DEFAULT_GRAMMAR_CHECK_TIMEOUT_MS) {}

  /** null when the grammar is valid, else xgrammar's reason. */
  check(spec: GrammarSpec): Promise<string | null> {
    const w = this.start();
    const id = this.nextId++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        resolve(`checking it took longer than ${this.timeoutMs / 1000} s`);
        this.restart();
      }, this.timeoutMs);
      this.waiting.set(id, { resolve, timer });
      w.postMessage({ id, spec } satisfies CheckRequest);
    });
  }

  /** Starts the thread ahead of the first request (loading xgrammar's wasm takes ~100 ms). */
  warm(): void {
    this.start();
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    this.failAll('the server is shutting down');
    if (w) await w.terminate();
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const w = new Worker(new URL('./grammar-check-worker.js', import.meta.url));
    w.unref(); // never keeps the daemon alive
    w.on('message', (m: CheckResult) => {
      const entry = this.waiting.get(m.id);
      if (!entry) return;
      this.waiting.delete(m.id);
      clearTimeout(entry.timer);
      entry.resolve(m.error);
    });
    const lost = (why: string) => {
      if (this.worker !== w) return;
      this.worker = null;
      this.failAll(why);
    };
    w.on('error', (e) => lost(`the grammar checker failed: ${e.message}`));
    w.on('exit', (code) => lost(`the grammar checker exited (${code})`));
    this.worker = w;
    return w;
  }

  private restart(): void {
    const w = this.worker;
    this.worker = null;
    void w?.terminate();
    this.failAll('the grammar checker was restarted');
  }

  private failAll(why: string): void {
    for (const [id, entry] of this.waiting) {
      clearTimeout(entry.timer);
      entry.resolve(why);
      this.waiting.delete(id);
    }
  }
}
