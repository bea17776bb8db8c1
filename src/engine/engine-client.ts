// The main thread's handle on the engine worker: starts it, forwards requests and aborts, and
// routes the worker's token events back to each request's callback. Never computes.
import { EventEmitter } from 'node:events';
import { Worker } from 'node:worker_threads';

import type { EngineOptions, FromWorker, StepMetrics, ToWorker } from './protocol.js';
import { refusedEvent, type EngineEvent, type EngineStats, type GenerateRequest, type ModelInfo } from './types.js';

export type EngineState = 'loading' | 'ready' | 'draining' | 'failed';

export class EngineClient extends EventEmitter {
  private readonly worker: Worker;
  private readonly pending = new Map<string, (ev: EngineEvent) => void>();
  private lastStats: EngineStats = { running: 0, waiting: 0, kvBlocksTotal: 0, kvBlocksUsed: 0, preemptionsTotal: 0 };
  private current: EngineState = 'loading';
  private infoValue: ModelInfo | undefined;
  private failure: string | undefined;
  summary = '';
  readonly ready: Promise<ModelInfo>;

  /** provisional: the model's info from its config, so the API can answer while weights load. */
  constructor(options: EngineOptions, provisional?: ModelInfo) {
    super();
    this.infoValue = provisional;
    this.worker = new Worker(new URL('./worker.js', import.meta.url));
    this.ready = new Promise<ModelInfo>((resolve, reject) => {
      this.worker.on('message', (m: FromWorker) => {
        if (m.type === 'ready') {
          this.infoValue = m.info;
          this.summary = m.summary;
          this.current = 'ready';
          resolve(m.info);
        } else if (m.type === 'progress') {
          this.emit('progress', m);
        } else if (m.type === 'events') {
          this.lastStats = m.stats;
          for (const ev of m.events) {
            const cb = this.pending.get(ev.id);
            if (ev.type === 'finished') this.pending.delete(ev.id);
            cb?.(ev);
            if (ev.type === 'finished') this.emit('finished', ev);
          }
          if (m.step) this.emit('step', m.step satisfies StepMetrics);
        } else if (m.type === 'warning') {
          this.emit('warning', m.message);
        } else if (m.type === 'fatal') {
          this.fail(m.message);
          reject(new Error(m.message));
        }
      });
      this.worker.on('error', (err) => {
        this.fail(`engine worker crashed: ${err.message}`);
        reject(err);
      });
      this.worker.on('exit', (code) => {
        if (this.current !== 'failed' && this.pending.size > 0) this.fail(`engine worker exited (code ${code})`);
        if (this.current === 'loading') reject(new Error(`engine worker exited during load (code ${code})`));
      });
    });
    this.ready.catch(() => undefined);
    this.post({ type: 'init', options });
  }

  private fail(message: string): void {
    this.current = 'failed';
    this.failure = message;
    // Every pending request fails loudly, and only it.
    for (const [id, cb] of this.pending) {
      cb({ type: 'finished', id, reason: 'error', error: message, promptTokens: 0, completionTokens: 0 });
    }
    this.pending.clear();
    this.emit('failed', message);
  }

  private post(m: ToWorker): void {
    this.worker.postMessage(m);
  }

  get info(): ModelInfo {
    if (!this.infoValue) throw new Error('engine is still loading');
    return this.infoValue;
  }

  get failureMessage(): string | undefined {
    return this.failure;
  }

  state(): EngineState {
    return this.current;
  }

  setDraining(): void {
    if (this.current === 'ready') this.current = 'draining';
  }

  generate(req: GenerateRequest, onEvent: (ev: EngineEvent) => void): void {
    if (this.current === 'failed') {
      queueMicrotask(() => onEvent(refusedEvent(req, this.failure ?? 'engine failed')));
      return;
    }
    this.pending.set(req.id, onEvent);
    this.post({ type: 'generate', req });
  }

  abort(id: string): void {
    if (this.pending.has(id)) this.post({ type: 'abort', id });
  }

  /** Backpressure: the engine stops stepping these requests (they keep their KV) until resume(). */
  pause(ids: readonly string[]): void {
    const live = ids.filter((id) => this.pending.has(id));
    if (live.length > 0) this.post({ type: 'pause', ids: live });
  }

  resume(ids: readonly string[]): void {
    const live = ids.filter((id) => this.pending.has(id));
    if (live.length > 0) this.post({ type: 'resume', ids: live });
  }

  /**
   * The worker's last figures, with `waiting` counting requests posted but not yet seen running,
   * so admission control (429) is never behind a burst.
   */
  stats(): EngineStats {
    const waiting = Math.max(this.lastStats.waiting, this.pending.size - this.lastStats.running);
    return { ...this.lastStats, waiting };
  }

  inFlight(): number {
    return this.pending.size;
  }

  /** Stops the worker: a clean shutdown when loaded; during the load, at once (see below). */
  async close(): Promise<void> {
    if (this.current === 'loading') {
      // The load runs synchronously in the worker, so a 'shutdown' message would wait for it to
      // finish: terminate() stops its JavaScript at once (a native call in progress ends first),
      // and the worker's memory goes with its environment.
      await this.worker.terminate();
      return;
    }
    this.post({ type: 'shutdown' });
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => { void this.worker.terminate().then(() => resolve()); }, 5000);
      this.worker.once('exit', () => { clearTimeout(timer); resolve(); });
    });
  }
}
