// Expert parallelism on devices: the GroupExpertComm protocol (ep-comm.ts) over device buffers and a
// CUDA comm group (NCCL). Counts, then rows (bf16) go to the ranks owning their experts (an
// ExpertPlacement: rows grouped by owner, on the device, unless every rank owns a contiguous slice); the rows
// arrive expert-major for the GroupGemm; combine sends the f32 results back where they came from.
// Identity experts never travel. One device sync per dispatch (the counts come back to the host).
import type { CudaAddon, CudaBuffer, CudaCommGroup, CudaStream } from '../native/index.js';
import { checkPlacement, contiguousPlacement, countBytes, countsByOwner, epPlan, ownerRuns, rowBytes, type EpPlan,
  type ExpertPlacement } from './ep-comm.js';

const BF16 = 2, F32 = 4, I32 = 4;

interface Pending {
  plan: EpPlan;
  /** Host offsets [ET+1] of the caller's permutation. */
  offsets: Int32Array;
}

export class DeviceExpertComm {
  readonly rank: number;
  readonly worldSize: number;
  private readonly pending: Pending[] = [];
  bytesSent = 0;
  private reportedBytes = 0;

  readonly numExperts: number;
  readonly placement: ExpertPlacement;

  /**
   * control (rank 0 only): [steps started, stop] shared with the expert ranks (dist/expert-ranks.ts).
   * `experts`: the placement of the routed experts, or their count (contiguous slices).
   */
  constructor(private readonly cu: CudaAddon, readonly group: CudaCommGroup, experts: number | ExpertPlacement,
              private readonly control: Int32Array | null = null) {
    this.rank = group.rank;
    this.worldSize = group.worldSize;
    this.placement = typeof experts === 'number' ? contiguousPlacement(experts, this.worldSize)
      : checkPlacement(experts, experts.numExperts, this.worldSize);
    this.numExperts = this.placement.numExperts;
  }

  /** EPS-MoE: the chunk count every rank uses for this layer (the largest any rank asks for). */
  agreeChunks(want: number): number {
    if (this.worldSize === 1) return want;
    const recv = new Float64Array(this.worldSize);
    this.group.all2allCounts(new Float64Array(this.worldSize).fill(want), recv);
    return Math.max(...recv);
  }

  ownsExpert(e: number): boolean {
    return this.placement.owner[e] === this.rank;
  }

  beginStep(): void {
    if (!this.control) return;
    Atomics.add(this.control, 0, 1);
    Atomics.notify(this.control, 0);
  }

  /**
   * xPerm [offsets[ET], H] bf16 in expert order, host offsets [ET+1] -> this rank's rows of its own
   * experts, expert-major in `x` (bf16), with host offsets over the E routed experts.
   */
  dispatch(xPerm: CudaBuffer, offsets: Int32Array, hidden: number, st: CudaStream | null,
           scratch: (name: string, bytes: number) => CudaBuffer): { x: CudaBuffer; offsets: Int32Array; rows: number } {
    const { cu } = this;
    const W = this.worldSize, E = this.numExperts;
    const P = this.placement;
    const mine = P.experts[this.rank]!.length;
    const countSend = countsByOwner(offsets, P);
    const cb = countBytes(P, mine);
    const cSend = scratch('ep.counts.send', E * I32), cRecv = scratch('ep.counts.recv', W * mine * I32);
    cu.cudaCopyToDevice(cSend, 0, countSend, st);
    this.group.all2allv(cSend, cb.send, cRecv, cb.recv, st);
    const countRecv = new Int32Array(W * mine);
    if (countRecv.length) cu.cudaCopyToHost(countRecv, cRecv, 0, st);
    const plan = epPlan(Array.from({ length: W }, (_, s) => countRecv.subarray(s * mine, (s + 1) * mine)), P, this.rank);
    const rowB = hidden * BF16;
    const rb = rowBytes(offsets, plan, P, rowB, 'dispatch');
    const inbox = scratch('ep.inbox', plan.received * rowB);
    let send = xPerm;
    if (!P.contiguous) {
      // Rows grouped by owner rank (each owner's experts in its local order).
      send = scratch('ep.send', offsets[E]! * rowB);
      let to = 0;
      for (const r of ownerRuns(offsets, P).runs) {
        cu.cudaCopyDevice(send, to * rowB, xPerm, r.at * rowB, r.rows * rowB, st);
        to += r.rows;
      }
    }
    this.group.all2allv(send, rb.send, inbox, rb.recv, st);
    this.bytesSent += rb.send.reduce((acc, v) => acc + v, 0);
    const x = scratch('ep.x', plan.received * rowB);
    for (const k of plan.blocks) cu.cudaCopyDevice(x, k.local * rowB, inbox, k.inbox * rowB, k.rows * rowB, st);
    this.pending.push({ plan, offsets: Int32Array.from(offsets) });
    return { x, offsets: plan.local, rows: plan.received };
  }

  /** yLocal [rows, H] f32 (expert-major) -> the callers' yPerm rows [0, offsets[E]) (f32). */
  combine(yLocal: CudaBuffer, yPerm: CudaBuffer, hidden: number, st: CudaStream | null,
          scratch: (name: string, bytes: number) => CudaBuffer): void {
    const p = this.pending.shift();
    if (!p) throw new Error('DeviceExpertComm.combine without a dispatch');
    const { cu } = this;
    const rowB = hidden * F32;
    const outbox = scratch('ep.outbox', p.plan.received * rowB);
    for (const k of p.plan.blocks) cu.cudaCopyDevice(outbox, k.inbox * rowB, yLocal, k.local * rowB, k.rows * rowB, st);
    const P = this.placement;
    const rb = rowBytes(p.offsets, p.plan, P, rowB, 'combine');
    const back = P.contiguous ? yPerm : scratch('ep.back', p.offsets[this.numExperts]! * rowB);
    this.group.all2allv(outbox, rb.send, back, rb.recv, st);
    if (!P.contiguous) {
      let from = 0;
      for (const r of ownerRuns(p.offsets, P).runs) {
        cu.cudaCopyDevice(yPerm, r.at * rowB, back, from * rowB, r.rows * rowB, st);
        from += r.rows;
      }
    }
    this.bytesSent += rb.send.reduce((acc, v) => acc + v, 0);
  }

  /** Bytes sent since the last call (the collectives are enqueued on streams: no host-side time). */
  takeDelta(): { bytes: number; seconds: number; overlap: number | null } {
    const d = { bytes: this.bytesSent - this.reportedBytes, seconds: 0, overlap: null };
    this.reportedBytes = this.bytesSent;
    return d;
  }

  dispose(): void {
    this.group.dispose();
  }
}
