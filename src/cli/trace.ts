// `expertd trace summary | heatmap | replay`: reads a --trace-dir written by the offloader (the
// rotated routing trace, streamed oldest file first, and the EAM collection) and reports request
// counts, per-layer expert popularity and similarity structure, draws per-layer expert heatmaps,
// or replays the trace through a simulated expert cache. Also the offloading flags of `serve`.
import fs from 'node:fs';
import path from 'node:path';

import { ExpertActivationMatrix, unitRows, unitSimilarity } from '../offload/eam.js';
import { EamCollection, EAM_COLLECTION_FILE } from '../offload/eam-collection.js';
import { mulberry32 } from '../engine/rng.js';
import { BeladyReplayer, offloaderReplayer, REPLAY_POLICIES, type ReplayPolicy, type ReplayResult, type StepReplayer } from '../offload/replay.js';
import { readTraceMeta, traceSteps, type Trace, type TraceMeta, type TraceReadOptions } from '../offload/trace-file.js';
import { DEFAULT_TRACE_MAX_FILE_BYTES, DEFAULT_TRACE_MAX_FILES } from '../offload/trace-writer.js';
import { heatmapChart } from '../plot/charts.js';
import { plotFiles, writePlot, type PlotFormat } from '../plot/render.js';
import { formatHelp, parseFlags, UsageError, type FlagSpec } from './options.js';

/** Flags of `serve` that turn expert offloading on (the lead wires them into the engine). */
export const offloadFlags: FlagSpec[] = [
  { name: 'expert-cache-gb', type: 'number', min: 0, default: 0, arg: 'GB', help: 'Expert cache (fast tier) size in GiB: RAM on the CPU (the rest is read from the checkpoint on demand), device memory with --device cuda (the rest waits in pinned host memory) (0 = see --expert-cache-fraction)' },
  { name: 'expert-cache-fraction', type: 'number', min: 0, max: 1, default: 1, arg: 'F', help: 'Expert cache size as a fraction of all routed experts (1 = everything resident, no offloading)' },
  { name: 'cache-policy', type: 'string', choices: ['eam', 'lru', 'lfu'], default: 'eam', help: 'Eviction: eam = lowest predicted reuse from request activation traces (MoE-Infinity); lru, lfu = baselines' },
  { name: 'expert-loader', type: 'string', choices: ['auto', 'copy-thread', 'engine-thread'], default: 'auto',
    help: 'Where offloaded experts are read and repacked: a copy thread that overlaps prefetch with compute, or the engine thread between layers (auto = copy thread only when --threads leaves a core free)' },
  { name: 'eam-capacity', type: 'int', min: 1, default: 1000, arg: 'N', help: "Finished requests' expert activation matrices kept for prediction (the least-matched is replaced when full)" },
  { name: 'trace-dir', type: 'string', arg: 'DIR', default: '', help: 'Folder for the routing trace (written off the step path; records the writer cannot keep up with are dropped and counted) and the EAM collection (reloaded at start, saved every minute and on shutdown)' },
  { name: 'trace-max-file-mb', type: 'number', min: 0.001, default: DEFAULT_TRACE_MAX_FILE_BYTES / 2 ** 20, arg: 'MB',
    help: 'Routing trace: start a new file (trace-NNNNNN.jsonl) before one passes this many MiB' },
  { name: 'trace-max-files', type: 'int', min: 1, default: DEFAULT_TRACE_MAX_FILES, arg: 'N',
    help: 'Routing trace: keep the newest N files, delete older ones (the trace takes at most N x --trace-max-file-mb)' },
  { name: 'trace-sample', type: 'number', min: 0, max: 1, default: 1, arg: 'F',
    help: 'Routing trace: fraction of requests traced, chosen by request id (the EAM collection still learns from all)' },
];

const commonFlags: FlagSpec[] = [
  { name: 'trace-dir', type: 'string', arg: 'DIR', help: 'Folder written by `expertd serve --trace-dir`' },
  { name: 'json', type: 'boolean', help: 'Print JSON instead of text', noEnv: true },
];

