// Engine worker entry: owns the model, the KV cache and the step loop. Steps run back to back
// while there is work, yielding to the worker's event loop between steps so requests and aborts
// join between steps. The main thread never waits on any of this.
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { parentPort } from 'node:worker_threads';

import type { ForwardModel } from '../model/forward-batch.js';
import { loadCudaModel, loadModel, loadSummary, type LoadedModel, type LoadProgress } from '../model/load.js';
import { loadNative, type CudaAddon } from '../native/index.js';
import { DeviceExpertComm } from '../moe/device-ep.js';
import { startDeviceExpertRanks, startExpertRanks, type ExpertRanks } from '../dist/expert-ranks.js';
import type { ModelOptions, MoeModel } from '../model/model.js';
import { attachDeviceOffloader, attachOffloader, skipAllExperts } from '../offload/setup.js';
import type { Offloader } from '../offload/offloader.js';
import { EngineCore, type StepOffloader } from './engine-core.js';
import type { EngineOptions, FromWorker, StepMetrics, ToWorker } from './protocol.js';
import type { EngineEvent } from './types.js';
import { Lockstep, Vote } from '../dist/lockstep.js';
import { contiguousPlacement, GroupExpertComm, placementFromOwners, type ExpertPlacement } from '../moe/ep-comm.js';
import { parseModelConfig } from '../model/config.js';
import { exchangeNcclId } from '../dist/rendezvous.js';
import { StoreClient } from '../dist/store.js';
import { describeQuantize } from '../model/quantize.js';
import { GrammarEngine } from '../structured/grammar-engine.js';
import { refusedEvent, type GenerateRequest } from './types.js';

const port = parentPort;
if (!port) throw new Error('engine worker must run in a worker thread');

let core: EngineCore | null = null;
let expertRanks: Pick<ExpertRanks<{ dispose(): void }>, 'stop' | 'placement'> | null = null;
let offloader: Pick<Offloader, 'save' | 'close' | 'stats'> & { store: Pick<Offloader['store'], 'slotBytes' | 'slotFormat'> } & StepOffloader | null = null;
let saveTimer: NodeJS.Timeout | null = null;
let pending: EngineEvent[] = [];
let scheduled = false;
let stopping = false;
/** Expert parallelism across rank processes: the vote, the model's empty step, a stop requested. */
let lockstep: { sync: Lockstep; serveExperts: () => void; stopRequested: boolean; comm: { dispose(): void; placement: ExpertPlacement } } | null = null;
/** Structured output: made on the first request with a grammar (the vocabulary's preprocessing costs once). */
let grammarEngine: Promise<GrammarEngine> | null = null;
let modelDir = '';
/** Requests whose grammar is compiling (not yet in the core): id -> aborted while compiling. */
const compiling = new Map<string, { aborted: boolean }>();

function send(m: FromWorker): void {
  port!.postMessage(m);
}

/** The offloader's trace writer reports drops and failed writes through the daemon's log. */
const offloadHooks = { warn: (message: string) => send({ type: 'warning', message }) };

function flush(step?: StepMetrics): void {
  if (!core) return;
  if (pending.length === 0 && !step) return;
  send(makeEvents(step));
  pending = [];
}

function makeEvents(step?: StepMetrics): FromWorker {
  return { type: 'events', events: pending, stats: core!.stats(), ...(step ? { step } : {}) };
}

/** Sends a step's events and figures (or only what is pending, when the step ran nothing). */
function emitStep(res: ReturnType<EngineCore['step']>): void {
  if (res) {
    pending.push(...res.events);
    flush(res.metrics);
  } else {
    flush();
  }
}

/** A failed step fails the engine: device/kernel/collective errors are not recoverable per request. */
function failStep(e: unknown): void {
  const err = e as Error & { code?: string };
  send({ type: 'fatal', message: `engine step failed: ${err.message}`, ...(err.code ? { code: err.code } : {}) });
  stopping = true;
}

