// Several "nodes" on 127.0.0.1: the same `expertd serve` command per node with --nnodes 2
// --node-rank R --dist-init-addr; the group forms, spreads requests over both nodes and drains on
// SIGTERM; a node with other flags is refused at rendezvous; a node that vanishes ends the group.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, packageRoot } from '../src/native/index.js';
import { startDaemon, stopDaemon } from './helpers/daemon.js';

const mixtral = path.join(packageRoot(), 'test', 'fixtures', 'mixtral');

/** Listens on `port` (0: any) and closes again: the port it got, or null where it was taken. */
async function tryListen(port: number): Promise<number | null> {
  const s = net.createServer();
  const got = await new Promise<number | null>((resolve) => {
    s.once('error', () => resolve(null));
    s.listen(port, '127.0.0.1', () => resolve((s.address() as net.AddressInfo).port));
  });
  if (got !== null) await new Promise<void>((r) => s.close(() => r()));
  return got;
}

/**
 * A rendezvous port P with P + 1 free too: node 0 serves the group's store on P + 1, and an
 * ephemeral port's neighbour may be any other socket's (a CI run met EADDRINUSE there).
 */
async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 100; attempt++) {
    const port = await tryListen(0);
    if (port !== null && port < 65535 && (await tryListen(port + 1)) !== null) return port;
  }
  throw new Error('no free pair of adjacent ports on 127.0.0.1');
}

interface Proc { proc: ChildProcess; logs: string[]; exit: Promise<number | null> }