const summaryFlags: FlagSpec[] = [
  ...commonFlags,
  { name: 'max-requests', type: 'int', min: 2, default: 1000, arg: 'N', help: 'Requests (a seeded uniform sample of them when the trace holds more) whose EAMs the similarity structure compares', noEnv: true },
  { name: 'clusters', type: 'int', min: 1, max: 64, default: 4, help: 'Clusters for the similarity structure (spherical k-means on EAMs)', noEnv: true },
  { name: 'top', type: 'int', min: 1, max: 64, default: 4, help: 'Most popular experts listed per layer', noEnv: true },
];
const heatmapFlags: FlagSpec[] = [
  ...commonFlags,
  { name: 'out', type: 'string', arg: 'FILE', help: 'Image to write (FILE.png or FILE.svg); its Vega-Lite spec goes beside it as FILE.vl.json', noEnv: true },
  { name: 'format', type: 'string', choices: ['png', 'svg'], help: "Image format (default: --out's extension, else png)", noEnv: true },
  { name: 'request', type: 'string', arg: 'ID', help: "One request's expert activation matrix instead of the whole trace's", noEnv: true },
];
const replayFlags: FlagSpec[] = [
  ...commonFlags,
  { name: 'capacity', type: 'number', min: 0.0001, max: 1, default: 0.25, help: 'Cache size as a fraction of all experts', noEnv: true },
  { name: 'policy', type: 'string', choices: [...REPLAY_POLICIES, 'all'], default: 'all', help: 'Eviction policy to simulate', noEnv: true },
  { name: 'prefetch', type: 'boolean', help: 'eam: also prefetch the coming layers (hit rates then exceed what eviction alone can do)', noEnv: true },
  { name: 'warm', type: 'boolean', help: `Start from the folder's ${EAM_COLLECTION_FILE} (it may hold the replayed requests themselves: optimistic)`, noEnv: true },
  { name: 'belady-max-accesses', type: 'int', min: 1, default: 25_000_000, arg: 'N',
    help: 'belady needs every future access in memory (4 bytes each): skipped, with a warning, on a trace with more', noEnv: true },
];

export const traceHelp = [
  'Usage: expertd trace <summary|heatmap|replay> --trace-dir DIR [options]',
  '',
  'Inspects a routing trace recorded by `expertd serve --trace-dir DIR`: every trace file of the folder,',
  'oldest first, streamed line by line (a torn last line, from a crash mid-write, is skipped with a warning).',
  '',
  formatHelp('expertd trace summary --trace-dir DIR', 'Requests, per-layer expert popularity, and how similar requests are (within vs across clusters).', summaryFlags),
  '',
  formatHelp('expertd trace heatmap --trace-dir DIR --out FILE.png [--request ID] [--format png|svg]',
    "Per-layer expert popularity as a picture: MoE layers x experts, colour = share of the layer's routed tokens.", heatmapFlags),
  '',
  formatHelp('expertd trace replay --trace-dir DIR [--capacity 0.25] [--policy eam|lru|lfu|belady|all]', 'Hit rates of a simulated expert cache on the trace (belady = the offline optimum).', replayFlags),
].join('\n');

function traceDirOf(flags: Record<string, unknown>): string {
  const dir = flags['trace-dir'];
  if (typeof dir !== 'string' || dir === '') throw new UsageError('--trace-dir DIR is required');
  if (!fs.existsSync(dir)) throw new UsageError(`--trace-dir ${dir} does not exist`);
  return dir;
}

/** Each request's whole-life EAM, rebuilt from the trace. */
export function requestEams(trace: Trace): Map<string, ExpertActivationMatrix> {
  const { numLayers: L, numExperts: E } = trace.meta;
  const out = new Map<string, ExpertActivationMatrix>();
  for (const st of trace.steps)
    for (const r of st.requests) {
      let m = out.get(r.id);
      if (!m) out.set(r.id, (m = new ExpertActivationMatrix(L, E)));
      r.layers.forEach((row, l) => { for (let i = 0; i < row.length; i += 2) m!.counts[l * E + row[i]!]! += row[i + 1]!; });
    }
  return out;
}

