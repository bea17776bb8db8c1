// --quantize with expert parallelism on the device engine: every rank quantizes the experts it owns at
// load (or keeps an FP8 checkpoint's blocks), and 2 ranks (emulated devices, NCCL as the loopback
// group) equal one device with the same --quantize bit for bit, with the EPS-MoE pipeline (PN 2) too.
// Served: in-process ranks (--expert-parallel 2) and rank processes (--nproc-per-node 2 --dist-moe
// expert) answer as one quantized device, and the device expert cache with --quantize says its slots.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';

import { startDeviceExpertRanks } from '../src/dist/expert-ranks.js';
import { loadCudaModel } from '../src/model/load.js';
import { quantizeSpec, type QuantizeSpec } from '../src/model/quantize.js';
import { packageRoot } from '../src/native/index.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { emulatorSkip, needsGloo } from './helpers/cuda-skip.js';
import { startDaemon, stopDaemon } from './helpers/daemon.js';
import { makeFp8Checkpoint } from './helpers/fp8-checkpoint.js';
import { actOrderCopy } from './helpers/int-checkpoint.js';
import { runAll } from './helpers/model-runner.js';

const emu = path.join(packageRoot(), 'dist', 'test', 'helpers', 'cuda-emu.js');
const fixture = (name: string) => path.join(packageRoot(), 'test', 'fixtures', name);
let fp8Root: string | null = null, actRoot: string | null = null;
const fp8Checkpoint = () => (fp8Root ??= makeFp8Checkpoint(24, 48));
const actOrderCheckpoint = () => {
  if (!actRoot) {
    actRoot = mkdtempSync(path.join(os.tmpdir(), 'expertd-act-ep-'));
    actOrderCopy(path.join(actRoot, 'act'));
  }
  return path.join(actRoot, 'act');
};
after(() => {
  for (const d of [fp8Root, actRoot]) if (d) rmSync(d, { recursive: true, force: true });
});

const cases: { label: string; dir: () => string; quantize: QuantizeSpec | null; format: string; pn: number }[] = [
  { label: 'qwen2_moe --quantize int8', dir: () => fixture('qwen2_moe'), quantize: quantizeSpec('int8', 0), format: 'int8', pn: 1 },
  { label: 'mixtral --quantize int4 g128, PN 2', dir: () => fixture('mixtral'), quantize: quantizeSpec('int4', 128), format: 'int4', pn: 2 },
  { label: 'deepseek_v3 --quantize fp8', dir: () => fixture('deepseek_v3'), quantize: quantizeSpec('fp8', 0), format: 'fp8', pn: 1 },
  { label: 'longcat_flash --quantize int4 g32', dir: () => fixture('longcat_flash'), quantize: quantizeSpec('int4', 32), format: 'int4', pn: 1 },
  { label: 'an FP8 checkpoint (24 x 48 blocks, kept FP8)', dir: fp8Checkpoint, quantize: null, format: 'fp8', pn: 1 },
  { label: 'an FP8 checkpoint with --quantize int8', dir: fp8Checkpoint, quantize: quantizeSpec('int8', 0), format: 'int8', pn: 2 },
  // Act-order GPTQ: each rank gathers the rows it receives into its own experts' input orders.
  { label: 'an act-order GPTQ checkpoint (int4 g32 codes as stored), PN 2', dir: actOrderCheckpoint, quantize: null, format: 'int4', pn: 2 },
  // gpt-oss's biased, clamped-SwiGLU experts: each rank runs cudaGroupGemmBiasedFfn over its quantized slice.
  { label: 'gpt_oss --quantize int8', dir: () => fixture('gpt_oss'), quantize: quantizeSpec('int8', 0), format: 'int8', pn: 1 },
  { label: 'gpt_oss --quantize fp8, PN 2', dir: () => fixture('gpt_oss'), quantize: quantizeSpec('fp8', 0), format: 'fp8', pn: 2 },
  // --quantize-dense: rank 0's attention and shared expert quantized too (expert ranks hold experts only).
  { label: 'qwen2_moe --quantize int8 --quantize-dense, PN 2', dir: () => fixture('qwen2_moe'), quantize: quantizeSpec('int8', 0, true), format: 'int8', pn: 2 },
];

