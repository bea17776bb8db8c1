// `npm run bench -- comm`: all2allv over Gloo between 2 and 3 rank processes (TCP on loopback)
// against the in-process loopback group (worker threads, shared memory) at the byte sizes of one
// MoE layer's dispatch of the bench models (f32 rows of H values, T tokens x top-k rows per rank
// spread evenly over the ranks). Each repetition is timed on every rank after a barrier; the
// collective's time is the slowest rank's. Reported: median and min-max, and Gloo / loopback; the
// barrier alone too.
import { fork } from 'node:child_process';
import { parseArgs } from 'node:util';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

import { StoreServer } from '../src/dist/store.js';
import { loadNative, type CommGroup } from '../src/native/index.js';
import { BENCH_CONFIGS, type BenchModelName } from './bench-models.js';
import { fmt, markdownTable, median, parseIntList, parsePositiveInt, runInfo, writeJson, type Cell } from './harness.js';

/** An all2allv of one MoE layer's dispatch, or (model null) a barrier. */
interface Case { model: BenchModelName | null; tokens: number; world: number; bytesPerPeer: number }
interface RankJob { cases: Case[]; reps: number; warmup: number }

/** Bytes one rank sends each peer in one MoE layer's dispatch: ceil(T * k / W) f32 rows of H. */
export function dispatchBytesPerPeer(model: BenchModelName, tokens: number, world: number): number {
  const cfg = BENCH_CONFIGS[model] as { hidden_size: number; num_experts_per_tok: number };
  return Math.ceil((tokens * cfg.num_experts_per_tok) / world) * cfg.hidden_size * 4;
}

/** One rank's timings (ms) of each case's all2allv, after warm-up, each preceded by a barrier. */
function timeRank(g: CommGroup, job: RankJob): number[][] {
  const W = g.worldSize;
  return job.cases.map((c) => {
    const send = new Uint8Array(c.bytesPerPeer * W).fill(g.rank + 1);
    const recv = new Uint8Array(c.bytesPerPeer * W);
    const counts = new Float64Array(W).fill(c.bytesPerPeer);
    const t: number[] = [];
    for (let i = 0; i < job.warmup + job.reps; i++) {
      g.barrier();
      const t0 = performance.now();
      if (c.model) g.all2allv(send, counts, recv, counts);
      else g.barrier();
      const dt = performance.now() - t0;
      if (i >= job.warmup) t.push(dt);
    }
    for (let s = 0; s < W && c.model; s++)
      if (recv[s * c.bytesPerPeer] !== s + 1) throw new Error(`rank ${g.rank}: bytes from rank ${s} are wrong`);
    return t;
  });
}

/** Per repetition the slowest rank's time. */
const slowest = (perRank: number[][]): number[] => perRank[0]!.map((_, i) => Math.max(...perRank.map((t) => t[i]!)));

async function runGloo(world: number, job: RankJob): Promise<number[][]> {
  const server = await StoreServer.listen('127.0.0.1', 0);
  const prefix = `bench-comm-${process.pid}-${world}`;
  const children = [...Array(world).keys()].map((rank) => fork(new URL(import.meta.url), [], {
    env: { ...process.env, EXPERTD_COMM_BENCH_RANK: JSON.stringify({ port: server.port, prefix, rank, world, job }) },
  }));
  try {
    const perRank = await Promise.all(children.map((c, rank) => new Promise<number[][]>((resolve, reject) => {
      c.once('message', (m: { ok: boolean; times?: number[][]; error?: string }) => (m.ok ? resolve(m.times!) : reject(new Error(`gloo rank ${rank}: ${m.error}`))));
      c.once('exit', (code) => reject(new Error(`gloo rank ${rank} exited with ${code}`)));
    })));
    return job.cases.map((_, i) => slowest(perRank.map((t) => t[i]!)));
  } finally {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    await server.close();
  }
}

async function runLoopback(world: number, job: RankJob): Promise<number[][]> {
  const group = `bench-comm-${process.pid}-${world}-${Date.now()}`;
  const perRank = await Promise.all([...Array(world).keys()].map((rank) => new Promise<number[][]>((resolve, reject) => {
    const w = new Worker(new URL(import.meta.url), { workerData: { benchLoopback: { group, rank, world, job } } });
    w.once('message', (m: { ok: boolean; times?: number[][]; error?: string }) => (m.ok ? resolve(m.times!) : reject(new Error(m.error))));
    w.once('error', reject);
  })));
  return job.cases.map((_, i) => slowest(perRank.map((t) => t[i]!)));
}

