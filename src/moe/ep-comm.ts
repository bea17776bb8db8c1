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

/**
 * The all2all plan of one MoE layer on one rank, from the per-expert counts every rank sent it:
 * rows arrive source-major (each source's rows in expert order); the GroupGemm wants them
 * expert-major. `blocks` maps one to the other ((source, expert) runs of rows, in expert-major
 * order): dispatch copies inbox -> local along them, combine copies local -> outbox back, and the
 * outbox order is the inbox order, which is what each source expects back.
 */
export interface EpPlan {
  /** [world] rows received from (and returned to) each rank. */
  fromRank: number[];
  received: number;
  /** Offsets [E + 1] of the local rows over the routed experts (empty outside this rank's slice). */
  local: Int32Array;
  blocks: { inbox: number; local: number; rows: number }[];
}

export function epPlan(counts: Int32Array[], numExperts: number, lo: number, hi: number): EpPlan {
  const fromRank = counts.map((c) => c.reduce((a, v) => a + v, 0));
  const received = fromRank.reduce((a, v) => a + v, 0);
  const srcStart: number[] = [];
  fromRank.reduce((a, v) => { srcStart.push(a); return a + v; }, 0);
  const local = new Int32Array(numExperts + 1);
  const blocks: EpPlan['blocks'] = [];
  let row = 0;
  for (let e = 0; e < numExperts; e++) {
    local[e] = row;
    if (e < lo || e >= hi) continue;
    counts.forEach((c, s) => {
      let at = srcStart[s]!;
      for (let j = 0; j < e - lo; j++) at += c[j]!;
      const n = c[e - lo]!;
      if (n) blocks.push({ inbox: at, local: row, rows: n });
      row += n;
    });
  }
  local[numExperts] = row;
  return { fromRank, received, local, blocks };
}

/** Per-rank byte counts: to rank d, [offsets[first_d], offsets[last_d]) rows; from each, plan.fromRank rows. */
export function rowBytes(offsets: Int32Array, plan: EpPlan, numExperts: number, worldSize: number, rowSize: number,
                         direction: 'dispatch' | 'combine'): { send: Float64Array; recv: Float64Array } {
  const send = new Float64Array(worldSize), recv = new Float64Array(worldSize);
  for (let d = 0; d < worldSize; d++) {
    const [a, b] = expertSlice(numExperts, worldSize, d);
    const out = (offsets[b]! - offsets[a]!) * rowSize, back = plan.fromRank[d]! * rowSize;
    send[d] = direction === 'dispatch' ? out : back;
    recv[d] = direction === 'dispatch' ? back : out;
  }
  return { send, recv };
}

/** Per-rank byte counts of the counts exchange: to rank d the counts of its experts (i32). */
export function countBytes(numExperts: number, worldSize: number, mine: number): { send: Float64Array; recv: Float64Array } {
  const send = new Float64Array(worldSize), recv = new Float64Array(worldSize);
  for (let d = 0; d < worldSize; d++) {
    const [a, b] = expertSlice(numExperts, worldSize, d);
    send[d] = (b - a) * 4;
    recv[d] = mine * 4;
  }
  return { send, recv };
}

/** What combine() needs from the dispatch it answers. */
interface Pending {
  plan: EpPlan;
  /** Sender side: offsets [ET+1] of the caller's permutation. */
  offsets: Int32Array;
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
   * step's MoE layers per increment (see dist/expert-ranks.ts).
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
    const cb = countBytes(E, W, mine);
    const countRecv = new Int32Array(W * mine);
    this.group.all2allv(bytes(countSend), cb.send, bytes(countRecv), cb.recv);
    const plan = epPlan(Array.from({ length: W }, (_, s) => countRecv.subarray(s * mine, (s + 1) * mine)), E, lo, hi);
    // 2. The rows: to rank d those of its experts, contiguous in xPerm.
    const rb = rowBytes(offsets, plan, E, W, hidden * 4, 'dispatch');
    const inbox = new Float32Array(plan.received * hidden); // source-major, expert order within a source
    this.group.all2allv(bytes(xPerm.subarray(0, offsets[E]! * hidden)), rb.send, bytes(inbox), rb.recv);
    this.bytesSent += rb.send.reduce((acc, v) => acc + v, 0);
    // 3. Expert-major for the GroupGemm, this rank's identity-expert rows after them.
    const identity = offsets[ET]! - offsets[E]!;
    const x = new Float32Array((plan.received + identity) * hidden);
    for (const k of plan.blocks) x.set(inbox.subarray(k.inbox * hidden, (k.inbox + k.rows) * hidden), k.local * hidden);
    const local = new Int32Array(ET + 1);
    local.set(plan.local);
    x.set(xPerm.subarray(offsets[E]! * hidden, offsets[ET]! * hidden), plan.received * hidden);
    for (let e = E; e < ET; e++) local[e + 1] = local[e]! + offsets[e + 1]! - offsets[e]!;
    const now = performance.now();
    this.pending.push({ plan, offsets: Int32Array.from(offsets), dispatchedAt: now });
    this.seconds += (now - t0) / 1000;
    return { x, offsets: local };
  }

  combine(yLocal: Float32Array, yPerm: Float32Array, hidden: number): void {
    const t0 = performance.now();
    const p = this.pending.shift();
    if (!p) throw new Error('GroupExpertComm.combine without a dispatch');
    const W = this.worldSize, E = this.numExperts, ET = p.offsets.length - 1;
    // Back to source-major: each source gets its rows in the order it sent them.
    const outbox = new Float32Array(p.plan.received * hidden);
    for (const k of p.plan.blocks) outbox.set(yLocal.subarray(k.local * hidden, (k.local + k.rows) * hidden), k.inbox * hidden);
    const rb = rowBytes(p.offsets, p.plan, E, W, hidden * 4, 'combine');
    this.group.all2allv(bytes(outbox), rb.send, bytes(yPerm.subarray(0, p.offsets[E]! * hidden)), rb.recv);
    this.bytesSent += rb.send.reduce((acc, v) => acc + v, 0);
    // This rank's identity rows, computed locally.
    const idFrom = p.plan.received * hidden;
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
