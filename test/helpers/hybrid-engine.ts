// Drives an EngineCore over a hybrid model (state slots) to the end, for the state-cache tests on the
// CPU engine and the device engine: greedy requests with 20 logprobs per step, every step checking
// that the slots in use equal the running sequences, and that every slot is back at the end.
import assert from 'node:assert/strict';

import { EngineCore, type EngineCoreOptions } from '../../src/engine/engine-core.js';
import type { EngineEvent, GenerateRequest } from '../../src/engine/types.js';
import type { ForwardModel } from '../../src/model/forward-batch.js';
import type { LoadedModel } from '../../src/model/load.js';

export function request(id: string, prompt: number[], maxTokens: number): GenerateRequest {
  return {
    id, promptTokenIds: prompt, maxTokens, stopTokenIds: [], ignoreEos: true, minTokens: 0, returnRoutedExperts: false,
    // logprobs: the 20 best log-softmax values of every step's logits row (a function of the whole row).
    sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0, logprobs: 20 },
  };
}

export interface Outcome { tokens: number[]; logprobs: unknown[] }

export function runAll(loaded: LoadedModel<ForwardModel>, opts: Partial<EngineCoreOptions>, reqs: GenerateRequest[]):
    { out: Map<string, Outcome>; core: EngineCore; preemptions: number } {
  const core = new EngineCore(loaded, {
    kvCacheBlocks: 128, kvCacheGb: 0, blockSize: 4, maxNumSeqs: 8, maxNumBatchedTokens: 512, servedModelName: 't', ...opts,
  });
  const out = new Map<string, Outcome>();
  let preemptions = 0;
  for (const r of reqs) {
    assert.equal(core.add(r), null);
    out.set(r.id, { tokens: [], logprobs: [] });
  }
  for (let steps = 0; core.hasWork(); steps++) {
    assert.ok(steps < 2000, 'the engine should finish');
    const res = core.step();
    preemptions += res?.metrics.preemptions ?? 0;
    const st = core.stats();
    assert.equal(st.stateSlotsUsed, st.running, 'state slots in use = running sequences');
    for (const ev of res?.events ?? [] as EngineEvent[]) {
      const o = out.get(ev.id)!;
      if (ev.type === 'tokens') {
        o.tokens.push(...ev.tokenIds);
        o.logprobs.push(...(ev.logprobs ?? []));
      } else {
        assert.equal(ev.reason, 'length', `${ev.id}: ${ev.type === 'finished' ? ev.error : ''}`);
      }
    }
  }
  assert.equal(core.stats().stateSlotsUsed, 0, 'every slot given back');
  return { out, core, preemptions };
}
