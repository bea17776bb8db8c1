// Offloading never changes the numbers: every fixture model (and the demo model) run fully
// resident and with an expert cache of 25% under each policy (eam with prefetching on the copy
// thread; at 50% behind a slow simulated link so that prefetches are still in flight when needed;
// eam loading on the engine thread) gives the same logits bit for bit, in f32 and bf16 modes, over
// prompts, a batched step and greedy decoding.
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { SUPPORTED_MODEL_TYPES } from '../src/model/config.js';
import { ensureDemoModel } from '../src/model/demo.js';
import { loadModel } from '../src/model/load.js';
import { openCheckpoint, writeSafetensors } from '../src/model/safetensors.js';
import { packageRoot } from '../src/native/index.js';
import { attachOffloader, skipAllExperts, type OffloadConfig } from '../src/offload/setup.js';
import { readTrace } from '../src/offload/trace-file.js';
import { runAll } from './helpers/model-runner.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const models: Array<[string, string]> = [];
if (existsSync(fixturesDir))
  for (const d of readdirSync(fixturesDir).sort()) {
    const cfg = path.join(fixturesDir, d, 'config.json');
    if (!existsSync(cfg)) continue;
    const type = (JSON.parse(readFileSync(cfg, 'utf8')) as { model_type: string }).model_type;
    // qwen3_5_moe_text: Qwen3.5's text model, which loads as qwen3_5_moe.
    if ((SUPPORTED_MODEL_TYPES as readonly string[]).includes(type) || type === 'qwen3_5_moe_text')
      models.push([d, path.join(fixturesDir, d)]);
  }
models.push(['demo', ensureDemoModel(mkdtempSync(path.join(os.tmpdir(), 'expertd-demo-')))]);
if (existsSync(path.join(fixturesDir, 'qwen3_5_moe_text', 'config.json')))
  models.push(['qwen3_5_moe (hub layout, model.language_model.*)', nestedQwen35(path.join(fixturesDir, 'qwen3_5_moe_text'))]);

/**
 * The qwen3_5_moe_text fixture in the hub's Qwen3.5 layout: config nested under text_config (model_type
 * qwen3_5_moe) and the text model's tensors under model.language_model.* (lm_head.weight stays on top).
 */
function nestedQwen35(flatDir: string): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'expertd-qwen35-nested-'));
  const text = JSON.parse(readFileSync(path.join(flatDir, 'config.json'), 'utf8')) as Record<string, unknown>;
  writeFileSync(path.join(dir, 'config.json'), JSON.stringify({
    architectures: ['Qwen3_5MoeForConditionalGeneration'], model_type: 'qwen3_5_moe',
    tie_word_embeddings: text.tie_word_embeddings, text_config: text, vision_config: { depth: 1 },
  }));
  for (const f of ['generation_config.json', 'tokenizer.json', 'tokenizer_config.json'])
    if (existsSync(path.join(flatDir, f))) copyFileSync(path.join(flatDir, f), path.join(dir, f));
  const ckpt = openCheckpoint(flatDir);
  writeSafetensors(path.join(dir, 'model.safetensors'), [...ckpt.tensors.values()].map((t) => ({
    name: t.name.startsWith('model.') ? `model.language_model.${t.name.slice('model.'.length)}` : t.name,
    dtype: t.dtype, shape: t.shape, data: t.data(),
  })));
  return dir;
}

for (const [name, dir] of models) {
  test(`${name}: offloaded at 25% (eam, lru, lfu) equals fully resident, bit for bit, f32 and bf16`, async () => {
    for (const fast of [false, true]) {
      const resident = loadModel(dir, { fast });
      const want = runAll(resident.model, null);
      resident.model.dispose();
      const configs: Array<{ label: string; cfg: Omit<OffloadConfig, 'traceDir'> }> = [
        ...(['eam', 'lru', 'lfu'] as const).map((policy) => ({ label: policy, cfg: { policy, fraction: 0.25, prefetch: policy === 'eam' } })),
        // SIMULATION: 0.5 GB/s + 3 ms per load (far longer than a tiny layer's compute) makes prefetches be awaited in flight
        // (at 50%: a cache of one layer's experts leaves prefetching no slot).
        { label: 'eam at 50%, slow link', cfg: { policy: 'eam', fraction: 0.5, prefetch: true, prefetchMinProbability: 0, simulatedLink: { gbps: 0.5, latencyUs: 3000 } } },
        { label: 'eam, engine thread', cfg: { policy: 'eam', fraction: 0.25, prefetch: true, copyThread: false } },
      ];
      for (const { label: mode, cfg } of configs) {
        const policy = cfg.policy;
        const traceDir = mkdtempSync(path.join(os.tmpdir(), 'expertd-offload-model-'));
        const loaded = loadModel(dir, { fast, loadExpert: skipAllExperts });
        const off = attachOffloader(loaded, { ...cfg, traceDir });
        const got = runAll(loaded.model, off);
        const label = `${name} ${mode} ${fast ? 'bf16' : 'f32'}`;
        assert.deepEqual(got.tokens, want.tokens, label);
        assert.equal(got.logits.length, want.logits.length);
        got.logits.forEach((l, i) => {
          const same = Buffer.compare(Buffer.from(l.buffer, l.byteOffset, l.byteLength),
            Buffer.from(want.logits[i]!.buffer, want.logits[i]!.byteOffset, want.logits[i]!.byteLength)) === 0;
          assert.ok(same, `${label}: logits of step ${i} differ`);
        });
        const st = off.stats();
        assert.ok(st.slots < st.totalExperts, `${label}: the cache must be smaller than the model (${st.slots}/${st.totalExperts})`);
        assert.ok(st.misses > 0 && st.hits > 0, `${label}: ${JSON.stringify(st)}`);
        assert.ok(off.cache.evictions > 0, `${label}: no eviction happened`);
        if (policy === 'eam') assert.ok(st.prefetchLoads > 0, `${label}: the prefetch path must run`);
        if (cfg.simulatedLink && st.slots > loaded.spec.moe.numExperts) assert.ok(st.prefetchLate > 0, `${label}: no prefetch was awaited in flight: ${JSON.stringify(st)}`);
        assert.equal(st.collectionSize, 3);
        await off.save();
        assert.equal((await readTrace(traceDir)).steps.length, got.logits.length);
        off.dispose();
        loaded.model.dispose();
      }
    }
  });
}