export async function runCommBench(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      reps: { type: 'string' }, warmup: { type: 'string' }, tokens: { type: 'string' },
      worlds: { type: 'string' }, models: { type: 'string' }, json: { type: 'string' },
    },
  });
  if (!loadNative().capabilities().gloo) throw new Error('this build has no Gloo: apt-get install libgloo-dev and rebuild');
  const reps = parsePositiveInt('--reps', values.reps, 30);
  const warmup = parsePositiveInt('--warmup', values.warmup, 3);
  const tokensList = values.tokens ? parseIntList('--tokens', values.tokens) : [1, 8, 64, 512];
  const worlds = values.worlds ? parseIntList('--worlds', values.worlds) : [2, 3];
  const models = (values.models?.split(',') ?? ['mixtral-like', 'qwen3moe-like']) as BenchModelName[];
  for (const m of models) if (!BENCH_CONFIGS[m]) throw new Error(`--models: unknown model '${m}'`);

  const rows: Cell[][] = [];
  const results: unknown[] = [];
  for (const world of worlds) {
    const cases: Case[] = [{ model: null, tokens: 0, world, bytesPerPeer: 0 }];
    for (const model of models)
      for (const tokens of tokensList) cases.push({ model, tokens, world, bytesPerPeer: dispatchBytesPerPeer(model, tokens, world) });
    const job = { cases, reps, warmup };
    const loop = await runLoopback(world, job);
    const gloo = await runGloo(world, job);
    cases.forEach((c, i) => {
      const l = loop[i]!, g = gloo[i]!;
      const span = (t: number[]) => `${fmt(median(t))} (${fmt(Math.min(...t))}-${fmt(Math.max(...t))})`;
      rows.push([c.model ?? '(barrier)', c.model ? c.tokens : '-', world, c.model ? `${(c.bytesPerPeer / 1024).toFixed(0)} KiB` : '-', span(l), span(g), `${fmt(median(g) / median(l))}x`]);
      results.push({ ...c, loopbackMs: l, glooMs: g, loopbackMedianMs: median(l), glooMedianMs: median(g) });
    });
  }
  console.log(`\n### all2allv: Gloo (rank processes, TCP on 127.0.0.1) vs loopback (threads), ${reps} reps after ${warmup} warm-up, slowest rank per rep\n`);
  console.log(markdownTable(['model', 'tokens/rank', 'ranks', 'bytes/peer', 'loopback ms median (min-max)', 'gloo ms median (min-max)', 'gloo / loopback'], rows));
  if (values.json) writeJson(values.json, { run: runInfo(), results });
}

// As a rank: a process (Gloo) or a worker thread (loopback) started by the functions above.
if (process.env.EXPERTD_COMM_BENCH_RANK && process.send) {
  const { port, prefix, rank, world, job } = JSON.parse(process.env.EXPERTD_COMM_BENCH_RANK) as { port: number; prefix: string; rank: number; world: number; job: RankJob };
  let g: CommGroup | null = null;
  try {
    g = loadNative().glooJoin({ host: '127.0.0.1', port, prefix, rank, worldSize: world, timeoutMs: 60_000 });
    const times = timeRank(g, job);
    process.send({ ok: true, times }, () => process.exit(0));
  } catch (e) {
    process.send({ ok: false, error: (e as Error).message }, () => process.exit(1));
  } finally {
    g?.dispose();
  }
} else if (!isMainThread && (workerData as { benchLoopback?: unknown } | null)?.benchLoopback) {
  const { group, rank, world, job } = (workerData as { benchLoopback: { group: string; rank: number; world: number; job: RankJob } }).benchLoopback;
  const g = loadNative().loopbackJoin(group, world, rank, 60_000);
  try { parentPort!.postMessage({ ok: true, times: timeRank(g, job) }); } catch (e) { parentPort!.postMessage({ ok: false, error: (e as Error).message }); } finally { g.dispose(); }
}
