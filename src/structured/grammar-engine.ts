// The engine worker's side of structured output: the model's vocabulary as xgrammar sees it, an LRU
// cache of compiled grammars, and a matcher per constrained sequence that fills the next token's
// bitmask and accepts the sampled token. Compiling is async and happens before a request is admitted.
import fs from 'node:fs';
import path from 'node:path';

import { compileGrammar, grammarKey, type GrammarSpec } from './grammar-spec.js';
import { tokenBytes, Utf8Guard } from './utf8-guard.js';
import { loadXgrammar, type CompiledGrammar, type GrammarCompiler, type GrammarMatcher, type XgInstance } from './xgrammar.js';

/** Compiled grammars kept (most recently used); a cached schema costs nothing to admit again. */
export const DEFAULT_GRAMMAR_CACHE_SIZE = 64;

export interface VocabForGrammar {
  /** [vocabSize] token strings as tokenizer.json spells them ('' for ids it does not name). */
  encodedVocab: string[];
  vocabType: 'byte_fallback' | 'byte_level' | 'raw';
  prependSpace: boolean;
  /** Added tokens marked special (control tokens such as eos): they write no text. */
  special: Set<number>;
}

/**
 * Reads tokenizer.json the way xgrammar's TokenizerInfo.from_huggingface does: ByteFallback in the
 * decoder = SentencePiece byte fallback (<0x0A>, the ▁ space), ByteLevel = GPT-2 bytes (Ġ), else raw.
 */
export function vocabForGrammar(modelDir: string, vocabSize: number): VocabForGrammar {
  const tj = JSON.parse(fs.readFileSync(path.join(modelDir, 'tokenizer.json'), 'utf8')) as {
    model?: { vocab?: Record<string, number> | [string, number][] };
    added_tokens?: { id: number; content: string; special?: boolean }[];
    decoder?: unknown; normalizer?: unknown; pre_tokenizer?: unknown;
  };
  const encodedVocab = new Array<string>(vocabSize).fill('');
  const vocab = tj.model?.vocab ?? {};
  // BPE/WordPiece: {token: id}; Unigram: [[token, score], ...] in id order.
  if (Array.isArray(vocab)) vocab.forEach(([tok], id) => { if (id < vocabSize) encodedVocab[id] = tok; });
  else for (const [tok, id] of Object.entries(vocab)) if (id < vocabSize) encodedVocab[id] = tok;
  const special = new Set<number>();
  for (const a of tj.added_tokens ?? []) {
    if (a.id >= vocabSize) continue;
    encodedVocab[a.id] = a.content;
    if (a.special) special.add(a.id);
  }
  const decoder = JSON.stringify(tj.decoder ?? null);
  const vocabType = decoder.includes('"ByteFallback"') ? 'byte_fallback' : decoder.includes('"ByteLevel"') ? 'byte_level' : 'raw';
  const norm = JSON.stringify(tj.normalizer ?? null);
  const pre = JSON.stringify(tj.pre_tokenizer ?? null);
  const prependSpace = /"type":"Prepend","prepend":"▁"/.test(norm) ||
    (/"type":"Metaspace"/.test(pre) && !/"prepend_scheme":"never"/.test(pre) && !/"add_prefix_space":false/.test(pre));
  return { encodedVocab, vocabType, prependSpace, special };
}

/** One constrained sequence's grammar state. */
export class SequenceGrammar {
  private readonly handle: { GetNextTokenBitmask(v: number): { delete(): void } };
  private disposed = false;
  /** The output's UTF-8 decoder state (see Utf8Guard). */
  private utf8State = 0;

  constructor(private readonly inst: XgInstance, private readonly matcher: GrammarMatcher, readonly vocabSize: number,
    private readonly guard: Utf8Guard) {
    this.handle = (matcher as unknown as { handle: SequenceGrammar['handle'] }).handle;
  }

  /** Writes the next token's bitmask ([ceil(V / 32)] i32, bit set = allowed) into mask. */
  fillMask(mask: Int32Array): void {
    const vec = this.handle.GetNextTokenBitmask(this.vocabSize);
    try {
      mask.set(this.inst.binding().vecIntToView(vec));
    } finally {
      vec.delete();
    }
    this.guard.restrict(mask, this.utf8State);
  }

  /** Advances by the sampled token; false if the grammar does not allow it (a bug upstream). */
  accept(tokenId: number): boolean {
    if (!this.matcher.acceptToken(tokenId)) return false;
    const s = this.guard.after(this.utf8State, tokenId);
    if (s >= 0) this.utf8State = s;
    return true;
  }

  /** The grammar accepted a stop token: the output is complete. */
  get terminated(): boolean {
    return this.matcher.isTerminated();
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.matcher.dispose();
  }
}

export class GrammarEngine {
  /** Insertion order = recency: the first key is the least recently used. */
  private readonly cache = new Map<string, Promise<CompiledGrammar>>();
  compiles = 0;

  private constructor(private readonly inst: XgInstance, private readonly compiler: GrammarCompiler,
    readonly vocabSize: number, private readonly capacity: number, private readonly guard: Utf8Guard) {}

  static async create(modelDir: string, vocabSize: number, eosTokenIds: number[], capacity = DEFAULT_GRAMMAR_CACHE_SIZE): Promise<GrammarEngine> {
    const inst = loadXgrammar();
    const v = vocabForGrammar(modelDir, vocabSize);
    const info = await inst.call(() => inst.xg.TokenizerInfo.createTokenizerInfo(v.encodedVocab, v.vocabType, v.prependSpace, vocabSize, eosTokenIds));
    // xgrammar's own cache is off: this class's LRU bounds what stays compiled.
    const compiler = await inst.call(() => inst.xg.GrammarCompiler.createGrammarCompiler(info, false));
    const guard = new Utf8Guard(tokenBytes(v.encodedVocab, v.vocabType, v.special), vocabSize);
    return new GrammarEngine(inst, compiler, vocabSize, capacity, guard);
  }

  /** Compiled grammars cached now. */
  get cacheSize(): number {
    return this.cache.size;
  }

  /** The compiled grammar of a spec, from the cache or compiled now (a GrammarError if invalid). */
  compile(spec: GrammarSpec): Promise<CompiledGrammar> {
    const key = grammarKey(spec);
    let p = this.cache.get(key);
    if (p) {
      this.cache.delete(key);
      this.cache.set(key, p);
      return p;
    }
    this.compiles++;
    p = this.inst.call(() => compileGrammar(this.compiler, spec));
    this.cache.set(key, p);
    p.catch(() => { if (this.cache.get(key) === p) this.cache.delete(key); });
    while (this.cache.size > this.capacity) {
      const [oldKey, old] = this.cache.entries().next().value as [string, Promise<CompiledGrammar>];
      this.cache.delete(oldKey);
      // NOTE: matchers keep their own reference to the grammar (xgrammar's shared state), so
      // freeing the cache's handle does not disturb sequences that still use it.
      old.then((g) => g.dispose(), () => undefined);
    }
    return p;
  }

  /** A fresh matcher for one sequence. */
  async matcher(spec: GrammarSpec): Promise<SequenceGrammar> {
    const compiled = await this.compile(spec);
    const m = await this.inst.call(() => this.inst.xg.GrammarMatcher.createGrammarMatcher(compiled));
    return new SequenceGrammar(this.inst, m, this.vocabSize, this.guard);
  }
}
