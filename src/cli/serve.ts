// `expertd serve`: load the model in the engine worker, then serve the OpenAI-compatible API.
// SIGTERM/SIGINT drain in-flight requests up to --shutdown-timeout and exit 0; during the model
// load they stop the load and exit 0. With rank processes this process is the front (src/dist/).
import { pino } from 'pino';

import { startFront, type Front } from '../dist/launcher.js';
import type { GroupExperts } from '../dist/rank-protocol.js';
import type { EngineOptions } from '../engine/protocol.js';
import { runRelay } from '../dist/relay.js';
import { resolveTopology, TopologyError, type Topology } from '../dist/topology.js';
import { EngineClient } from '../engine/engine-client.js';
import { createMetrics, type Metrics } from '../metrics/registry.js';
import { ModelTokenizer } from '../model/tokenizer.js';
import { loadNative } from '../native/index.js';
import { createServer, type ServerOptions, type TextCodec } from '../server/index.js';
import { DEFAULT_MAX_QUEUED_SEQUENCES } from '../server/request-params.js';
import { modelFlags } from './engine-flags.js';
import { showLoadProgress } from './progress.js';
import { formatHelp, parseFlags, UsageError, type FlagSpec, type ParsedFlags } from './options.js';
import { resolveEngineOptions } from './resolve.js';
import { packageVersion } from '../server/version.js';
import { offloadFlags } from './trace.js';
import { detectReasoningParser, type ReasoningParserName } from '../server/reasoning.js';
import { detectToolCallParser, TOOL_CALL_PARSERS, type ToolCallParserName } from '../server/tool-calls.js';

export const serveFlags: FlagSpec[] = [
  ...modelFlags,
  ...offloadFlags,
  { name: 'host', type: 'string', default: '127.0.0.1', help: 'Address to listen on' },
  { name: 'port', type: 'int', min: 0, max: 65535, default: 8000, help: 'Port to listen on (0 = any free port)' },
  { name: 'api-key', type: 'string', arg: 'KEY', help: 'Require "Authorization: Bearer KEY" on every route except /health and /metrics' },
  { name: 'served-model-name', type: 'string', arg: 'NAME', help: 'Model name in the API (default: the folder name, or expertd-demo)' },
  { name: 'max-queued-sequences', type: 'int', min: 1, arg: 'N', help: 'Sequences (prompts x n of every request) that may wait for a running slot; a request whose sequences do not fit in the room left gets 429 with Retry-After, one with more than N gets 400 [default: 256]' },
  { name: 'max-queued-requests', type: 'int', min: 1, arg: 'N', help: 'Old name of --max-queued-sequences (it counts sequences, not requests)' },
  { name: 'max-prompts-per-request', type: 'int', min: 1, max: 65536, default: 128, help: 'Prompts in one /v1/completions request at most (more: 400)' },
  { name: 'max-sequences-per-request', type: 'int', min: 1, max: 65536, default: 256, help: 'Sequences (prompts x n) of one request at most (more: 400); n itself is at most 128' },
  { name: 'stream-stall-timeout', type: 'number', min: 0.1, default: 120, arg: 'SECONDS', help: 'A stream whose client stops reading pauses its sequences (KV kept, not stepped); still unread after this long, it is aborted, its KV freed' },
  { name: 'shutdown-timeout', type: 'number', min: 0, default: 30, arg: 'SECONDS', help: 'On SIGTERM/SIGINT, how long in-flight requests may finish' },
  { name: 'nproc-per-node', type: 'int', min: 1, max: 1024, default: 1, arg: 'N',
    help: 'Data-parallel rank processes on this node, each with the whole model and its own KV cache (with --device cuda rank r on cuda:r); this process serves HTTP and spreads requests over them by load (1 = one engine in this process)' },
  { name: 'nnodes', type: 'int', min: 1, max: 4096, arg: 'K', help: 'Nodes in the group: run the same command on every node (default 1; else WORLD_SIZE/nproc-per-node or LWS_GROUP_SIZE)' },
  { name: 'node-rank', type: 'int', min: 0, max: 4095, arg: 'R', help: 'This node\'s index; node 0 serves HTTP (default 0; else RANK/nproc-per-node or LWS_WORKER_INDEX)' },
  { name: 'dist-init-addr', type: 'string', arg: 'HOST:PORT', help: 'Node 0\'s address for the rank rendezvous and channels, the same on every node (else MASTER_ADDR:MASTER_PORT or LWS_LEADER_ADDRESS:29500)' },
  { name: 'dist-moe', type: 'string', arg: 'MODE', choices: ['auto', 'expert', 'replicated'], default: 'auto',
    help: 'MoE layers across the rank processes: expert = each rank holds a slice of the routed experts (--expert-placement), tokens travel by all2all (Gloo on CPU ranks, NCCL on devices) and the ranks step in lockstep; replicated = every rank holds every expert (auto = expert on CPU ranks where the addon has Gloo and neither --expert-parallel nor offloading is on; on devices auto is replicated until the NCCL path has run on GPUs, --dist-moe expert opts in)' },
  { name: 'dist-timeout', type: 'number', min: 1, default: 300, arg: 'SECONDS', help: 'How long every rank has to join the rendezvous (with --dist-moe expert also the bound on the Gloo or NCCL join and each all2all)' },
  { name: 'heartbeat-timeout', type: 'number', min: 0.5, default: 10, arg: 'SECONDS', help: 'A rank silent this long (dead, hung or cut off) ends the group: 503s, every process exits non-zero; ranks whose front is silent this long exit non-zero' },
  { name: 'reasoning-parser', type: 'string', arg: 'NAME', choices: ['auto', 'none', 'think', 'gpt_oss'], default: 'auto',
    help: 'Chat completions split reasoning into message.reasoning_content: think = <think>...</think> (Qwen3, DeepSeek-R1, GLM-4.5), gpt_oss = harmony analysis channel (auto = from the chat template\'s markers; none = all text is content)' },
  { name: 'tool-call-parser', type: 'string', arg: 'NAME', choices: ['auto', 'none', ...TOOL_CALL_PARSERS], default: 'auto',
    help: 'How the model writes tool calls, parsed into message.tool_calls: hermes (Qwen3 <tool_call>), deepseek_v3, glm45, minimax_m2, gpt_oss, mistral (auto = from the chat template\'s markers)' },
  { name: 'log-level', type: 'string', default: 'info', choices: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], help: 'pino log level' },
  { name: 'log-prompts', type: 'boolean', default: false, help: 'Include prompt text in request log lines (off: prompts are user data)' },
];

