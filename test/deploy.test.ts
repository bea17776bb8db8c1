// The deployment files under docker/ against their schemas: Kubernetes objects with kubernetes-models
// (plus kubectl-style strict field checks), the LeaderWorkerSet with LWS's own CRD schema, compose
// files with the compose spec's JSON schema; the Grafana dashboard's PromQL against a live /metrics.
// Every validator is also shown a broken copy and must reject it.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { test } from 'node:test';

import AjvModule, { type ValidateFunction } from 'ajv';
import { Deployment } from 'kubernetes-models/apps/v1';
import { PodTemplateSpec, Service } from 'kubernetes-models/v1';
import YAML from 'yaml';

import { packageRoot } from '../src/native/index.js';
import { startDaemon, stopDaemon, type Daemon } from './helpers/daemon.js';

const Ajv = AjvModule.default ?? AjvModule;
const dockerDir = path.join(packageRoot(), 'docker');
type Json = any; // eslint-disable-line @typescript-eslint/no-explicit-any -- parsed YAML/JSON walked by path

function readYamlDocs(file: string): Json[] {
  const docs = YAML.parseAllDocuments(fs.readFileSync(file, 'utf8'));
  for (const d of docs) assert.deepEqual(d.errors.map(String), [], `${file} parses as YAML`);
  return docs.map((d) => d.toJS());
}

// ---------------------------------------------------------------- Kubernetes (core and apps)

interface ModelCtor { prototype: { validate(): void } }
const k8sModels: Record<string, ModelCtor> = { 'apps/v1/Deployment': Deployment, 'v1/Service': Service };

/**
 * Problems of `data` as a `ctor` object: kubernetes-models' schema errors, and fields the schema does
 * not know (what `kubectl apply --validate=strict` refuses; the models alone accept them). Unknown
 * fields are found by watching which keys the schema's validator reads: it reads every known property
 * of an object and enumerates the keys of maps (labels, limits).
 */
function k8sProblems(ctor: ModelCtor, data: Json, where: string): string[] {
  const watched: { path: string; keys: string[]; read: Set<string> }[] = [];
  const watch = (node: Json, at: string): Json => {
    if (Array.isArray(node)) return node.map((x, i) => watch(x, `${at}[${i}]`));
    if (!node || typeof node !== 'object') return node;
    const read = new Set<string>();
    watched.push({ path: at, keys: Object.keys(node), read });
    const copy = Object.fromEntries(Object.entries(node).map(([k, v]) => [k, watch(v, `${at}.${k}`)]));
    return new Proxy(copy, {
      get(t, k, r) { if (typeof k === 'string') read.add(k); return Reflect.get(t, k, r); },
      ownKeys(t) { for (const k of Reflect.ownKeys(t)) if (typeof k === 'string') read.add(k); return Reflect.ownKeys(t); },
    });
  };
  const problems: string[] = [];
  try {
    ctor.prototype.validate.call(watch(data, where));
  } catch (e) {
    problems.push(`${where}: ${(e as Error).message}`);
  }
  for (const w of watched) for (const k of w.keys) if (!w.read.has(k)) problems.push(`${w.path}.${k}: unknown field`);
  return problems;
}

function objectProblems(obj: Json, where: string): string[] {
  const ctor = k8sModels[`${obj?.apiVersion}/${obj?.kind}`];
  return ctor ? k8sProblems(ctor, obj, where) : [`${where}: no schema for ${obj?.apiVersion} ${obj?.kind}`];
}

/** `$(VAR)` references in a container's command/args/env values (Kubernetes expands them at start). */
function expansionsOf(container: Json): string[] {
  const texts = [...(container.command ?? []), ...(container.args ?? []), ...(container.env ?? []).map((e: Json) => e.value ?? '')];
  return texts.flatMap((t: string) => [...String(t).matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g)].map((m) => m[1]!));
}

function flagValue(args: string[], flag: string): string | undefined {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === flag) return args[i + 1];
    if (args[i]!.startsWith(`${flag}=`)) return args[i]!.slice(flag.length + 1);
  }
  return undefined;
}

