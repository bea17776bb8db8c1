// The pure parts of the data-parallel group: how flags and the torchrun / LeaderWorkerSet variables
// map onto a topology, the rendezvous check that names a difference, and the front's pick by load.
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { checkIdentities, rankIdentity, tensorsHash, type RankIdentity } from '../src/dist/identity.js';
import { localRanks, rankEngineOptions } from '../src/dist/launcher.js';
import type { RankLink } from '../src/dist/rank-link.js';
import { RankGroup } from '../src/dist/rank-group.js';
import { RemoteEngine } from '../src/dist/remote-engine.js';
import { identityKey } from '../src/dist/rendezvous.js';
import { DEFAULT_DIST_PORT, resolveTopology } from '../src/dist/topology.js';
import type { EngineOptions } from '../src/engine/protocol.js';
import { packageRoot } from '../src/native/index.js';

test('topology: no flags and no variables is one node', () => {
  assert.deepEqual(resolveTopology({}, {}), { nnodes: 1, nodeRank: 0, nprocPerNode: 1, worldSize: 1, deviceOffset: 0, source: 'single' });
  assert.deepEqual(resolveTopology({ nprocPerNode: 3 }, {}), { nnodes: 1, nodeRank: 0, nprocPerNode: 3, worldSize: 3, deviceOffset: 0, source: 'single' });
});

test('topology: flags (SGLang convention) win over every variable', () => {
  const env = { WORLD_SIZE: '8', RANK: '4', MASTER_ADDR: 'm', MASTER_PORT: '1234', LWS_LEADER_ADDRESS: 'l', LWS_GROUP_SIZE: '4', LWS_WORKER_INDEX: '2' };
  assert.deepEqual(resolveTopology({ nprocPerNode: 2, nnodes: 3, nodeRank: 1, distInitAddr: '10.0.0.1:5000' }, env),
    { nnodes: 3, nodeRank: 1, nprocPerNode: 2, worldSize: 6, initHost: '10.0.0.1', initPort: 5000, deviceOffset: 0, source: 'flags' });
  assert.equal(resolveTopology({ distInitAddr: 'head' }, env).initPort, DEFAULT_DIST_PORT);
  assert.equal(resolveTopology({ distInitAddr: '[::1]:7000', nnodes: 2 }, {}).initHost, '::1');
  assert.throws(() => resolveTopology({ nnodes: 2 }, {}), /--nnodes 2 needs --dist-init-addr HOST:PORT/);
  assert.throws(() => resolveTopology({ nnodes: 2, nodeRank: 2, distInitAddr: 'h:1' }, {}), /node rank 2 is not below the node count 2/);
  assert.throws(() => resolveTopology({ distInitAddr: 'h:99999' }, {}), /port 99999 is not in 1\.\.65535/);
});

test('topology: torchrun variables: WORLD_SIZE counts ranks, RANK is this process\'s first, LOCAL_RANK offsets the device', () => {
  const env = { WORLD_SIZE: '4', RANK: '2', LOCAL_RANK: '1', MASTER_ADDR: 'head', MASTER_PORT: '29400' };
  assert.deepEqual(resolveTopology({}, env),
    { nnodes: 4, nodeRank: 2, nprocPerNode: 1, worldSize: 4, initHost: 'head', initPort: 29400, deviceOffset: 1, source: 'torchrun' });
  assert.deepEqual(resolveTopology({ nprocPerNode: 2 }, env),
    { nnodes: 2, nodeRank: 1, nprocPerNode: 2, worldSize: 4, initHost: 'head', initPort: 29400, deviceOffset: 1, source: 'torchrun' });
  // torchrun's own agent holds MASTER_PORT: expertd takes the next port.
  assert.equal(resolveTopology({}, { ...env, TORCHELASTIC_USE_AGENT_STORE: 'True' }).initPort, 29401);
  assert.throws(() => resolveTopology({ nprocPerNode: 3 }, env), /WORLD_SIZE 4 is not a multiple of --nproc-per-node 3/);
  assert.throws(() => resolveTopology({ nprocPerNode: 4 }, { ...env, WORLD_SIZE: '8' }), /RANK 2 is not a multiple of --nproc-per-node 4/);
  assert.throws(() => resolveTopology({}, { ...env, RANK: 'x' }), /RANK: expected an integer >= 0, got 'x'/);
});

