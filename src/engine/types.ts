// The engine's public contract: what the server (main thread) sends to the engine worker and
// what comes back. Plain data only: these objects cross a MessagePort.

import type { GrammarSpec } from '../structured/grammar-spec.js';

export interface SamplingParams {
  /** 0 = greedy. */
  temperature: number;
  topP: number;          // 1 = off
  topK: number;          // 0 or -1 = off
  minP: number;          // 0 = off
  repetitionPenalty: number;  // 1 = off (HF/vLLM semantics: divide positive, multiply negative logits)
  presencePenalty: number;    // 0 = off (OpenAI semantics)
  frequencyPenalty: number;   // 0 = off
  /** Same seed + same request = same output. Absent: a random seed. */
  seed?: number;
  /** token id -> bias added to the logit (OpenAI logit_bias). */
  logitBias?: Record<number, number>;
  /** Number of top alternatives to return per generated token (0 = none, null = no logprobs). */
  logprobs?: number | null;
}

export interface GenerateRequest {
  id: string;
  promptTokenIds: number[];
  maxTokens: number;
  sampling: SamplingParams;
  /** Generation stops on these (in addition to the model's eos ids unless ignoreEos). */
  stopTokenIds: number[];
  ignoreEos: boolean;
  /** eos/stop tokens are ignored until this many tokens were generated. */
  minTokens: number;
  /** Return, per position, the experts chosen in every MoE layer (see RoutedExperts). */
  returnRoutedExperts: boolean;
  /**
   * Prompt logprobs (completions' echo with logprobs): each prompt token's logprob given the ones
   * before it, with this many top alternatives; null or absent = off.
   */
  promptLogprobs?: number | null;
  /** Structured output: every generated token follows this grammar, eos only where it is complete. */
  grammar?: GrammarSpec;
}

export interface TokenLogprob {
  tokenId: number;
  logprob: number;
  top: { tokenId: number; logprob: number }[];
}

/** routed[position][moeLayer] = k expert ids, highest routing weight first. */
export type RoutedExperts = number[][][];

export type FinishReason = 'stop' | 'length' | 'abort' | 'error';

export type EngineEvent =
  | {
      type: 'tokens';
      id: string;
      tokenIds: number[];
      logprobs?: TokenLogprob[];
      /** Routing of the positions processed in this step (prompt positions first, once). */
      routedExperts?: RoutedExperts;
      /** On the first generated token: prompt tokens found in the prefix cache (see 'finished'). */
      cachedTokens?: number;
      /** On the first generated token, when requested: per prompt position (the first: null). */
      promptLogprobs?: (TokenLogprob | null)[];
    }
  | {
      type: 'finished';
      id: string;
      reason: FinishReason;
      /** The token that caused a 'stop' (eos or a stop token id), if any. */
      stopTokenId?: number;
      error?: string;
      promptTokens: number;
      completionTokens: number;
      /** Prompt tokens found in the prefix cache (their K/V reused, not computed) when first scheduled. */
      cachedTokens?: number;
      /**
       * Present once a token was generated: prefill = first scheduling to first token, decode =
       * first token to last (vLLM's request prefill/decode time), in the engine's clock.
       */
      prefillMs?: number;
      decodeMs?: number;
    };

export interface EngineStats {
  running: number;
  waiting: number;
  kvBlocksTotal: number;
  kvBlocksUsed: number;
  /** Bytes of the KV cache and of its used blocks, in its element type (absent: not reported). */
  kvBytesTotal?: number;
  kvBytesUsed?: number;
  /** Hybrid models: the state cache's per-sequence slots (linear attention), and their bytes. */
  stateSlotsTotal?: number;
  stateSlotsUsed?: number;
  stateBytesTotal?: number;
  stateBytesUsed?: number;
  preemptionsTotal: number;
}

export interface ModelInfo {
  name: string;
  architecture: string;
  maxContext: number;
  vocabSize: number;
  eosTokenIds: number[];
  numMoeLayers: number;
  numExperts: number;
  topK: number;
  /** Whether requests may ask for promptLogprobs (false: the device engine samples on the GPU); absent = yes. */
  promptLogprobs?: boolean;
}

/** The event that ends a request the engine cannot take (failed, or not loaded): reason 'error'. */
export function refusedEvent(req: GenerateRequest, error: string): EngineEvent {
  return { type: 'finished', id: req.id, reason: 'error', error, promptTokens: req.promptTokenIds.length, completionTokens: 0 };
}