function loop(): void {
  scheduled = false;
  if (!core || stopping) return;
  let res: ReturnType<EngineCore['step']>;
  try {
    res = core.step();
    emitStep(res);
  } catch (e) {
    failStep(e);
    return;
  }
  // NOTE: a step that ran nothing (every request paused, say) would run nothing again until a
  // message changes that: generate, abort and resume kick.
  if (res && core.hasWork()) kick();
}

/**
 * The lockstep loop (distExperts): runs for the engine's whole life, voting every step; a rank with
 * no work runs an empty step whenever another rank has work, so the MoE all2alls match.
 */
function lockstepLoop(): void {
  const ls = lockstep!;
  if (!core || stopping) return;
  let outcome: Vote;
  try {
    outcome = ls.sync.vote(ls.stopRequested ? Vote.Stop : core.hasWork() ? Vote.Work : Vote.Idle);
    if (outcome === Vote.Work) {
      const res = core.hasWork() ? core.step() : null;
      if (!res) ls.serveExperts(); // T = 0 through every MoE layer
      emitStep(res);
    }
  } catch (e) {
    failStep(e);
    return;
  }
  if (outcome === Vote.Stop) {
    stopping = true;
    finishShutdown();
    return;
  }
  const delay = ls.sync.nextDelayMs(outcome);
  if (delay === 0) setImmediate(lockstepLoop);
  else setTimeout(lockstepLoop, delay);
}

function kick(): void {
  if (lockstep) return; // the lockstep loop never stops while the engine lives
  if (scheduled || stopping) return;
  scheduled = true;
  setImmediate(loop);
}

/** An expert rank failed after startup: the engine cannot step any more. */
function onRankFailure(message: string): void {
  send({ type: 'fatal', message: `expert parallelism: ${message}` });
  stopping = true;
}

/**
 * Test hook (EXPERTD_TEST_LOAD_DELAY_MS): holds this thread for that long before the load, busy
 * the way a synchronous load is (no messages are read), so a test can signal the daemon while it
 * is surely still loading.
 */
function testLoadDelay(): void {
  const ms = Number(process.env.EXPERTD_TEST_LOAD_DELAY_MS ?? 0);
  if (!(ms > 0)) return;
  const cell = new Int32Array(new SharedArrayBuffer(4));
  const end = performance.now() + ms;
  // Short waits, so that worker.terminate() (checked between them) can end the hold.
  for (let left = ms; left > 0; left = end - performance.now()) Atomics.wait(cell, 0, 0, Math.min(50, left));
}

/**
 * Loads the model (CPU or device) and answers 'ready' or 'fatal'. EXPERTD_CUDA_STANDIN (tests only)
 * names a module whose createCudaEmulator() replaces the addon's CUDA ops, so the device path of
 * the daemon runs end to end on a machine without a GPU.
 */
