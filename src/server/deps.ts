// What the HTTP server needs from the rest of the daemon: an engine client and a text codec.
// The real engine (worker thread) and tokenizer implement these; tests use a labelled fake.

import type { EngineEvent, EngineStats, GenerateRequest, ModelInfo } from '../engine/types.js';

export interface EngineClient {
  readonly info: ModelInfo;
  /** Starts a request; events arrive through onEvent until a 'finished' event. */
  generate(req: GenerateRequest, onEvent: (ev: EngineEvent) => void): void;
  abort(id: string): void; // cancels; a 'finished' with reason 'abort' follows
  /** Backpressure: stop stepping these requests (they keep their KV) until resume(); unknown ids are ignored. */
  pause(ids: readonly string[]): void;
  resume(ids: readonly string[]): void;
  stats(): EngineStats;
  state(): 'loading' | 'ready' | 'draining' | 'failed';
  /** Why the engine failed (state 'failed'), for the 503s' message. */
  readonly failureMessage?: string | undefined;
}

export interface TextCodec {
  encode(text: string, addSpecialTokens: boolean): number[];
  decode(ids: number[], skipSpecialTokens: boolean): string;
  /** extra: more template variables (tools, chat_template_kwargs such as enable_thinking). */
  applyChatTemplate(messages: { role: string; content: string }[], addGenerationPrompt: boolean, extra?: Record<string, unknown>): string;
  /**
   * Streaming detokenizer: push ids, get the text that became stable (never half a UTF-8 char).
   * promptTokenIds are the ids the generated ones follow (the prompt; for chat, the templated
   * prompt): the first generated word's spacing depends on them (SentencePiece drops the leading
   * space of a sequence's first word).
   */
  createDetokenizer(promptTokenIds: number[], skipSpecialTokens: boolean): { push(id: number): string; flush(): string };
  readonly eosTokenIds: number[];
  /** GET /tokenizer_info's fields (special tokens, class, chat template); absent: only model_max_length. */
  tokenizerInfo?(): Record<string, string | boolean | null>;
}