/** The ENV an image's Dockerfile sets (`ENV A=1 B=2` lines). */
function imageEnv(dockerfile: string): Record<string, string> {
  const text = fs.readFileSync(path.join(dockerDir, dockerfile), 'utf8');
  const env: Record<string, string> = {};
  for (const line of text.split('\n').filter((l) => l.startsWith('ENV '))) {
    for (const m of line.slice(4).matchAll(/([A-Za-z_][A-Za-z0-9_]*)=(\S+)/g)) env[m[1]!] = m[2]!;
  }
  return env;
}

// ---------------------------------------------------------------- LeaderWorkerSet

const lwsInjectedEnv = ['LWS_LEADER_ADDRESS', 'LWS_GROUP_SIZE', 'LWS_WORKER_INDEX', 'LWS_LEADER_NAME'];
// Labels LWS puts on every pod of a set (the Service selects leaders with them).
const lwsPodLabels = (name: string, workerIndex: number) => ({ 'leaderworkerset.sigs.k8s.io/name': name, 'leaderworkerset.sigs.k8s.io/worker-index': String(workerIndex) });

let lwsValidator: ValidateFunction | null = null;
/**
 * LWS's v1 spec schema (docker/k8s/schema, cut from its CRD) compiled the way the API server applies a
 * structural schema with strict field validation: objects that list properties and do not preserve
 * unknown fields refuse other keys.
 */
function lwsValidate(): ValidateFunction {
  if (lwsValidator) return lwsValidator;
  const schema = JSON.parse(fs.readFileSync(path.join(dockerDir, 'k8s', 'schema', 'leaderworkerset-v1.schema.json'), 'utf8'));
  const extensions = new Set<string>();
  const strict = (node: Json): void => {
    if (!node || typeof node !== 'object') return;
    for (const [k, v] of Object.entries(node)) {
      if (k.startsWith('x-kubernetes-')) extensions.add(k);
      strict(v);
    }
    if (!Array.isArray(node) && node.properties && !node['x-kubernetes-preserve-unknown-fields'] && node.additionalProperties === undefined) {
      node.additionalProperties = false;
    }
  };
  strict(schema);
  const ajv = new Ajv({ allErrors: true, allowUnionTypes: true });
  for (const k of extensions) ajv.addKeyword(k);
  ajv.addFormat('int32', { type: 'number', validate: (n: number) => Number.isInteger(n) && n >= -(2 ** 31) && n < 2 ** 31 });
  ajv.addFormat('int64', { type: 'number', validate: (n: number) => Number.isInteger(n) });
  lwsValidator = ajv.compile(schema);
  return lwsValidator;
}

function lwsProblems(lws: Json): string[] {
  const validate = lwsValidate();
  const problems = validate(lws) ? [] : (validate.errors ?? []).map((e) => `LeaderWorkerSet${e.instancePath}: ${e.message} ${JSON.stringify(e.params)}`);
  const lwt = lws?.spec?.leaderWorkerTemplate ?? {};
  for (const role of ['leaderTemplate', 'workerTemplate']) {
    if (lwt[role] === undefined) continue;
    problems.push(...k8sProblems(PodTemplateSpec, lwt[role], `LeaderWorkerSet.spec.leaderWorkerTemplate.${role}`));
  }
  return problems;
}

