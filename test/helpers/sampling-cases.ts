// Sampling options for tests that hold two samplers to the same tokens: every knob the sampler
// has, alone and combined (greedy, temperature, top-k on both selection paths, top-p, min-p,
// penalties, logit bias, logprobs).
import type { SamplingParams } from '../../src/engine/types.js';

/** Every option the sampler has, alone and combined. */
export const SAMPLING_CASES: Partial<SamplingParams>[] = [
  { temperature: 0 },
  { temperature: 0, logprobs: 5 },
  { temperature: 1e-6, logprobs: 0 },
  {},
  { temperature: 0.7 },
  { temperature: 1.3, topP: 0.9 },
  { temperature: 0.8, topP: 0.5, logprobs: 20 },
  { topK: 1 },
  { topK: 5, temperature: 0.9 },
  { topK: 40, topP: 0.95, minP: 0.02 },
  { topK: 1500 },                       // the quickselect path (k > 1024)
  { minP: 0.1 },
  { topP: 0.999999 },
  { repetitionPenalty: 1.3, temperature: 0.6 },
  { repetitionPenalty: 0.8, temperature: 0 },
  { presencePenalty: 0.7, frequencyPenalty: 0.4 },
  { presencePenalty: -0.5, frequencyPenalty: 1.1, temperature: 0 },
  { logitBias: { 3: 5, 17: -100, 40: 2.5 } },
  { logitBias: { 3: 5, 17: -100 }, temperature: 0, logprobs: 3 },
  { temperature: 0.9, topP: 0.8, topK: 50, minP: 0.01, repetitionPenalty: 1.1, presencePenalty: 0.3,
    frequencyPenalty: 0.2, logitBias: { 5: 1.5 }, logprobs: 4 },
];

