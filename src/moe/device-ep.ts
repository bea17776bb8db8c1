// Expert parallelism on devices: the GroupExpertComm protocol (ep-comm.ts) over device buffers and a
// CUDA comm group (NCCL). Counts, then rows (bf16) go to the ranks owning their experts; the rows
// arrive expert-major for the GroupGemm; combine sends the f32 results back where they came from.
// Identity experts never travel. One device sync per dispatch (the counts come back to the host).
import type { CudaAddon, CudaBuffer, CudaCommGroup, CudaStream } from '../native/index.js';
import { expertSlice } from './ep-comm.js';

const BF16 = 2, F32 = 4, I32 = 4;

interface Pending {
  fromRank: number[];
  counts: Int32Array[];
  /** Host offsets [ET+1] of the caller's permutation. */
  offsets: Int32Array;
  received: number;
}

export class DeviceExpertComm {
  readonly rank: number;
  readonly worldSize: number;
  private readonly pending: Pending[] = [];
  bytesSent = 0;
  private reportedBytes = 0;

  /** control (rank 0 only): [steps started, stop] shared with the expert ranks (expert-ranks.ts). */
  constructor(private readonly cu: CudaAddon, readonly group: CudaCommGroup, readonly numExperts: number,
              private readonly control: Int32Array | null = null) {
    this.rank = group.rank;
    this.worldSize = group.worldSize;
  }

  get owned(): [number, number] {
    return expertSlice(this.numExperts, this.worldSize, this.rank);
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
    const [lo, hi] = this.owned;
    const mine = hi - lo;
    const countSend = new Int32Array(E);
    for (let e = 0; e < E; e++) countSend[e] = offsets[e + 1]! - offsets[e]!;
    const sendBytes = new Float64Array(W), recvBytes = new Float64Array(W);
    for (let d = 0; d < W; d++) {
      const [a, b] = expertSlice(E, W, d);
      sendBytes[d] = (b - a) * I32;
      recvBytes[d] = mine * I32;
    }
    const cSend = scratch('ep.counts.send', E * I32), cRecv = scratch('ep.counts.recv', W * mine * I32);
    cu.cudaCopyToDevice(cSend, 0, countSend, st);
    this.group.all2allv(cSend, sendBytes, cRecv, recvBytes, st);
    const countRecv = new Int32Array(W * mine);
    if (countRecv.length) cu.cudaCopyToHost(countRecv, cRecv, 0, st);
    const counts = Array.from({ length: W }, (_, s) => countRecv.subarray(s * mine, (s + 1) * mine));
    const fromRank = counts.map((c) => c.reduce((a, v) => a + v, 0));
    const received = fromRank.reduce((a, v) => a + v, 0);
    for (let d = 0; d < W; d++) {
      const [a, b] = expertSlice(E, W, d);
      sendBytes[d] = (offsets[b]! - offsets[a]!) * hidden * BF16;
      recvBytes[d] = fromRank[d]! * hidden * BF16;
    }
    const rowB = hidden * BF16;
    const inbox = scratch('ep.inbox', received * rowB);
    this.group.all2allv(xPerm, sendBytes, inbox, recvBytes, st);
    this.bytesSent += sendBytes.reduce((a, v) => a + v, 0);
    const x = scratch('ep.x', received * rowB);
    const local = new Int32Array(E + 1);
    let row = 0;
    for (let e = 0; e < E; e++) {
      local[e] = row;
      if (e < lo || e >= hi) continue;
      let src = 0;
      for (let s = 0; s < W; s++) {
        const c = counts[s]!;
        let at = src;
        for (let j = 0; j < e - lo; j++) at += c[j]!;
        const n = c[e - lo]!;
        if (n) cu.cudaCopyDevice(x, row * rowB, inbox, at * rowB, n * rowB, st);
        row += n;
        src += fromRank[s]!;
      }
    }
    local[E] = row;
    this.pending.push({ fromRank, counts, offsets: Int32Array.from(offsets), received });
    return { x, offsets: local, rows: received };
  }

  /** yLocal [rows, H] f32 (expert-major) -> the callers' yPerm rows [0, offsets[E]) (f32). */
  combine(yLocal: CudaBuffer, yPerm: CudaBuffer, hidden: number, st: CudaStream | null,
          scratch: (name: string, bytes: number) => CudaBuffer): void {
    const p = this.pending.shift();
    if (!p) throw new Error('DeviceExpertComm.combine without a dispatch');
    const { cu } = this;
    const W = this.worldSize, E = this.numExperts;
    const [lo, hi] = this.owned;
    const rowB = hidden * F32;
    const outbox = scratch('ep.outbox', p.received * rowB);
    let o = 0;
    for (let s = 0; s < W; s++) {
      for (let e = lo; e < hi; e++) {
        let at = 0;
        for (let ee = lo; ee < e; ee++) for (let ss = 0; ss < W; ss++) at += p.counts[ss]![ee - lo]!;
        for (let ss = 0; ss < s; ss++) at += p.counts[ss]![e - lo]!;
        const n = p.counts[s]![e - lo]!;
        if (n) cu.cudaCopyDevice(outbox, o * rowB, yLocal, at * rowB, n * rowB, st);
        o += n;
      }
    }
    const sendBytes = new Float64Array(W), recvBytes = new Float64Array(W);
    for (let d = 0; d < W; d++) {
      const [a, b] = expertSlice(E, W, d);
      sendBytes[d] = p.fromRank[d]! * rowB;
      recvBytes[d] = (p.offsets[b]! - p.offsets[a]!) * rowB;
    }
    this.group.all2allv(outbox, sendBytes, yPerm, recvBytes, st);
    this.bytesSent += sendBytes.reduce((a, v) => a + v, 0);
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