export const serveHelp = formatHelp('expertd serve [--model DIR] [options]',
  'Serves a Mixture-of-Experts model over an OpenAI-compatible HTTP API (POST /v1/completions, ' +
  '/v1/chat/completions; GET /v1/models, /health, /metrics, /version, /tokenizer_info; POST /tokenize, /detokenize).\n' +
  'Without --model it serves the built-in demo model (random weights: gibberish text, real API).', serveFlags);

/** --reasoning-parser and --tool-call-parser, auto resolved from the chat template (and model type). */
export function chatParsers(flags: ParsedFlags, tok: ModelTokenizer, modelType: string): Pick<ServerOptions, 'reasoningParser' | 'toolCallParser'> {
  const r = String(flags['reasoning-parser'] ?? 'auto');
  const t = String(flags['tool-call-parser'] ?? 'auto');
  return {
    reasoningParser: r === 'auto' ? detectReasoningParser(tok.chatTemplate, modelType) : r === 'none' ? null : r as ReasoningParserName,
    toolCallParser: t === 'auto' ? detectToolCallParser(tok.chatTemplate, modelType) : t === 'none' ? null : t as ToolCallParserName,
  };
}

/** ModelTokenizer as the server's TextCodec. */
export function codecFor(tok: ModelTokenizer): TextCodec {
  return {
    encode: (text, add) => tok.encode(text, add),
    decode: (ids, skip) => tok.decode(ids, skip),
    applyChatTemplate: (messages, addGenerationPrompt, extra) => tok.applyChatTemplate(messages, { addGenerationPrompt, ...(extra ? { extra } : {}) }),
    createDetokenizer: (promptIds, skip) => {
      const d = tok.detokenizer(promptIds, skip);
      return { push: (id) => d.push(id), flush: () => d.flush() };
    },
    eosTokenIds: tok.eosTokenIds,
    tokenizerInfo: () => tok.info(),
  };
}

