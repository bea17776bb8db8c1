// The model's tokenizer: tokenizer.json + tokenizer_config.json through @huggingface/tokenizers,
// the chat template through @huggingface/jinja, generation_config.json defaults, and an
// incremental detokenizer for streaming that never emits half a character.
import fs from 'node:fs';
import path from 'node:path';

import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';

import { IncrementalDetokenizer } from './incremental-detokenizer.js';

export { IncrementalDetokenizer };

export class TokenizerError extends Error {
  readonly code = 'E_TOKENIZER';
  constructor(message: string) {
    super(message);
    this.name = 'TokenizerError';
  }
}

export interface ChatMessage {
  role: string;
  content: string;
  [key: string]: unknown;
}

export interface GenerationDefaults {
  eosTokenIds: number[];
  temperature?: number;
  topP?: number;
  topK?: number;
  repetitionPenalty?: number;
  maxNewTokens?: number;
}

type Raw = Record<string, unknown>;

function readJsonIfExists(file: string): Raw | null {
  if (!fs.existsSync(file)) return null;
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as Raw;
  } catch (e) {
    throw new TokenizerError(`${file} is not valid JSON: ${(e as Error).message}`);
  }
}

/** tokenizer_config tokens are a string or an AddedToken-like {content}. */
function tokenString(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Raw).content === 'string') return (v as Raw).content as string;
  return null;
}

function idList(v: unknown): number[] {
  if (typeof v === 'number') return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === 'number');
  return [];
}

export class ModelTokenizer {
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly eosTokenIds: number[];
  readonly bosTokenId: number | null;
  readonly generation: GenerationDefaults;
  readonly chatTemplate: string | null;
  private template: Template | null = null;

  constructor(readonly tokenizer: Tokenizer, readonly config: Raw, generationConfig: Raw | null,
              chatTemplate: string | null) {
    this.bosToken = tokenString(config.bos_token);
    this.eosToken = tokenString(config.eos_token);
    this.bosTokenId = this.bosToken !== null ? tokenizer.token_to_id(this.bosToken) ?? null : null;
    const eos: number[] = [];
    const push = (id: number | undefined | null): void => {
      if (typeof id === 'number' && !eos.includes(id)) eos.push(id);
    };
    for (const id of idList(generationConfig?.eos_token_id)) push(id);
    if (this.eosToken !== null) push(tokenizer.token_to_id(this.eosToken));
    this.eosTokenIds = eos;
    const g = generationConfig ?? {};
    const num = (k: string): number | undefined => (typeof g[k] === 'number' ? (g[k] as number) : undefined);
    this.generation = { eosTokenIds: eos };
    // do_sample=false in generation_config means greedy by default.
    const temperature = g.do_sample === false ? 0 : num('temperature');
    if (temperature !== undefined) this.generation.temperature = temperature;
    const topP = num('top_p');
    if (topP !== undefined) this.generation.topP = topP;
    const topK = num('top_k');
    if (topK !== undefined) this.generation.topK = topK;
    const rep = num('repetition_penalty');
    if (rep !== undefined) this.generation.repetitionPenalty = rep;
    const maxNew = num('max_new_tokens');
    if (maxNew !== undefined) this.generation.maxNewTokens = maxNew;
    this.chatTemplate = chatTemplate;
  }

  /** Loads tokenizer.json, tokenizer_config.json, generation_config.json and chat_template.jinja from a model folder. */
  static load(dir: string): ModelTokenizer {
    const tjFile = path.join(dir, 'tokenizer.json');
    const tj = readJsonIfExists(tjFile);
    if (!tj) throw new TokenizerError(`no tokenizer.json in ${dir} (only fast-tokenizer checkpoints are supported)`);
    const cfg = readJsonIfExists(path.join(dir, 'tokenizer_config.json')) ?? {};
    const gen = readJsonIfExists(path.join(dir, 'generation_config.json'));
    let template: string | null = null;
    const ct = cfg.chat_template;
    if (typeof ct === 'string') template = ct;
    else if (Array.isArray(ct)) {
      const named = ct as Array<{ name?: string; template?: string }>;
      template = (named.find((t) => t.name === 'default') ?? named[0])?.template ?? null;
    }
    // transformers: a chat_template.jinja beside tokenizer_config.json takes priority over the
    // config's chat_template (GLM-4.5, gpt-oss and transformers-5 saves ship it that way).
    const jinjaFile = path.join(dir, 'chat_template.jinja');
    if (fs.existsSync(jinjaFile)) template = fs.readFileSync(jinjaFile, 'utf8');
    let tok: Tokenizer;
    try {
      tok = new Tokenizer(tj, cfg);
    } catch (e) {
      throw new TokenizerError(`cannot build the tokenizer from ${tjFile}: ${(e as Error).message}`);
    }
    return new ModelTokenizer(tok, cfg, gen, template);
  }

  get vocabSize(): number {
    return this.tokenizer.get_vocab(true).size;
  }

  encode(text: string, addSpecialTokens = true): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
  }

  decode(ids: number[], skipSpecialTokens = true): string {
    if (ids.length === 0) return '';  // the library rejects an empty list
    return this.tokenizer.decode(ids, { skip_special_tokens: skipSpecialTokens });
  }

  /** Renders the chat template (HF semantics: messages, add_generation_prompt, special tokens). */
  applyChatTemplate(messages: ChatMessage[], options: { addGenerationPrompt?: boolean; extra?: Raw } = {}): string {
    if (this.chatTemplate === null)
      throw new TokenizerError('this model has no chat template (tokenizer_config.json chat_template or ' +
        'chat_template.jinja); use the completions endpoint with a plain prompt');
    if (!this.template) {
      try {
        this.template = new Template(this.chatTemplate);
      } catch (e) {
        throw new TokenizerError(`the chat template does not parse: ${(e as Error).message}`);
      }
    }
    const vars: Raw = {
      messages,
      add_generation_prompt: options.addGenerationPrompt ?? true,
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
      ...options.extra,
    };
    for (const k of ['unk_token', 'pad_token']) {
      const s = tokenString(this.config[k]);
      if (s !== null) vars[k] = s;
    }
    try {
      return this.template.render(vars);
    } catch (e) {
      throw new TokenizerError(`the chat template failed: ${(e as Error).message}`);
    }
  }

  /**
   * What vLLM's GET /tokenizer_info gives clients that tokenize through the server (lm-evaluation-
   * harness's remote tokenizer reads eos_token and chat_template): the special tokens, the class, the template.
   */
  info(): Record<string, string | boolean | null> {
    const c = this.config;
    return {
      tokenizer_class: typeof c.tokenizer_class === 'string' ? c.tokenizer_class : null,
      bos_token: this.bosToken, eos_token: this.eosToken,
      pad_token: tokenString(c.pad_token), unk_token: tokenString(c.unk_token),
      add_bos_token: typeof c.add_bos_token === 'boolean' ? c.add_bos_token : null,
      add_eos_token: typeof c.add_eos_token === 'boolean' ? c.add_eos_token : null,
      chat_template: this.chatTemplate,
    };
  }

  /** A streaming detokenizer; pass the prompt ids so the first generated word keeps its space. */
  detokenizer(promptIds: number[] = [], skipSpecialTokens = true): IncrementalDetokenizer {
    return new IncrementalDetokenizer((ids) => this.decode(ids, skipSpecialTokens), promptIds);
  }
}
