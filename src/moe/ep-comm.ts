// Expert parallelism over a comm group: rank r owns a contiguous slice of the routed experts. The
// MoE layer's dispatch sends each rank the rows routed to its experts (already contiguous in the
// expert-ordered permutation) and gathers the rows routed to this rank's experts from every rank,
// expert-major; combine sends the results back to where the rows came from. Identity
// ("zero-computation") experts never travel: their rows stay on the rank that routed them.
import type { CommGroup } from '../native/index.js';
import type { ExpertComm } from './comm.js';

/** Experts [first, last) of `rank` when numExperts are split over worldSize ranks (sizes differ by <= 1). */
export function expertSlice(numExperts: number, worldSize: number, rank: number): [number, number] {
  const base = Math.floor(numExperts / worldSize), extra = numExperts % worldSize;
  const first = rank * base + Math.min(rank, extra);
  return [first, first + base + (rank < extra ? 1 : 0)];
}

/** What combine() needs from the dispatch it answers. */
interface Pending {
  /** [world] rows received from each source rank. */
  fromRank: number[];
  /** [world][owned experts] rows of each (source, expert). */
  counts: Int32Array[];
  /** Sender side: offsets [ET+1] of the caller's permutation, and ET. */
  offsets: Int32Array;
  received: number;
  /** When the dispatch returned (ms): from here the other ranks compute while this one goes on. */
  dispatchedAt: number;
}

export class GroupExpertComm implements ExpertComm {
  readonly rank: number;
  readonly worldSize: number;
  private readonly pending: Pending[] = [];
  /** Bytes and seconds spent in all2all (for the metrics). */
  bytesSent = 0;
  seconds = 0;
  /**
   * Overlap: of the time from each dispatch's return to its combine's return, the part this rank
   * spent computing (its own experts; ScMoE's dense sub-blocks) rather than blocked in the combine.
   */
  busyMs = 0;
  windowMs = 0;
  private reported = { bytes: 0, seconds: 0, busyMs: 0, windowMs: 0 };

  /**
   * control (rank 0 only): [steps started, stop] shared with the expert ranks, which serve one
   * step's MoE layers per increment (see expert-ranks.ts).
   */
  constructor(readonly group: CommGroup, readonly numExperts: number, private readonly control: Int32Array | null = null) {
    this.rank = group.rank;
    this.worldSize = group.worldSize;
  }

  beginStep(): void {
    if (!this.control) return;
    Atomics.add(this.control, 0, 1);
    Atomics.notify(this.control, 0);
  }

  ownedExperts(numExperts: number): [number, number] {
    return expertSlice(numExperts, this.worldSize, this.rank);
  }