for (const c of cases) {
  test(`${c.label} on 2 emulated devices equals one device with the same experts, bit for bit`, { skip: emulatorSkip }, async () => {
    const dir = c.dir();
    const q = c.quantize ? { quantize: c.quantize } : {};
    const single = loadCudaModel(dir, { device: 0, cuda: createCudaEmulator(), ...q });
    assert.equal(single.model.expertQuant?.format, c.format);
    const want = runAll(single.model, null);
    single.model.dispose();
    const cuda = createCudaEmulator();
    const ranks = startDeviceExpertRanks(dir, 2, cuda, emu, 60_000, undefined, c.quantize);
    try {
      await ranks.ready;
      const loaded = loadCudaModel(dir, { device: 0, cuda, ep: ranks.comm, ...q });
      try {
        loaded.model.setPipelineChunks(c.pn);
        const got = runAll(loaded.model, null);
        assert.deepEqual(got.tokens, want.tokens, `${c.label}: greedy tokens`);
        got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `${c.label}: logits of step ${i}`));
        assert.ok(ranks.comm.bytesSent > 0, 'rows went to the other rank');
      } finally {
        loaded.model.dispose();
      }
    } finally {
      await ranks.stop();
    }
  });
}

/** Greedy texts with their tokens' logprobs (equal bits give equal logprobs: a stricter check than the text). */
async function texts(args: string[], env: NodeJS.ProcessEnv): Promise<{ texts: string[]; logprobs: unknown[]; logs: string }> {
  const d = await startDaemon(['--model', fixture('qwen2_moe'), '--compute-dtype', 'bf16', '--device', 'cuda', '--quantize', 'int8', ...args], env);
  try {
    const out: string[] = [], logprobs: unknown[] = [];
    for (const prompt of ['The quick brown fox', 'Hello']) {
      const c = await d.client.completions.create({ model: 'qwen2_moe', prompt, max_tokens: 8, temperature: 0, logprobs: 2 });
      out.push(c.choices[0]!.text);
      assert.ok(c.choices[0]!.logprobs?.token_logprobs?.length, 'logprobs came back');
      logprobs.push(c.choices[0]!.logprobs);
    }
    const logs = d.logs.join('');
    assert.equal(await stopDaemon(d), 0, logs);
    return { texts: out, logprobs, logs };
  } catch (e) {
    d.proc.kill('SIGKILL');
    throw e;
  }
}

test('expertd serve --device cuda --quantize int8 (emulated): --expert-parallel 2, rank processes and the expert cache answer as one device', { skip: emulatorSkip }, async (t) => {
  const env = { EXPERTD_CUDA_STANDIN: emu };
  const one = await texts([], env);
  assert.match(one.logs, /quantized int8/);
  const inProcess = await texts(['--expert-parallel', '2'], env);
  assert.deepEqual(inProcess.texts, one.texts, '--expert-parallel 2');
  assert.deepEqual(inProcess.logprobs, one.logprobs, '--expert-parallel 2: logprobs');
  if (needsGloo) {
    t.diagnostic(`rank processes not checked: ${needsGloo}`);
  } else {
    const procs = await texts(['--nproc-per-node', '2', '--dist-moe', 'expert'], env);
    assert.deepEqual(procs.texts, one.texts, '--nproc-per-node 2 --dist-moe expert');
    assert.deepEqual(procs.logprobs, one.logprobs, '--nproc-per-node 2 --dist-moe expert: logprobs');
    assert.match(procs.logs, /MoE layers expert-parallel over 2 ranks \(NCCL/);
  }
  const cached = await texts(['--expert-cache-fraction', '0.5'], env);
  assert.deepEqual(cached.texts, one.texts, '--expert-cache-fraction 0.5');
  assert.deepEqual(cached.logprobs, one.logprobs, '--expert-cache-fraction 0.5: logprobs');
  // qwen2_moe fixture: H 64, I 32: int8 gate_up 4096 + 256 B, down 2048 + 256 B.
  assert.match(cached.logs, /expert cache \d+\/\d+ experts \(int8\) in slots of 6\.5 KiB/);
});

test('expertd serve --device cuda --quantize int8 --quantize-dense (emulated): served, and rank processes answer as one device', { skip: emulatorSkip || needsGloo }, async () => {
  const env = { EXPERTD_CUDA_STANDIN: emu };
  const one = await texts(['--quantize-dense'], env);
  const procs = await texts(['--quantize-dense', '--nproc-per-node', '2', '--dist-moe', 'expert'], env);
  assert.deepEqual(procs.texts, one.texts, '--nproc-per-node 2 --dist-moe expert');
  assert.deepEqual(procs.logprobs, one.logprobs, '--nproc-per-node 2 --dist-moe expert: logprobs');
});
