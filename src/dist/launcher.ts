// Starts a node's rank processes (child_process.fork of rank-main.js) and, on node 0, the front's
// group over them and over the ranks that other nodes' relays bring in over TCP, and the group's
// store (the rendezvous, the Gloo rendezvous and the NCCL unique id: rendezvous.ts).
import { fork, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import net from 'node:net';

import type { EngineOptions } from '../engine/protocol.js';
import type { ModelInfo } from '../engine/types.js';
import { JsonLines } from './json-lines.js';
import { ChildRankLink, RelayedRankLink } from './rank-link.js';
import { RankGroup, type RankGroupOptions } from './rank-group.js';
import type { FrontToRelay, RankInit, RelayToFront } from './rank-protocol.js';
import { RemoteEngine } from './remote-engine.js';
import { GROUP_KEY } from './rendezvous.js';
import { StoreClient, StoreServer } from './store.js';
import type { Topology } from './topology.js';

export interface LaunchOptions {
  engine: EngineOptions;
  topology: Topology;
  maxModelLen: number;
  version: string;
  /** Cores this node's kernels may use in all (the rank count splits them). */
  hardwareThreads: number;
  /** --dist-timeout: the bound on the rendezvous (and on every store wait of a rank). */
  distTimeoutMs: number;
}

const isLoopback = (host: string) => /^(127\.|localhost$|::1$)/.test(host);

/**
 * Where the ranks reach the group's store: on one node 127.0.0.1 (any free port, given to the
 * ranks), on several node 0's address at the rendezvous port + 1.
 */
export function storeAddress(t: Topology, port?: number): { host: string; port: number } {
  return t.nnodes > 1 ? { host: t.initHost!, port: t.initPort! + 1 } : { host: '127.0.0.1', port: port ?? 0 };
}

/** This node's ranks: rank = nodeRank * nprocPerNode + local index. */
export function localRanks(t: Topology): number[] {
  return Array.from({ length: t.nprocPerNode }, (_, l) => t.nodeRank * t.nprocPerNode + l);
}

/**
 * A rank's own engine options: cuda ranks on cuda:(deviceOffset + local index); CPU ranks share
 * the cores (--threads 0 = this node's cores split evenly, at least one each).
 */
export function rankEngineOptions(o: EngineOptions, t: Topology, local: number, hardwareThreads: number): EngineOptions {
  const device = (o.device ?? 'cpu').startsWith('cuda') ? `cuda:${t.deviceOffset + local}` : 'cpu';
  const threads = o.threads > 0 ? o.threads : Math.max(1, Math.floor(hardwareThreads / t.nprocPerNode));
  return { ...o, device, threads };
}

/**
 * Forks this node's rank processes and sends each its init (with the group's store at `store`);
 * their stdout/stderr are this process's.
 */
export function forkRanks(l: LaunchOptions, store: { host: string; port: number }): ChildProcess[] {
  const t = l.topology;
  return localRanks(t).map((rank, local) => {
    const child = fork(new URL('./rank-main.js', import.meta.url), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const init: RankInit = {
      type: 'init', options: rankEngineOptions(l.engine, t, local, l.hardwareThreads), rank, nodeRank: t.nodeRank,
      worldSize: t.worldSize, maxModelLen: l.maxModelLen, version: l.version,
      store: { ...store, timeoutMs: l.distTimeoutMs },
    };
    child.send(init);
    return child;
  });
}

export interface Front {
  group: RankGroup;
  /** The group's store (its server), where the ranks reach it, and the group's key prefix (a UUID per start). */
  store: StoreServer;
  storeHost: string;
  prefix: string;
  /** The front's own client of the store (the rendezvous reads every rank's identity through it). */
  client: StoreClient;
  /** Closes the node listener (if any) and the store; the ranks are the group's to end. */
  close(): Promise<void>;
}

/**
 * Node 0: the group over this node's forked ranks, and (nnodes > 1) a TCP listener on the
 * rendezvous port where the other nodes' relays bring their ranks.
 */
export async function startFront(l: LaunchOptions, groupOptions: Omit<RankGroupOptions, 'worldSize'>, provisional?: ModelInfo): Promise<Front> {
  const t = l.topology;
  const group = new RankGroup({ ...groupOptions, worldSize: t.worldSize }, provisional);
  // Bound to node 0's address when it is a loopback one (one-machine groups, tests), else every
  // interface (a name like a Kubernetes service need not be an address of this host).
  const at = storeAddress(t);
  const bindHost = t.nnodes > 1 && !isLoopback(at.host) ? '0.0.0.0' : at.host;
  let store: StoreServer;
  try {
    store = await StoreServer.listen(bindHost, at.port);
  } catch (e) {
    throw new Error(`cannot serve the group's store on ${bindHost}:${at.port}: ${(e as Error).message}`);
  }
  const prefix = `expertd-${randomUUID()}`;
  const client = await StoreClient.connect(bindHost === '0.0.0.0' ? '127.0.0.1' : bindHost, store.port, l.distTimeoutMs);
  await client.set(GROUP_KEY, prefix);
  let server: net.Server | undefined;
  if (t.nnodes > 1) {
    server = net.createServer((socket) => acceptNode(group, t, socket));
    try {
      await new Promise<void>((resolve, reject) => {
        server!.once('error', (e: Error) => reject(new Error(`cannot listen for the other nodes on ${t.initHost}:${t.initPort}: ${e.message}`)));
        const host = isLoopback(t.initHost ?? '') ? t.initHost : undefined;
        server!.listen({ port: t.initPort, ...(host ? { host } : {}) }, () => resolve());
      });
    } catch (e) {
      await client.close();
      await store.close();
      throw e;
    }
  }
  const ranksAt = storeAddress(t, store.port);
  forkRanks(l, ranksAt).forEach((child, local) => group.add(new RemoteEngine(new ChildRankLink(t.nodeRank * t.nprocPerNode + local, 0, child))));
  return {
    group, store, storeHost: ranksAt.host, prefix, client,
    close: async () => {
      server?.close();
      await client.close();
      await store.close();
    },
  };
}

function acceptNode(group: RankGroup, t: Topology, socket: net.Socket): void {
  const lines = new JsonLines<RelayToFront>(socket);
  const links = new Map<number, RelayedRankLink>();
  const send = (m: FrontToRelay) => lines.write(m);
  let where = `${socket.remoteAddress}:${socket.remotePort}`;
  lines.on('message', (m: RelayToFront) => {
    if (m.type === 'node') {
      const want = Array.from({ length: t.nprocPerNode }, (_, i) => m.nodeRank * t.nprocPerNode + i);
      const taken = want.some((r) => group.ranks[r]);
      const bad = m.nodeRank < 1 || m.nodeRank >= t.nnodes ? `node rank ${m.nodeRank} is not in 1..${t.nnodes - 1} (--nnodes ${t.nnodes} on node 0)`
        : JSON.stringify(m.ranks) !== JSON.stringify(want) ? `node ${m.nodeRank} brings ranks ${m.ranks.join(',')}, node 0 expects ${want.join(',')} (is --nproc-per-node ${t.nprocPerNode} on every node?)`
          : taken ? `node ${m.nodeRank} joined twice` : null;
      if (bad) {
        send({ type: 'refused', message: bad });
        socket.end();
        group.fault(`rendezvous refused: ${bad}`);
        return;
      }
      where = `node ${m.nodeRank}`;
      for (const r of m.ranks) {
        const link = new RelayedRankLink(r, m.nodeRank, (fm) => send({ type: 'rank', rank: r, m: fm }), () => socket.destroy());
        links.set(r, link);
        group.add(new RemoteEngine(link));
      }
    } else if (m.type === 'rank') {
      links.get(m.rank)?.emit('message', m.m);
    } else if (m.type === 'rank-exit') {
      links.get(m.rank)?.markGone(m.signal ? `exited on signal ${m.signal}` : `exited with code ${m.code}`, m.code === 0);
    }
  });
  lines.on('close', (why: string) => {
    for (const link of links.values()) link.markGone(`lost its link to the front (${where}: ${why})`, false);
  });
}
