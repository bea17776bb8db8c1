// Where this process sits in a data-parallel group: nodes, ranks per node, this node's index and
// the front's address, from the flags or else from the torchrun or LeaderWorkerSet variables.
// A pure function of (flags, env), so the mapping is tested without starting anything.

/** The port used when only a host is known (LeaderWorkerSet gives no port): torch's default. */
export const DEFAULT_DIST_PORT = 29500;

export interface Topology {
  nnodes: number;
  nodeRank: number;
  nprocPerNode: number;
  /** nnodes * nprocPerNode; rank = nodeRank * nprocPerNode + localRank. */
  worldSize: number;
  /** Node 0's address for the rank channels; absent on one node (ranks speak IPC only). */
  initHost?: string;
  initPort?: number;
  /** Added to a rank's local index for its CUDA device (torchrun's LOCAL_RANK; 0 otherwise). */
  deviceOffset: number;
  /** Which source decided: the flags, torchrun's variables, LeaderWorkerSet's, or one node by default. */
  source: 'flags' | 'torchrun' | 'lws' | 'single';
}

export interface TopologyFlags {
  nprocPerNode?: number | undefined;
  nnodes?: number | undefined;
  nodeRank?: number | undefined;
  distInitAddr?: string | undefined;
}

export class TopologyError extends Error {
  override name = 'UsageError';
}

/** 'HOST:PORT' (or '[v6]:PORT'; a bare HOST takes DEFAULT_DIST_PORT). */
export function parseHostPort(value: string, from: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+))(?::(\d+))?$/.exec(value.trim());
  if (!m) throw new TopologyError(`${from}: '${value}' is not HOST:PORT`);
  const port = m[3] === undefined ? DEFAULT_DIST_PORT : Number(m[3]);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new TopologyError(`${from}: port ${m[3]} is not in 1..65535`);
  return { host: (m[1] ?? m[2])!, port };
}

function envInt(env: NodeJS.ProcessEnv, name: string, min: number): number {
  const raw = env[name]!;
  const n = Number(raw);
  if (raw.trim() === '' || !Number.isInteger(n) || n < min) throw new TopologyError(`${name}: expected an integer >= ${min}, got '${raw}'`);
  return n;
}

/**
 * Precedence: any of --nnodes/--node-rank/--dist-init-addr given -> the flags; else WORLD_SIZE,
 * RANK and MASTER_ADDR set -> torchrun; else LWS_LEADER_ADDRESS set -> LeaderWorkerSet; else one node.
 *
 * torchrun (one expertd per torchrun process, or a PyTorchJob pod): WORLD_SIZE counts ranks, RANK is
 * this process's first rank, so nnodes = WORLD_SIZE / nproc-per-node and node-rank = RANK /
 * nproc-per-node (both must divide); the front is MASTER_ADDR:MASTER_PORT, or MASTER_PORT + 1 when
 * TORCHELASTIC_USE_AGENT_STORE=True (torchrun's agent holds MASTER_PORT itself); LOCAL_RANK offsets
 * the CUDA device index.
 *
 * LeaderWorkerSet (one pod per node): nnodes = LWS_GROUP_SIZE, node-rank = LWS_WORKER_INDEX, the
 * front is LWS_LEADER_ADDRESS on port DEFAULT_DIST_PORT (another port: give the flags instead).
 */
export function resolveTopology(flags: TopologyFlags, env: NodeJS.ProcessEnv = process.env): Topology {
  const nproc = flags.nprocPerNode ?? 1;
  if (!Number.isInteger(nproc) || nproc < 1) throw new TopologyError(`--nproc-per-node: expected an integer >= 1, got ${nproc}`);
  const given = flags.nnodes !== undefined || flags.nodeRank !== undefined || flags.distInitAddr !== undefined;
  let t: Omit<Topology, 'worldSize' | 'nprocPerNode'>;
  if (given) {
    const nnodes = flags.nnodes ?? 1;
    const nodeRank = flags.nodeRank ?? 0;
    if (nnodes > 1 && flags.distInitAddr === undefined)
      throw new TopologyError(`--nnodes ${nnodes} needs --dist-init-addr HOST:PORT (node 0's address, the same on every node)`);
    const addr = flags.distInitAddr !== undefined ? parseHostPort(flags.distInitAddr, '--dist-init-addr') : undefined;
    t = { nnodes, nodeRank, deviceOffset: 0, source: 'flags', ...(addr ? { initHost: addr.host, initPort: addr.port } : {}) };
  } else if (env.WORLD_SIZE && env.RANK && env.MASTER_ADDR) {
    const world = envInt(env, 'WORLD_SIZE', 1);
    const rank = envInt(env, 'RANK', 0);
    if (world % nproc !== 0) throw new TopologyError(`WORLD_SIZE ${world} is not a multiple of --nproc-per-node ${nproc}`);
    if (rank % nproc !== 0) throw new TopologyError(`RANK ${rank} is not a multiple of --nproc-per-node ${nproc} (one expertd per node starts ranks RANK..RANK+${nproc - 1})`);
    const agentStore = env.TORCHELASTIC_USE_AGENT_STORE === 'True';
    const port = env.MASTER_PORT ? envInt(env, 'MASTER_PORT', 1) + (agentStore ? 1 : 0) : DEFAULT_DIST_PORT;
    t = {
      nnodes: world / nproc, nodeRank: rank / nproc, initHost: env.MASTER_ADDR, initPort: port,
      deviceOffset: env.LOCAL_RANK ? envInt(env, 'LOCAL_RANK', 0) : 0, source: 'torchrun',
    };
  } else if (env.LWS_LEADER_ADDRESS) {
    t = {
      nnodes: env.LWS_GROUP_SIZE ? envInt(env, 'LWS_GROUP_SIZE', 1) : 1,
      nodeRank: env.LWS_WORKER_INDEX ? envInt(env, 'LWS_WORKER_INDEX', 0) : 0,
      initHost: env.LWS_LEADER_ADDRESS,
      initPort: DEFAULT_DIST_PORT,
      deviceOffset: 0, source: 'lws',
    };
  } else {
    t = { nnodes: 1, nodeRank: 0, deviceOffset: 0, source: 'single' };
  }
  if (t.nodeRank >= t.nnodes) throw new TopologyError(`node rank ${t.nodeRank} is not below the node count ${t.nnodes}`);
  if (t.initPort !== undefined && (t.initPort < 1 || t.initPort > 65535)) throw new TopologyError(`rendezvous port ${t.initPort} is not in 1..65535`);
  return { ...t, nprocPerNode: nproc, worldSize: t.nnodes * nproc };
}