/** The request and queue limits of the serve flags (--max-queued-requests is the old name of --max-queued-sequences). */
export function serverLimits(flags: ParsedFlags): Pick<ServerOptions, 'maxQueuedSequences' | 'maxPromptsPerRequest' | 'maxSequencesPerRequest'> {
  return {
    maxQueuedSequences: Number(flags['max-queued-sequences'] ?? flags['max-queued-requests'] ?? DEFAULT_MAX_QUEUED_SEQUENCES),
    maxPromptsPerRequest: Number(flags['max-prompts-per-request']),
    maxSequencesPerRequest: Number(flags['max-sequences-per-request']),
  };
}

/** Feeds the engine's per-step and per-sequence figures into the metrics registry. */
export function wireEngineMetrics(engine: Pick<import('node:events').EventEmitter, 'on'>, metrics: Metrics): void {
  engine.on('step', (s: import('../engine/protocol.js').StepMetrics) => {
    if (s.trace) metrics.recordTrace(s.trace);
    if (s.expertCache) {
      metrics.recordExpertCache(s.expertCache.delta);
      metrics.setExpertCacheOccupancy(s.expertCache.occupancy);
      metrics.setExpertCacheLayerHitRatio(s.expertCache.layerHitRate);
    }
    metrics.recordIterationTokens(s.prefillTokens + s.decodeTokens);
    if (s.prefixCache) metrics.recordPrefixCache(s.prefixCache.queriedTokens, s.prefixCache.hitTokens);
    for (const q of s.queueTimesMs ?? []) metrics.recordQueueTime(q / 1000);
    const sec = s.durationMs / 1000;
    if (s.prefillTokens > 0) metrics.recordPrefillStep(sec);
    else metrics.recordDecodeStep(sec);
    s.expertTokens?.forEach((counts, layer) => metrics.recordExpertTokens(layer, counts));
    for (const [kernel, layers] of Object.entries(s.kernelChoices ?? {})) metrics.recordKernelChoice(kernel, layers);
    if (s.all2all) {
      metrics.recordAll2all(s.all2all.bytes, s.all2all.seconds);
      if (s.all2all.overlap !== null) metrics.setCommOverlap(s.all2all.overlap);
    }
    if (s.layerPlans) metrics.setLayerPlans(s.layerPlans, s.all2all?.hidden);
  });
  // Per sequence, once, when it ends (stop, length, or an abort after its first token).
  engine.on('finished', (ev: Extract<import('../engine/types.js').EngineEvent, { type: 'finished' }>) => {
    if (ev.prefillMs !== undefined && ev.decodeMs !== undefined) metrics.recordRequestPhases(ev.prefillMs / 1000, ev.decodeMs / 1000);
  });
}

/**
 * The first SIGTERM or SIGINT, from the moment this is called. Once-only handlers, as before: a
 * second signal of the same kind takes Node's default (immediate exit), the escape hatch when a
 * drain hangs.
 */