/** A node's expertd that does not serve HTTP (node rank > 0), or a front expected to fail. */
function spawnNode(args: string[]): Proc {
  const bin = path.join(packageRoot(), 'bin', 'expertd.js');
  const proc = spawn(process.execPath, [bin, 'serve', '--port', '0', '--compute-dtype', 'f32', '--log-level', 'info', ...args],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: string[] = [];
  proc.stdout!.on('data', (d: Buffer) => logs.push(d.toString()));
  proc.stderr!.on('data', (d: Buffer) => logs.push(d.toString()));
  return { proc, logs, exit: new Promise((resolve) => proc.on('exit', (code) => resolve(code))) };
}

function kill(p: { proc: ChildProcess }): void {
  if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill('SIGKILL');
}

const nodeArgs = (port: number, rank: number) => ['--model', mixtral, '--nnodes', '2', '--node-rank', String(rank), '--dist-init-addr', `127.0.0.1:${port}`];

async function complete(base: string, prompt: string): Promise<{ text: string; logprobs: number[] }> {
  const r = await fetch(`${base}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'mixtral', prompt, max_tokens: 6, temperature: 0, logprobs: 1, ignore_eos: true }),
  });
  const body = await r.json() as { choices: { text: string; logprobs: { token_logprobs: number[] } }[] };
  assert.equal(r.status, 200, JSON.stringify(body));
  return { text: body.choices[0]!.text, logprobs: body.choices[0]!.logprobs.token_logprobs };
}

test('two nodes on loopback form one group: requests on both, same answers, SIGTERM on the front ends both nodes with 0', async () => {
  const port = await freePort();
  const node1 = spawnNode(nodeArgs(port, 1));
  try {
    const front = await startDaemon(nodeArgs(port, 0));
    try {
      const a = await complete(front.base, 'the same prompt');
      const b = await complete(front.base, 'the same prompt');
      assert.deepEqual(b, a, 'rank 1 on node 1 answers as rank 0 on node 0');
      const metrics = await (await fetch(`${front.base}/metrics`)).text();
      assert.match(metrics, /^expertd_rank_requests_total\{rank="0"\} 1$/m);
      assert.match(metrics, /^expertd_rank_requests_total\{rank="1"\} 1$/m);
      // With Gloo the MoE layers are expert-parallel across the nodes (store on the rendezvous port + 1).
      if (loadNative().capabilities().gloo) assert.ok(Number(/^expertd_all2all_bytes_total (\S+)$/m.exec(metrics)?.[1] ?? 0) > 0, 'rows crossed between the nodes');
      assert.match(front.logs.join(''), /"ranks":\[\{"rank":0,"pid":\d+,"node":0\},\{"rank":1,"pid":\d+,"node":1\}\]/);
    } catch (e) {
      kill(front);
      throw e;
    }
    assert.equal(await stopDaemon(front), 0);
    assert.equal(await node1.exit, 0, node1.logs.join(''));
  } finally {
    kill(node1);
  }
});

test('a node with another block size is refused at rendezvous: both nodes exit non-zero naming the field and both values', async () => {
  const port = await freePort();
  const node1 = spawnNode([...nodeArgs(port, 1), '--block-size', '32']);
  const node0 = spawnNode(nodeArgs(port, 0));
  try {
    assert.equal(await node0.exit, 1);
    assert.notEqual(await node1.exit, 0);
    assert.match(node0.logs.join(''), /rendezvous refused: rank 1 \(node 1\) differs from rank 0 \(node 0\) in blockSize: 32 vs 16/);
    assert.match(node1.logs.join(''), /expertd rank 1: the group is down: rendezvous refused: rank 1 \(node 1\) differs/);
  } finally {
    kill(node0);
    kill(node1);
  }
});

test('nodes with different --expert-placement tables are refused at rendezvous (through the store), naming the field and both tables', { skip: !loadNative().capabilities().gloo && 'this addon has no Gloo' }, async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'expertd-nodes-placement-'));
  const mine = path.join(dir, 'a.json'), theirs = path.join(dir, 'b.json');
  writeFileSync(mine, JSON.stringify([[1, 4, 6], [0, 2, 3, 5, 7]]));
  writeFileSync(theirs, JSON.stringify([[0, 1, 2, 3], [4, 5, 6, 7]]));
  const port = await freePort();
  const node1 = spawnNode([...nodeArgs(port, 1), '--dist-moe', 'expert', '--expert-placement', theirs]);
  const node0 = spawnNode([...nodeArgs(port, 0), '--dist-moe', 'expert', '--expert-placement', mine]);
  try {
    assert.equal(await node0.exit, 1);
    assert.notEqual(await node1.exit, 0);
    const diff = 'rank 1 (node 1) differs from rank 0 (node 0) in expertPlacement: "[0,0,0,0,1,1,1,1]" vs "[1,0,1,1,0,1,0,1]"';
    assert.ok(node0.logs.join('').includes(`rendezvous refused: ${JSON.stringify(diff).slice(1, -1)}`), node0.logs.join(''));
    // Rank 1 exits with the verdict (its own from the store, or the front's: whichever came first).
    assert.ok(node1.logs.join('').includes(`rendezvous refused: ${diff}`), node1.logs.join(''));
  } finally {
    kill(node0);
    kill(node1);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a node that vanishes (its launcher killed) ends the group: its rank exits, the front answers 503 and exits 1', async () => {
  const port = await freePort();
  const node1 = spawnNode(nodeArgs(port, 1));
  try {
    const front = await startDaemon([...nodeArgs(port, 0), '--heartbeat-timeout', '3']);
    try {
      const line = front.logs.join('').split('\n').find((l) => l.includes('"rendezvous'))!;
      const pids = (JSON.parse(line) as { ranks: { pid: number }[] }).ranks.map((r) => r.pid);
      node1.proc.kill('SIGKILL');
      const deadline = Date.now() + 10_000;
      let status = 0;
      while (Date.now() < deadline && status !== 503) {
        status = (await fetch(`${front.base}/health`)).status;
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(status, 503);
      assert.equal(await front.exit, 1);
      // The front sees node 1 go, or (expert-parallel MoE) rank 0's all2all with rank 1 breaks first.
      assert.match(front.logs.join(''),
        /rank 1 \(node 1\) (lost its link to the front|exited with code 1)|rank 0 \(pid \d+\) failed: engine step failed: gloo group .*; the group is broken/);
      const alive = (pid: number) => { try { process.kill(pid, 0); return true; } catch { return false; } };
      const until = Date.now() + 5000;
      while (Date.now() < until && pids.some(alive)) await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(pids.filter(alive), [], 'both ranks (node 1\'s lost its launcher) are gone');
    } finally {
      kill(front);
    }
  } finally {
    kill(node1);
  }
});
