// Logit error of the CPU engine against HF transformers' float32 goldens for one compute mode and KV
// cache dtype: what the fidelity tests bound and `npm run bench -- fidelity --kv` tabulates.
import { readFileSync } from 'node:fs';
import path from 'node:path';

import type { ForwardModel } from '../../src/model/forward-batch.js';
import type { KvDtype } from '../../src/model/kv-dtype.js';
import { loadModel } from '../../src/model/load.js';
import { DirectRunner } from './model-runner.js';

interface GoldenCase { prompt_ids: number[]; logits: number[][]; router: number[][][] }
interface Golden { moe_layers: number[]; cases: GoldenCase[] }

export interface KvFidelity {
  /** Mean over positions of max |logit - HF| / range(HF logits). */
  mean: number;
  /** Max of the same where routing of the position and every earlier one equals HF's. */
  maxConsistent: number;
  /** Max over every position. */
  maxAll: number;
  positions: number;
  /** Positions whose routing (and every earlier one's) equals HF's. */
  consistent: number;
  /** Positions whose argmax token equals HF's. */
  top1: number;
}

export function kvFidelity(dir: string, fast: boolean, kvDtype: KvDtype): KvFidelity {
  const { model } = loadModel(dir, { fast });
  try {
    return kvFidelityOf(model, dir, kvDtype);
  } finally {
    model.dispose();
  }
}

/** The same for a loaded model (CPU or device) of the fixture in dir. */
export function kvFidelityOf<C>(model: ForwardModel<C>, dir: string, kvDtype: KvDtype): KvFidelity {
  const golden = JSON.parse(readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden;
  const spec = model.spec;
  {
    const V = spec.vocabSize;
    const k = spec.moe.router.topK;
    const r: KvFidelity = { mean: 0, maxConsistent: 0, maxAll: 0, positions: 0, consistent: 0, top1: 0 };
    for (const c of golden.cases) {
      const runner = new DirectRunner(model, 4, 256, kvDtype);
      const res = runner.step([runner.newSeq()], [c.prompt_ids], true);
      let routingOk = true;
      for (let p = 0; p < c.prompt_ids.length; p++) {
        const gl = c.logits[p]!;
        let lo = Infinity, hi = -Infinity, w = 0, argHf = 0, argOurs = 0;
        for (let i = 0; i < V; i++) {
          lo = Math.min(lo, gl[i]!);
          hi = Math.max(hi, gl[i]!);
          w = Math.max(w, Math.abs(res.logits[p * V + i]! - gl[i]!));
          if (gl[i]! > gl[argHf]!) argHf = i;
          if (res.logits[p * V + i]! > res.logits[p * V + argOurs]!) argOurs = i;
        }
        if (argHf === argOurs) r.top1++;
        const rel = w / (hi - lo);
        routingOk &&= golden.moe_layers.every((_, m) => {
          const ids = Array.from(res.routedIds[m]!.subarray(p * k, (p + 1) * k)).sort((a, b) => a - b);
          const want = [...c.router[m]![p]!].sort((a, b) => a - b);
          return ids.every((v, j) => v === want[j]);
        });
        r.mean += rel;
        r.positions++;
        r.maxAll = Math.max(r.maxAll, rel);
        if (routingOk) {
          r.consistent++;
          r.maxConsistent = Math.max(r.maxConsistent, rel);
        }
      }
    }
    r.mean /= r.positions;
    return r;
  }
}
