// One rank of the Gloo tests (gloo.test.ts): a child process (forked with
// EXPERTD_GLOO_RANK set to its JSON config) joins a Gloo group through the test's StoreServer and
// runs a scenario; the EP scenario also runs in a worker thread over a loopback group, so both
// backends go through the same code. Results go back over IPC (or the worker's port).
import { isMainThread, parentPort, workerData } from 'node:worker_threads';

import { mulberry32 } from '../../src/engine/rng.js';
import { GroupExpertComm } from '../../src/moe/ep-comm.js';
import { loadNative, type CommGroup, type GlooJoinOptions } from '../../src/native/index.js';

export interface RankConfig extends GlooJoinOptions {
  scenario: 'structured' | 'ep' | 'join-only' | 'lose-peer' | 'mismatch';
}

/** Rows sent from source s to dest d in round `round` of the structured scenario (some zero). */
export function structuredRows(round: number, s: number, d: number): number {
  if (round === 0) return (s + 2 * d) % 3;
  if (round === 1) return s === 1 ? 0 : (d + 1) * (s + 1);
  return s === d ? 0 : 1000 + 37 * s + 11 * d;
}
export const ROUNDS = 3;
export const ROW_INTS = 4;   // (source, dest, row index, round) as int32
/** all2all_i64 value from s to d: beyond 2^32, so a 32-bit path would show. */
export const countValue = (s: number, d: number) => s * 2 ** 40 + d * 7 + 3;

function bytesOf(a: Int32Array | Float32Array): Uint8Array { return new Uint8Array(a.buffer, a.byteOffset, a.byteLength); }

/** all2allv of rows that say where they come from; returns what arrived, per round, flat. */
function structured(g: CommGroup): { rounds: number[][]; counts: number[] } {
  const W = g.worldSize, me = g.rank;
  const rounds: number[][] = [];
  for (let round = 0; round < ROUNDS; round++) {
    const sendRows = [...Array(W).keys()].map((d) => structuredRows(round, me, d));
    const recvRows = [...Array(W).keys()].map((s) => structuredRows(round, s, me));
    const send = new Int32Array(sendRows.reduce((a, v) => a + v, 0) * ROW_INTS);
    let at = 0;
    for (let d = 0; d < W; d++)
      for (let r = 0; r < sendRows[d]!; r++) { send.set([me, d, r, round], at); at += ROW_INTS; }
    // Poisoned: any byte not written stays -1.
    const recv = new Int32Array(recvRows.reduce((a, v) => a + v, 0) * ROW_INTS).fill(-1);
    g.all2allv(bytesOf(send), Float64Array.from(sendRows, (n) => n * ROW_INTS * 4),
               bytesOf(recv), Float64Array.from(recvRows, (n) => n * ROW_INTS * 4));
    rounds.push([...recv]);
  }
  const counts = new Float64Array(W);
  g.all2allCounts(Float64Array.from([...Array(W).keys()], (d) => countValue(me, d)), counts);
  g.barrier();
  return { rounds, counts: [...counts] };
}

/** E routed + Z identity experts, hidden H: a few steps of dispatch -> y = x * (e + 1) -> combine. */
export const EP = { E: 5, Z: 1, H: 3, steps: 4 };

export function epSteps(g: CommGroup): number[][] {
  const { E, Z, H, steps } = EP;
  const comm = new GroupExpertComm(g, E);
  const rand = mulberry32(77 + g.rank);
  const out: number[][] = [];
  for (let step = 0; step < steps; step++) {
    const counts = Array.from({ length: E + Z }, () => (rand() < 0.3 ? 0 : Math.floor(rand() * 4)));
    if ((step + g.rank) % 3 === 2) counts.fill(0);   // a rank with no rows at all
    const offsets = new Int32Array(E + Z + 1);
    counts.forEach((c, e) => { offsets[e + 1] = offsets[e]! + c; });
    const rows = offsets[E + Z]!;
    const xPerm = Float32Array.from({ length: rows * H }, (_, i) => g.rank * 100 + step * 10 + i * 0.5);
    const local = comm.dispatch(xPerm, offsets, H);
    const y = Float32Array.from(local.x);
    for (let e = 0; e < E + Z; e++)
      for (let r = local.offsets[e]!; r < local.offsets[e + 1]!; r++)
        for (let j = 0; j < H; j++) y[r * H + j] = local.x[r * H + j]! * (e < E ? e + 1 : 1);
    const yPerm = new Float32Array(rows * H).fill(NaN);
    comm.combine(y, yPerm, H);
    out.push([...offsets], [...xPerm], [...yPerm]);
  }
  return out;
}

function errorOf(e: unknown) {
  const x = e as Error & { code?: string };
  return { name: x.name, message: x.message, code: x.code };
}

const send = (m: unknown) => new Promise<void>((resolve) => process.send!(m, () => resolve()));
const nextMessage = () => new Promise<unknown>((resolve) => process.once('message', resolve));