/** What the group needs beyond the schemas: the dist contract, probes, shm, GPUs, the whole-group restart. */
function lwsContractProblems(lws: Json, service: Json): string[] {
  const problems: string[] = [];
  const lwt = lws.spec.leaderWorkerTemplate;
  if (lwt.restartPolicy !== 'RecreateGroupOnPodRestart') problems.push(`restartPolicy is ${lwt.restartPolicy}, expected RecreateGroupOnPodRestart (a lost rank ends the group)`);
  if (!(lwt.size >= 2)) problems.push(`size is ${lwt.size}, expected the K >= 2 nodes of a multi-node group`);
  if (lws.spec.startupPolicy === 'LeaderReady') problems.push('startupPolicy LeaderReady deadlocks: the leader is ready only when the workers\' ranks are');
  for (const role of ['leaderTemplate', 'workerTemplate']) {
    const pod = lwt[role].spec;
    const c = pod.containers.find((x: Json) => x.name === 'expertd');
    if (!c) { problems.push(`${role}: no expertd container`); continue; }
    const args: string[] = c.args ?? [];
    const nproc = Number(flagValue(args, '--nproc-per-node'));
    const gpus = Number(c.resources?.limits?.['nvidia.com/gpu']);
    if (!(nproc >= 1) || nproc !== gpus) problems.push(`${role}: --nproc-per-node ${nproc} but nvidia.com/gpu ${gpus}: one rank per GPU`);
    if (flagValue(args, '--nnodes') !== '$(LWS_GROUP_SIZE)') problems.push(`${role}: --nnodes is not $(LWS_GROUP_SIZE)`);
    if (flagValue(args, '--node-rank') !== '$(LWS_WORKER_INDEX)') problems.push(`${role}: --node-rank is not $(LWS_WORKER_INDEX)`);
    if (!/^\$\(LWS_LEADER_ADDRESS\):\d+$/.test(flagValue(args, '--dist-init-addr') ?? '')) problems.push(`${role}: --dist-init-addr is not $(LWS_LEADER_ADDRESS):PORT`);
    const defined = new Set((c.env ?? []).map((e: Json) => e.name));
    for (const v of expansionsOf(c)) if (!defined.has(v) && !lwsInjectedEnv.includes(v)) problems.push(`${role}: $(${v}) is neither in env nor injected by LWS`);
    const shm = (c.volumeMounts ?? []).find((m: Json) => m.mountPath === '/dev/shm');
    const shmVolume = shm && (pod.volumes ?? []).find((v: Json) => v.name === shm.name);
    if (shmVolume?.emptyDir?.medium !== 'Memory') problems.push(`${role}: no memory-backed /dev/shm for NCCL`);
    const mounts = new Set((pod.volumes ?? []).map((v: Json) => v.name));
    for (const m of c.volumeMounts ?? []) if (!mounts.has(m.name)) problems.push(`${role}: volumeMount ${m.name} has no volume`);
  }
  const leader = lwt.leaderTemplate.spec.containers.find((x: Json) => x.name === 'expertd');
  for (const probe of ['readinessProbe', 'livenessProbe', 'startupProbe']) {
    if (leader?.[probe]?.httpGet?.path !== '/health') problems.push(`leader: ${probe} is not on /health`);
  }
  const httpPort = (leader?.ports ?? []).find((p: Json) => p.name === 'http');
  const servedPort = Number(flagValue(leader?.args ?? [], '--port') ?? imageEnv('Dockerfile.gpu').EXPERTD_PORT);
  if (httpPort?.containerPort !== servedPort) problems.push(`leader: port http is ${httpPort?.containerPort}, expertd listens on ${servedPort}`);
  // The Service must reach leaders (node 0 serves HTTP) and never workers.
  const selects = (labels: Record<string, string>) => Object.entries(service.spec.selector ?? {}).every(([k, v]) => labels[k] === v);
  const leaderLabels = { ...lwt.leaderTemplate.metadata?.labels, ...lwsPodLabels(lws.metadata.name, 0) };
  const workerLabels = { ...lwt.workerTemplate.metadata?.labels, ...lwsPodLabels(lws.metadata.name, 1) };
  if (!selects(leaderLabels)) problems.push('Service does not select the leader pods');
  if (selects(workerLabels)) problems.push('Service selects worker pods, which serve no HTTP');
  if (!(service.spec.ports ?? []).some((p: Json) => p.targetPort === 'http' || p.targetPort === httpPort?.containerPort)) problems.push('Service does not target the leader\'s http port');
  return problems;
}

