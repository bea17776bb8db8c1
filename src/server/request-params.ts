// OpenAI request fields (already type-checked by the route schema) -> engine GenerationParams,
// plus the checks a schema cannot express: token ids in the vocabulary, prompt + max_tokens in context.

import type { SamplingParams } from '../engine/types.js';
import { invalidRequest } from './errors.js';
import type { GenerationParams } from './generation.js';
import type { StructuredOutputBody } from './structured-output.js';

/** The generation fields shared by /v1/completions and /v1/chat/completions (snake_case, as sent). */
export interface SamplingBody extends StructuredOutputBody {
  max_tokens?: number | null;
  max_completion_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  min_p?: number | null;
  n?: number | null;
  stop?: string | string[] | null;
  seed?: number | null;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  repetition_penalty?: number | null;
  logit_bias?: Record<string, number> | null;
  stop_token_ids?: number[] | null;
  ignore_eos?: boolean | null;
  min_tokens?: number | null;
  skip_special_tokens?: boolean | null;
  return_routed_experts?: boolean | null;
}

export function checkTokenIds(ids: readonly number[], vocabSize: number, param: string): void {
  for (let i = 0; i < ids.length; i++) {
    if (ids[i]! >= vocabSize) {
      throw invalidRequest(`Invalid value for '${param}': token id ${ids[i]} at position ${i} is outside the vocabulary (size ${vocabSize}).`, param, 'invalid_token_id');
    }
  }
}

export interface ContextCheck {
  promptLengths: number[];
  maxModelLen: number;
  /** The max_tokens the client asked for, or null to take the default. */
  requested: number | null;
  /** Default when requested is null: a number (completions: 16, capped to what fits) or 'fill' (chat: the rest of the context). */
  defaultMaxTokens: number | 'fill';
  promptParam: string;
  maxTokensParam: string;
}

/** Resolves max_tokens and rejects a prompt that leaves no room, saying both lengths. */
export function resolveMaxTokens(c: ContextCheck): number {
  const longest = Math.max(...c.promptLengths);
  if (longest === 0) throw invalidRequest(`Invalid value for '${c.promptParam}': the prompt is empty (0 tokens).`, c.promptParam, 'empty_prompt');
  if (longest >= c.maxModelLen) {
    throw invalidRequest(
      `This model's maximum context length is ${c.maxModelLen} tokens. However, your prompt is ${longest} tokens, which leaves no room for the completion. Please shorten the prompt.`,
      c.promptParam, 'context_length_exceeded');
  }
  const room = c.maxModelLen - longest;
  if (c.requested === null) return c.defaultMaxTokens === 'fill' ? room : Math.min(c.defaultMaxTokens, room);
  if (longest + c.requested > c.maxModelLen) {
    throw invalidRequest(
      `This model's maximum context length is ${c.maxModelLen} tokens. However, you requested ${longest + c.requested} tokens (${longest} in the prompt, ${c.requested} for the completion). Please reduce the prompt or '${c.maxTokensParam}' (at most ${room} here).`,
      c.maxTokensParam, 'context_length_exceeded');
  }
  return c.requested;
}

export function buildParams(body: SamplingBody, maxTokens: number, logprobs: number | null, vocabSize: number): GenerationParams {
  const stop = body.stop == null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop;
  const stopTokenIds = body.stop_token_ids ?? [];
  checkTokenIds(stopTokenIds, vocabSize, 'stop_token_ids');
  let logitBias: Record<number, number> | undefined;
  if (body.logit_bias) {
    logitBias = {};
    for (const [k, v] of Object.entries(body.logit_bias)) {
      const id = Number(k);
      if (id >= vocabSize) throw invalidRequest(`Invalid key in 'logit_bias': token id ${k} is outside the vocabulary (size ${vocabSize}).`, 'logit_bias', 'invalid_token_id');
      logitBias[id] = v;
    }
  }
  const minTokens = body.min_tokens ?? 0;
  if (minTokens > maxTokens) {
    throw invalidRequest(`Invalid value for 'min_tokens': ${minTokens} is more than max_tokens (${maxTokens}).`, 'min_tokens', 'invalid_value');
  }
  const sampling: SamplingParams = {
    temperature: body.temperature ?? 1,
    topP: body.top_p ?? 1,
    topK: body.top_k ?? 0,
    minP: body.min_p ?? 0,
    repetitionPenalty: body.repetition_penalty ?? 1,
    presencePenalty: body.presence_penalty ?? 0,
    frequencyPenalty: body.frequency_penalty ?? 0,
    logprobs,
  };
  if (body.seed != null) sampling.seed = body.seed;
  if (logitBias) sampling.logitBias = logitBias;
  return {
    maxTokens,
    sampling,
    n: body.n ?? 1,
    stop,
    stopTokenIds,
    ignoreEos: body.ignore_eos ?? false,
    minTokens,
    skipSpecialTokens: body.skip_special_tokens ?? true,
    returnRoutedExperts: body.return_routed_experts ?? false,
  };
}

/** Defaults of --max-sequences-per-request and --max-queued-sequences. */
export const DEFAULT_MAX_SEQUENCES_PER_REQUEST = 256;
export const DEFAULT_MAX_QUEUED_SEQUENCES = 256;

export interface SequenceLimits {
  maxPromptsPerRequest: number;
  maxSequencesPerRequest: number;
  maxQueuedSequences: number;
}

/**
 * Refuses (400) a request that could never be admitted: more sequences (prompts x n) than one
 * request may have, or than the queue can ever hold. Returns the sequence count.
 */
export function checkSequenceCount(prompts: number, n: number, limits: SequenceLimits): number {
  const sequences = prompts * n;
  const param = n > 1 ? 'n' : 'prompt';
  const what = `${sequences} sequence${sequences === 1 ? '' : 's'} (${prompts} prompt${prompts === 1 ? '' : 's'} x n=${n})`;
  if (sequences > limits.maxSequencesPerRequest) {
    throw invalidRequest(`This request asks for ${what}, but the server accepts at most ${limits.maxSequencesPerRequest} sequences per request. Lower 'n' or split the prompts over several requests.`,
      param, 'too_many_sequences');
  }
  if (sequences > limits.maxQueuedSequences) {
    throw invalidRequest(`This request asks for ${what}, but the server queues at most ${limits.maxQueuedSequences} sequences, so it could never be admitted. Lower 'n' or split the prompts over several requests.`,
      param, 'too_many_sequences');
  }
  return sequences;
}