async function runProcess(cfg: RankConfig) {
  const native = loadNative();
  const t0 = Date.now();
  let g: CommGroup;
  try {
    g = native.glooJoin({ host: cfg.host, port: cfg.port, prefix: cfg.prefix, rank: cfg.rank,
                          worldSize: cfg.worldSize, timeoutMs: cfg.timeoutMs });
  } catch (e) {
    await send({ kind: 'join-failed', error: errorOf(e), elapsedMs: Date.now() - t0 });
    return;
  }
  await send({ kind: 'joined', backend: g.backend, rank: g.rank, worldSize: g.worldSize });
  try {
    if (cfg.scenario === 'structured') await send({ kind: 'result', result: structured(g) });
    else if (cfg.scenario === 'ep') await send({ kind: 'result', result: epSteps(g) });
    else if (cfg.scenario === 'mismatch') {
      // Rank 1 expects 16 bytes from rank 0, which sends 8: a caller's bug, reported, not a crash.
      const W = g.worldSize, t1 = Date.now();
      const sendBytes = new Float64Array(W).fill(8);
      const recvBytes = Float64Array.from({ length: W }, (_, s) => (g.rank === 1 && s === 0 ? 16 : 8));
      try {
        g.all2allv(new Uint8Array(8 * W), sendBytes, new Uint8Array(8 * W + 8), recvBytes);
        await send({ kind: 'result', result: { ok: true } });
      } catch (e) {
        await send({ kind: 'result', result: { error: errorOf(e), elapsedMs: Date.now() - t1 } });
      }
    } else if (cfg.scenario === 'lose-peer') {
      // Wait for the test's word (it then kills one rank while the others are inside the collective).
      await nextMessage();
      const W = g.worldSize;
      const errors: unknown[] = [];
      for (const op of ['all2allv', 'barrier'] as const) {
        const t1 = Date.now();
        try {
          if (op === 'all2allv') {
            const buf = new Uint8Array(4 * W), counts = new Float64Array(W).fill(4);
            g.all2allv(buf, counts, new Uint8Array(4 * W), counts);
          } else g.barrier();
          errors.push({ op, ok: true, elapsedMs: Date.now() - t1 });
        } catch (e) {
          errors.push({ op, error: errorOf(e), elapsedMs: Date.now() - t1 });
        }
      }
      await send({ kind: 'result', result: errors });
    }
  } catch (e) {
    await send({ kind: 'failed', error: errorOf(e) });
  } finally {
    g.dispose();
  }
}

if (process.env.EXPERTD_GLOO_RANK && process.send) {
  const cfg = JSON.parse(process.env.EXPERTD_GLOO_RANK) as RankConfig;
  if (cfg.scenario === 'lose-peer' && cfg.rank === cfg.worldSize - 1) {
    // The rank that will be killed: join, say so, and idle until SIGKILL.
    const g = loadNative().glooJoin({ host: cfg.host, port: cfg.port, prefix: cfg.prefix, rank: cfg.rank,
                                      worldSize: cfg.worldSize, timeoutMs: cfg.timeoutMs });
    process.send({ kind: 'joined', backend: g.backend, rank: g.rank, worldSize: g.worldSize });
    setInterval(() => {}, 1000);
  } else {
    runProcess(cfg).then(() => process.exit(0), () => process.exit(1));
  }
} else if (!isMainThread && (workerData as { glooRank?: RankConfig } | null)?.glooRank) {
  // A Gloo rank in a worker thread of a process whose main thread serves the store (rank 0 of a
  // daemon: the engine worker joins while the main thread keeps serving).
  const cfg = (workerData as { glooRank: RankConfig }).glooRank;
  let g: CommGroup | null = null;
  try {
    g = loadNative().glooJoin({ host: cfg.host, port: cfg.port, prefix: cfg.prefix, rank: cfg.rank, worldSize: cfg.worldSize,
                                timeoutMs: cfg.timeoutMs, ...(cfg.listenHost ? { listenHost: cfg.listenHost } : {}) });
    parentPort!.postMessage({ ok: true, result: structured(g) });
  } catch (e) {
    parentPort!.postMessage({ ok: false, error: errorOf(e) });
  } finally {
    g?.dispose();
  }
} else if (!isMainThread && (workerData as { loopbackGroup?: string } | null)?.loopbackGroup) {
  // The loopback reference of the EP scenario: one worker thread per rank.
  const { loopbackGroup, rank, worldSize } = workerData as { loopbackGroup: string; rank: number; worldSize: number };
  const g = loadNative().loopbackJoin(loopbackGroup, worldSize, rank, 10_000);
  try { parentPort!.postMessage({ ok: true, result: epSteps(g) }); } catch (e) { parentPort!.postMessage({ ok: false, error: errorOf(e) }); } finally { g.dispose(); }
}
// Loaded any other way (node --test dist/test/ loads helpers too): it does nothing.
