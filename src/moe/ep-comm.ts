// Expert parallelism over a comm group: an ExpertPlacement table says which rank owns each routed
// expert (any set per rank: a rebalancer can hand a different table). The MoE layer's dispatch
// sends each rank the rows routed to its experts (grouped by owner rank, each owner's experts in its
// local order) and gathers the rows routed to this rank's experts from every rank, expert-major;
// combine sends the results back to where the rows came from. Identity ("zero-computation") experts
// never travel: their rows stay on the rank that routed them.
import type { CommGroup, CommOp } from '../native/index.js';
import type { ChunkRoutes, CommDelta, ExpertComm, Inflight } from './comm.js';
import type { CommModel } from './eps-planner.js';

/**
 * Which rank owns each routed expert. A rank's experts are kept in ascending id order (its local
 * order), so its expert-major rows over the global ids are also in local order.
 */
export interface ExpertPlacement {
  readonly numExperts: number;
  readonly worldSize: number;
  /** [E] the rank owning each expert. */
  readonly owner: Int32Array;
  /** [worldSize] each rank's experts, ascending (local order). */
  readonly experts: readonly Int32Array[];
  /** [E] each expert's index among its owner's experts. */
  readonly localIndex: Int32Array;
  /** Every rank owns a contiguous range, in rank order (the all2all sends xPerm as it is). */
  readonly contiguous: boolean;
}

/** A placement from the owner rank of each expert; throws an exact RangeError on an invalid table. */
export function placementFromOwners(owner: ArrayLike<number>, worldSize: number): ExpertPlacement {
  if (!Number.isInteger(worldSize) || worldSize < 1) throw new RangeError(`placement: worldSize is ${worldSize}, expected an integer >= 1`);
  const E = owner.length;
  const own = new Int32Array(E);
  const lists: number[][] = Array.from({ length: worldSize }, () => []);
  for (let e = 0; e < E; e++) {
    const r = owner[e]!;
    if (!Number.isInteger(r) || r < 0 || r >= worldSize)
      throw new RangeError(`placement: expert ${e} is owned by rank ${r}, expected 0..${worldSize - 1}`);
    own[e] = r;
    lists[r]!.push(e);
  }
  const localIndex = new Int32Array(E);
  const experts = lists.map((l) => {
    l.forEach((e, i) => { localIndex[e] = i; });
    return Int32Array.from(l);
  });
  let contiguous = true;
  for (let e = 1; e < E; e++) if (own[e]! < own[e - 1]!) contiguous = false;
  return { numExperts: E, worldSize, owner: own, experts, localIndex, contiguous };
}

/**
 * A placement from each rank's experts (as a placement file gives it); throws an exact RangeError
 * when an expert is owned twice or by nobody, or an expert id is out of range.
 */
export function placementFromExperts(experts: readonly (readonly number[])[], numExperts: number): ExpertPlacement {
  const owner = new Array<number>(numExperts).fill(-1);
  experts.forEach((list, r) => {
    for (const e of list) {
      if (!Number.isInteger(e) || e < 0 || e >= numExperts)
        throw new RangeError(`placement: rank ${r} lists expert ${e}, expected 0..${numExperts - 1}`);
      if (owner[e] !== -1) throw new RangeError(`placement: expert ${e} is owned by ranks ${owner[e]} and ${r}`);
      owner[e] = r;
    }
  });
  const orphan = owner.indexOf(-1);
  if (orphan >= 0) throw new RangeError(`placement: expert ${orphan} is owned by no rank`);
  return placementFromOwners(owner, experts.length);
}

/** Contiguous slices in rank order, sizes differing by at most one (the default placement). */
export function contiguousPlacement(numExperts: number, worldSize: number): ExpertPlacement {
  const owner = new Int32Array(numExperts);
  for (let r = 0; r < worldSize; r++) {
    const [a, b] = expertSlice(numExperts, worldSize, r);
    owner.fill(r, a, b);
  }
  return placementFromOwners(owner, worldSize);
}