test('topology: LeaderWorkerSet variables: group size is the node count, worker index the node rank', () => {
  const env = { LWS_LEADER_ADDRESS: 'g-0.svc', LWS_GROUP_SIZE: '2', LWS_WORKER_INDEX: '1' };
  assert.deepEqual(resolveTopology({ nprocPerNode: 8 }, env),
    { nnodes: 2, nodeRank: 1, nprocPerNode: 8, worldSize: 16, initHost: 'g-0.svc', initPort: DEFAULT_DIST_PORT, deviceOffset: 0, source: 'lws' });
  // The torchrun variables win when both are present.
  assert.equal(resolveTopology({}, { ...env, WORLD_SIZE: '2', RANK: '0', MASTER_ADDR: 'm' }).source, 'torchrun');
});

test('rank numbering and per-rank engine options', () => {
  const t = resolveTopology({ nprocPerNode: 2, nnodes: 3, nodeRank: 2, distInitAddr: 'h:1' }, {});
  assert.deepEqual(localRanks(t), [4, 5]);
  const o = { device: 'cuda:0', threads: 0 } as EngineOptions;
  assert.deepEqual(rankEngineOptions(o, { ...t, deviceOffset: 2 }, 1, 16), { device: 'cuda:3', threads: 8 });
  assert.deepEqual(rankEngineOptions({ ...o, device: 'cpu' }, t, 1, 3), { device: 'cpu', threads: 1 });
  assert.deepEqual(rankEngineOptions({ ...o, device: 'cpu', threads: 5 }, t, 0, 3), { device: 'cpu', threads: 5 });
});

function identity(rank: number, over: Partial<RankIdentity['compat']> = {}, config = 'c'): RankIdentity {
  return {
    rank, nodeRank: rank >> 1, configSha256: config.repeat(64), tensorsSha256: 't'.repeat(64),
    compat: { computeDtype: 'f32', blockSize: 16, expertParallel: 1, maxModelLen: 4096, deviceKind: 'cpu', expertKernel: 'auto', quantize: 'none', expertdVersion: '0.1.0', expertPlacement: 'contiguous', ...over },
  };
}

test('rendezvous check: equal identities pass; the first difference is named with both values', () => {
  assert.equal(checkIdentities([identity(0), identity(1), identity(2)]), null);
  assert.equal(checkIdentities([identity(0), identity(1), identity(2, { computeDtype: 'bf16' })]),
    'rank 2 (node 1) differs from rank 0 (node 0) in computeDtype: "bf16" vs "f32"');
  assert.equal(checkIdentities([identity(1, { blockSize: 32 }), identity(0)]),
    'rank 1 (node 0) differs from rank 0 (node 0) in blockSize: 32 vs 16');
  assert.match(checkIdentities([identity(0), identity(1, {}, 'd')])!, /^rank 1 \(node 0\) loads another model than rank 0 \(node 0\): config\.json sha256 dddddddddddd vs cccccccccccc$/);
});