test('docker/k8s/expertd.yaml: a valid Deployment and Service (kubernetes-models, no unknown fields); broken copies are refused', () => {
  const docs = readYamlDocs(path.join(dockerDir, 'k8s', 'expertd.yaml'));
  assert.deepEqual(docs.map((d) => `${d.apiVersion}/${d.kind}`), ['apps/v1/Deployment', 'v1/Service']);
  docs.forEach((d, i) => assert.deepEqual(objectProblems(d, `doc ${i}`), []));

  const typo = structuredClone(docs[0]);
  typo.spec.template.spec.containers[0].readinesProbe = typo.spec.template.spec.containers[0].readinessProbe;
  delete typo.spec.template.spec.containers[0].readinessProbe;
  assert.match(objectProblems(typo, 'typo').join('\n'), /containers\[0\]\.readinesProbe: unknown field/);
  const badPort = structuredClone(docs[0]);
  badPort.spec.template.spec.containers[0].ports[0].containerPort = '8000';
  assert.match(objectProblems(badPort, 'port').join('\n'), /containerPort must be integer/);
  const badGpu = structuredClone(docs[0]);
  badGpu.spec.template.spec.containers[0].resources.limits['nvidia.com/gpu'] = 'one';
  assert.match(objectProblems(badGpu, 'gpu').join('\n'), /nvidia\.com~1gpu must match format "quantity"/);
  const svc = structuredClone(docs[1]);
  svc.spec.ports[0].port = '8000';
  svc.spec.selectr = svc.spec.selector;
  assert.match(objectProblems(svc, 'svc').join('\n'), /ports\/0\/port must be integer[^]*svc\.spec\.selectr: unknown field/);
});

test('docker/k8s/expertd-lws.yaml: LeaderWorkerSet valid against LWS\'s CRD schema, pod templates against PodTemplateSpec; broken copies are refused', () => {
  const [lws, service, ...rest] = readYamlDocs(path.join(dockerDir, 'k8s', 'expertd-lws.yaml'));
  assert.equal(rest.length, 0);
  assert.equal(lws.apiVersion, 'leaderworkerset.x-k8s.io/v1');
  assert.equal(lws.kind, 'LeaderWorkerSet');
  assert.deepEqual(lwsProblems(lws), []);
  assert.deepEqual(objectProblems(service, 'Service'), []);

  const broken = (edit: (x: Json) => void) => { const x = structuredClone(lws); edit(x); return lwsProblems(x).join('\n'); };
  assert.match(broken((x) => { x.spec.leaderWorkerTemplate.restartPolicy = 'RecreateGroup'; }), /restartPolicy: must be equal to one of the allowed values/);
  assert.match(broken((x) => { x.spec.leaderWorkerTemplate.sise = 2; }), /leaderWorkerTemplate: must NOT have additional properties .*"sise"/);
  assert.match(broken((x) => { x.spec.replicas = -1; }), /replicas: must be >= 0/);
  assert.match(broken((x) => { delete x.spec.leaderWorkerTemplate.workerTemplate; }), /must have required property 'workerTemplate'/);
  assert.match(broken((x) => { delete x.spec.leaderWorkerTemplate.leaderTemplate.spec.containers[0].name; }), /leaderTemplate: .*must have required property name/);
  assert.match(broken((x) => { x.spec.leaderWorkerTemplate.workerTemplate.spec.containers[0].resources.limit = {}; }), /workerTemplate\.spec\.containers\[0\]\.resources\.limit: unknown field/);
});

test('docker/k8s/expertd-lws.yaml: the group follows the dist contract (LWS env -> dist flags, one rank per GPU, shm, /health probes, Service on leaders only)', () => {
  const [lws, service] = readYamlDocs(path.join(dockerDir, 'k8s', 'expertd-lws.yaml'));
  assert.deepEqual(lwsContractProblems(lws, service), []);

  const broken = (edit: (l: Json, s: Json) => void) => {
    const l = structuredClone(lws); const s = structuredClone(service); edit(l, s); return lwsContractProblems(l, s).join('\n');
  };
  const worker = (l: Json) => l.spec.leaderWorkerTemplate.workerTemplate.spec;
  assert.match(broken((l) => { l.spec.leaderWorkerTemplate.restartPolicy = 'None'; }), /expected RecreateGroupOnPodRestart/);
  assert.match(broken((_l, s) => { delete s.spec.selector.role; }), /Service selects worker pods/);
  assert.match(broken((_l, s) => { s.spec.selector.role = 'front'; }), /does not select the leader pods/);
  assert.match(broken((l) => { worker(l).containers[0].resources.limits['nvidia.com/gpu'] = 4; }), /workerTemplate: --nproc-per-node 8 but nvidia.com\/gpu 4/);
  assert.match(broken((l) => { worker(l).containers[0].args = worker(l).containers[0].args.map((a: string) => a.replace('LWS_WORKER_INDEX', 'LWS_WORKER_IDX')); }),
    /--node-rank is not \$\(LWS_WORKER_INDEX\)[^]*\$\(LWS_WORKER_IDX\) is neither in env nor injected by LWS/);
  assert.match(broken((l) => { worker(l).volumes = worker(l).volumes.filter((v: Json) => v.name !== 'dshm'); }), /workerTemplate: no memory-backed \/dev\/shm/);
  assert.match(broken((l) => { delete l.spec.leaderWorkerTemplate.leaderTemplate.spec.containers[0].livenessProbe; }), /leader: livenessProbe is not on \/health/);
  assert.match(broken((l) => { l.spec.startupPolicy = 'LeaderReady'; }), /LeaderReady deadlocks/);
  assert.match(broken((l) => { l.spec.leaderWorkerTemplate.leaderTemplate.spec.containers[0].args.push('--port=9000'); }), /port http is 8000, expertd listens on 9000/);
});