/** [L, E] tokens routed per (layer, expert) over the whole trace. */
export function popularity(trace: Trace): ExpertActivationMatrix {
  const m = new ExpertActivationMatrix(trace.meta.numLayers, trace.meta.numExperts);
  for (const eam of requestEams(trace).values()) m.addMatrix(eam);
  return m;
}

/** What one streaming pass over a trace folder gathers (memory: the sample, not the trace). */
export interface TraceScan {
  meta: TraceMeta;
  steps: number;
  /** Distinct requests seen, and finished-request entries. */
  requests: number;
  finishedRequests: number;
  /** [L, E] tokens routed per (layer, expert) over the whole trace. */
  popularity: ExpertActivationMatrix;
  /**
   * Whole-life EAMs of at most maxRequests requests, in order of first appearance: all of them
   * when the trace holds no more, else a uniform sample (reservoir, seeded: the same every run).
   */
  eams: ExpertActivationMatrix[];
}

export interface ScanOptions extends TraceReadOptions {
  /** EAMs kept for the similarity structure (0: none, and no per-request state is kept). */
  maxRequests?: number;
}

/**
 * One streaming pass: per-request EAMs are held only while a request runs (until the step that
 * lists it as finished), then kept in a bounded reservoir. Requests still running when the trace
 * ends (a crash, or the newest steps) are included as they are.
 */
export async function scanTrace(dir: string, opts: ScanOptions = {}): Promise<TraceScan> {
  const meta = readTraceMeta(dir);
  const { numLayers: L, numExperts: E } = meta;
  const maxRequests = opts.maxRequests ?? 1000;
  const pop = new ExpertActivationMatrix(L, E);
  const running = new Map<string, { seq: number; eam: ExpertActivationMatrix | null }>();
  const sample: { seq: number; eam: ExpertActivationMatrix }[] = [];
  const rand = mulberry32(1);
  let seen = 0;
  let done = 0;
  let steps = 0;
  let finishedRequests = 0;
  const keep = (r: { seq: number; eam: ExpertActivationMatrix }) => {
    done++;
    if (sample.length < maxRequests) sample.push(r);
    else {
      const j = Math.floor(rand() * done);
      if (j < maxRequests) sample[j] = r;
    }
  };
  const readOpts: TraceReadOptions = { ...(opts.warn ? { warn: opts.warn } : {}), ...(opts.createReadStream ? { createReadStream: opts.createReadStream } : {}) };
  for await (const st of traceSteps(dir, readOpts)) {
    steps++;
    for (const r of st.requests) {
      let live = running.get(r.id);
      if (!live) {
        seen++;
        // NOTE: tracked even without a sample (maxRequests 0), else every step would count it anew.
        running.set(r.id, (live = { seq: seen, eam: maxRequests > 0 ? new ExpertActivationMatrix(L, E) : null }));
      }
      const eam = live.eam;
      r.layers.forEach((row, l) => {
        for (let i = 0; i < row.length; i += 2) {
          pop.counts[l * E + row[i]!]! += row[i + 1]!;
          if (eam) eam.counts[l * E + row[i]!]! += row[i + 1]!;
        }
      });
    }
    for (const id of st.finished ?? []) {
      finishedRequests++;
      const live = running.get(id);
      if (live) { running.delete(id); if (live.eam) keep({ seq: live.seq, eam: live.eam }); }
    }
  }
  for (const live of running.values()) if (live.eam) keep({ seq: live.seq, eam: live.eam });
  sample.sort((a, b) => a.seq - b.seq);
  return { meta, steps, requests: seen, finishedRequests, popularity: pop, eams: sample.map((x) => x.eam) };
}

export interface SimilarityStructure {
  clusters: number;
  sizes: number[];
  /** Mean pairwise EAM similarity of requests in the same cluster / in different clusters. */
  withinMean: number;
  acrossMean: number;
}