test('model identity: the fixtures differ from each other; a copy with one tensor renamed differs in its tensors only', () => {
  const fx = (n: string) => path.join(packageRoot(), 'test', 'fixtures', n);
  const o = (dir: string) => ({ modelDir: dir, computeDtype: 'f32', blockSize: 16 }) as EngineOptions;
  const a = rankIdentity(o(fx('mixtral')), 4096, 0, 0, 'v');
  assert.deepEqual(rankIdentity(o(fx('mixtral')), 4096, 1, 0, 'v').tensorsSha256, a.tensorsSha256);
  assert.notEqual(rankIdentity(o(fx('deepseek_v3')), 4096, 1, 0, 'v').configSha256, a.configSha256);
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-identity-'));
  try {
    fs.copyFileSync(path.join(fx('mixtral'), 'config.json'), path.join(tmp, 'config.json'));
    const bytes = fs.readFileSync(path.join(fx('mixtral'), 'model.safetensors'));
    const headerLen = Number(bytes.readBigUInt64LE(0));
    const header = bytes.subarray(8, 8 + headerLen).toString('utf8');
    const renamed = header.replace('"model.norm.weight"', '"model.norm.weighx"');
    assert.notEqual(renamed, header);
    fs.writeFileSync(path.join(tmp, 'model.safetensors'), Buffer.concat([bytes.subarray(0, 8), Buffer.from(renamed), bytes.subarray(8 + headerLen)]));
    const b = rankIdentity(o(tmp), 4096, 1, 0, 'v');
    assert.equal(b.configSha256, a.configSha256);
    assert.notEqual(b.tensorsSha256, a.tensorsSha256);
    assert.equal(tensorsHash(tmp), b.tensorsSha256);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});

/** A link that records what the front sends and lets the test play the rank. */
class FakeLink extends EventEmitter implements RankLink {
  sent: unknown[] = [];
  isGone = false;
  killed = false;
  readonly where: string;
  constructor(readonly rank: number, readonly nodeRank = 0) { super(); this.where = `fake ${rank}`; }
  send(m: unknown): void { this.sent.push(m); }
  kill(): void { this.killed = true; }
}

function fakeGroup(n: number, heartbeatTimeoutMs = 60_000) {
  const group = new RankGroup({ worldSize: n, rendezvousTimeoutMs: 60_000, heartbeatTimeoutMs });
  const links = Array.from({ length: n }, (_, r) => new FakeLink(r));
  for (const l of links) group.add(new RemoteEngine(l));
  return { group, links };
}

const info = { name: 'm', architecture: 'mixtral', maxContext: 64, vocabSize: 10, eosTokenIds: [0], numMoeLayers: 1, numExperts: 2, topK: 1 };
const stats = (running: number, waiting: number) => ({ running, waiting, kvBlocksTotal: 8, kvBlocksUsed: 0, preemptionsTotal: 0 });
const req = (id: string) => ({ id, promptTokenIds: [1], maxTokens: 1, sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 }, stopTokenIds: [], ignoreEos: false, minTokens: 0, returnRoutedExperts: false });

/** The group's store as the ranks see it, in memory (the real one: dist-rendezvous.test.ts). */
class MemStore {
  private readonly values = new Map<string, Uint8Array>();
  private readonly waiters = new Map<string, ((v: Uint8Array) => void)[]>();
  async set(key: string, value: Uint8Array | string): Promise<void> {
    const v = typeof value === 'string' ? Buffer.from(value) : value;
    this.values.set(key, v);
    for (const w of this.waiters.get(key) ?? []) w(v);
    this.waiters.delete(key);
  }
  get(key: string, timeoutMs: number): Promise<Uint8Array> {
    const v = this.values.get(key);
    if (v) return Promise.resolve(v);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(Object.assign(new Error(`get('${key}') timed out`), { code: 'E_STORE_TIMEOUT' })), timeoutMs);
      this.waiters.set(key, [...(this.waiters.get(key) ?? []), (x) => { clearTimeout(t); resolve(x); }]);
    });
  }
  async getString(key: string, timeoutMs: number): Promise<string> { return Buffer.from(await this.get(key, timeoutMs)).toString(); }
}

/** Every rank of a fake group publishes its identity to the store, as rank-main does. */
function publish(store: MemStore, ids: RankIdentity[]): void {
  for (const id of ids) void store.set(identityKey('P', id.rank), JSON.stringify(id));
}

async function startFake(n: number, heartbeatTimeoutMs?: number) {
  const f = fakeGroup(n, heartbeatTimeoutMs);
  const store = new MemStore();
  const rv = f.group.rendezvous({ client: store, prefix: 'P' });
  f.links.forEach((l) => l.emit('message', { type: 'hello', pid: 1 }));
  publish(store, f.links.map((_, r) => identity(r)));
  await rv;
  f.links.forEach((l) => l.emit('message', { type: 'ready', info, summary: 's' }));
  await f.group.ready;
  return f;
}