// ---------------------------------------------------------------- compose

let composeValidator: ValidateFunction | null = null;
/** The compose spec's JSON schema as dclint ships it (node_modules/dclint/schemas/compose.schema.json). */
function composeValidate(): ValidateFunction {
  if (composeValidator) return composeValidator;
  const require = createRequire(import.meta.url);
  const schemaPath = path.join(path.dirname(require.resolve('dclint/package.json')), 'schemas', 'compose.schema.json');
  const schema = JSON.parse(fs.readFileSync(schemaPath, 'utf8'));
  delete schema.$schema; // "https://json-schema.org/draft-07/schema", which ajv knows as its default draft
  composeValidator = new Ajv({ allErrors: true, allowUnionTypes: true, strictTypes: false }).compile(schema);
  return composeValidator;
}

/** Compose's interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$) over every string. */
function interpolate(node: Json, env: Record<string, string>): Json {
  if (Array.isArray(node)) return node.map((x) => interpolate(x, env));
  if (node && typeof node === 'object') return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, interpolate(v, env)]));
  if (typeof node !== 'string') return node;
  return node.replace(/\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)([^}]*))?\}/g, (all: string, name?: string, op?: string, arg?: string) => {
    if (all === '$$') return '$';
    const value = env[name!];
    const unset = value === undefined || (op?.startsWith(':') === true && value === '');
    if ((op === ':-' || op === '-') && unset) return arg!;
    if ((op === ':?' || op === '?') && unset) throw new Error(`${name}: ${arg}`);
    return value ?? '';
  });
}

function composeSchemaProblems(doc: Json): string[] {
  const validate = composeValidate();
  return validate(doc) ? [] : (validate.errors ?? []).map((e) => `compose${e.instancePath}: ${e.message} ${JSON.stringify(e.params)}`);
}

/** Host paths a compose file bind-mounts (./x relative to the file) that do not exist. */
function missingBindSources(doc: Json): string[] {
  const missing: string[] = [];
  for (const [name, svc] of Object.entries<Json>(doc.services)) {
    for (const v of svc.volumes ?? []) {
      const source = typeof v === 'string' ? v.split(':')[0]! : v.source;
      if (source.startsWith('./') && !fs.existsSync(path.join(dockerDir, source))) missing.push(`${name}: ${source}`);
    }
  }
  return missing;
}

function mountedFile(svc: Json, target: string): string {
  const v = (svc.volumes ?? []).find((x: Json) => typeof x === 'string' && x.split(':')[1] === target);
  assert.ok(v, `a volume mounted at ${target}`);
  return path.join(dockerDir, v.split(':')[0]);
}