  dispatch(xPerm: Float32Array, offsets: Int32Array, hidden: number): { x: Float32Array; offsets: Int32Array } {
    const t0 = performance.now();
    const W = this.worldSize, E = this.numExperts, ET = offsets.length - 1;
    const [lo, hi] = this.ownedExperts(E);
    const mine = hi - lo;
    // 1. Per-expert counts to each owner: rank d gets the counts of its experts.
    const countSend = new Int32Array(E);
    for (let e = 0; e < E; e++) countSend[e] = offsets[e + 1]! - offsets[e]!;
    const sendBytes = new Float64Array(W), recvBytes = new Float64Array(W);
    for (let d = 0; d < W; d++) {
      const [a, b] = expertSlice(E, W, d);
      sendBytes[d] = (b - a) * 4;
      recvBytes[d] = mine * 4;
    }
    const countRecv = new Int32Array(W * mine);
    this.group.all2allv(bytes(countSend), sendBytes, bytes(countRecv), recvBytes);
    const counts = Array.from({ length: W }, (_, s) => countRecv.subarray(s * mine, (s + 1) * mine));
    // 2. The rows: to rank d those of its experts, contiguous in xPerm.
    const fromRank = counts.map((c) => c.reduce((a, v) => a + v, 0));
    const received = fromRank.reduce((a, v) => a + v, 0);
    for (let d = 0; d < W; d++) {
      const [a, b] = expertSlice(E, W, d);
      sendBytes[d] = (offsets[b]! - offsets[a]!) * hidden * 4;
      recvBytes[d] = fromRank[d]! * hidden * 4;
    }
    const inbox = new Float32Array(received * hidden); // source-major, expert order within a source
    this.group.all2allv(bytes(xPerm.subarray(0, offsets[E]! * hidden)), sendBytes, bytes(inbox), recvBytes);
    this.bytesSent += sendBytes.reduce((a, v) => a + v, 0);
    // 3. Expert-major for the GroupGemm, this rank's identity-expert rows after them.
    const identity = offsets[ET]! - offsets[E]!;
    const x = new Float32Array((received + identity) * hidden);
    const local = new Int32Array(ET + 1);
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
        x.set(inbox.subarray(at * hidden, (at + n) * hidden), row * hidden);
        row += n;
        src += fromRank[s]!;
      }
    }
    local[E] = row;
    x.set(xPerm.subarray(offsets[E]! * hidden, offsets[ET]! * hidden), row * hidden);
    for (let e = E; e < ET; e++) local[e + 1] = local[e]! + offsets[e + 1]! - offsets[e]!;
    const now = performance.now();
    this.pending.push({ fromRank, counts, offsets: Int32Array.from(offsets), received, dispatchedAt: now });
    this.seconds += (now - t0) / 1000;
    return { x, offsets: local };
  }

  combine(yLocal: Float32Array, yPerm: Float32Array, hidden: number): void {
    const t0 = performance.now();
    const p = this.pending.shift();
    if (!p) throw new Error('GroupExpertComm.combine without a dispatch');
    const W = this.worldSize, E = this.numExperts, ET = p.offsets.length - 1;
    const [lo, hi] = this.ownedExperts(E);
    // Back to source-major: each source gets its rows in the order it sent them.
    const outbox = new Float32Array(p.received * hidden);
    let o = 0;
    for (let s = 0; s < W; s++) {
      for (let e = lo; e < hi; e++) {
        // Rows of (s, e) sit in yLocal at expert e's block, after the earlier sources' rows of e.
        let at = 0;
        for (let ee = lo; ee < e; ee++) for (let ss = 0; ss < W; ss++) at += p.counts[ss]![ee - lo]!;
        for (let ss = 0; ss < s; ss++) at += p.counts[ss]![e - lo]!;
        const n = p.counts[s]![e - lo]!;
        outbox.set(yLocal.subarray(at * hidden, (at + n) * hidden), o * hidden);
        o += n;
      }
    }
    const sendBytes = new Float64Array(W), recvBytes = new Float64Array(W);
    for (let d = 0; d < W; d++) {
      const [a, b] = expertSlice(E, W, d);
      sendBytes[d] = p.fromRank[d]! * hidden * 4;
      recvBytes[d] = (p.offsets[b]! - p.offsets[a]!) * hidden * 4;
    }
    this.group.all2allv(bytes(outbox), sendBytes, bytes(yPerm.subarray(0, p.offsets[E]! * hidden)), recvBytes);
    this.bytesSent += sendBytes.reduce((a, v) => a + v, 0);
    // This rank's identity rows, computed locally.
    const idFrom = p.received * hidden;
    yPerm.set(yLocal.subarray(idFrom, idFrom + (p.offsets[ET]! - p.offsets[E]!) * hidden), p.offsets[E]! * hidden);
    const now = performance.now();
    this.seconds += (now - t0) / 1000;
    this.busyMs += t0 - p.dispatchedAt;
    this.windowMs += now - p.dispatchedAt;
  }

  takeDelta(): { bytes: number; seconds: number; overlap: number | null } {
    const r = this.reported;
    const window = this.windowMs - r.windowMs;
    const d = {
      bytes: this.bytesSent - r.bytes, seconds: this.seconds - r.seconds,
      overlap: window > 0 ? (this.busyMs - r.busyMs) / window : null,
    };
    this.reported = { bytes: this.bytesSent, seconds: this.seconds, busyMs: this.busyMs, windowMs: this.windowMs };
    return d;
  }

  dispose(): void {
    this.group.dispose();
  }
}

function bytes(a: Float32Array | Int32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}
