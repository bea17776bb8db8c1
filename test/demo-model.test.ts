// The demo model: created once, deterministic, complete (config, weights, tokenizer, chat template)
// and valid against its own config.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';

import { expectedTensors, parseModelConfig, validateCheckpoint } from '../src/model/config.js';
import { DEMO_VERSION, demoModelDir, ensureDemoModel } from '../src/model/demo.js';
import { openCheckpoint } from '../src/model/safetensors.js';
import { ModelTokenizer } from '../src/model/tokenizer.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-demo-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

const sha = (file: string): string => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

test('ensureDemoModel creates a valid tiny Mixtral once, deterministically', () => {
  const a = ensureDemoModel(path.join(tmp, 'a'));
  assert.equal(a, path.join(tmp, 'a', `demo-v${DEMO_VERSION}`));
  for (const f of ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'])
    assert.ok(fs.existsSync(path.join(a, f)), f);
  assert.deepEqual(fs.readdirSync(path.join(tmp, 'a')), [`demo-v${DEMO_VERSION}`]);  // no tmp leftovers

  const mtime = fs.statSync(path.join(a, 'model.safetensors')).mtimeMs;
  assert.equal(ensureDemoModel(path.join(tmp, 'a')), a);
  assert.equal(fs.statSync(path.join(a, 'model.safetensors')).mtimeMs, mtime, 'second call reuses the folder');

  const b = ensureDemoModel(path.join(tmp, 'b'));
  assert.equal(sha(path.join(a, 'model.safetensors')), sha(path.join(b, 'model.safetensors')), 'same seed, same bytes');

  const spec = parseModelConfig(a);
  assert.equal(spec.modelType, 'mixtral');
  assert.ok(spec.hidden >= 64 && spec.hidden <= 128);
  assert.ok(spec.numLayers >= 2 && spec.numLayers <= 4);
  assert.equal(spec.moe.numExperts, 8);
  assert.equal(spec.moe.router.topK, 2);
  assert.equal(spec.vocabSize, 32000);
  assert.deepEqual(spec.eosTokenIds, [2]);

  const ck = openCheckpoint(a);
  assert.deepEqual(validateCheckpoint(spec, ck), { layout: 'per_expert', warnings: [] });
  assert.equal(ck.tensors.size, expectedTensors(spec).length);
  for (const t of ck.tensors.values()) assert.equal(t.dtype, 'BF16', t.name);
  // Weights are random, finite and not all equal.
  const w = ck.getTensor('model.layers.1.block_sparse_moe.experts.7.w2.weight').data() as Uint16Array;
  const vals = new Float32Array(new Uint32Array(Array.from(w, (x) => x << 16)).buffer);
  assert.ok(vals.every(Number.isFinite));
  assert.ok(new Set(vals).size > 200, `${new Set(vals).size} distinct values`);  // bf16 has 128 per binade

  const tok = ModelTokenizer.load(a);
  const prompt = tok.applyChatTemplate([{ role: 'user', content: 'Hello' }]);
  assert.equal(prompt, '<s>[INST] Hello [/INST]');
  assert.equal(tok.encode(prompt, false)[0], 1);
});

test('demoModelDir honours EXPERTD_CACHE_DIR', () => {
  const prev = process.env.EXPERTD_CACHE_DIR;
  process.env.EXPERTD_CACHE_DIR = path.join(tmp, 'env');
  try {
    assert.equal(demoModelDir(), path.join(tmp, 'env', `demo-v${DEMO_VERSION}`));
  } finally {
    if (prev === undefined) delete process.env.EXPERTD_CACHE_DIR;
    else process.env.EXPERTD_CACHE_DIR = prev;
  }
});