async function init(o: EngineOptions): Promise<void> {
  modelDir = o.modelDir;
  try {
    testLoadDelay();
    const standIn = process.env.EXPERTD_CUDA_STANDIN;
    // A stand-in's NCCL spans rank processes through the group's store (like NCCL's own bootstrap).
    const d = o.distExperts;
    const cuda = standIn
      ? (await import(pathToFileURL(path.resolve(standIn)).href) as { createCudaEmulator(opts?: object): CudaAddon })
        .createCudaEmulator(d ? { ncclStore: { host: d.host, port: d.port, timeoutMs: d.timeoutMs } } : {})
      : undefined;
    if (o.threads > 0) loadNative().setNumThreads(o.threads);
    const fast = o.computeDtype === 'bf16';
    let lastProgress = 0;
    const onProgress = (pr: LoadProgress) => {
      const now = performance.now();
      if (now - lastProgress < 100 && pr.tensorsDone < pr.tensorsTotal) return;
      lastProgress = now;
      send({ type: 'progress', ...pr });
    };
    const device = o.device ?? 'cpu';
    let loaded: LoadedModel<ForwardModel>;
    let autoKvCapBytes: number | undefined;
    if (device.startsWith('cuda')) {
      let ep: DeviceExpertComm | undefined;
      if (d) {
        // Expert parallelism across rank processes: rank 0's NCCL unique id through the store.
        const cu = cuda ?? (loadNative() as unknown as CudaAddon);
        if (!cuda) cu.cudaSetDevice(Number(device.split(':')[1] ?? 0));
        const id = await ncclIdFromStore(d, () => cu.cudaNcclUniqueId());
        // Blocks this thread until every rank joined (or --dist-timeout: E_COMM): this is the engine worker.
        ep = new DeviceExpertComm(cu, cu.cudaNcclJoin(id, d.worldSize, d.rank, d.timeoutMs), distPlacement(o, d.worldSize));
      } else if ((o.expertParallel ?? 1) > 1) {
        const ranks = startDeviceExpertRanks(o.modelDir, o.expertParallel!, cuda ?? (loadNative() as unknown as CudaAddon),
          process.env.EXPERTD_CUDA_STANDIN, undefined, placementOption(o), o.quantize ?? null);
        expertRanks = ranks;
        await ranks.ready;
        ranks.onFailure = onRankFailure;
        ep = ranks.comm;
      }
      const cudaLoaded = loadCudaModel(o.modelDir, {
        device: Number(device.split(':')[1] ?? 0), onProgress, ...(o.offload ? { loadExperts: false } : {}),
        ...(cuda ? { cuda } : {}), ...(ep ? { ep } : {}), ...(o.quantize ? { quantize: o.quantize } : {}),
      });
      loaded = cudaLoaded;
      if (d && ep) {
        const group = ep, model = cudaLoaded.model;
        lockstep = { sync: new Lockstep(group.group), serveExperts: () => model.serveExperts(), stopRequested: false, comm: group };
      }
      // Automatic KV size on the device: 90% of what the weights left free, less the expert
      // cache's slots (allocated as they first fill) and 512 MiB of activations.
      let slotBytes = 0;
      if (o.offload) {
        const off = attachDeviceOffloader(cudaLoaded, o.offload, cuda, offloadHooks);
        slotBytes = off.stats().slots * off.store.slotBytes;
        offloader = off;
      }
      const mem = (cuda ?? loadNative() as unknown as CudaAddon).cudaMemInfo();
      autoKvCapBytes = Math.max(0, mem.freeBytes * 0.9 - slotBytes - 512 * 2 ** 20);
    } else {
      let ep: Partial<ModelOptions> = {};
      let distComm: GroupExpertComm | undefined;
      if (d) {
        // Blocks this thread until every rank joined (or the timeout): this is the engine worker.
        distComm = new GroupExpertComm(loadNative().glooJoin({
          host: d.host, port: d.port, prefix: d.prefix, rank: d.rank, worldSize: d.worldSize, timeoutMs: d.timeoutMs,
        }), distPlacement(o, d.worldSize));
        const comm = distComm;
        ep = { comm, loadExpert: (_layer, e) => comm.ownsExpert(e) };
      } else if ((o.expertParallel ?? 1) > 1) {
        const ranks = startExpertRanks(o.modelDir, o.expertParallel!, fast, undefined, placementOption(o), o.quantize ?? null);
        expertRanks = ranks;
        await ranks.ready;
        ranks.onFailure = onRankFailure;
                ep = { comm: ranks.comm, loadExpert: (_layer, e) => ranks.comm.ownsExpert(e) };
      }
      const cpuLoaded = loadModel(o.modelDir, {
        fast, quantize: o.quantize ?? null, ...(o.offload ? { loadExpert: skipAllExperts } : {}), ...ep, onProgress,
      });
      loaded = cpuLoaded;
      if (o.offload) offloader = attachOffloader(cpuLoaded, { ...o.offload, quantize: o.quantize ?? null }, offloadHooks);
      if (distComm) {
        const model = cpuLoaded.model;
        lockstep = { sync: new Lockstep(distComm.group), serveExperts: () => model.serveExperts(), stopRequested: false, comm: distComm };
      }
    }
    if (o.offload?.traceDir) {
      // The trace is written as it goes (asynchronously); this persists the EAM collection.
      saveTimer = setInterval(() => {
        void offloader?.save().catch((e: Error) => send({ type: 'warning', message: `saving the EAM collection failed: ${e.message}` }));
      }, 60_000);
      saveTimer.unref();
    }
    loaded.model.setExpertKernel(o.expertKernel ?? 'auto');
    loaded.model.setPipelineChunks?.(o.pipelineChunks ?? 'auto');
    core = new EngineCore(loaded, {
      kvCacheBlocks: o.kvCacheBlocks, kvCacheGb: o.kvCacheGb, kvCacheDtype: o.kvCacheDtype ?? 'f32', blockSize: o.blockSize,
      maxNumSeqs: o.maxNumSeqs, maxNumBatchedTokens: o.maxNumBatchedTokens,
      servedModelName: o.servedModelName,
      ...(autoKvCapBytes !== undefined ? { autoKvCapBytes } : {}),
      prefixCacheKey: o.prefixCaching === false ? null : prefixCacheKey(o),
    }, offloader);
    const resident = (loaded.model as Partial<MoeModel>).residentWeightBytes;
    const mib = (b: number) => (b / 2 ** 20).toFixed(1);
    const sizeText = (b: number) => (b >= 2 ** 20 ? `${mib(b)} MiB` : `${(b / 1024).toFixed(1)} KiB`);
    const summary = `${loadSummary(loaded)}; compute ${o.computeDtype}${o.quantize ? `; quantized ${describeQuantize(o.quantize)}` : ''}` +
      (resident ? `; weights resident ${mib(resident.dense)} MiB + experts ${mib(resident.experts)} MiB` : '') + `; KV cache ${core.numBlocks} blocks x ${o.blockSize} tokens ${core.kvDtype}` +
      `, prefix caching ${core.scheduler.cache.prefixCaching ? 'on' : 'off'}` +
      (loaded.report.warnings.length ? `; ${loaded.report.warnings.length} unexpected tensor(s) ignored` : '') +
      (offloader ? `; expert cache ${offloader.stats().slots}/${offloader.stats().totalExperts} experts` +
        `${offloader.store.slotFormat ? ` (${offloader.store.slotFormat})` : ''} in slots of ${sizeText(offloader.store.slotBytes)}, ` +
        `policy ${o.offload!.policy}, EAM collection ${offloader.stats().collectionSize}` : '') +
      (lockstep && o.expertPlacement ? `; expert placement ${describePlacement(lockstep.comm.placement)}` : '') +
      (expertRanks && o.expertPlacement ? `; expert placement ${describePlacement(expertRanks.placement)}` : '');
    if (core.prefixCachingRefused) send({ type: 'warning', message: core.prefixCachingRefused });
    send({ type: 'ready', info: core.info, summary });
    if (lockstep) setImmediate(lockstepLoop);
  } catch (e) {
    const err = e as Error & { code?: string };
    send({ type: 'fatal', message: err.message, ...(err.code ? { code: err.code } : {}) });
  }
}

