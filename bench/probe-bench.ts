// `npm run bench -- probe`: the machine's limits and the OpenBLAS per-expert loop at the kernels
// bench's shapes, without our kernels: the reference half of every kernels table, on its own.
import os from 'node:os';
import { parseArgs } from 'node:util';

import { loadNative } from '../src/native/index.js';
import { fmt, markdownTable, parseIntList, parsePositiveInt, pct, runInfo, stats, writeJson, type Cell } from './harness.js';
import { SHAPES } from './kernels.js';
import { runOpenBlasPeer, type PeerCase } from './peers/openblas.js';
import { runProbe } from './probe/probe.js';

/** Rows per expert from top-k of random logits (only the load matters to the peer). */
function randomCounts(e: number, k: number, t: number, seed: number): number[] {
  let a = seed >>> 0;
  const rand = () => {
    a = (Math.imul(a, 1664525) + 1013904223) >>> 0;
    return a / 4294967296;
  };
  const counts = new Array<number>(e).fill(0);
  for (let r = 0; r < t; r++) {
    const logits = Array.from({ length: e }, (_, i) => ({ i, v: rand() }));
    logits.sort((x, y) => y.v - x.v || x.i - y.i);
    for (let j = 0; j < k; j++) counts[logits[j]!.i]!++;
  }
  return counts;
}

export async function runProbeBench(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: { json: { type: 'string' }, reps: { type: 'string' }, threads: { type: 'string' }, tokens: { type: 'string' } },
    strict: true,
  });
  const threads = parsePositiveInt('threads', values.threads, os.availableParallelism());
  const reps = Math.max(1, parsePositiveInt('reps', values.reps, 5));
  const tokens = values.tokens ? parseIntList('tokens', values.tokens) : [1, 8, 64, 512];

  console.error(`# probing the machine (${threads} threads)...`);
  const limits = runProbe({ threads });
  console.log('## machine limits\n');
  console.log(markdownTable(['quantity', 'value'], [
    ['CPU', limits.cpuModel],
    ['threads (hardware)', `${limits.threads} (${limits.hardwareThreads})`],
    ['L3', `${(limits.l3Bytes / 2 ** 20).toFixed(0)} MiB`],
    ['load average (1/5/15 min)', os.loadavg().map((v) => v.toFixed(1)).join(' ')],
    ['read bandwidth, all threads (best / median)', `${fmt(limits.readBandwidthGBps)} / ${fmt(limits.readBandwidthMedianGBps)} GB/s`],
    ['read bandwidth, 1 thread', `${fmt(limits.readBandwidth1ThreadGBps)} GB/s`],
    ['core-to-core round trip (first two CPUs)', limits.coreRoundTripNs === null ? 'n/a (one thread)' : `${fmt(limits.coreRoundTripNs)} ns`],
    [`peak f32 FMA (${limits.f32Isa}), all threads`, `${fmt(limits.peakF32Gflops)} GFLOP/s (${fmt(limits.peakF32PerThreadGflops)} per thread)`],
    ['peak bf16 dot (vdpbf16ps), all threads', limits.peakBf16Gflops === null ? 'n/a (no AVX512_BF16)' : `${fmt(limits.peakBf16Gflops)} GFLOP/s`],
  ], ['left', 'right']));

  const flushBytes = Math.max(64 << 20, 3 * limits.l3Bytes);
  const cases: PeerCase[] = [];
  for (const s of SHAPES)
    for (const t of tokens)
      for (const dtype of ['f32', 'bf16'] as const)
        cases.push({ id: `${s.name}/${t}/${dtype}`, dtype, h: s.h, inter: s.inter,
          counts: randomCounts(s.experts, s.topK, t, 7 + t), reps, warmup: 1, flushBytes });
  console.error('# running the OpenBLAS peer...');
  const peer = runOpenBlasPeer(cases, threads);
  const i = peer.info;
  console.log(`\n## OpenBLAS per-expert loop (gate, up, SiLU*up, down per expert)\n`);
  console.log(i.available
    ? `${i.config}; library ${i.library}; core ${i.corename}; ${i.threads} threads; cblas_sbgemm ${i.sbgemm ? 'yes' : 'no'}; ` +
      `unset for the peer: ${Object.keys(i.unsetEnv).length ? Object.entries(i.unsetEnv).map(([k, v]) => `${k}=${v}`).join(' ') : 'nothing (not set)'}.\n`
    : `${i.reason}: ${i.error ?? ''}\n`);

  const rows: Cell[][] = [];
  const json: Record<string, unknown>[] = [];
  for (const c of cases) {
    const [model, t] = c.id.split('/');
    const r = peer.results.get(c.id);
    const e = c.counts.length;
    const active = Array.from(c.counts).filter((n) => n > 0).length;
    const shape = SHAPES.find((s) => s.name === model)!;
    const params = 3 * shape.h * shape.inter;
    const flops = 2 * Number(t) * shape.topK * params;
    const bytes = active * params * (c.dtype === 'f32' ? 4 : 2);
    if (!r?.timesMs?.length) {
      rows.push([model!, Number(t), c.dtype, i.available ? `n/a (${r?.error ?? 'no result'})` : i.reason!, '', '', '', '', '']);
      json.push({ id: c.id, error: r?.error ?? i.reason });
      continue;
    }
    const st = stats(r.timesMs);
    const gflops = flops / (st.medianMs / 1e3) / 1e9;
    const gbps = bytes / (st.medianMs / 1e3) / 1e9;
    const decode = Number(t) <= 8;
    const peak = c.dtype === 'bf16' && limits.peakBf16Gflops !== null ? limits.peakBf16Gflops : limits.peakF32Gflops;
    const limit = decode ? `${pct(gbps / limits.readBandwidthGBps)} bw` : `${pct(gflops / peak)} ${c.dtype} peak`;
    rows.push([model!, Number(t), c.dtype, st.medianMs, `${fmt(st.minMs)}-${fmt(st.maxMs)}`, gflops, gbps, limit,
      `${active}/${e} experts, check ${r.checkRelErr?.toExponential(1)}`]);
    json.push({ id: c.id, stats: st, flops, bytes, gflops, gbps, activeExperts: active, checkRelErr: r.checkRelErr });
  }
  console.log(markdownTable(['model', 'T', 'dtype', 'median ms', 'min-max ms', 'GFLOP/s', 'GB/s', 'of limit', 'notes'], rows,
    ['left', 'right', 'left', 'right', 'right', 'right', 'right', 'right', 'left']));

  if (values.json) {
    let capabilities: unknown = null;
    try { capabilities = loadNative().capabilities(); } catch { /* the addon may not be built */ }
    writeJson(values.json, { bench: 'probe', run: runInfo(), capabilities, limits, peer: i, cases: json });
  }
}
