// The front's engine over every data-parallel rank: the EngineClient surface the server uses,
// requests spread by load (fewest running + waiting sequences, ties in turn), the rendezvous check
// (every rank's identity, read from the group's store), heartbeats both ways, and the one way a
// group ends on a fault: every request fails, every rank is told to exit non-zero, /health answers
// 503 and 'failed' is emitted once.
import { EventEmitter } from 'node:events';

import type { EngineState } from '../engine/engine-client.js';
import { refusedEvent, type EngineEvent, type EngineStats, type GenerateRequest, type ModelInfo } from '../engine/types.js';
import { checkIdentities, type RankIdentity } from './identity.js';
import { HEARTBEAT_INTERVAL_MS, type GroupExperts } from './rank-protocol.js';
import { readIdentities, type RendezvousStore } from './rendezvous.js';
import type { RemoteEngine } from './remote-engine.js';

export interface RankGroupOptions {
  worldSize: number;
  /** How long every rank has to say hello (rendezvous) and then to load the model. */
  rendezvousTimeoutMs: number;
  /**
   * A rank silent for longer than this (no heartbeat, no events) fails the group; the front's own
   * heartbeats tell every rank the same bound, and a rank whose front is silent that long exits.
   */
  heartbeatTimeoutMs: number;
  /** After shutdown, how long ranks get to exit before they are killed. */
  closeTimeoutMs?: number;
}

export class RankGroup extends EventEmitter {
  readonly ranks: (RemoteEngine | undefined)[];
  private readonly owner = new Map<string, RemoteEngine>();
  private current: EngineState = 'loading';
  private failure: string | undefined;
  private infoValue: ModelInfo | undefined;
  private nextTurn = 0;
  private watchdog: NodeJS.Timeout | undefined;
  private readonly beat: NodeJS.Timeout;
  private rendezvousDone = false;
  private identities: RankIdentity[] | undefined;
  private experts: GroupExperts | undefined;
  private rendezvousWaiters: { resolve: () => void; reject: (e: Error) => void } | undefined;
  summary = '';
  readonly ready: Promise<ModelInfo>;
  private resolveReady!: (info: ModelInfo) => void;
  private rejectReady!: (e: Error) => void;

  constructor(readonly options: RankGroupOptions, provisional?: ModelInfo) {
    super();
    this.ranks = new Array<RemoteEngine | undefined>(options.worldSize).fill(undefined);
    this.infoValue = provisional;
    this.ready = new Promise<ModelInfo>((resolve, reject) => { this.resolveReady = resolve; this.rejectReady = reject; });
    this.ready.catch(() => undefined);
    this.beat = setInterval(() => { for (const e of this.ranks) if (e) this.heartbeat(e); }, HEARTBEAT_INTERVAL_MS);
    this.beat.unref();
  }

  /** Tells a rank the front is alive, and how long a silence means it is not. */
  private heartbeat(e: RemoteEngine): void {
    if (!e.closing) e.link.send({ type: 'heartbeat', timeoutMs: this.options.heartbeatTimeoutMs });
  }

  /** Adds a rank (local at once, remote ones as their node's relay connects). */
  add(engine: RemoteEngine): void {
    const r = engine.rank;
    if (r < 0 || r >= this.ranks.length) throw new Error(`rank ${r} is outside the group of ${this.ranks.length}`);
    if (this.ranks[r]) throw new Error(`rank ${r} joined twice`);
    this.ranks[r] = engine;
    this.heartbeat(engine);
    this.checkRendezvous();
    engine.on('ready', () => this.checkReady());
    engine.on('fatal', (msg: string) => {
      // A rank told to shut down while loading reports its load as stopped: not a fault.
      if (!engine.closing) this.fault(`rank ${r} (${engine.link.where}) failed: ${msg}`);
    });
    engine.on('gone', (reason: string, clean: boolean) => {
      if (engine.closing && clean) return;
      this.fault(`rank ${r} (${engine.link.where}) ${reason}${engine.closing ? ' while shutting down' : ''}`);
    });
    engine.on('step', (s) => this.emit('step', s, r));
    engine.on('finished', (ev) => this.emit('finished', ev));
    if (r === 0) engine.on('progress', (p) => this.emit('progress', p));
  }

