// `expertd serve --nproc-per-node N` end to end: rank processes behind one front on a real port.
// Greedy outputs and logprobs equal one engine's on three fixtures (f32) with 2 and 3 ranks and
// the requests spread over every rank, and on the other four with 2 ranks and two prompts; a
// killed rank gives 503s and every process exits; a hung rank or a hung front ends the group;
// SIGTERM drains in-flight requests on all ranks and everything exits 0.
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, packageRoot } from '../src/native/index.js';
import { startDaemon, stopDaemon, type Daemon } from './helpers/daemon.js';

const fixture = (name: string) => path.join(packageRoot(), 'test', 'fixtures', name);
const prompts = ['The quick brown fox', 'Once upon a time', 'hello world', '1 2 3 4', 'MoE layers route tokens'];

interface Out { text: string; tokens: string[]; logprobs: number[] }

async function complete(base: string, model: string, prompt: string, maxTokens = 6): Promise<Out> {
  const r = await fetch(`${base}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, prompt, max_tokens: maxTokens, temperature: 0, logprobs: 2, ignore_eos: true }),
  });
  const body = await r.json() as { choices: { text: string; logprobs: { tokens: string[]; token_logprobs: number[] } }[] };
  assert.equal(r.status, 200, JSON.stringify(body));
  const c = body.choices[0]!;
  return { text: c.text, tokens: c.logprobs.tokens, logprobs: c.logprobs.token_logprobs };
}

/** expertd_rank_requests_total per rank, from /metrics. */
async function rankRequests(base: string): Promise<number[]> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const out: number[] = [];
  for (const m of text.matchAll(/^expertd_rank_requests_total\{rank="(\d+)"\} (\d+)/gm)) out[Number(m[1])] = Number(m[2]);
  return out;
}

/** The rank pids the front logged at rendezvous. */
function rankPids(d: Daemon): number[] {
  const line = d.logs.join('').split('\n').find((l) => l.includes('"rendezvous'));
  assert.ok(line, 'the front logged the rendezvous');
  return (JSON.parse(line) as { ranks: { pid: number }[] }).ranks.map((r) => r.pid);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Test cleanup after a failure: nothing this file started may outlive it. */
function killAll(d: Daemon, pids: number[]): void {
  for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
  if (d.proc.exitCode === null && d.proc.signalCode === null) d.proc.kill('SIGKILL');
}

async function allGone(pids: number[], withinMs: number): Promise<boolean> {
  const deadline = Date.now() + withinMs;
  while (Date.now() < deadline) {
    if (!pids.some(alive)) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return false;
}

/** expertd_all2all_bytes_total from /metrics (0 when absent). */
async function all2allBytes(base: string): Promise<number> {
  const m = /^expertd_all2all_bytes_total (\S+)$/m.exec(await (await fetch(`${base}/metrics`)).text());
  return m ? Number(m[1]) : 0;
}

const gloo = loadNative().capabilities().gloo;
// Expert-parallel MoE across the rank processes needs Gloo in the addon; without it only the
// replicated layout runs (and says so).
const layouts: [number, string][] = gloo ? [[2, 'expert'], [3, 'expert'], [2, 'replicated']] : [[2, 'replicated'], [3, 'replicated']];

for (const name of ['mixtral', 'deepseek_v3', 'longcat_flash']) {
  test(`${name}: 2 and 3 rank processes answer exactly as one engine (greedy text and logprobs, f32), spread over every rank` +
      (gloo ? '; MoE expert-parallel over Gloo and replicated' : ' (replicated MoE only: this addon has no Gloo)'), async () => {
    const one = await startDaemon(['--model', fixture(name)]);
    const want: Out[] = [];
    try {
      for (const p of prompts) want.push(await complete(one.base, name, p));
    } finally {
      assert.equal(await stopDaemon(one), 0);
    }
    for (const [world, layout] of layouts) {
      const d = await startDaemon(['--model', fixture(name), '--nproc-per-node', String(world), '--dist-moe', layout]);
      const pids = rankPids(d);
      try {
        assert.equal(pids.length, world);
        // One at a time: every request has a rank to itself, so each runs as it would alone.
        for (const [i, p] of prompts.entries()) assert.deepEqual(await complete(d.base, name, p), want[i], `${name} x${world} ${layout}: '${p}'`);
        // All at once: the ranks step together, each with its own batch, the MoE rows of both in one all2all.
        const together = await Promise.all(prompts.map((p) => complete(d.base, name, p)));
        together.forEach((got, i) => assert.deepEqual(got, want[i], `${name} x${world} ${layout}, concurrent: '${prompts[i]}'`));
        const moved = await all2allBytes(d.base);
        if (layout === 'expert') assert.ok(moved > 0, 'rows travelled between the rank processes');
        else assert.equal(moved, 0, 'replicated experts: no all2all');
        const spread = await rankRequests(d.base);
        assert.equal(spread.length, world, `every rank got requests: ${JSON.stringify(spread)}`);
        assert.ok(spread.every((n) => n >= 2), `every rank got requests: ${JSON.stringify(spread)}`);
      } catch (e) {
        killAll(d, pids);
        throw e;
      }
      assert.equal(await stopDaemon(d), 0, `${name} x${world}: the front exits 0 after SIGTERM`);
      assert.ok(await allGone(pids, 10_000), 'no rank process is left behind');
    }
  });
}

// The other fixtures, lighter: every architecture the loader knows serves through 2 rank processes
// with its MoE expert-parallel (or replicated without Gloo), a couple of prompts each.
const heavy = ['mixtral', 'deepseek_v3', 'longcat_flash'];
const allFixtures = readdirSync(path.join(packageRoot(), 'test', 'fixtures'), { withFileTypes: true })
  .filter((e) => e.isDirectory()).map((e) => e.name).sort();
test('every fixture is covered by a rank-process test', () => {
  assert.equal(allFixtures.length, 12, `fixtures: ${allFixtures.join(', ')}`);
  for (const name of heavy) assert.ok(allFixtures.includes(name), name);
});
for (const name of allFixtures.filter((n) => !heavy.includes(n))) {
  const layout = gloo ? 'expert' : 'replicated';
  test(`${name}: 2 rank processes (--dist-moe ${layout}) answer exactly as one engine (greedy text and logprobs, f32)`, async () => {
    const few = prompts.slice(0, 2);
    const one = await startDaemon(['--model', fixture(name)]);
    const want: Out[] = [];
    try {
      for (const p of few) want.push(await complete(one.base, name, p, 4));
    } finally {
      assert.equal(await stopDaemon(one), 0);
    }
    const d = await startDaemon(['--model', fixture(name), '--nproc-per-node', '2', '--dist-moe', layout]);
    const pids = rankPids(d);
    try {
      assert.equal(pids.length, 2);
      // Together, so each rank holds one and the MoE rows of both meet in the all2all.
      const got = await Promise.all(few.map((p) => complete(d.base, name, p, 4)));
      got.forEach((g, i) => assert.deepEqual(g, want[i], `${name} x2 ${layout}: '${few[i]}'`));
      if (layout === 'expert') assert.ok(await all2allBytes(d.base) > 0, 'rows travelled between the rank processes');
      assert.deepEqual(await rankRequests(d.base), [1, 1], 'one request on each rank');
    } catch (e) {
      killAll(d, pids);
      throw e;
    }
    assert.equal(await stopDaemon(d), 0, `${name} x2: the front exits 0 after SIGTERM`);
    assert.ok(await allGone(pids, 10_000), 'no rank process is left behind');
  });
}

test('--expert-placement FILE with 2 rank processes (uneven, non-contiguous) answers exactly as one engine; the ranks agree on the table', { skip: !gloo && 'this addon has no Gloo' }, async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'expertd-dist-placement-'));
  const file = path.join(dir, 'p.json');
  writeFileSync(file, JSON.stringify([[1, 4, 6], [0, 2, 3, 5, 7]]));  // mixtral has 8 experts
  try {
    const one = await startDaemon(['--model', fixture('mixtral')]);
    const want: Out[] = [];
    try {
      for (const p of prompts) want.push(await complete(one.base, 'mixtral', p));
    } finally {
      assert.equal(await stopDaemon(one), 0);
    }
    const d = await startDaemon(['--model', fixture('mixtral'), '--nproc-per-node', '2', '--dist-moe', 'expert', '--expert-placement', file]);
    const pids = rankPids(d);
    try {
      const got = await Promise.all(prompts.map((p) => complete(d.base, 'mixtral', p)));
      got.forEach((g, i) => assert.deepEqual(g, want[i], `'${prompts[i]}'`));
      for (const [i, p] of prompts.entries()) assert.deepEqual(await complete(d.base, 'mixtral', p), want[i], `alone: '${p}'`);
      assert.ok(await all2allBytes(d.base) > 0, 'rows travelled between the rank processes');
      assert.match(d.logs.join(''), /expert placement rank 0 \[1,4,6\], rank 1 \[0,2,3,5,7\]/);
    } catch (e) {
      killAll(d, pids);
      throw e;
    }
    assert.equal(await stopDaemon(d), 0);
    assert.ok(await allGone(pids, 10_000), 'no rank process is left behind');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a rank killed mid-generation: its request fails, later requests get 503 naming the rank, every process exits non-zero within 30 s', async () => {
  const d = await startDaemon(['--model', fixture('mixtral'), '--nproc-per-node', '2', '--max-num-seqs', '2']);
  const pids = rankPids(d);
  const started = Date.now();
  try {
  // A long stream on each rank (spread by load); wait until both are producing tokens.
  const streams = [0, 1].map(async () => {
    const r = await fetch(`${d.base}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'mixtral', prompt: 'a long story', max_tokens: 480, ignore_eos: true, stream: true, temperature: 0 }),
    });
    return r;
  });
  const responses = await Promise.all(streams);
  const readers = responses.map((r) => r.body!.getReader());
  for (const rd of readers) await rd.read();
  // Stopped first, so its request is surely still running when it dies.
  process.kill(pids[1]!, 'SIGSTOP');
  assert.deepEqual(await rankRequests(d.base), [1, 1]);
  process.kill(pids[1]!, 'SIGKILL');
  // Rank 1's stream ends with an error event naming the lost rank.
  const dec = new TextDecoder();
  let text = '';
  for (;;) {
    const { done, value } = await readers[1]!.read();
    if (done) break;
    text += dec.decode(value);
  }
  assert.match(text, /"error"/);
  const later = await fetch(`${d.base}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'mixtral', prompt: 'x', max_tokens: 2 }),
  });
  assert.equal(later.status, 503);
  const body = await later.json() as { error: { message: string; code: string } };
  assert.equal(body.error.code, 'engine_failed');
  // The front sees rank 1 exit, or (expert-parallel MoE) rank 0 sees its all2all with rank 1 break first.
  assert.match(body.error.message, new RegExp('^The engine has failed and cannot serve requests: ' +
    `(rank 1 \\(pid ${pids[1]}\\) exited on signal SIGKILL|rank 0 \\(pid ${pids[0]}\\) failed: engine step failed: gloo group .*; the group is broken)$`));
  assert.equal((await fetch(`${d.base}/health`)).status, 503);
  await readers[0]!.cancel().catch(() => undefined);
  assert.equal(await d.exit, 1, 'the front exits non-zero');
  assert.ok(await allGone(pids, 5000), 'no rank is left behind');
  assert.ok(Date.now() - started < 30_000, `all gone within 30 s (took ${Date.now() - started} ms)`);
  assert.match(d.logs.join(''), /expertd rank 0: the group is down: rank [01] \(pid \d+\)/);
  } finally {
    killAll(d, pids);
  }
});

test('a hung rank (SIGSTOP) is found by the heartbeat timeout: 503s, and every process exits non-zero', async () => {
  const d = await startDaemon(['--model', fixture('mixtral'), '--nproc-per-node', '2', '--heartbeat-timeout', '2']);
  const pids = rankPids(d);
  process.kill(pids[0]!, 'SIGSTOP');
  try {
    assert.equal(await d.exit, 1);
    assert.match(d.logs.join(''), /rank 0 \(pid \d+\) sent nothing for 2\.0 s \(hung or unreachable\)/);
    assert.ok(await allGone(pids, 5000), 'the stopped rank was killed, the other exited');
  } finally {
    killAll(d, pids);
  }
});

/** Running, not a zombie (a rank that exited under a stopped front stays a zombie until reaped). */
function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

test('a hung front (SIGSTOP) is found by the ranks\' heartbeat timeout: they exit non-zero; the front, continued, sees that and exits non-zero', async () => {
  const d = await startDaemon(['--model', fixture('mixtral'), '--nproc-per-node', '2', '--heartbeat-timeout', '2']);
  const pids = rankPids(d);
  try {
    d.proc.kill('SIGSTOP');
    const stopped = Date.now();
    while (pids.some(running)) {
      assert.ok(Date.now() - stopped < 15_000, 'the ranks outlived a hung front by 15 s');
      await new Promise((r) => setTimeout(r, 100));
    }
    const tookMs = Date.now() - stopped;
    // The last heartbeat came up to one interval (1 s) before the stop.
    assert.ok(tookMs >= 1000, `the ranks waited for the timeout (gone after ${tookMs} ms)`);
    for (const r of [0, 1]) assert.match(d.logs.join(''), new RegExp(`expertd rank ${r}: the front sent nothing for 2\\.0 s \\(hung or unreachable\\); exiting`));
    d.proc.kill('SIGCONT');
    assert.equal(await d.exit, 1, 'the front exits non-zero');
    // The front reads what the ranks left in the channel: an exit with code 1, or first the other
    // rank's broken all2all (expert-parallel MoE: its peer went first); or, continued after more
    // than --heartbeat-timeout, its own watchdog fires before it reads the channel.
    assert.match(d.logs.join(''), /"error":"rank [01] \(pid \d+\) (exited with code 1|failed: engine step failed: gloo group .*; the group is broken|sent nothing for 2\.0 s \(hung or unreachable\))"/);
  } finally {
    if (d.proc.exitCode === null && d.proc.signalCode === null) d.proc.kill('SIGCONT');
    killAll(d, pids);
  }
});

test('SIGTERM on the front drains in-flight requests on every rank, then all exit 0', async () => {
  const d = await startDaemon(['--model', fixture('mixtral'), '--nproc-per-node', '2', '--shutdown-timeout', '60']);
  const pids = rankPids(d);
  try {
  const reqs = [0, 1].map(() => fetch(`${d.base}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'mixtral', prompt: 'drain me', max_tokens: 400, ignore_eos: true, stream: true, temperature: 0 }),
  }));
  const responses = await Promise.all(reqs);
  const readers = responses.map((r) => r.body!.getReader());
  for (const rd of readers) await rd.read();
  // Both ranks held still, so both requests are in flight when SIGTERM comes; the front waits.
  for (const pid of pids) process.kill(pid, 'SIGSTOP');
  assert.deepEqual(await rankRequests(d.base), [1, 1], 'one request on each rank');
  d.proc.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(d.proc.exitCode, null, 'the front is still draining');
  assert.equal((await fetch(`${d.base}/health`)).status, 503, '/health says draining');
  for (const pid of pids) process.kill(pid, 'SIGCONT');
  const dec = new TextDecoder();
  for (const rd of readers) {
    let text = '';
    for (;;) {
      const { done, value } = await rd.read();
      if (done) break;
      text += dec.decode(value);
    }
    assert.match(text, /"finish_reason":"length"/, 'the request ran to its end');
    assert.match(text, /data: \[DONE\]/);
  }
  assert.equal(await d.exit, 0);
  assert.ok(await allGone(pids, 5000));
  } finally {
    killAll(d, pids);
  }
});
