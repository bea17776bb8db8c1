// The command line as a user runs it: generate on every fixture, --help, and clean failures.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { loadNative, packageRoot } from '../src/native/index.js';

const run = promisify(execFile);
const bin = path.join(packageRoot(), 'bin', 'expertd.js');

async function expertd(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(process.execPath, [bin, ...args], { env: { ...process.env, ...env }, timeout: 120_000 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

for (const arch of ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v2', 'deepseek_v3', 'longcat_flash', 'glm4_moe',
  'minimax_m2', 'gpt_oss', 'qwen3_next', 'qwen3_5_moe_text']) {
  test(`expertd generate runs on the ${arch} fixture`, async () => {
    const dir = path.join(packageRoot(), 'test', 'fixtures', arch);
    const r = await expertd(['generate', '--model', dir, '--prompt', 'The quick brown fox', '--max-tokens', '12',
      '--compute-dtype', 'f32', '--ignore-eos']);
    assert.equal(r.code, 0, r.stderr);
    // qwen3_5_moe_text is Qwen3.5's text model: it loads as qwen3_5_moe.
    assert.match(r.stderr, new RegExp(`loaded ${arch.replace(/_text$/, '')}`));
    assert.ok(r.stdout.trim().length > 0, 'no text generated');
  });
}

test('expertd generate --chat uses the chat template; the demo model needs no --model', async () => {
  const r = await expertd(['generate', '--chat', 'Hi!', '--max-tokens', '5', '--seed', '3', '--temperature', '0.8']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /demo model/);
});

test('--help tells the truth for every command', async () => {
  const top = await expertd(['--help']);
  assert.equal(top.code, 0);
  assert.match(top.stdout, /serve/);
  assert.match(top.stdout, /generate/);
  const serve = await expertd(['serve', '--help']);
  for (const flag of ['--model', '--host', '--port', '--api-key', '--max-num-seqs', '--max-num-batched-tokens',
    '--max-queued-requests', '--max-queued-sequences', '--max-prompts-per-request', '--max-sequences-per-request', '--stream-stall-timeout', '--kv-cache-gb', '--kv-cache-blocks', '--block-size', '--compute-dtype',
    '--served-model-name', '--shutdown-timeout', '--log-level']) assert.ok(serve.stdout.includes(flag), `serve --help lacks ${flag}`);
  assert.match(serve.stdout, /EXPERTD_PORT/);
  const gen = await expertd(['generate', '--help']);
  for (const flag of ['--prompt', '--chat', '--max-tokens', '--temperature', '--seed', '--compute-dtype'])
    assert.ok(gen.stdout.includes(flag), `generate --help lacks ${flag}`);
});

test('bad usage and bad checkpoints fail with a clear message and a non-zero exit', async () => {
  const unknown = await expertd(['generate', '--frobnicate', '1']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown option --frobnicate/);
  const both = await expertd(['generate']);
  assert.equal(both.code, 2);
  assert.match(both.stderr, /exactly one of --prompt or --chat/);
  const env = await expertd(['generate', '--prompt', 'x'], { EXPERTD_BLOCK_SIZE: 'big' });
  assert.equal(env.code, 2);
  assert.match(env.stderr, /EXPERTD_BLOCK_SIZE: expected an integer, got 'big'/);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'expertd-cli-'));
  writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ model_type: 'llama', hidden_size: 8 }));
  const bad = await expertd(['generate', '--model', dir, '--prompt', 'x']);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /llama/);
  assert.match(bad.stderr, /mixtral/);
  const cmd = await expertd(['frob']);
  assert.equal(cmd.code, 2);
  assert.match(cmd.stderr, /unknown command 'frob'/);
});

test('--device: cpu, cuda[:N] checked before any worker starts, auto falls back to cpu', async () => {
  const caps = loadNative().capabilities();
  const bad = await expertd(['generate', '--prompt', 'x', '--device', 'gpu']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--device: 'gpu' is not one of auto, cpu, cuda, cuda:N/);
  const cpuN = await expertd(['generate', '--prompt', 'x', '--device', 'cpu:1']);
  assert.equal(cpuN.code, 2);
  const f32 = await expertd(['generate', '--prompt', 'x', '--device', 'cuda', '--compute-dtype', 'f32']);
  assert.equal(f32.code, 2);
  if (!caps.cudaCompiled) assert.match(f32.stderr, /built without CUDA/);
  else if (caps.cudaDevices === 0) assert.match(f32.stderr, /no CUDA device is visible/);
  else assert.match(f32.stderr, /--compute-dtype f32 runs on the CPU only/);
  const far = await expertd(['generate', '--prompt', 'x', '--device', `cuda:${caps.cudaDevices + 3}`]);
  assert.equal(far.code, 2);
  const offload = await expertd(['generate', '--prompt', 'x', '--device', 'cuda', '--expert-cache-fraction', '0.5']);
  assert.equal(offload.code, 2);
  // auto: the CPU here unless a device is visible (then the summary names it).
  const auto = await expertd(['generate', '--prompt', 'The', '--max-tokens', '3', '--ignore-eos']);
  assert.equal(auto.code, 0, auto.stderr);
  if (caps.cudaDevices > 0) assert.match(auto.stderr, /device cuda:0/);
  else assert.doesNotMatch(auto.stderr, /device cuda/);
});

test('--compute-dtype auto runs quantized weights in the fast mode on any CPU, f32 weights by the CPU', async () => {
  const { autoComputeDtype, resolveEngineOptions } = await import('../src/cli/resolve.js');
  assert.equal(autoComputeDtype(false, false), 'f32');
  assert.equal(autoComputeDtype(true, false), 'bf16');
  assert.equal(autoComputeDtype(false, true), 'bf16');
  const cpu = loadNative().capabilities().bf16Dot ? 'bf16' : 'f32';
  assert.equal(resolveEngineOptions({ device: 'cpu' }).computeDtype, cpu);
  const q = resolveEngineOptions({ device: 'cpu', quantize: 'int8' });
  assert.equal(q.computeDtype, 'bf16');
  assert.equal(q.kvCacheDtype, 'bf16');
  assert.equal(resolveEngineOptions({ device: 'cpu', quantize: 'int8', 'compute-dtype': 'f32' }).computeDtype, 'f32');
});
