// The comm seam of the MoE layer: dispatch sends expert-contiguous rows to the ranks that own the
// experts, combine brings the results back. With one rank both are the identity; expert
// parallelism (NCCL or loopback ranks) plugs in here without touching the layer. The pipelined
// form (EPS-MoE) splits a layer's tokens into chunks whose dispatch and combine are queued on the
// comm thread and waited for only when their data is needed.

/** A collective in flight: wait() blocks (within the comm's timeout) until its data is there. */
export interface Inflight<T> {
  wait(): T;
}

/** One layer's chunks after the counts exchange (what each chunk's dispatch and combine move). */
export interface ChunkRoutes {
  readonly chunks: number;
  /** Per chunk, offsets [E + Z + 1] of the rows this rank computes (known before they arrive). */
  readonly local: Int32Array[];
}

import type { CommModel } from './eps-planner.js';
import type { ExpertPlacement } from './ep-comm.js';

export interface ExpertComm {
  readonly rank: number;
  readonly worldSize: number;
  /** Whether this rank owns routed expert e (its placement; see ep-comm.ts). */
  ownsExpert(e: number): boolean;
  /** The placement of the routed experts over the ranks (absent: one rank owns them all). */
  readonly placement?: ExpertPlacement;
  /**
   * xPerm [rows, H] in expert order with offsets [E+1] -> the rows this rank must compute and their
   * local offsets over its owned experts. Identity for one rank.
   */
  dispatch(xPerm: Float32Array, offsets: Int32Array, hidden: number): { x: Float32Array; offsets: Int32Array };
  /** Inverse of dispatch for the computed rows: back into yPerm (same layout as xPerm). */
  combine(yLocal: Float32Array, yPerm: Float32Array, hidden: number): void;
  /** Pipeline: the chunk count every rank uses for this layer (the largest any rank asks for). */
  agreeChunks(want: number): number;
  /** Pipeline: one counts exchange for every chunk; offsets[c] [E + Z + 1] is chunk c's permutation. */
  routeChunks(offsets: Int32Array[]): ChunkRoutes;
  /**
   * Pipeline: queues chunk c's dispatch of xPerm (its rows in expert order); wait() gives the rows
   * this rank computes, expert-major, into x [local[c] rows, H].
   */
  dispatchChunk(routes: ChunkRoutes, c: number, xPerm: Float32Array, x: Float32Array, hidden: number): Inflight<void>;
  /** Pipeline: queues chunk c's combine of yLocal back into yPerm (xPerm's layout). */
  combineChunk(routes: ChunkRoutes, c: number, yLocal: Float32Array, yPerm: Float32Array, hidden: number): Inflight<void>;
  /** The link as the EPS planner sees it (absent: one rank, nothing to hide). */
  commModel?(): CommModel;
  /** Called at the start of every forward step (expert ranks serve one step per call). */
  beginStep?(): void;
  /**
   * All2all bytes sent and seconds spent since the last call, the overlap ratio of that interval
   * (the share of dispatch-to-combine time spent computing, not waiting; null: no MoE), and the
   * hidden share of the all2all time (1 - time the caller was blocked on it / its time; null: none).
   */
  takeDelta?(): CommDelta;
}

export interface CommDelta { bytes: number; seconds: number; overlap: number | null; hidden: number | null }

const done: Inflight<void> = { wait() {} };

export class SingleRankComm implements ExpertComm {
  readonly rank = 0;
  readonly worldSize = 1;
  ownsExpert(): boolean { return true; }
  dispatch(xPerm: Float32Array, offsets: Int32Array): { x: Float32Array; offsets: Int32Array } {
    return { x: xPerm, offsets };
  }
  combine(yLocal: Float32Array, yPerm: Float32Array): void {
    if (yLocal !== yPerm) yPerm.set(yLocal.subarray(0, yPerm.length));
  }
  agreeChunks(want: number): number { return want; }
  routeChunks(offsets: Int32Array[]): ChunkRoutes { return { chunks: offsets.length, local: offsets }; }
  dispatchChunk(routes: ChunkRoutes, c: number, xPerm: Float32Array, x: Float32Array, hidden: number): Inflight<void> {
    if (!sameMemory(x, xPerm)) x.set(xPerm.subarray(0, routes.local[c]!.at(-1)! * hidden));
    return done;
  }
  combineChunk(routes: ChunkRoutes, c: number, yLocal: Float32Array, yPerm: Float32Array, hidden: number): Inflight<void> {
    if (!sameMemory(yLocal, yPerm)) yPerm.set(yLocal.subarray(0, routes.local[c]!.at(-1)! * hidden));
    return done;
  }
}

/** a and b start at the same byte of the same buffer (MoeLayer hands one rank's views so). */
function sameMemory(a: Float32Array, b: Float32Array): boolean {
  return a === b || (a.buffer === b.buffer && a.byteOffset === b.byteOffset);
}
