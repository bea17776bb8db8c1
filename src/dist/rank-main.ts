// A rank process: one engine (its own worker thread, weights and KV cache) driven by the front
// over IPC from its node's launcher. It exits when the launcher goes away, when the front says
// so, non-zero when its engine fails, and non-zero when the front (once heard) sends nothing for
// --heartbeat-timeout (hung); signals are the launcher's business, so it ignores them.
import { EngineClient } from '../engine/engine-client.js';
import type { StepMetrics } from '../engine/protocol.js';
import type { EngineEvent } from '../engine/types.js';
import { rankIdentity } from './identity.js';
import { publishAndCheck } from './rendezvous.js';
import { StoreClient } from './store.js';
import { HEARTBEAT_INTERVAL_MS, type FrontToRank, type GroupExperts, type RankInit, type RankToFront } from './rank-protocol.js';

if (!process.send) throw new Error('rank-main must be started by child_process.fork');

let init: RankInit | null = null;
/** Settles true once this rank found every identity in the store equal to its own (the rendezvous). */
let agreed: Promise<boolean> = Promise.resolve(false);
let engine: EngineClient | null = null;
let events: EngineEvent[] = [];
let steps: StepMetrics[] = [];
let flushQueued = false;
let closing = false;
/** performance.now() of the front's last message, and its --heartbeat-timeout (0 until its first heartbeat). */
let frontSeenMs = performance.now();
let frontTimeoutMs = 0;

function send(m: RankToFront): void {
  // A closed channel means the launcher is gone; 'disconnect' below ends this process.
  if (process.connected) process.send!(m);
}

function exit(code: number, message?: string): never {
  if (message) process.stderr.write(`expertd rank ${init?.rank ?? '?'}: ${message}\n`);
  process.exit(code);
}

function flush(): void {
  flushQueued = false;
  if (!engine || (events.length === 0 && steps.length === 0)) return;
  send({ type: 'events', events, stats: engine.stats(), steps });
  events = [];
  steps = [];
}

function queueFlush(): void {
  if (flushQueued) return;
  flushQueued = true;
  setImmediate(flush);
}

/**
 * Publishes this rank's identity to the group's store and compares every rank's with it. A
 * difference is not this rank's to report: the front reads the same identities, refuses the group
 * naming the difference and tells every rank to exit; this rank only never starts.
 */
async function rendezvous(i: RankInit): Promise<boolean> {
  let store: StoreClient | null = null;
  try {
    let identity;
    try {
      identity = rankIdentity(i.options, i.maxModelLen, i.rank, i.nodeRank, i.version);
    } catch (e) {
      send({ type: 'fatal', message: `cannot read the model's identity: ${(e as Error).message}` });
      return false;
    }
    const deadline = performance.now() + i.store.timeoutMs;
    store = await StoreClient.connect(i.store.host, i.store.port, i.store.timeoutMs);
    const { refused } = await publishAndCheck(store, identity, i.worldSize, deadline);
    if (refused) process.stderr.write(`expertd rank ${i.rank}: rendezvous refused: ${refused}\n`);
    return refused === null;
  } catch (e) {
    send({ type: 'fatal', message: `rendezvous failed: ${(e as Error).message}` });
    return false;
  } finally {
    await store?.close();
  }
}

function start(i: RankInit, experts: GroupExperts | undefined): void {
  const options = experts ? { ...i.options, distExperts: { ...experts, rank: i.rank, worldSize: i.worldSize } } : i.options;
  const e = new EngineClient(options);
  engine = e;
  e.on('progress', (p: Extract<RankToFront, { type: 'progress' }>) => send({ ...p, type: 'progress' }));
  e.on('step', (s: StepMetrics) => { steps.push(s); queueFlush(); });
  e.on('failed', (message: string) => { flush(); send({ type: 'fatal', message }); });
  e.ready.then((info) => send({ type: 'ready', info, summary: e.summary }),
    (err: Error) => send({ type: 'fatal', message: `model load failed: ${err.message}` }));
}

process.on('message', (raw: RankInit | FrontToRank) => {
  frontSeenMs = performance.now(); // any message from the front counts as a heartbeat
  switch (raw.type) {
    case 'init':
      init = raw;
      send({ type: 'hello', pid: process.pid });
      agreed = rendezvous(raw);
      break;
    case 'start': {
      // The front's go, after its own check of the same identities; this rank's check must agree.
      const experts = raw.experts;
      void agreed.then((ok) => { if (ok && init && !engine && !closing) start(init, experts); });
      break;
    }
    case 'generate':
      engine?.generate(raw.req, (ev) => { events.push(ev); queueFlush(); });
      break;
    case 'abort':
      engine?.abort(raw.id);
      break;
    case 'pause':
      engine?.pause(raw.ids);
      break;
    case 'resume':
      engine?.resume(raw.ids);
      break;
    case 'shutdown':
      if (closing) break;
      closing = true;
      flush();
      void (engine?.close() ?? Promise.resolve()).then(() => exit(0), (e: Error) => exit(1, `engine close failed: ${e.message}`));
      break;
    case 'exit':
      exit(raw.code, raw.message);
      break;
    case 'heartbeat':
      frontTimeoutMs = raw.timeoutMs;
  }
});

// The launcher died (or closed the channel): nothing can reach this rank any more.
process.on('disconnect', () => { if (!closing) exit(1, 'lost the launcher (IPC channel closed); exiting'); else exit(0); });
process.on('SIGTERM', () => undefined);
process.on('SIGINT', () => undefined);
setInterval(() => send({ type: 'heartbeat' }), HEARTBEAT_INTERVAL_MS).unref();
// A hung front (stopped, deadlocked, its node cut off behind a live relay) is silent: end this rank.
// Shutting down, the rank exits on its own once its engine has closed.
setInterval(() => {
  if (closing || frontTimeoutMs === 0) return;
  const silentMs = performance.now() - frontSeenMs;
  if (silentMs > frontTimeoutMs) exit(1, `the front sent nothing for ${(frontTimeoutMs / 1000).toFixed(1)} s (hung or unreachable); exiting`);
}, 250).unref();