/** Spherical k-means on EAMs (per-layer unit rows, averaged cosine), deterministic seeding. */
export function similarityStructure(eams: ExpertActivationMatrix[], k: number): SimilarityStructure {
  const n = eams.length;
  if (n === 0) return { clusters: 0, sizes: [], withinMean: NaN, acrossMean: NaN };
  const L = eams[0]!.numLayers;
  const E = eams[0]!.numExperts;
  const units = eams.map((m) => unitRows(m.counts, L, E));
  const sim = (a: Float32Array, b: Float32Array) => unitSimilarity(a, b, L, E);
  k = Math.min(k, n);
  // Farthest-point seeding: start at request 0, then the least similar to every chosen center.
  const centers: Float32Array[] = [units[0]!];
  while (centers.length < k) {
    let best = 0;
    let bestSim = Infinity;
    units.forEach((u, i) => { const s = Math.max(...centers.map((c) => sim(u, c))); if (s < bestSim) { bestSim = s; best = i; } });
    centers.push(units[best]!);
  }
  let assign = new Int32Array(n);
  for (let iter = 0; iter < 20; iter++) {
    const next = Int32Array.from(units, (u) => {
      let b = 0;
      for (let c = 1; c < k; c++) if (sim(u, centers[c]!) > sim(u, centers[b]!)) b = c;
      return b;
    });
    const same = next.every((v, i) => v === assign[i]);
    assign = next;
    for (let c = 0; c < k; c++) {
      const sum = new Float32Array(L * E);
      units.forEach((u, i) => { if (assign[i] === c) for (let j = 0; j < u.length; j++) sum[j]! += u[j]!; });
      centers[c] = unitRows(sum, L, E);
    }
    if (same && iter > 0) break;
  }
  let wSum = 0, wN = 0, aSum = 0, aN = 0;
  for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) {
    const s = (sim(units[i]!, units[j]!) + sim(units[j]!, units[i]!)) / 2;
    if (assign[i] === assign[j]) { wSum += s; wN++; } else { aSum += s; aN++; }
  }
  const sizes = new Array<number>(k).fill(0);
  for (const a of assign) sizes[a]!++;
  return { clusters: k, sizes, withinMean: wN ? wSum / wN : NaN, acrossMean: aN ? aSum / aN : NaN };
}

const stderrWarn = (m: string) => process.stderr.write(`warning: ${m}\n`);

async function summary(argv: string[]): Promise<number> {
  const { flags } = parseFlags(summaryFlags, argv);
  const dir = traceDirOf(flags);
  const scan = await scanTrace(dir, { maxRequests: Number(flags['max-requests']), warn: stderrWarn });
  const { meta, popularity: pop } = scan;
  const { numLayers: L, numExperts: E } = meta;
  const top = Number(flags['top']);
  const layers = Array.from({ length: L }, (_, l) => {
    const row = pop.normalisedRow(l);
    let entropy = 0;
    for (const p of row) if (p > 0) entropy -= p * Math.log(p);
    const order = [...row.keys()].sort((a, b) => row[b]! - row[a]! || a - b).slice(0, top);
    return { layer: l, tokens: pop.rowSum(l), effectiveExperts: Math.exp(entropy), top: order.map((e) => ({ expert: e, share: row[e]! })) };
  });
  const collectionFile = path.join(dir, EAM_COLLECTION_FILE);
  const collection = fs.existsSync(collectionFile) ? EamCollection.load(dir, L, E, { warn: stderrWarn }) : null;
  const compared = scan.eams.filter((m) => m.total() > 0);
  const structure = similarityStructure(compared, Number(flags['clusters']));
  const out = {
    traceDir: dir, model: meta.model, moeLayers: L, experts: E, topK: meta.topK,
    steps: scan.steps, requests: scan.requests, finishedRequests: scan.finishedRequests,
    collection: collection ? { size: collection.size, capacity: collection.capacity } : null,
    layers, similarity: { ...structure, requestsCompared: compared.length },
  };
  if (flags['json']) {
    console.log(JSON.stringify(out, null, 2));
    return 0;
  }
  console.log(`trace ${dir}: model ${out.model}, ${L} MoE layers x ${E} experts (top-${out.topK})`);
  console.log(`${out.steps} steps, ${out.requests} requests (${out.finishedRequests} finished)` +
    (collection ? `; EAM collection ${collection.size}/${collection.capacity}` : '; no EAM collection saved'));
  console.log('\nper-layer expert popularity (share of the layer\'s routed tokens):');
  for (const l of layers)
    console.log(`  layer ${String(l.layer).padStart(3)}: ${String(l.tokens).padStart(8)} tokens, ${l.effectiveExperts.toFixed(1).padStart(5)} effective experts; top ` +
      l.top.map((t) => `${t.expert} (${(t.share * 100).toFixed(1)}%)`).join(', '));
  const st = structure;
  const of = compared.length < scan.requests ? ` (over a sample of ${compared.length} of the ${scan.requests} requests)` : '';
  console.log(`\nsimilarity (per-layer cosine of request EAMs${of}): ${st.clusters} clusters of sizes ${st.sizes.join(', ')}; ` +
    `mean within ${st.withinMean.toFixed(3)}, across ${st.acrossMean.toFixed(3)}`);
  return 0;
}