/** What compose.gpu.yaml must do beyond the schema: N ranks on N reserved GPUs, whole-group restart, wiring. */
function gpuComposeProblems(doc: Json): string[] {
  const problems: string[] = [];
  const e = doc.services.expertd;
  const nproc = Number(flagValue(e.command, '--nproc-per-node'));
  const devices = e.deploy?.resources?.reservations?.devices ?? [];
  const gpu = devices.find((d: Json) => (d.capabilities ?? []).includes('gpu'));
  if (!gpu) problems.push('expertd: no GPU device reservation');
  else if (Number(gpu.count) !== nproc) problems.push(`expertd: --nproc-per-node ${nproc} but ${gpu.count} GPUs reserved`);
  for (const flag of ['--nnodes', '--node-rank', '--dist-init-addr']) if (flagValue(e.command, flag) === undefined) problems.push(`expertd: no ${flag}`);
  if (e.restart !== 'on-failure' && e.restart !== 'always') problems.push(`expertd: restart ${e.restart}: a group that lost a rank exits non-zero and must be restarted`);
  if (e.ipc !== 'host' && !e.shm_size) problems.push('expertd: ranks need a shared /dev/shm (ipc: host or shm_size)');
  return problems;
}

const composeEnv = { MODEL: 'Qwen3-30B-A3B', MODEL_DIR: '/models', NPROC_PER_NODE: '4' };

test('docker/compose*.yaml: valid against the compose spec schema before and after interpolation, bind mounts exist; broken copies are refused', () => {
  for (const file of ['compose.yaml', 'compose.gpu.yaml']) {
    const [raw] = readYamlDocs(path.join(dockerDir, file));
    assert.deepEqual(composeSchemaProblems(raw), [], `${file} as written`);
    const doc = interpolate(raw, composeEnv);
    assert.deepEqual(composeSchemaProblems(doc), [], `${file} interpolated`);
    assert.deepEqual(missingBindSources(doc), [], `${file} bind mounts`);
    for (const svc of ['expertd', 'prometheus', 'grafana']) assert.ok(doc.services[svc], `${file} has ${svc}`);
  }
  const [raw] = readYamlDocs(path.join(dockerDir, 'compose.gpu.yaml'));
  const broken = (edit: (x: Json) => void) => { const x = structuredClone(raw); edit(x); return composeSchemaProblems(x).join('\n'); };
  assert.match(broken((x) => { x.services.expertd.deploy.resources.reservations.gpus = 8; }), /reservations: must NOT have additional properties .*"gpus"/);
  assert.match(broken((x) => { x.services.expertd.deploy.resources.reservations.devices[0].capabilities = 'gpu'; }), /capabilities: must be array/);
  assert.match(broken((x) => { x.services.expertd.restart_policy = 'on-failure'; }), /must NOT have additional properties .*"restart_policy"/);
  const gone = structuredClone(raw);
  gone.services.prometheus.volumes[0] = './prometheus.hots.yml:/etc/prometheus/prometheus.yml:ro';
  assert.deepEqual(missingBindSources(gone), ['prometheus: ./prometheus.hots.yml']);
  assert.throws(() => interpolate(raw, {}), /MODEL: set MODEL/);
});

test('docker/compose.gpu.yaml: N ranks on N reserved GPUs, dist flags, whole-group restart, Prometheus and Grafana wired to expertd', () => {
  const [raw] = readYamlDocs(path.join(dockerDir, 'compose.gpu.yaml'));
  const doc = interpolate(raw, composeEnv);
  assert.deepEqual(gpuComposeProblems(doc), []);
  assert.equal(flagValue(doc.services.expertd.command, '--nproc-per-node'), '4');
  assert.equal(flagValue(doc.services.expertd.command, '--model'), '/models/Qwen3-30B-A3B');
  const multi = interpolate(raw, { ...composeEnv, NNODES: '2', NODE_RANK: '1', DIST_INIT_ADDR: '10.0.0.1:29500' });
  assert.deepEqual(['--nnodes', '--node-rank', '--dist-init-addr'].map((f) => flagValue(multi.services.expertd.command, f)), ['2', '1', '10.0.0.1:29500']);
  // Workers (node rank > 0) serve no HTTP, so their healthcheck must not probe it.
  assert.match(multi.services.expertd.healthcheck.test[1], /^\[ "1" != 0 \] \|\|/);

  const broken = (edit: (x: Json) => void) => { const x = structuredClone(doc); edit(x); return gpuComposeProblems(x).join('\n'); };
  assert.match(broken((x) => { x.services.expertd.deploy.resources.reservations.devices[0].count = '2'; }), /--nproc-per-node 4 but 2 GPUs reserved/);
  assert.match(broken((x) => { x.services.expertd.restart = 'no'; }), /restart no/);
  assert.match(broken((x) => { delete x.services.expertd.ipc; }), /shared \/dev\/shm/);

  // Prometheus scrapes expertd's port on the host network; Grafana's datasource points at Prometheus.
  const prom = YAML.parse(fs.readFileSync(mountedFile(doc.services.prometheus, '/etc/prometheus/prometheus.yml'), 'utf8'));
  assert.deepEqual(prom.scrape_configs[0].static_configs[0].targets, [`127.0.0.1:${doc.services.expertd.environment.EXPERTD_PORT}`]);
  const promAddress = flagValue(doc.services.prometheus.command, '--web.listen-address');
  assert.equal(doc.services.grafana.environment.PROMETHEUS_URL, `http://${promAddress}`);
});