function firstStopSignal(): Promise<'SIGTERM' | 'SIGINT'> {
  return new Promise((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
}

/** After a group fault, how long the front keeps answering 503 before it exits non-zero. */
const FAULT_LINGER_MS = 3000;

function topologyFrom(flags: import('./options.js').ParsedFlags): Topology {
  const opt = (name: string) => flags[name] as number | string | undefined;
  try {
    return resolveTopology({
      nprocPerNode: opt('nproc-per-node') as number | undefined, nnodes: opt('nnodes') as number | undefined,
      nodeRank: opt('node-rank') as number | undefined, distInitAddr: opt('dist-init-addr') as string | undefined,
    });
  } catch (e) {
    if (e instanceof TopologyError) throw new UsageError(e.message);
    throw e;
  }
}

/**
 * --dist-moe: with 'expert' the ranks' MoE group (Gloo on CPU ranks, NCCL on devices) rendezvous in
 * the front's store under the group's prefix. Device ranks need NCCL in the addon (or the test
 * stand-in); CPU ranks need Gloo.
 */
function expertMode(mode: string, opts: EngineOptions, caps: { gloo: boolean; ncclFound: boolean }): boolean {
  const cpu = (opts.device ?? 'cpu') === 'cpu';
  const why = cpu && !caps.gloo ? 'this addon was built without Gloo (install libgloo-dev and rebuild)'
    : !cpu && !caps.ncclFound && !process.env.EXPERTD_CUDA_STANDIN ? 'NCCL was not found (install NCCL or set EXPERTD_NCCL_SO)'
      : (opts.expertParallel ?? 1) > 1 ? 'it cannot be combined with --expert-parallel (in-process expert ranks)'
        : opts.offload ? 'it cannot be combined with expert offloading yet' : null;
  // NOTE: auto stays replicated on devices until expert parallelism across GPU rank processes has
  // run on GPUs (it is tested on the emulator only); --dist-moe expert opts in.
  const autoWhy = why ?? (!cpu ? 'device rank processes use it only when asked (--dist-moe expert; not yet validated on GPUs)' : null);
  if (mode === 'replicated' || (mode === 'auto' && autoWhy)) {
    if (opts.expertPlacement) throw new UsageError(`--expert-placement with rank processes needs --dist-moe expert${autoWhy ? ` (${why ? 'not possible here: ' : ''}${autoWhy})` : ''}`);
    return false;
  }
  if (why) throw new UsageError(`--dist-moe expert: ${why}`);
  return true;
}

/** The MoE group of the ranks (expertMode): its store is the front's, its keys under the group's prefix. */
function groupExperts(front: Front, timeoutMs: number): GroupExperts {
  return { host: front.storeHost, port: front.store.port, prefix: `${front.prefix}/moe`, timeoutMs };
}

export async function serveCommand(argv: string[]): Promise<number> {
  const { flags } = parseFlags(serveFlags, argv);
  // NOTE: before the model load starts: a signal during the load must stop it and exit 0, not kill
  // the process with the default signal exit.
  const stopSignal = firstStopSignal();
  const logger = pino({ level: String(flags['log-level']) });
  const topology = topologyFrom(flags);
  const opts = resolveEngineOptions(flags, flags['served-model-name'] as string | undefined, topology.worldSize);
  if (opts.isDemo) logger.warn({ model: opts.modelDir }, 'no --model given: serving the built-in demo model (random weights, gibberish text)');
  const caps = loadNative().capabilities();
  logger.info({ capabilities: caps, config: { ...opts, apiKey: flags['api-key'] ? '(set)' : '(none)' },
    ...(topology.worldSize > 1 ? { topology } : {}) }, 'starting');
  if (topology.worldSize > 1 && (opts.device ?? 'cpu').startsWith('cuda')) {
    // Rank l of this node on cuda:(offset + l): that many devices must be visible (a test stand-in is one per rank).
    const need = topology.deviceOffset + topology.nprocPerNode;
    const visible = process.env.EXPERTD_CUDA_STANDIN ? need : caps.cudaDevices;
    if (visible < need) throw new UsageError(`--nproc-per-node ${topology.nprocPerNode} on devices puts local rank l on cuda:${topology.deviceOffset ? `${topology.deviceOffset}+l` : 'l'}: needs ${need} CUDA devices, ${visible} visible`);
    if ((opts.expertParallel ?? 1) > 1) throw new UsageError('--expert-parallel on devices (ranks on cuda:0..N-1 of one process) cannot be combined with rank processes; use one or the other');
  }
  const distTimeoutMs = Number(flags['dist-timeout']) * 1000;
  const launch = { engine: opts, topology, maxModelLen: opts.info.maxContext, version: packageVersion(),
    hardwareThreads: caps.hardwareThreads, distTimeoutMs };
  if (topology.nodeRank > 0) return runRelay(launch, distTimeoutMs, logger);
  const tok = ModelTokenizer.load(opts.modelDir);
  const expert = topology.worldSize > 1 && expertMode(String(flags['dist-moe']), opts, caps);
  const front = topology.worldSize > 1
    ? await startFront(launch, { rendezvousTimeoutMs: distTimeoutMs,
      heartbeatTimeoutMs: Number(flags['heartbeat-timeout']) * 1000 }, opts.info)
    : null;
  const experts = front && expert ? groupExperts(front, distTimeoutMs) : null;
  if (front) logger.info({ distMoe: experts ? 'expert' : 'replicated', store: `${front.storeHost}:${front.store.port}` }, experts
    ? `MoE layers expert-parallel over ${topology.worldSize} ranks (${(opts.device ?? 'cpu') === 'cpu' ? 'Gloo' : 'NCCL'}, store ${experts.host}:${experts.port})`
    : `MoE layers replicated on ${topology.worldSize} ranks`);
  const engine = front ? front.group : new EngineClient(opts, opts.info);
  showLoadProgress(engine);
  const metrics = createMetrics();
  wireEngineMetrics(engine, metrics);
  if (front) {
    metrics.bindRankStats(() => front.group.rankStats());
    front.group.on('dispatch', (rank: number) => metrics.recordRankRequest(rank));
  }
  // Listen at once: /health answers 503 and generation routes 503 (model_loading) until the
  // weights are in; the config gave everything else the API needs.
  const server = createServer({
    engine, codec: codecFor(tok), servedModelName: opts.servedModelName,
    apiKey: flags['api-key'] as string | undefined, ...serverLimits(flags),
    streamStallTimeoutMs: Number(flags['stream-stall-timeout']) * 1000,
    maxModelLen: opts.info.maxContext, logger, metrics, logPrompts: Boolean(flags['log-prompts']),
    ...chatParsers(flags, tok, opts.info.architecture),
  });
  engine.on('failed', (msg: string) => logger.error({ error: msg }, 'engine failed: /health now answers 503'));
  engine.on('warning', (msg: string) => logger.warn(msg));
  const address = await server.listen({ host: String(flags['host']), port: Number(flags['port']) });
  logger.info({ address, model: opts.servedModelName }, `expertd listening on ${address} (loading the model)`);
  // A lost rank ends the group at any time; listened for from the start.
  const groupFailed = front ? new Promise<'fault'>((r) => front.group.once('failed', () => r('fault'))) : new Promise<never>(() => undefined);
  const started = (async () => {
    if (front) {
      await front.group.rendezvous({ client: front.client, prefix: front.prefix }, experts ?? undefined);
      logger.info({ worldSize: topology.worldSize, nnodes: topology.nnodes, ranks: front.group.ranks.map((e) => ({ rank: e!.rank, pid: e!.pid, node: e!.link.nodeRank })) }, 'rendezvous: every rank loads the same model with the same flags');
    }
    await engine.ready;
    return 'ready' as const;
  })();
  started.catch(() => undefined);
  let loaded: 'ready' | 'SIGTERM' | 'SIGINT';
  try {
    loaded = await Promise.race([started, stopSignal]);
  } catch (e) {
    logger.error({ error: (e as Error).message }, front ? 'group start failed' : 'model load failed');
    await server.close();
    if (front) {
      await front.group.waitAllGone(5000);
      await front.close();
    } else {
      await engine.close();
    }
    throw e;
  }
  const closeEngine = async () => {
    await engine.close();
    await front?.close();
  };
  if (loaded !== 'ready') {
    // Nothing is in flight yet (generation routes answered 503): end the load, close, exit 0.
    logger.info({ signal: loaded }, `${loaded} while the model was loading: load stopped, exiting`);
    await server.close();
    await closeEngine();
    logger.info('stopped');
    return 0;
  }
  logger.info(engine.summary);
  logger.info({ address }, `expertd ready on ${address}`);
  const ended = await Promise.race([stopSignal, groupFailed]);
  if (ended === 'fault') {
    // A rank lost ends the group: 503s for a moment, every rank gone, then a non-zero exit so that
    // the launcher, Kubernetes or LeaderWorkerSet restarts the group whole.
    await front!.group.waitAllGone(5000);
    await new Promise((r) => setTimeout(r, FAULT_LINGER_MS));
    await server.drain(0).catch(() => undefined);
    await front!.close();
    return 1;
  }
  logger.info({ signal: ended }, 'draining');
  engine.setDraining();
  try {
    await server.drain(Number(flags['shutdown-timeout']) * 1000);
    await closeEngine();
  } catch (e) {
    logger.error({ error: (e as Error).message }, 'shutdown failed');
    return 1;
  }
  logger.info('stopped');
  return 0;
}
