// float16 checkpoints (torch_dtype float16: GPTQ / AWQ-era uploads, older fine-tunes): every fixture with
// each bf16 tensor written as f16 loads and, in the reference mode, gives the logits of the same values
// written as f32 (the loader widens f16 exactly wherever the engine computes in f32).
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadModel } from '../src/model/load.js';
import type { TensorToWrite } from '../src/model/safetensors.js';
import { loadNative, packageRoot } from '../src/native/index.js';
import { storedTensors, writeCheckpointCopy } from './helpers/checkpoint-copy.js';
import { maxAbsDiff } from './helpers/model-runner.js';
import { fixtureSequences, forcedLogits } from './helpers/quant-fidelity.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');
const fixtures = readdirSync(fixturesDir).filter((d) => existsSync(path.join(fixturesDir, d, 'golden.json'))).sort();

test('f16 checkpoints: every fixture in f16 gives the logits of the same values in f32 (reference mode)', (t) => {
  const n = loadNative();
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'expertd-f16-'));
  try {
    for (const name of fixtures) {
      const src = path.join(fixturesDir, name);
      const f16: TensorToWrite[] = [], f32: TensorToWrite[] = [];
      let converted = 0;
      for (const tt of storedTensors(src)) {
        const data = tt.data;
        if (tt.dtype !== 'BF16') {
          f16.push(tt);
          f32.push(tt);
          continue;
        }
        const count = data.byteLength / 2;
        const wide = new Float32Array(count), half = new Uint16Array(count), back = new Float32Array(count);
        n.convert(new Uint16Array(data.buffer, 0, count), 'bf16', wide, 'f32');
        n.convert(wide, 'f32', half, 'f16');
        n.convert(half, 'f16', back, 'f32');
        f16.push({ name: tt.name, dtype: 'F16', shape: tt.shape, data: new Uint8Array(half.buffer) });
        f32.push({ name: tt.name, dtype: 'F32', shape: tt.shape, data: new Uint8Array(back.buffer) });
        converted++;
      }
      const a = path.join(tmp, `${name}-f16`), b = path.join(tmp, `${name}-f32`);
      writeCheckpointCopy(src, a, f16, true);
      writeCheckpointCopy(src, b, f32, true);
      const ma = loadModel(a, { fast: false }).model, mb = loadModel(b, { fast: false }).model;
      try {
        const seqs = fixtureSequences(src).slice(0, 2);
        const worst = maxAbsDiff(forcedLogits(ma, seqs), forcedLogits(mb, seqs));
        t.diagnostic(`${name}: ${converted} tensors f16; logits max-abs difference from the f32 copy ${worst}`);
        assert.ok(worst <= 1e-5, `${name}: logits max-abs difference ${worst}`);
      } finally {
        ma.dispose();
        mb.dispose();
      }
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});