port.on('message', (m: ToWorker) => {
  switch (m.type) {
    case 'init':
      void init(m.options);
      break;
    case 'generate': {
      if (!core) break;
      if (m.req.grammar) {
        void addConstrained(m.req);
        break;
      }
      const ev = core.add(m.req);
      if (ev) { pending.push(ev); flush(); } else kick();
      break;
    }
    case 'abort': {
      if (!core) break;
      const c = compiling.get(m.id);
      if (c) { c.aborted = true; break; } // addConstrained answers once the compile is over
      const ev = core.abort(m.id);
      if (ev) { pending.push(ev); flush(); kick(); }
      break;
    }
    case 'pause':
      for (const id of m.ids) core?.pause(id);
      break;
    case 'resume':
      if (!core) break;
      for (const id of m.ids) core.resume(id);
      kick();
      break;
    case 'shutdown':
      // In lockstep the ranks leave together: the next vote says stop, then every rank shuts down.
      if (lockstep && !stopping && core) {
        lockstep.stopRequested = true;
        break;
      }
      finishShutdown();
      break;
  }
});

/**
 * A request with structured output: its grammar is compiled (or found in the cache) first, and only
 * then is the request admitted, so compiling never happens inside a step. NOTE: xgrammar's wasm
 * compiles synchronously on this thread, so a new schema holds the step loop for its compile time
 * (tens to hundreds of ms by vocabulary size) once; cached ones cost nothing.
 */