/** One request's EAM from the trace (null: the id is not in it), and a few ids for the error. */
async function requestEam(dir: string, meta: TraceMeta, id: string): Promise<{ eam: ExpertActivationMatrix | null; ids: string[]; requests: number }> {
  const { numLayers: L, numExperts: E } = meta;
  let eam: ExpertActivationMatrix | null = null;
  const seen = new Set<string>();
  for await (const st of traceSteps(dir, { warn: stderrWarn })) {
    for (const r of st.requests) {
      seen.add(r.id);
      if (r.id !== id) continue;
      eam ??= new ExpertActivationMatrix(L, E);
      r.layers.forEach((row, l) => {
        for (let i = 0; i < row.length; i += 2) eam!.counts[l * E + row[i]!]! += row[i + 1]!;
      });
    }
  }
  return { eam, ids: [...seen].slice(0, 3), requests: seen.size };
}

async function heatmap(argv: string[]): Promise<number> {
  const { flags } = parseFlags(heatmapFlags, argv);
  const dir = traceDirOf(flags);
  const outFlag = flags['out'];
  if (typeof outFlag !== 'string' || !outFlag) throw new UsageError('--out FILE.png is required');
  const ext = /\.(png|svg)$/i.exec(outFlag)?.[1]?.toLowerCase() as PlotFormat | undefined;
  const asked = flags['format'] as PlotFormat | undefined;
  if (asked && ext && asked !== ext) throw new UsageError(`--out ${outFlag} ends in .${ext} but --format is ${asked}; make them agree`);
  const format: PlotFormat = asked ?? ext ?? 'png';
  const files = plotFiles(outFlag);
  const outFile = format === 'png' ? files.png : files.svg;
  const meta = readTraceMeta(dir);
  const { numLayers: L, numExperts: E } = meta;
  const request = typeof flags['request'] === 'string' && flags['request'] !== '' ? flags['request'] : null;
  let eam: ExpertActivationMatrix;
  let about: string;
  if (request !== null) {
    const found = await requestEam(dir, meta, request);
    if (!found.eam) {
      throw new UsageError(`--request ${request} is not in the trace at ${dir} (${found.requests} requests` +
        `${found.ids.length ? `, e.g. ${found.ids.join(', ')}` : ''}); ids are the ones the daemon logged and returned`);
    }
    eam = found.eam;
    about = `request ${request}`;
  } else {
    const scan = await scanTrace(dir, { maxRequests: 0, warn: stderrWarn });
    eam = scan.popularity;
    about = `${scan.requests} requests`;
  }
  const cells = Array.from({ length: L }, (_, l) => eam.normalisedRow(l));
  const tokens = eam.total() / Math.max(1, meta.topK * L);
  const spec = heatmapChart({
    title: `Expert activation: ${meta.model}, ${about}`,
    note: `trace ${path.resolve(dir)}; ${L} MoE layers x ${E} experts, top-${meta.topK}, ${Math.round(tokens)} routed tokens per layer`,
    cells, rowTitle: 'MoE layer', colTitle: 'expert', colorTitle: "share of the layer's routed tokens", colorFormat: '.0%',
  });
  const out = await writePlot(outFile, spec, { formats: [format] });
  if (flags['json']) {
    console.log(JSON.stringify({ out: outFile, spec: out.spec, format, width: out.width, height: out.height, layers: L, experts: E, request }));
  } else {
    console.log(`wrote ${outFile} (${out.width}x${out.height}) and its Vega-Lite spec ${out.spec}: rows = MoE layers 0..${L - 1}, ` +
      `columns = experts 0..${E - 1}, colour = share of the layer's routed tokens (${about})`);
  }
  return 0;
}