/** Experts [first, last) of `rank` when numExperts are split over worldSize ranks (sizes differ by <= 1). */
export function expertSlice(numExperts: number, worldSize: number, rank: number): [number, number] {
  const base = Math.floor(numExperts / worldSize), extra = numExperts % worldSize;
  const first = rank * base + Math.min(rank, extra);
  return [first, first + base + (rank < extra ? 1 : 0)];
}

/** Checks that `p` places exactly `numExperts` experts over `worldSize` ranks. */
export function checkPlacement(p: ExpertPlacement, numExperts: number, worldSize: number): ExpertPlacement {
  if (p.numExperts !== numExperts || p.worldSize !== worldSize)
    throw new RangeError(`placement: places ${p.numExperts} experts over ${p.worldSize} ranks, expected ${numExperts} over ${worldSize}`);
  return p;
}

/**
 * The send side of the all2all: runs of xPerm rows (by expert offsets [E+1]) in owner-grouped order
 * (rank 0's experts in its local order, then rank 1's, ...), and the rows to each rank.
 */
export function ownerRuns(offsets: Int32Array, p: ExpertPlacement): { runs: { at: number; rows: number }[]; toRank: number[] } {
  const runs: { at: number; rows: number }[] = [];
  const toRank = p.experts.map((list) => {
    let n = 0;
    for (const e of list) {
      const rows = offsets[e + 1]! - offsets[e]!;
      if (rows) runs.push({ at: offsets[e]!, rows });
      n += rows;
    }
    return n;
  });
  return { runs, toRank };
}

/** xPerm's routed rows regrouped by owner (the buffer itself when the placement is contiguous). */
function packByOwner(buf: Float32Array, offsets: Int32Array, p: ExpertPlacement, hidden: number): Float32Array {
  const E = p.numExperts;
  if (p.contiguous) return buf.subarray(0, offsets[E]! * hidden);
  const out = new Float32Array(offsets[E]! * hidden);
  let to = 0;
  for (const r of ownerRuns(offsets, p).runs) {
    out.set(buf.subarray(r.at * hidden, (r.at + r.rows) * hidden), to * hidden);
    to += r.rows;
  }
  return out;
}

/** Inverse of packByOwner: owner-grouped rows back into expert order in `buf`. */
function unpackByOwner(grouped: Float32Array, buf: Float32Array, offsets: Int32Array, p: ExpertPlacement, hidden: number): void {
  if (grouped.buffer === buf.buffer && grouped.byteOffset === buf.byteOffset) return;
  let from = 0;
  for (const r of ownerRuns(offsets, p).runs) {
    buf.set(grouped.subarray(from * hidden, (from + r.rows) * hidden), r.at * hidden);
    from += r.rows;
  }
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
  /** Offsets [E + 1] of the local rows over the routed experts (empty for experts this rank does not own). */
  local: Int32Array;
  blocks: { inbox: number; local: number; rows: number }[];
}

/** counts[s]: the counts source s sent for this rank's experts, in its local order (placement.experts[rank]). */
export function epPlan(counts: Int32Array[], placement: ExpertPlacement, rank: number): EpPlan {
  const numExperts = placement.numExperts;
  const fromRank = counts.map((c) => c.reduce((a, v) => a + v, 0));
  const received = fromRank.reduce((a, v) => a + v, 0);
  const srcStart: number[] = [];
  fromRank.reduce((a, v) => { srcStart.push(a); return a + v; }, 0);
  const local = new Int32Array(numExperts + 1);
  const blocks: EpPlan['blocks'] = [];
  let row = 0;
  for (let e = 0; e < numExperts; e++) {
    local[e] = row;
    if (placement.owner[e] !== rank) continue;
    const li = placement.localIndex[e]!;
    counts.forEach((c, s) => {
      let at = srcStart[s]!;
      for (let j = 0; j < li; j++) at += c[j]!;
      const n = c[li]!;
      if (n) blocks.push({ inbox: at, local: row, rows: n });
      row += n;
    });
  }
  local[numExperts] = row;
  return { fromRank, received, local, blocks };
}

