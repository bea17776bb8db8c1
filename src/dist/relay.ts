// Nodes 1..K-1: fork this node's ranks and relay their messages to the front on node 0 over one
// TCP link. The link lost, the front's 'exit', or a rank lost ends every rank here; the relay then
// exits non-zero (0 only after the front's shutdown, when every rank exited 0).
import type { ChildProcess } from 'node:child_process';
import net from 'node:net';

import type { Logger } from 'pino';

import { JsonLines } from './json-lines.js';
import { forkRanks, localRanks, storeAddress, type LaunchOptions } from './launcher.js';
import type { FrontToRelay, RelayToFront } from './rank-protocol.js';

/** Connects to the front, retrying until timeoutMs: node 0 may start after this node. */
async function connect(host: string, port: number, timeoutMs: number): Promise<net.Socket> {
  const deadline = performance.now() + timeoutMs;
  let last = '';
  while (performance.now() < deadline) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect({ host, port }, () => { s.off('error', reject); resolve(s); });
        s.once('error', reject);
      });
    } catch (e) {
      last = (e as Error).message;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  throw new Error(`could not reach the front at ${host}:${port} within ${timeoutMs / 1000} s (${last})`);
}

export async function runRelay(l: LaunchOptions, connectTimeoutMs: number, logger: Logger): Promise<number> {
  const t = l.topology;
  const socket = await connect(t.initHost!, t.initPort!, connectTimeoutMs);
  const lines = new JsonLines<FrontToRelay>(socket);
  const ranks = localRanks(t);
  lines.write({ type: 'node', nodeRank: t.nodeRank, ranks } satisfies RelayToFront);
  const children = new Map<number, ChildProcess>();
  const codes = new Map<number, number | null>();
  let shuttingDown = false;
  let failure: string | null = null;
  logger.info({ node: t.nodeRank, ranks, front: `${t.initHost}:${t.initPort}` }, `node ${t.nodeRank}: ranks ${ranks.join(', ')} joining the front`);

  return await new Promise<number>((resolve) => {
    const endAll = (why: string) => {
      if (failure === null && !shuttingDown) failure = why;
      for (const c of children.values()) if (c.exitCode === null && c.signalCode === null && c.connected)
        c.send({ type: 'exit', code: 1, message: `node ${t.nodeRank}: ${why}` });
      // Ranks that do not go at once are killed: nothing is left behind.
      setTimeout(() => { for (const c of children.values()) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL'); }, 2000).unref();
    };
    const finish = () => {
      if (codes.size < children.size) return;
      lines.close('relay done');
      const clean = failure === null && shuttingDown && [...codes.values()].every((c) => c === 0);
      if (!clean) logger.error({ node: t.nodeRank, reason: failure ?? 'a rank exited non-zero' }, `node ${t.nodeRank}: group ended`);
      resolve(clean ? 0 : 1);
    };
    forkRanks(l, storeAddress(t)).forEach((child, i) => {
      const rank = ranks[i]!;
      children.set(rank, child);
      child.on('message', (m) => lines.write({ type: 'rank', rank, m } as RelayToFront));
      child.on('exit', (code, signal) => {
        codes.set(rank, code);
        lines.write({ type: 'rank-exit', rank, code, signal } satisfies RelayToFront);
        if (code !== 0) endAll(`rank ${rank} ${signal ? `exited on signal ${signal}` : `exited with code ${code}`}`);
        finish();
      });
    });
    lines.on('message', (m: FrontToRelay) => {
      if (m.type === 'refused') {
        failure = `the front refused this node: ${m.message}`;
        endAll(failure);
        return;
      }
      if (m.m.type === 'shutdown') shuttingDown = true;
      const c = children.get(m.rank);
      if (c?.connected) c.send(m.m);
    });
    lines.on('close', (why: string) => {
      if (!shuttingDown) endAll(`lost the link to the front (${why})`);
    });
    // SIGTERM on a worker node: its ranks go, the front sees them go and ends the group.
    const onSignal = () => endAll('stopped by a signal');
    process.once('SIGTERM', onSignal);
    process.once('SIGINT', onSignal);
  });
}