async function replayCmd(argv: string[]): Promise<number> {
  const { flags } = parseFlags(replayFlags, argv);
  const dir = traceDirOf(flags);
  const meta = readTraceMeta(dir);
  const { numLayers: L, numExperts: E } = meta;
  const capacity = Number(flags['capacity']);
  const which = String(flags['policy']);
  const policies: ReplayPolicy[] = which === 'all' ? [...REPLAY_POLICIES] : [which as ReplayPolicy];
  const belady = policies.includes('belady') ? new BeladyReplayer(meta, capacity, Number(flags['belady-max-accesses'])) : null;
  const online = new Map<ReplayPolicy, StepReplayer>();
  for (const policy of policies) if (policy !== 'belady') online.set(policy, offloaderReplayer(meta, {
    policy, capacity, prefetch: Boolean(flags['prefetch']) && policy === 'eam',
    ...(flags['warm'] ? { collection: EamCollection.load(dir, L, E, { warn: stderrWarn }) } : {}),
  }));
  // Pass 1: the online policies, and Belady's index of future uses; pass 2 (Belady only): the replay.
  let steps = 0;
  for await (const st of traceSteps(dir, { warn: stderrWarn })) {
    steps++;
    for (const r of online.values()) r.step(st);
    belady?.observe(st);
  }
  if (belady && belady.overLimit) {
    stderrWarn(`belady skipped: the trace has more than ${belady.maxAccesses} expert accesses (--belady-max-accesses)`);
  } else if (belady) {
    // The torn-line warnings were given in pass 1.
    for await (const st of traceSteps(dir, { warn: () => undefined })) belady.step(st);
  }
  const results: ReplayResult[] = policies.flatMap((p) => {
    if (p !== 'belady') return [online.get(p)!.result()];
    return belady && !belady.overLimit ? [belady.result()] : [];
  });
  if (flags['json']) {
    console.log(JSON.stringify(results, null, 2));
    return 0;
  }
  if (results.length === 0) return 1;
  const r0 = results[0]!;
  console.log(`replay of ${dir}: ${steps} steps, cache of ${r0.slots}/${r0.totalExperts} experts ` +
    `(${(100 * r0.slots / r0.totalExperts).toFixed(0)}%, asked ${(capacity * 100).toFixed(0)}%), ${r0.accesses} expert accesses`);
  console.log('| policy | hit rate | misses | loads | prefetch used | prefetch wasted |');
  console.log('|:--|--:|--:|--:|--:|--:|');
  for (const r of results)
    console.log(`| ${r.policy}${r.prefetch ? '+prefetch' : ''} | ${(r.hitRate * 100).toFixed(1)}% | ${r.misses} | ${r.loads} | ${r.prefetchUsed} | ${r.prefetchWasted} |`);
  return 0;
}

export async function traceCommand(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  switch (sub) {
    case 'summary': return summary(rest);
    case 'heatmap': return heatmap(rest);
    case 'replay': return replayCmd(rest);
    case undefined: throw new UsageError('expected a subcommand: summary, heatmap or replay (see --help)');
    default: throw new UsageError(`unknown trace subcommand '${sub}'; expected summary, heatmap or replay`);
  }
}