async function addConstrained(req: GenerateRequest): Promise<void> {
  const state = { aborted: false };
  compiling.set(req.id, state);
  let ev;
  try {
    const info = core!.info;
    grammarEngine ??= GrammarEngine.create(modelDir, info.vocabSize, info.eosTokenIds);
    grammarEngine.catch(() => { grammarEngine = null; });
    const matcher = await (await grammarEngine).matcher(req.grammar!);
    compiling.delete(req.id);
    if (state.aborted) {
      matcher.dispose();
      ev = { type: 'finished' as const, id: req.id, reason: 'abort' as const, promptTokens: req.promptTokenIds.length, completionTokens: 0 };
    } else {
      ev = core!.add(req, matcher);
    }
  } catch (e) {
    compiling.delete(req.id);
    ev = refusedEvent(req, `the grammar could not be compiled: ${(e as Error).message}`);
  }
  if (ev) { pending.push(ev); flush(); } else kick();
}

/** Flushes the trace and saves the EAM collection, stops the in-process expert ranks, leaves the Gloo group, ends the worker. */
function finishShutdown(): void {
  stopping = true;
  if (saveTimer) clearInterval(saveTimer);
  // The queued trace gets 3 s (the client terminates this worker after 5 s), then the
  // collection is saved; expert ranks leave next (they may be waiting for the next step).
  void (offloader?.close(3000) ?? Promise.resolve())
    .catch((e: Error) => send({ type: 'fatal', message: `saving the EAM collection failed: ${e.message}` }))
    .then(() => expertRanks?.stop())
    .finally(() => {
      lockstep?.comm.dispose();
      port!.close();
    });
}

/**
 * The prefix cache's chain root: the model and every engine option, so a cached block is only ever
 * named for what computed it (the cache lives as long as this engine; this guards any later sharing).
 * NOTE: an option that changes K/V contents (compute or KV dtype, device) must be in EngineOptions.
 */
function prefixCacheKey(o: EngineOptions): string {
  return JSON.stringify({ ...o, distExperts: undefined, offload: undefined });
}

/** 'rank 0 [0,2], rank 1 [1,3]': each rank's experts, for the startup summary. */
function describePlacement(p: ExpertPlacement): string {
  return p.experts.map((l, r) => `rank ${r} [${Array.from(l)}]`).join(', ');
}

/** Rank processes' placement: --expert-placement's table over the group, else contiguous slices. */
function distPlacement(o: EngineOptions, worldSize: number): ExpertPlacement {
  return o.expertPlacement ? placementFromOwners(o.expertPlacement, worldSize)
    : contiguousPlacement(parseModelConfig(o.modelDir).moe.numExperts, worldSize);
}

/** Rank 0 makes the NCCL unique id and publishes it in the group's store; the others read it there. */
async function ncclIdFromStore(d: NonNullable<EngineOptions['distExperts']>, make: () => Uint8Array): Promise<Uint8Array> {
  const store = await StoreClient.connect(d.host, d.port, d.timeoutMs);
  try {
    return await exchangeNcclId(store, d.prefix, d.rank, make, d.timeoutMs);
  } finally {
    await store.close();
  }
}

/** The in-process expert ranks' placement (--expert-placement), or undefined: contiguous slices. */
function placementOption(o: EngineOptions): ExpertPlacement | undefined {
  return o.expertPlacement ? placementFromOwners(o.expertPlacement, o.expertParallel!) : undefined;
}
