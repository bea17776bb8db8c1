// Lockstep of the data-parallel ranks around expert-parallel MoE layers: every step all ranks first
// agree (a one-value all2all vote) whether anyone has work or wants to stop; then every rank runs
// one forward, its own batch or an empty one, so that the MoE layers' all2alls match across ranks.
import type { CommGroup, GlooJoinOptions } from '../native/index.js';

/** A rank's vote: nothing to do, work to run, or the front said shut down. */
export const enum Vote { Idle = 0, Work = 1, Stop = 2 }

/** Idle backoff between votes when nobody has work: doubling from 1 ms up to this. */
export const MAX_IDLE_MS = 20;

/** A rank's Gloo group: the front's StoreServer, a prefix unique per group start, and the bound on
 * the join and every collective (a lost or hung peer is an error after this long). */
export type DistExperts = Omit<GlooJoinOptions, 'listenHost'>;

export class Lockstep {
  private readonly send: Float64Array;
  private readonly recv: Float64Array;
  idleMs = 0;

  /** A CPU group (Gloo) or a device one (NCCL): only its one-value exchange is used. */
  constructor(readonly group: Pick<CommGroup, 'worldSize' | 'all2allCounts'>) {
    this.send = new Float64Array(group.worldSize);
    this.recv = new Float64Array(group.worldSize);
  }

  /** Every rank's vote, combined: Stop if anyone stops, else Work if anyone has work, else Idle. */
  vote(mine: Vote): Vote {
    this.send.fill(mine);
    this.group.all2allCounts(this.send, this.recv);
    let v = Vote.Idle;
    for (const x of this.recv) v = Math.max(v, x) as Vote;
    return v;
  }

  /** How long to wait before the next vote: 0 after work, else doubling up to MAX_IDLE_MS. */
  nextDelayMs(outcome: Vote): number {
    this.idleMs = outcome === Vote.Work ? 0 : Math.min(MAX_IDLE_MS, Math.max(1, this.idleMs * 2));
    return this.idleMs;
  }
}
