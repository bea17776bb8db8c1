// A real Prometheus (the `prometheus` binary; CI installs Debian's package) scrapes a live expertd with
// two rank processes (--nproc-per-node 2, expert-parallel MoE over Gloo) on loopback every second; what its HTTP API answers must equal what the daemon served,
// and every query of the Grafana dashboard must parse and evaluate there. promtool checks the configs.
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { packageRoot } from '../src/native/index.js';
import { startDaemon, stopDaemon } from './helpers/daemon.js';

const prometheusBin = process.env.EXPERTD_TEST_PROMETHEUS ?? 'prometheus';
const probe = spawnSync(prometheusBin, ['--version'], { encoding: 'utf8' });
const skip = probe.error ? `no ${prometheusBin} binary (${(probe.error as NodeJS.ErrnoException).code}): apt-get install -y prometheus` : false;
const promtoolBin = process.env.EXPERTD_TEST_PROMTOOL ?? 'promtool';
const promtoolProbe = spawnSync(promtoolBin, ['--version'], { encoding: 'utf8' });
const skipPromtool = promtoolProbe.error ? `no ${promtoolBin} binary (${(promtoolProbe.error as NodeJS.ErrnoException).code}): apt-get install -y prometheus` : false;
const dockerDir = path.join(packageRoot(), 'docker');

/** A port free at the time of asking (Prometheus cannot listen on port 0 and report it). */
async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

interface Prometheus { proc: ChildProcess; base: string; exit: Promise<number | null>; logs: string[] }

async function startPrometheus(dir: string, target: string): Promise<Prometheus> {
  const config = path.join(dir, 'prometheus.yml');
  fs.writeFileSync(config, [
    'global:', '  scrape_interval: 1s', '  scrape_timeout: 1s',
    'scrape_configs:', '  - job_name: expertd', '    metrics_path: /metrics',
    `    static_configs: [{ targets: ["${target}"] }]`, '',
  ].join('\n'));
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const logs: string[] = [];
    const proc = spawn(prometheusBin, [`--config.file=${config}`, `--storage.tsdb.path=${path.join(dir, 'tsdb')}`,
      `--web.listen-address=127.0.0.1:${port}`, '--log.level=warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
    proc.stdout!.on('data', (d: Buffer) => logs.push(d.toString()));
    proc.stderr!.on('data', (d: Buffer) => logs.push(d.toString()));
    const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
    const base = `http://127.0.0.1:${port}`;
    const ready = await waitFor(async () => {
      if (proc.exitCode !== null) return 'exited';
      const r = await fetch(`${base}/-/ready`).catch(() => null);
      return r?.ok ? 'ready' : null;
    }, 30_000);
    if (ready === 'ready') return { proc, base, exit, logs };
    proc.kill('SIGKILL');
    await exit;
    // Another process may have taken the port between asking and binding: try another one.
    if (attempt < 2 && /address already in use/.test(logs.join(''))) continue;
    throw new Error(`prometheus did not become ready (${ready ?? 'timeout'}):\n${logs.join('')}`);
  }
}

async function stopPrometheus(p: Prometheus): Promise<void> {
  if (p.proc.exitCode !== null) return;
  p.proc.kill('SIGTERM');
  const timer = setTimeout(() => p.proc.kill('SIGKILL'), 10_000);
  await p.exit;
  clearTimeout(timer);
}

/** Polls `check` every 250 ms until it returns a value, or null after `timeoutMs`. */
async function waitFor<T>(check: () => Promise<T | null>, timeoutMs: number): Promise<T | null> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== null) return v;
    if (Date.now() > deadline) return null;
    await new Promise((r) => setTimeout(r, 250));
  }
}

interface VectorSample { metric: Record<string, string>; value: [number, string] }

async function query(base: string, promql: string): Promise<VectorSample[]> {
  const res = await fetch(`${base}/api/v1/query?query=${encodeURIComponent(promql)}`);
  const body = await res.json() as { status: string; data?: { resultType: string; result: VectorSample[] }; error?: string };
  assert.equal(body.status, 'success', `${promql}: ${body.error}`);
  assert.equal(body.data!.resultType, 'vector');
  return body.data!.result;
}

/** Samples of `name` in Prometheus text: label set (sorted JSON) -> value. */
function served(text: string, name: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const labels = Object.fromEntries([...(m[2] ?? '').matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)].map((l) => [l[1]!, l[2]!]));
    out.set(labelKey(labels), Number(m[3]));
  }
  return out;
}

function labelKey(labels: Record<string, string>): string {
  return JSON.stringify(Object.entries(labels).filter(([k]) => k !== '__name__' && k !== 'job' && k !== 'instance').sort());
}

