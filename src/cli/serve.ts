// `expertd serve`: load the model in the engine worker, then serve the OpenAI-compatible API.
// SIGTERM/SIGINT drain in-flight requests up to --shutdown-timeout and exit 0; during the model
// load they stop the load and exit 0.
import { pino } from 'pino';

import { EngineClient } from '../engine/engine-client.js';
import { createMetrics, type Metrics } from '../metrics/registry.js';
import { ModelTokenizer } from '../model/tokenizer.js';
import { loadNative } from '../native/index.js';
import { createServer, type ServerOptions, type TextCodec } from '../server/index.js';
import { DEFAULT_MAX_QUEUED_SEQUENCES } from '../server/request-params.js';
import { modelFlags } from './engine-flags.js';
import { showLoadProgress } from './progress.js';
import { formatHelp, parseFlags, type FlagSpec, type ParsedFlags } from './options.js';
import { resolveEngineOptions } from './resolve.js';
import { offloadFlags } from './trace.js';

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
  { name: 'log-level', type: 'string', default: 'info', choices: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], help: 'pino log level' },
  { name: 'log-prompts', type: 'boolean', default: false, help: 'Include prompt text in request log lines (off: prompts are user data)' },
];

export const serveHelp = formatHelp('expertd serve [--model DIR] [options]',
  'Serves a Mixture-of-Experts model over an OpenAI-compatible HTTP API (POST /v1/completions, ' +
  '/v1/chat/completions; GET /v1/models, /health, /metrics, /version; POST /tokenize, /detokenize).\n' +
  'Without --model it serves the built-in demo model (random weights: gibberish text, real API).', serveFlags);

/** ModelTokenizer as the server's TextCodec. */
export function codecFor(tok: ModelTokenizer): TextCodec {
  return {
    encode: (text, add) => tok.encode(text, add),
    decode: (ids, skip) => tok.decode(ids, skip),
    applyChatTemplate: (messages, addGenerationPrompt) => tok.applyChatTemplate(messages, { addGenerationPrompt }),
    createDetokenizer: (promptIds, skip) => {
      const d = tok.detokenizer(promptIds, skip);
      return { push: (id) => d.push(id), flush: () => d.flush() };
    },
    eosTokenIds: tok.eosTokenIds,
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
export function wireEngineMetrics(engine: EngineClient, metrics: Metrics): void {
  engine.on('step', (s: import('../engine/protocol.js').StepMetrics) => {
    if (s.trace) metrics.recordTrace(s.trace);
    if (s.expertCache) {
      metrics.recordExpertCache(s.expertCache.delta);
      metrics.setExpertCacheOccupancy(s.expertCache.occupancy);
      metrics.setExpertCacheLayerHitRatio(s.expertCache.layerHitRate);
    }
    metrics.recordIterationTokens(s.prefillTokens + s.decodeTokens);
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

export async function serveCommand(argv: string[]): Promise<number> {
  const { flags } = parseFlags(serveFlags, argv);
  // NOTE: before the model load starts: a signal during the load must stop it and exit 0, not kill
  // the process with the default signal exit.
  const stopSignal = firstStopSignal();
  const logger = pino({ level: String(flags['log-level']) });
  const opts = resolveEngineOptions(flags, flags['served-model-name'] as string | undefined);
  if (opts.isDemo) logger.warn({ model: opts.modelDir }, 'no --model given: serving the built-in demo model (random weights, gibberish text)');
  logger.info({ capabilities: loadNative().capabilities(), config: { ...opts, apiKey: flags['api-key'] ? '(set)' : '(none)' } }, 'starting');
  const tok = ModelTokenizer.load(opts.modelDir);
  const engine = new EngineClient(opts, opts.info);
  showLoadProgress(engine);
  const metrics = createMetrics();
  wireEngineMetrics(engine, metrics);
  // Listen at once: /health answers 503 and generation routes 503 (model_loading) until the
  // weights are in; the config gave everything else the API needs.
  const server = createServer({
    engine, codec: codecFor(tok), servedModelName: opts.servedModelName,
    apiKey: flags['api-key'] as string | undefined, ...serverLimits(flags),
    streamStallTimeoutMs: Number(flags['stream-stall-timeout']) * 1000,
    maxModelLen: opts.info.maxContext, logger, metrics, logPrompts: Boolean(flags['log-prompts']),
  });
  engine.on('failed', (msg: string) => logger.error({ error: msg }, 'engine failed: /health now answers 503'));
  engine.on('warning', (msg: string) => logger.warn(msg));
  const address = await server.listen({ host: String(flags['host']), port: Number(flags['port']) });
  logger.info({ address, model: opts.servedModelName }, `expertd listening on ${address} (loading the model)`);
  let loaded: 'ready' | 'SIGTERM' | 'SIGINT';
  try {
    loaded = await Promise.race([engine.ready.then(() => 'ready' as const), stopSignal]);
  } catch (e) {
    logger.error({ error: (e as Error).message }, 'model load failed');
    await server.close();
    await engine.close();
    throw e;
  }
  if (loaded !== 'ready') {
    // Nothing is in flight yet (generation routes answered 503): end the load, close, exit 0.
    logger.info({ signal: loaded }, `${loaded} while the model was loading: load stopped, exiting`);
    await server.close();
    await engine.close();
    logger.info('stopped');
    return 0;
  }
  logger.info(engine.summary);
  logger.info({ address }, `expertd ready on ${address}`);
  const signal = await stopSignal;
  logger.info({ signal }, 'draining');
  engine.setDraining();
  try {
    await server.drain(Number(flags['shutdown-timeout']) * 1000);
    await engine.close();
  } catch (e) {
    logger.error({ error: (e as Error).message }, 'shutdown failed');
    return 1;
  }
  logger.info('stopped');
  return 0;
}