test('the front sends each request to the least-loaded rank, equals in turn, and aborts on the owner', async () => {
  const { group, links } = await startFake(3);
  assert.ok(links.every((l) => l.sent.some((m) => (m as { type: string }).type === 'start')), 'every rank told to start');
  links[0]!.emit('message', { type: 'events', events: [], stats: stats(1, 0), steps: [] });
  links[1]!.emit('message', { type: 'events', events: [], stats: stats(0, 0), steps: [] });
  links[2]!.emit('message', { type: 'events', events: [], stats: stats(0, 1), steps: [] });
  const owner = (id: string) => links.findIndex((l) => l.sent.some((m) => (m as { req?: { id: string } }).req?.id === id));
  const got: string[] = [];
  group.generate(req('a'), (ev) => got.push(`${ev.id}:${ev.type}`));
  assert.equal(owner('a'), 1, 'rank 1 had the fewest sequences');
  group.generate(req('b'), () => undefined);
  // Every rank now has one sequence (rank 1's is a): the turn goes on after rank 1.
  assert.equal(owner('b'), 2);
  group.generate(req('c'), () => undefined);
  assert.equal(owner('c'), 0);
  group.abort('a');
  assert.deepEqual(links[1]!.sent.at(-1), { type: 'abort', id: 'a' });
  links[1]!.emit('message', { type: 'events', events: [{ type: 'finished', id: 'a', reason: 'stop', promptTokens: 1, completionTokens: 1 }], stats: stats(0, 0), steps: [] });
  assert.deepEqual(got, ['a:finished']);
  // Sums of what each rank last reported (c and b count once their ranks report them).
  assert.deepEqual(group.stats(), { running: 1, waiting: 1, kvBlocksTotal: 24, kvBlocksUsed: 0, preemptionsTotal: 0 });
});

test('backpressure: pause and resume reach the rank that owns each request, unknown ids go nowhere', async () => {
  const { group, links } = await startFake(2);
  group.generate(req('a'), () => undefined);
  group.generate(req('b'), () => undefined);
  const owner = (id: string) => links.findIndex((l) => l.sent.some((m) => (m as { req?: { id: string } }).req?.id === id));
  const [oa, ob] = [owner('a'), owner('b')];
  assert.notEqual(oa, ob, 'equal loads go in turn');
  const before = links.map((l) => l.sent.length);
  group.pause(['a', 'b', 'nobody']);
  assert.deepEqual(links[oa]!.sent.at(-1), { type: 'pause', ids: ['a'] });
  assert.deepEqual(links[ob]!.sent.at(-1), { type: 'pause', ids: ['b'] });
  group.resume(['b']);
  assert.deepEqual(links[ob]!.sent.at(-1), { type: 'resume', ids: ['b'] });
  assert.deepEqual(links.map((l, r) => l.sent.length - before[r]!), [oa, ob].includes(0) ? links.map((_, r) => (r === ob ? 2 : 1)) : [0, 0]);
});

test('a rank that goes away fails the group: in-flight requests error, every rank is told to exit 1, later requests fail', async () => {
  const { group, links } = await startFake(2);
  const failed: string[] = [];
  group.on('failed', (m: string) => failed.push(m));
  const events: string[] = [];
  group.generate(req('x'), (ev) => events.push(ev.type === 'finished' ? `${ev.reason}: ${ev.error}` : ev.type));
  const victim = links.find((l) => l.sent.some((m) => (m as { type: string }).type === 'generate'))!;
  victim.emit('gone', 'exited on signal SIGKILL', false);
  const msg = `rank ${victim.rank} (fake ${victim.rank}) exited on signal SIGKILL`;
  assert.deepEqual(failed, [msg]);
  assert.deepEqual(events, [`error: ${msg}`]);
  assert.equal(group.state(), 'failed');
  for (const l of links) assert.deepEqual(l.sent.at(-1), { type: 'exit', code: 1, message: `the group is down: ${msg}` });
  group.generate(req('y'), (ev) => events.push(ev.type));
  await new Promise((r) => setImmediate(r));
  assert.equal(events.at(-1), 'finished');
});