test('a real Prometheus scrapes expertd --nproc-per-node 2 and answers the values it served', { skip, timeout: 180_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-prometheus-'));
  const d = await startDaemon(['--nproc-per-node', '2']);
  let prom: Prometheus | null = null;
  try {
    await Promise.all(['The weather today', 'Once upon a time'].map((prompt) =>
      d.client.completions.create({ model: 'expertd-demo', prompt, max_tokens: 6, temperature: 0 })));
    // No traffic follows, so every counter below keeps the value read here.
    const text = await (await fetch(`${d.base}/metrics`)).text();
    const target = new URL(d.base).host;
    prom = await startPrometheus(dir, target);
    const p = prom;

    const up = await waitFor(async () => {
      const r = await query(p.base, 'up{job="expertd"}');
      return r.length > 0 && r[0]!.value[1] === '1' ? r : null;
    }, 60_000);
    assert.ok(up, `expertd never scraped up:\n${p.logs.join('')}`);
    assert.equal(up[0]!.metric.instance, target);

    for (const name of ['expertd_all2all_bytes_total', 'expertd_all2all_seconds_total', 'expertd_generation_tokens_total', 'expertd_expert_tokens_total', 'expertd_moe_kernel_choice_total',
    'expertd_rank_requests_total', 'expertd_rank_sequences']) {
      const want = served(text, name);
      assert.ok(want.size > 0, `${name} served`);
      const got = await waitFor(async () => {
        const r = await query(p.base, name);
        return r.length === want.size ? r : null;
      }, 30_000);
      assert.ok(got, `${name}: Prometheus has ${want.size} series`);
      assert.deepEqual(new Map(got.map((s) => [labelKey(s.metric), Number(s.value[1])])), want, name);
    }
    assert.ok(served(text, 'expertd_all2all_bytes_total').get('[]')! > 0, 'two ranks exchanged rows');
    assert.deepEqual([...served(text, 'expertd_rank_requests_total').values()], [1, 1], 'the front sent one request to each rank');

    // Every dashboard query parses and evaluates in this Prometheus (Grafana's variables given values);
    // one whose metrics this daemon serves returns series once two scrapes fall in the rate window.
    const dash = JSON.parse(fs.readFileSync(path.join(dockerDir, 'grafana', 'dashboards', 'expertd.json'), 'utf8'));
    const exprs: { panel: string; expr: string }[] = dash.panels.flatMap((panel: { title: string; targets?: { expr: string }[] }) =>
      (panel.targets ?? []).map((t) => ({ panel: panel.title, expr: t.expr })));
    const servedNames = new Set(text.split('\n').filter((l) => l && !l.startsWith('#')).map((l) => /^[A-Za-z_:][A-Za-z0-9_:]*/.exec(l)![0]));
    for (const { panel, expr } of exprs) {
      const promql = expr.replaceAll('$__rate_interval', '5s').replaceAll('$__range', '5m').replaceAll('$instance', '.*').replaceAll('$rank', '.*');
      const expectSeries = [...promql.matchAll(/expertd_[a-z0-9_]+/g)].every((m) => servedNames.has(m[0]));
      const got = await waitFor(async () => {
        const r = await query(p.base, promql);
        return r.length > 0 || !expectSeries ? r : null;
      }, 15_000);
      assert.ok(got, `${panel}: ${promql} returned no series`);
    }
  } finally {
    if (prom) await stopPrometheus(prom);
    await stopDaemon(d);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  assert.equal(prom!.proc.exitCode !== null || prom!.proc.signalCode !== null, true, 'prometheus exited');
});

test('docker/prometheus*.yml pass promtool check config; a broken copy fails', { skip: skipPromtool, timeout: 30_000 }, () => {
  for (const file of ['prometheus.yml', 'prometheus.host.yml']) {
    const r = spawnSync(promtoolBin, ['check', 'config', path.join(dockerDir, file)], { encoding: 'utf8' });
    assert.equal(r.status, 0, `${file}: ${r.stdout}${r.stderr}`);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-promtool-'));
  try {
    const broken = path.join(dir, 'prometheus.yml');
    fs.writeFileSync(broken, fs.readFileSync(path.join(dockerDir, 'prometheus.host.yml'), 'utf8').replace('scrape_interval', 'scrape_intervall'));
    const r = spawnSync(promtoolBin, ['check', 'config', broken], { encoding: 'utf8' });
    assert.notEqual(r.status, 0);
    assert.match(r.stdout + r.stderr, /scrape_intervall/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
