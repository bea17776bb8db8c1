// The comm seam of the MoE layer: dispatch sends expert-contiguous rows to the ranks that own the
// experts, combine brings the results back. With one rank both are the identity; expert
// parallelism (NCCL or loopback ranks) plugs in here without touching the layer.

export interface ExpertComm {
  readonly rank: number;
  readonly worldSize: number;
  /** Experts owned by this rank: [first, last). */
  ownedExperts(numExperts: number): [number, number];
  /**
   * xPerm [rows, H] in expert order with offsets [E+1] -> the rows this rank must compute and their
   * local offsets over its owned experts. Identity for one rank.
   */
  dispatch(xPerm: Float32Array, offsets: Int32Array, hidden: number): { x: Float32Array; offsets: Int32Array };
  /** Inverse of dispatch for the computed rows: back into yPerm (same layout as xPerm). */
  combine(yLocal: Float32Array, yPerm: Float32Array, hidden: number): void;
  /** Called at the start of every forward step (expert ranks serve one step per call). */
  beginStep?(): void;
  /**
   * All2all bytes sent and seconds spent since the last call, and the overlap ratio of that
   * interval (the share of dispatch-to-combine time spent computing, not waiting; null: no MoE).
   */
  takeDelta?(): { bytes: number; seconds: number; overlap: number | null };
}

export class SingleRankComm implements ExpertComm {
  readonly rank = 0;
  readonly worldSize = 1;
  ownedExperts(numExperts: number): [number, number] { return [0, numExperts]; }
  dispatch(xPerm: Float32Array, offsets: Int32Array): { x: Float32Array; offsets: Int32Array } {
    return { x: xPerm, offsets };
  }
  combine(yLocal: Float32Array, yPerm: Float32Array): void {
    if (yLocal !== yPerm) yPerm.set(yLocal.subarray(0, yPerm.length));
  }
}