test('a silent rank (no heartbeat) fails the group within the heartbeat timeout and is killed', async () => {
  const { group, links } = await startFake(2, 300);
  const failed = new Promise<string>((resolve) => group.once('failed', resolve));
  const beat = setInterval(() => links[0]!.emit('message', { type: 'heartbeat' }), 50);
  try {
    const msg = await failed;
    assert.match(msg, /^rank 1 \(fake 1\) sent nothing for 0\.3 s \(hung or unreachable\)$/);
    assert.ok(links[1]!.killed);
    assert.ok(!links[0]!.killed);
  } finally {
    clearInterval(beat);
  }
});

test('the front heartbeats every rank (its first as the rank joins) with the --heartbeat-timeout, and stops once the group is down', async () => {
  const { group, links } = fakeGroup(2, 2500);
  const beats = (l: FakeLink) => l.sent.filter((m) => (m as { type: string }).type === 'heartbeat');
  for (const l of links) assert.deepEqual(l.sent[0], { type: 'heartbeat', timeoutMs: 2500 });
  // Then every HEARTBEAT_INTERVAL_MS (polled, not timed: a loaded machine may be late).
  const t0 = Date.now();
  while (!links.every((l) => beats(l).length >= 2)) {
    assert.ok(Date.now() - t0 < 20_000, 'no second heartbeat');
    await new Promise((r) => setTimeout(r, 50));
  }
  group.fault('over');
  const after = links.map((l) => l.sent.length);
  await new Promise((r) => setTimeout(r, 1500));
  assert.deepEqual(links.map((l) => l.sent.length), after, 'nothing sent after the exit');
  for (const l of links) assert.equal((l.sent.at(-1) as { type: string }).type, 'exit');
});

test('a refused rendezvous rejects with the difference and tells every rank to exit', async () => {
  const { group, links } = fakeGroup(2);
  const store = new MemStore();
  const rv = group.rendezvous({ client: store, prefix: 'P' });
  publish(store, [identity(0), identity(1, { expertParallel: 2 })]);
  await assert.rejects(rv, /^Error: rendezvous refused: rank 1 \(node 0\) differs from rank 0 \(node 0\) in expertParallel: 2 vs 1$/);
  for (const l of links) assert.equal((l.sent.at(-1) as { type: string }).type, 'exit');
  assert.ok(!links.some((l) => l.sent.some((m) => (m as { type: string }).type === 'start')), 'no rank was told to start');
});

test('the rendezvous reads every identity from the store, waits for a node whose link comes later, and names ranks that never publish', async () => {
  // Rank 1's identity is in the store before its node's relay brought its link: no start until then.
  const group = new RankGroup({ worldSize: 2, rendezvousTimeoutMs: 60_000, heartbeatTimeoutMs: 60_000 });
  const l0 = new FakeLink(0), l1 = new FakeLink(1, 1);
  group.add(new RemoteEngine(l0));
  const store = new MemStore();
  let done = false;
  const rv = group.rendezvous({ client: store, prefix: 'P' }).then(() => { done = true; });
  publish(store, [identity(0), identity(1)]);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(done, false, 'rank 1 has no link yet');
  assert.ok(!l0.sent.some((m) => (m as { type: string }).type === 'start'));
  group.add(new RemoteEngine(l1));
  await rv;
  for (const l of [l0, l1]) assert.ok(l.sent.some((m) => (m as { type: string }).type === 'start'));
  assert.deepEqual(group.ranks.map((e) => e!.identity), [identity(0), identity(1)]);
  group.fault('test over');

  const g2 = fakeGroup(3);
  const s2 = new MemStore();
  const rv2 = new RankGroup({ worldSize: 3, rendezvousTimeoutMs: 200, heartbeatTimeoutMs: 60_000 });
  g2.links.forEach((l) => rv2.add(new RemoteEngine(l)));
  const p = rv2.rendezvous({ client: s2, prefix: 'P' });
  publish(s2, [identity(1)]);
  await assert.rejects(p, { message: 'rendezvous failed: rank(s) 0, 2 did not publish their identity to the store within 0.2 s' });
  for (const l of g2.links) assert.equal((l.sent.at(-1) as { type: string }).type, 'exit');
  g2.group.fault('test over');
});
