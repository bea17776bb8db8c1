// Expert parallelism over a comm group: rank r owns a contiguous slice of the routed experts. The
// MoE layer's dispatch sends each rank the rows routed to its experts (already contiguous in the
// expert-ordered permutation) and gathers the rows routed to this rank's experts from every rank,
// expert-major; combine sends the results back to where the rows came from. Identity
// ("zero-computation") experts never travel: their rows stay on the rank that routed them.
import type { CommGroup, CommOp } from '../native/index.js';
import type { ChunkRoutes, CommDelta, ExpertComm, Inflight } from './comm.js';
import type { CommModel } from './eps-planner.js';

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

/** The routes of a pipelined layer on a group: each chunk's all2all plan and sender offsets. */
interface GroupRoutes extends ChunkRoutes {
  plans: EpPlan[];
  offsets: Int32Array[];
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
  /** Time this rank's caller was blocked on all2all (blocking collectives and waits). */
  blockedMs = 0;
  private reported = { bytes: 0, seconds: 0, busyMs: 0, windowMs: 0, blockedMs: 0 };
  /** A wait on the comm thread gives up after this long (the backend's own timeout is shorter). */
  waitTimeoutMs = 600_000;
  /** Simulated link (benchmarks), GB/s; 0: the real transport. */
  private linkGBps = 0;
  /**
   * Per-collective time beyond the modelled transfer (ms), the last 32 samples: their minimum is
   * the planner's latency. NOTE: not a mean: an op's time also holds the wait for a peer that is
   * still computing, which is skew, not a per-op cost of the link.
   */
  private readonly latencySamples: number[] = [];
  /** The pipelined layer in progress: ops not yet waited, when its first dispatch was queued. */
  private open = 0;
  private openedAt = 0;
  private blockedAtOpen = 0;

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
    this.blockedMs += now - t0;
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
    this.blockedMs += now - t0;
    this.busyMs += t0 - p.dispatchedAt;
    this.windowMs += now - p.dispatchedAt;
  }

  takeDelta(): CommDelta {
    const r = this.reported;
    const window = this.windowMs - r.windowMs;
    const seconds = this.seconds - r.seconds;
    const d = {
      bytes: this.bytesSent - r.bytes, seconds,
      overlap: window > 0 ? (this.busyMs - r.busyMs) / window : null,
      hidden: seconds > 0 ? Math.min(1, Math.max(0, 1 - (this.blockedMs - r.blockedMs) / 1000 / seconds)) : null,
    };
    this.reported = { bytes: this.bytesSent, seconds: this.seconds, busyMs: this.busyMs, windowMs: this.windowMs, blockedMs: this.blockedMs };
    return d;
  }

  /**
   * Benchmarks: every all2allv takes max(bytes out, bytes in) / (GB/s) on the comm thread (0: off).
   * Set the same on every rank.
   */
  setSimulatedLink(GBps: number): void {
    this.group.setSimulatedLink(GBps * 1e9);
    this.linkGBps = GBps;
  }

  /** The planner's view of this link: the simulated bandwidth (or memcpy speed) and the measured per-op latency. */
  commModel(): CommModel {
    const latencyMs = this.latencySamples.length ? Math.min(...this.latencySamples) : 0.05;
    return { bytesPerMs: this.linkGBps > 0 ? this.linkGBps * 1e6 : 1e7, latencyMs };
  }

  private blocking<T>(fn: () => T): T {
    const t0 = performance.now();
    try {
      return fn();
    } finally {
      const ms = performance.now() - t0;
      this.blockedMs += ms;
      this.seconds += ms / 1000;
    }
  }

  agreeChunks(want: number): number {
    if (this.worldSize === 1) return want;
    const recv = new Float64Array(this.worldSize);
    this.blocking(() => this.group.all2allCounts(new Float64Array(this.worldSize).fill(want), recv));
    return Math.max(...recv);
  }

  routeChunks(offsets: Int32Array[]): GroupRoutes {
    const W = this.worldSize, E = this.numExperts, PN = offsets.length;
    const [lo, hi] = this.ownedExperts(E);
    const mine = hi - lo;
    // Counts of every chunk in one exchange: to rank d, chunk-major, the counts of its experts.
    const send = new Int32Array(PN * E);
    const sendBytes = new Float64Array(W), recvBytes = new Float64Array(W).fill(PN * mine * 4);
    let at = 0;
    for (let d = 0; d < W; d++) {
      const [a, b] = expertSlice(E, W, d);
      for (const off of offsets) for (let e = a; e < b; e++) send[at++] = off[e + 1]! - off[e]!;
      sendBytes[d] = PN * (b - a) * 4;
    }
    const recv = new Int32Array(W * PN * mine);
    this.blocking(() => this.group.all2allv(bytes(send), sendBytes, bytes(recv), recvBytes));
    const plans = offsets.map((_, c) => epPlan(Array.from({ length: W }, (_, s) =>
      recv.subarray((s * PN + c) * mine, (s * PN + c + 1) * mine)), E, lo, hi));
    const local = offsets.map((off, c) => {
      const ET = off.length - 1;
      const l = new Int32Array(ET + 1);
      l.set(plans[c]!.local);
      for (let e = E; e < ET; e++) l[e + 1] = l[e]! + off[e + 1]! - off[e]!;
      return l;
    });
    return { chunks: PN, local, plans, offsets: offsets.map((o) => Int32Array.from(o)) };
  }

  /** Waits for a queued op; its comm-thread time is all2all time, the wait is blocked time. */
  private waitOp(op: CommOp, modelledMs: number): void {
    const t0 = performance.now();
    const s = op.wait(this.waitTimeoutMs);
    const now = performance.now();
    this.blockedMs += now - t0;
    this.seconds += s;
    this.latencySamples.push(Math.max(0, s * 1000 - modelledMs));
    if (this.latencySamples.length > 32) this.latencySamples.shift();
    if (--this.open === 0) {
      const window = now - this.openedAt;
      this.windowMs += window;
      this.busyMs += Math.max(0, window - (this.blockedMs - this.blockedAtOpen));
    }
  }

  private queue(send: Uint8Array, sb: Float64Array, recv: Uint8Array, rb: Float64Array): { op: CommOp; modelledMs: number } {
    if (this.open++ === 0) {
      this.openedAt = performance.now();
      this.blockedAtOpen = this.blockedMs;
    }
    let out = 0, inb = 0;
    sb.forEach((v, r) => { if (r !== this.rank) out += v; });
    rb.forEach((v, r) => { if (r !== this.rank) inb += v; });
    this.bytesSent += sb.reduce((a, v) => a + v, 0);
    const op = this.group.all2allvAsync(send, sb, recv, rb);
    return { op, modelledMs: this.linkGBps > 0 ? Math.max(out, inb) / (this.linkGBps * 1e6) : 0 };
  }

  dispatchChunk(routes: ChunkRoutes, c: number, xPerm: Float32Array, x: Float32Array, hidden: number): Inflight<void> {
    const r = routes as GroupRoutes;
    const plan = r.plans[c]!, off = r.offsets[c]!;
    const E = this.numExperts, ET = off.length - 1;
    const rb = rowBytes(off, plan, E, this.worldSize, hidden * 4, 'dispatch');
    const inbox = new Float32Array(plan.received * hidden); // source-major, expert order within a source
    const q = this.queue(bytes(xPerm.subarray(0, off[E]! * hidden)), rb.send, bytes(inbox), rb.recv);
    // This rank's identity-expert rows stay here, after the expert rows.
    x.set(xPerm.subarray(off[E]! * hidden, off[ET]! * hidden), plan.received * hidden);
    return {
      wait: () => {
        this.waitOp(q.op, q.modelledMs);
        for (const k of plan.blocks) x.set(inbox.subarray(k.inbox * hidden, (k.inbox + k.rows) * hidden), k.local * hidden);
      },
    };
  }

  combineChunk(routes: ChunkRoutes, c: number, yLocal: Float32Array, yPerm: Float32Array, hidden: number): Inflight<void> {
    const r = routes as GroupRoutes;
    const plan = r.plans[c]!, off = r.offsets[c]!;
    const E = this.numExperts, ET = off.length - 1;
    const outbox = new Float32Array(plan.received * hidden);
    for (const k of plan.blocks) outbox.set(yLocal.subarray(k.local * hidden, (k.local + k.rows) * hidden), k.inbox * hidden);
    const rb = rowBytes(off, plan, E, this.worldSize, hidden * 4, 'combine');
    const q = this.queue(bytes(outbox), rb.send, bytes(yPerm.subarray(0, off[E]! * hidden)), rb.recv);
    const idFrom = plan.received * hidden;
    yPerm.set(yLocal.subarray(idFrom, idFrom + (off[ET]! - off[E]!) * hidden), off[E]! * hidden);
    return { wait: () => this.waitOp(q.op, q.modelledMs) };
  }

  dispose(): void {
    this.group.dispose();
  }
}

function bytes(a: Float32Array | Int32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}
