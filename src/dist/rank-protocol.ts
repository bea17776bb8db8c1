// Messages between the front (node 0's launcher, which serves HTTP) and the rank processes, over
// IPC for ranks on the front's node and through a node relay's TCP link for ranks on other nodes.
// Plain JSON data only.
import type { EngineOptions, StepMetrics } from '../engine/protocol.js';
import type { EngineEvent, EngineStats, GenerateRequest, ModelInfo } from '../engine/types.js';
import type { DistExperts } from './lockstep.js';

/** How often a rank says it is alive to the front, and the front to every rank. */
export const HEARTBEAT_INTERVAL_MS = 1000;

/** From a node's launcher to its own rank process (IPC). */
export interface RankInit {
  type: 'init';
  options: EngineOptions;
  rank: number;
  nodeRank: number;
  worldSize: number;
  /** The context length the launcher resolved (part of the identity every rank must share). */
  maxModelLen: number;
  version: string;
  /**
   * The group's store (the front's, store.ts): the rank publishes its identity there and checks
   * everyone's (rendezvous.ts), within timeoutMs (--dist-timeout).
   */
  store: { host: string; port: number; timeoutMs: number };
}

/** From the front to a rank (after rendezvous). */
/** Expert parallelism across the ranks: the Gloo group's store and prefix (rank and size are the rank's). */
export type GroupExperts = Omit<DistExperts, 'rank' | 'worldSize'>;

export type FrontToRank =
  /** Rendezvous passed: load the model (with experts: this rank's slice, then join the Gloo group). */
  | { type: 'start'; experts?: GroupExperts }
  | { type: 'generate'; req: GenerateRequest }
  | { type: 'abort'; id: string }
  /** SSE backpressure: stop / restart stepping these requests (they keep their KV). */
  | { type: 'pause' | 'resume'; ids: string[] }
  /** Drain is done on the front: close the engine and exit 0. */
  | { type: 'shutdown' }
  /** The group is over (a fault, or a refused rendezvous): print the message, exit with code. */
  | { type: 'exit'; code: number; message: string }
  /**
   * The front is alive (every HEARTBEAT_INTERVAL_MS, the first as the rank joins the group). The
   * rank exits non-zero when the front then sends nothing for timeoutMs (--heartbeat-timeout): a
   * hung front keeps the IPC channel or the relay's TCP link open, so only silence shows it.
   */
  | { type: 'heartbeat'; timeoutMs: number };

export type RankToFront =
  /** The rank process runs (its identity goes to the store, not here). */
  | { type: 'hello'; pid: number }
  | { type: 'progress'; tensorsDone: number; tensorsTotal: number; bytesDone: number; bytesTotal: number }
  | { type: 'ready'; info: ModelInfo; summary: string }
  | { type: 'events'; events: EngineEvent[]; stats: EngineStats; steps: StepMetrics[] }
  | { type: 'fatal'; message: string }
  | { type: 'heartbeat' };

/** Between a node relay (nodes 1..K-1) and the front, one JSON object per line. */
export type RelayToFront =
  | { type: 'node'; nodeRank: number; ranks: number[] }
  | { type: 'rank'; rank: number; m: RankToFront }
  | { type: 'rank-exit'; rank: number; code: number | null; signal: string | null };

export type FrontToRelay =
  | { type: 'rank'; rank: number; m: FrontToRank }
  /** The node count, node rank or rank numbers of this relay do not fit the front's group. */
  | { type: 'refused'; message: string };