  /**
   * Waits for every rank's identity in the store (each rank publishes its own and checks everyone's
   * too, rendezvous.ts) and for every rank's link, checks that all load the same model with
   * compatible flags, then lets them load. A difference (or a timeout) ends every rank with the
   * reason and rejects.
   */
  rendezvous(store: { client: RendezvousStore; prefix: string }, experts?: GroupExperts): Promise<void> {
    this.experts = experts;
    const timeoutMs = this.options.rendezvousTimeoutMs;
    return new Promise<void>((resolve, reject) => {
      // A second later than the store's wait, which names the ranks whose identity never came.
      const timer = setTimeout(() => {
        const missing = this.ranks.map((e, i) => (e ? -1 : i)).filter((i) => i >= 0);
        this.fault(`rendezvous timed out after ${timeoutMs / 1000} s: rank(s) ${missing.join(', ')} never joined the front`);
      }, timeoutMs + 1000);
      this.rendezvousWaiters = {
        resolve: () => { clearTimeout(timer); resolve(); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      };
      readIdentities(store.client, store.prefix, this.ranks.length, timeoutMs).then((ids) => {
        this.identities = ids;
        this.checkRendezvous();
      }, (e: Error) => this.fault(`rendezvous failed: ${e.message}`));
    });
  }

  private checkRendezvous(): void {
    if (this.rendezvousDone || !this.rendezvousWaiters || !this.identities) return;
    if (this.ranks.some((e) => !e)) return;   // a node's relay has not brought its ranks yet
    this.rendezvousDone = true;
    this.identities.forEach((id, r) => { this.ranks[r]!.identity = id; });
    const diff = checkIdentities(this.identities);
    if (diff) {
      this.fault(`rendezvous refused: ${diff}`);
      return;
    }
    for (const e of this.ranks) e!.link.send({ type: 'start', ...(this.experts ? { experts: this.experts } : {}) });
    this.startWatchdog();
    this.rendezvousWaiters.resolve();
  }

  private checkReady(): void {
    if (this.current !== 'loading' || this.ranks.some((e) => e?.state() !== 'ready')) return;
    this.current = 'ready';
    this.infoValue = this.ranks[0]!.infoValue;
    this.summary = `${this.ranks.length} data-parallel ranks; rank 0: ${this.ranks[0]!.summary}`;
    this.resolveReady(this.infoValue!);
  }

  private startWatchdog(): void {
    const limit = this.options.heartbeatTimeoutMs;
    this.watchdog = setInterval(() => {
      const now = performance.now();
      for (const e of this.ranks) {
        if (e && !e.closing && now - e.lastSeenMs > limit) {
          e.link.kill();
          this.fault(`rank ${e.rank} (${e.link.where}) sent nothing for ${(limit / 1000).toFixed(1)} s (hung or unreachable)`);
          return;
        }
      }
    }, Math.min(1000, Math.max(100, limit / 4)));
    this.watchdog.unref();
  }

  /** The group is over: fail everything in flight, tell every rank to exit 1, emit 'failed' once. */
  fault(message: string): void {
    if (this.current === 'failed') return;
    const wasLoading = this.current === 'loading';
    this.current = 'failed';
    this.failure = message;
    clearInterval(this.watchdog);
    clearInterval(this.beat);
    for (const e of this.ranks) {
      if (!e) continue;
      e.fail(message);
      e.closing = true;
      e.link.send({ type: 'exit', code: 1, message: `the group is down: ${message}` });
    }
    this.owner.clear();
    this.rendezvousWaiters?.reject(new Error(message));
    if (wasLoading) this.rejectReady(new Error(message));
    this.emit('failed', message);
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

  /** The least-loaded rank; among equals, the next one after the last pick. */
  pick(): RemoteEngine {
    const n = this.ranks.length;
    let best: RemoteEngine | undefined;
    for (let i = 0; i < n; i++) {
      const e = this.ranks[(this.nextTurn + i) % n]!;
      if (!best || e.load() < best.load()) best = e;
    }
    this.nextTurn = (best!.rank + 1) % n;
    return best!;
  }

  generate(req: GenerateRequest, onEvent: (ev: EngineEvent) => void): void {
    if (this.current === 'failed' || this.current === 'loading') {
      queueMicrotask(() => onEvent(refusedEvent(req, this.failure ?? 'the ranks are still loading')));
      return;
    }
    const e = this.pick();
    this.owner.set(req.id, e);
    this.emit('dispatch', e.rank);
    e.generate(req, (ev) => {
      if (ev.type === 'finished') this.owner.delete(ev.id);
      onEvent(ev);
    });
  }

  abort(id: string): void {
    this.owner.get(id)?.abort(id);
  }

  pause(ids: readonly string[]): void {
    for (const [e, own] of this.byOwner(ids)) e.pause(own);
  }

  resume(ids: readonly string[]): void {
    for (const [e, own] of this.byOwner(ids)) e.resume(own);
  }

  /** The ids each rank owns (unknown ids are dropped). */
  private byOwner(ids: readonly string[]): Map<RemoteEngine, string[]> {
    const out = new Map<RemoteEngine, string[]>();
    for (const id of ids) {
      const e = this.owner.get(id);
      if (e) out.set(e, [...(out.get(e) ?? []), id]);
    }
    return out;
  }

  /** Sums over ranks (KV blocks too: each rank has its own cache). */
  stats(): EngineStats {
    const sum: EngineStats = { running: 0, waiting: 0, kvBlocksTotal: 0, kvBlocksUsed: 0, preemptionsTotal: 0 };
    for (const e of this.ranks) {
      if (!e) continue;
      const s = e.stats();
      sum.running += s.running;
      sum.waiting += s.waiting;
      sum.kvBlocksTotal += s.kvBlocksTotal;
      sum.kvBlocksUsed += s.kvBlocksUsed;
      sum.preemptionsTotal += s.preemptionsTotal;
    }
    return sum;
  }

  /** Per-rank figures, for the per-rank metrics. */
  rankStats(): EngineStats[] {
    return this.ranks.map((e) => e?.stats() ?? { running: 0, waiting: 0, kvBlocksTotal: 0, kvBlocksUsed: 0, preemptionsTotal: 0 });
  }

  /** Every rank closes its engine and exits 0; resolves when all are gone. */
  async close(): Promise<void> {
    clearInterval(this.watchdog);
    clearInterval(this.beat);
    for (const e of this.ranks) {
      if (!e) continue;
      e.closing = true;
      e.link.send({ type: 'shutdown' });
    }
    await this.waitAllGone(this.options.closeTimeoutMs ?? 10_000);
  }

  /** Resolves when every rank's link is gone; ranks still there after timeoutMs are killed. */
  async waitAllGone(timeoutMs: number): Promise<void> {
    const gone = this.ranks.filter((e): e is RemoteEngine => !!e).map((e) => new Promise<void>((resolve) => {
      if (e.link.isGone) resolve();
      else e.once('gone', () => resolve());
    }));
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      Promise.all(gone).then(() => false),
      new Promise<boolean>((r) => { timer = setTimeout(() => r(true), timeoutMs); }),
    ]);
    clearTimeout(timer);
    if (timedOut) for (const e of this.ranks) e?.link.kill();
  }
}
