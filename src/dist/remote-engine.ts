// One rank as the front sees it: the EngineClient surface (generate, abort, stats, state) over a
// RankLink, with the rank's token events routed back to each request's callback.
import { EventEmitter } from 'node:events';

import type { StepMetrics } from '../engine/protocol.js';
import { refusedEvent, type EngineEvent, type EngineStats, type GenerateRequest, type ModelInfo } from '../engine/types.js';
import type { EngineState } from '../engine/engine-client.js';
import type { RankIdentity } from './identity.js';
import type { RankLink } from './rank-link.js';
import type { RankToFront } from './rank-protocol.js';

export class RemoteEngine extends EventEmitter {
  private readonly pending = new Map<string, (ev: EngineEvent) => void>();
  private lastStats: EngineStats = { running: 0, waiting: 0, kvBlocksTotal: 0, kvBlocksUsed: 0, preemptionsTotal: 0 };
  private current: EngineState = 'loading';
  private failure: string | undefined;
  infoValue: ModelInfo | undefined;
  /** The rank's identity, as the rendezvous read it from the store. */
  identity: RankIdentity | undefined;
  /** The rank process's pid (from its hello; on its own node). */
  pid: number | undefined;
  summary = '';
  /** performance.now() of the last message from the rank (any message counts as a heartbeat). */
  lastSeenMs = performance.now();
  /** Set once the rank has been told to shut down: its exit then is not a fault. */
  closing = false;

  constructor(readonly link: RankLink) {
    super();
    link.on('message', (m: RankToFront) => this.onMessage(m));
    link.on('gone', (reason: string, clean: boolean) => this.emit('gone', reason, clean));
  }

  get rank(): number {
    return this.link.rank;
  }

  private onMessage(m: RankToFront): void {
    this.lastSeenMs = performance.now();
    switch (m.type) {
      case 'hello':
        this.pid = m.pid;
        this.emit('hello');
        break;
      case 'ready':
        this.infoValue = m.info;
        this.summary = m.summary;
        this.current = 'ready';
        this.emit('ready', m.info);
        break;
      case 'progress':
        this.emit('progress', m);
        break;
      case 'events':
        this.lastStats = m.stats;
        for (const ev of m.events) {
          const cb = this.pending.get(ev.id);
          if (ev.type === 'finished') this.pending.delete(ev.id);
          cb?.(ev);
          if (ev.type === 'finished') this.emit('finished', ev);
        }
        for (const s of m.steps) this.emit('step', s satisfies StepMetrics);
        break;
      case 'fatal':
        this.emit('fatal', m.message);
        break;
      case 'heartbeat':
        break;
    }
  }

  /** Every pending request fails with the message; later requests fail at once. */
  fail(message: string): void {
    if (this.current === 'failed') return;
    this.current = 'failed';
    this.failure = message;
    for (const [id, cb] of this.pending) {
      cb({ type: 'finished', id, reason: 'error', error: message, promptTokens: 0, completionTokens: 0 });
    }
    this.pending.clear();
  }

  state(): EngineState {
    return this.current;
  }

  generate(req: GenerateRequest, onEvent: (ev: EngineEvent) => void): void {
    if (this.current === 'failed') {
      queueMicrotask(() => onEvent(refusedEvent(req, this.failure ?? 'rank failed')));
      return;
    }
    this.pending.set(req.id, onEvent);
    this.link.send({ type: 'generate', req });
  }

  abort(id: string): void {
    if (this.pending.has(id)) this.link.send({ type: 'abort', id });
  }

  pause(ids: readonly string[]): void { this.flow('pause', ids); }

  resume(ids: readonly string[]): void { this.flow('resume', ids); }

  private flow(type: 'pause' | 'resume', ids: readonly string[]): void {
    const live = ids.filter((id) => this.pending.has(id));
    if (live.length > 0) this.link.send({ type, ids: live });
  }

  /** As EngineClient.stats(): requests sent but not yet seen running count as waiting. */
  stats(): EngineStats {
    const waiting = Math.max(this.lastStats.waiting, this.pending.size - this.lastStats.running);
    return { ...this.lastStats, waiting };
  }

  /**
   * Load for dispatch: sequences running or waiting on this rank. Every sequence on a rank came
   * from this front, so the requests not yet finished count at once, before the rank reports them.
   */
  load(): number {
    const s = this.lastStats;
    return Math.max(this.pending.size, s.running + s.waiting);
  }
}