test('docker/compose.yaml: Prometheus scrapes the expertd service, Grafana reads that Prometheus', () => {
  const [doc] = readYamlDocs(path.join(dockerDir, 'compose.yaml'));
  const prom = YAML.parse(fs.readFileSync(mountedFile(doc.services.prometheus, '/etc/prometheus/prometheus.yml'), 'utf8'));
  assert.deepEqual(prom.scrape_configs[0].static_configs[0].targets, ['expertd:8000']);
  assert.ok(doc.services.expertd.ports.includes('8000:8000'));
  assert.equal(doc.services.grafana.environment.PROMETHEUS_URL, 'http://prometheus:9090');
});

// ---------------------------------------------------------------- Grafana

const dashboardPath = path.join(dockerDir, 'grafana', 'dashboards', 'expertd.json');

function dashboardExprs(dash: Json): { panel: string; expr: string }[] {
  const out: { panel: string; expr: string }[] = [];
  const walk = (panels: Json[]) => {
    for (const p of panels ?? []) {
      for (const t of p.targets ?? []) out.push({ panel: p.title, expr: t.expr });
      walk(p.panels);
    }
  };
  walk(dash.panels);
  return out;
}

const promqlKeywords = new Set(['and', 'or', 'unless', 'bool', 'offset', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'inf', 'nan']);
/** Metric names a PromQL expression reads: identifiers outside strings, label matchers, ranges and grouping lists that are not functions. */
function promqlMetricNames(expr: string): string[] {
  const s = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  const names = new Set<string>();
  for (const m of s.matchAll(/(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*/g)) {
    if (/^\s*\(/.test(s.slice(m.index! + m[0].length)) || promqlKeywords.has(m[0].toLowerCase())) continue;
    names.add(m[0]);
  }
  return [...names];
}

/** Dashboard PromQL that names a metric absent from `served` (sample names of a live /metrics). */
function unknownMetrics(dash: Json, served: Set<string>): string[] {
  return dashboardExprs(dash).flatMap(({ panel, expr }) => promqlMetricNames(expr).filter((n) => !served.has(n)).map((n) => `${panel}: ${n}`));
}

function sampleNames(metricsText: string): Set<string> {
  return new Set(metricsText.split('\n').filter((l) => l && !l.startsWith('#')).map((l) => /^[A-Za-z_:][A-Za-z0-9_:]*/.exec(l)![0]));
}

test('promqlMetricNames finds the metrics of an expression and nothing else', () => {
  assert.deepEqual(promqlMetricNames('histogram_quantile(0.99, sum by (le) (rate(a_bucket{rank=~"$rank", x="y(z)"}[$__rate_interval])))'), ['a_bucket']);
  assert.deepEqual(promqlMetricNames('sum(rate(a_total[5m])) / (sum(rate(a_total[5m])) + sum without (le, rank) (b))'), ['a_total', 'b']);
  assert.deepEqual(promqlMetricNames('max by (rank, layer) (c) > bool 1 and on (rank) d offset 5m'), ['c', 'd']);
});

test('docker/grafana: provisioning names the dashboard\'s datasource; every panel queries through it; rank and instance variables exist', () => {
  const ds = YAML.parse(fs.readFileSync(path.join(dockerDir, 'grafana', 'provisioning', 'datasources', 'prometheus.yml'), 'utf8'));
  const provider = YAML.parse(fs.readFileSync(path.join(dockerDir, 'grafana', 'provisioning', 'dashboards', 'expertd.yml'), 'utf8'));
  assert.equal(ds.datasources[0].type, 'prometheus');
  assert.equal(ds.datasources[0].isDefault, true);
  assert.equal(ds.datasources[0].url, '${PROMETHEUS_URL}');
  for (const file of ['compose.yaml', 'compose.gpu.yaml']) {
    const [doc] = readYamlDocs(path.join(dockerDir, file));
    const g = doc.services.grafana;
    assert.match(g.environment.PROMETHEUS_URL, /^http:\/\//, `${file}: grafana gets PROMETHEUS_URL`);
    assert.ok(g.volumes.includes('./grafana/provisioning:/etc/grafana/provisioning:ro'), `${file}: provisioning mounted`);
    assert.ok(g.volumes.includes(`./grafana/dashboards:${provider.providers[0].options.path}:ro`), `${file}: dashboards mounted where the provider reads them`);
  }
  const dash = JSON.parse(fs.readFileSync(dashboardPath, 'utf8'));
  const vars = new Map<string, Json>(dash.templating.list.map((v: Json) => [v.name, v]));
  assert.equal(vars.get('datasource')?.query, 'prometheus');
  assert.equal(vars.get('rank')?.allValue, '.*', 'All ranks also matches series without a rank label');
  const exprs = dashboardExprs(dash);
  assert.ok(exprs.length >= 30, `${exprs.length} queries`);
  const panels = dash.panels.filter((p: Json) => p.type !== 'row');
  for (const p of panels) {
    assert.equal(p.datasource?.uid, '${datasource}', `${p.title} uses the datasource variable`);
    assert.ok(p.targets?.length > 0, `${p.title} has queries`);
  }
  assert.equal(new Set(dash.panels.map((p: Json) => p.id)).size, dash.panels.length, 'panel ids are unique');
  for (const { panel, expr } of exprs) {
    if (promqlMetricNames(expr).length === 0) assert.fail(`${panel}: no metric in ${expr}`);
    assert.match(expr, /rank=~"\$rank"/, `${panel} filters by rank`);
  }
});

async function liveMetrics(d: Daemon): Promise<string> {
  await d.client.completions.create({ model: 'expertd-demo', prompt: 'The weather today', max_tokens: 6, temperature: 0 });
  const res = await fetch(`${d.base}/metrics`);
  assert.equal(res.status, 200);
  return res.text();
}

test('the dashboard queries only metrics a live expertd serves (--nproc-per-node 2, and with expert offloading)', async () => {
  // Rank processes (expert-parallel MoE over Gloo, the front's per-rank series) and offloading
  // cannot run together yet: the union of the two daemons' series.
  const served = new Set<string>();
  for (const flags of [['--nproc-per-node', '2'], ['--expert-cache-fraction', '0.5']]) {
    const d = await startDaemon(flags);
    try {
      for (const n of sampleNames(await liveMetrics(d))) served.add(n);
    } finally {
      await stopDaemon(d);
    }
  }
  const dash = JSON.parse(fs.readFileSync(dashboardPath, 'utf8'));
  assert.deepEqual(unknownMetrics(dash, served), []);
  // The check can fail: a misspelt metric (or one only a dropped histogram suffix would give) is reported.
  const broken = structuredClone(dash);
  const target = broken.panels.find((p: Json) => p.title === 'Share of time in all2all per rank').targets[0];
  target.expr = target.expr.replace('expertd_all2all_seconds_total', 'expertd_all2all_second_total');
  const ttft = broken.panels.find((p: Json) => p.title === 'Time to first token').targets[0];
  ttft.expr = ttft.expr.replace('_seconds_bucket', '_seconds');
  assert.deepEqual(unknownMetrics(broken, served), ['Time to first token: expertd_time_to_first_token_seconds', 'Share of time in all2all per rank: expertd_all2all_second_total']);
});