/** Per-rank byte counts: to rank d, the rows of its experts; from each, plan.fromRank rows. */
export function rowBytes(offsets: Int32Array, plan: EpPlan, placement: ExpertPlacement, rowSize: number,
                         direction: 'dispatch' | 'combine'): { send: Float64Array; recv: Float64Array } {
  const worldSize = placement.worldSize;
  const send = new Float64Array(worldSize), recv = new Float64Array(worldSize);
  const { toRank } = ownerRuns(offsets, placement);
  for (let d = 0; d < worldSize; d++) {
    const out = toRank[d]! * rowSize, back = plan.fromRank[d]! * rowSize;
    send[d] = direction === 'dispatch' ? out : back;
    recv[d] = direction === 'dispatch' ? back : out;
  }
  return { send, recv };
}

/** Per-rank byte counts of the counts exchange: to rank d the counts of its experts (i32, its local order). */
export function countsByOwner(offsets: Int32Array, placement: ExpertPlacement): Int32Array {
  const out = new Int32Array(placement.numExperts);
  let at = 0;
  for (const list of placement.experts) for (const e of list) out[at++] = offsets[e + 1]! - offsets[e]!;
  return out;
}

/** Per-rank byte counts of the counts exchange: to rank d the counts of its experts (i32). */
export function countBytes(placement: ExpertPlacement, mine: number): { send: Float64Array; recv: Float64Array } {
  const worldSize = placement.worldSize;
  const send = new Float64Array(worldSize), recv = new Float64Array(worldSize);
  for (let d = 0; d < worldSize; d++) {
    send[d] = placement.experts[d]!.length * 4;
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
   * step's MoE layers per increment (see dist/expert-ranks.ts). `experts`: the placement of the
   * routed experts over the group, or their count (contiguous slices). Every rank must use the same.
   */
  readonly numExperts: number;
  readonly placement: ExpertPlacement;

  constructor(readonly group: CommGroup, experts: number | ExpertPlacement, private readonly control: Int32Array | null = null) {
    this.rank = group.rank;
    this.worldSize = group.worldSize;
    this.placement = typeof experts === 'number' ? contiguousPlacement(experts, this.worldSize)
      : checkPlacement(experts, experts.numExperts, this.worldSize);
    this.numExperts = this.placement.numExperts;
  }

  beginStep(): void {
    if (!this.control) return;
    Atomics.add(this.control, 0, 1);
    Atomics.notify(this.control, 0);
  }

  ownsExpert(e: number): boolean {
    return this.placement.owner[e] === this.rank;
  }

  dispatch(xPerm: Float32Array, offsets: Int32Array, hidden: number): { x: Float32Array; offsets: Int32Array } {
    const t0 = performance.now();
    const W = this.worldSize, E = this.numExperts, ET = offsets.length - 1;
    const P = this.placement;
    const mine = P.experts[this.rank]!.length;
    // 1. Per-expert counts to each owner: rank d gets the counts of its experts, in its local order.
    const countSend = countsByOwner(offsets, P);
    const cb = countBytes(P, mine);
    const countRecv = new Int32Array(W * mine);
    this.group.all2allv(bytes(countSend), cb.send, bytes(countRecv), cb.recv);
    const plan = epPlan(Array.from({ length: W }, (_, s) => countRecv.subarray(s * mine, (s + 1) * mine)), P, this.rank);
    // 2. The rows: to rank d those of its experts (grouped by owner; contiguous slices: xPerm as it is).
    const rb = rowBytes(offsets, plan, P, hidden * 4, 'dispatch');
    const inbox = new Float32Array(plan.received * hidden); // source-major, local expert order within a source
    this.group.all2allv(bytes(packByOwner(xPerm, offsets, P, hidden)), rb.send, bytes(inbox), rb.recv);
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
    const E = this.numExperts, ET = p.offsets.length - 1;
    // Back to source-major: each source gets its rows in the order it sent them.
    const outbox = new Float32Array(p.plan.received * hidden);
    for (const k of p.plan.blocks) outbox.set(yLocal.subarray(k.local * hidden, (k.local + k.rows) * hidden), k.inbox * hidden);
    const rb = rowBytes(p.offsets, p.plan, this.placement, hidden * 4, 'combine');
    const back = this.placement.contiguous ? yPerm.subarray(0, p.offsets[E]! * hidden) : new Float32Array(p.offsets[E]! * hidden);
    this.group.all2allv(bytes(outbox), rb.send, bytes(back), rb.recv);
    unpackByOwner(back, yPerm, p.offsets, this.placement, hidden);
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
    const P = this.placement;
    const mine = P.experts[this.rank]!.length;
    // Counts of every chunk in one exchange: to rank d, chunk-major, the counts of its experts in its local order.
    const send = new Int32Array(PN * E);
    const sendBytes = new Float64Array(W), recvBytes = new Float64Array(W).fill(PN * mine * 4);
    let at = 0;
    for (let d = 0; d < W; d++) {
      const list = P.experts[d]!;
      for (const off of offsets) for (const e of list) send[at++] = off[e + 1]! - off[e]!;
      sendBytes[d] = PN * list.length * 4;
    }
    const recv = new Int32Array(W * PN * mine);
    this.blocking(() => this.group.all2allv(bytes(send), sendBytes, bytes(recv), recvBytes));
    const plans = offsets.map((_, c) => epPlan(Array.from({ length: W }, (_, s) =>
      recv.subarray((s * PN + c) * mine, (s * PN + c + 1) * mine)), P, this.rank));
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
    const rb = rowBytes(off, plan, this.placement, hidden * 4, 'dispatch');
    const inbox = new Float32Array(plan.received * hidden); // source-major, local expert order within a source
    const q = this.queue(bytes(packByOwner(xPerm, off, this.placement, hidden)), rb.send, bytes(inbox), rb.recv);
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
    const rb = rowBytes(off, plan, this.placement, hidden * 4, 'combine');
    const back = this.placement.contiguous ? yPerm.subarray(0, off[E]! * hidden) : new Float32Array(off[E]! * hidden);
    const q = this.queue(bytes(outbox), rb.send, bytes(back), rb.recv);
    const idFrom = plan.received * hidden;
    yPerm.set(yLocal.subarray(idFrom, idFrom + (off[ET]! - off[E]!) * hidden), off[E]! * hidden);
    return {
      wait: () => {
        this.waitOp(q.op, q.modelledMs);
        unpackByOwner(back, yPerm, off, this.placement, hidden);
      },
    };
  }

  dispose(): void {
    this.group.dispose();
  }
}

function bytes(a: Float32Array | Int32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/**
 * A placement file (--expert-placement): JSON, rank r's experts as the r-th array, e.g.
 * [[0, 2, 4, 6], [1, 3, 5, 7]]. Throws an exact RangeError when it is not that shape, does not
 * list worldSize ranks, or is not a valid placement of numExperts experts.
 */
export function parsePlacement(text: string, numExperts: number, worldSize: number): ExpertPlacement {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new RangeError(`placement: not JSON (${(e as Error).message})`);
  }
  if (!Array.isArray(v) || !v.every((l) => Array.isArray(l) && l.every((e) => typeof e === 'number')))
    throw new RangeError('placement: expected an array of each rank\'s expert ids, e.g. [[0, 2], [1, 3]]');
  if (v.length !== worldSize) throw new RangeError(`placement: lists ${v.length} ranks, expected ${worldSize}`);
  return placementFromExperts(v as number[][], numExperts);
}
