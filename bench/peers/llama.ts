// The llama.cpp peer of the quantized-formats bench: node-llama-cpp's prebuilt CPU build of llama.cpp
// running the same bench checkpoint as GGUF, quantized by llama.cpp's own quantizer to Q8_0 and
// Q4_K_M (bench/peers/gguf_convert.py). Nothing of it is a dependency of expertd: node-llama-cpp is
// installed on first use under ~/.cache/expertd/peers/ (npm registry), the GGUF files are made once
// beside the bench checkpoint, and either step failing leaves the bench running without the peer,
// saying why.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const LLAMA_PEER_VERSION = '3.22.1';
export const LLAMA_TYPES = ['Q8_0', 'Q4_K_M'] as const;

const CONVERT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bench/peers/gguf_convert.py');

function cacheRoot(): string {
  return process.env.EXPERTD_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'expertd');
}

/** node-llama-cpp's folder under the cache, installed from the npm registry on first use. */
function ensureNodeLlamaCpp(log: (s: string) => void): string {
  const dir = path.join(cacheRoot(), 'peers', `node-llama-cpp-${LLAMA_PEER_VERSION}`);
  const pkg = path.join(dir, 'node_modules', 'node-llama-cpp', 'package.json');
  if (fs.existsSync(pkg)) return dir;
  if (process.platform !== 'linux' || process.arch !== 'x64')
    throw new Error(`the llama.cpp peer uses node-llama-cpp's linux-x64 prebuilt; this is ${process.platform}-${process.arch}`);
  fs.mkdirSync(dir, { recursive: true });
  log(`# llama.cpp peer: npm install node-llama-cpp@${LLAMA_PEER_VERSION} into ${dir} (once)...`);
  // Only the CPU prebuilt: the optional CUDA / Vulkan packages are ~600 MB and unused here.
  execFileSync('npm', ['install', '--prefix', dir, '--no-audit', '--no-fund', '--ignore-scripts', '--omit=optional',
    `node-llama-cpp@${LLAMA_PEER_VERSION}`, `@node-llama-cpp/linux-x64@${LLAMA_PEER_VERSION}`], { stdio: ['ignore', 'ignore', 'inherit'] });
  return dir;
}

function libllama(dir: string): string {
  const bins = path.join(dir, 'node_modules', '@node-llama-cpp', 'linux-x64', 'bins', 'linux-x64');
  const lib = fs.readdirSync(bins).find((f) => /^libllama(\.v[\d.]+)?\.so$/.test(f));
  if (!lib) throw new Error(`no libllama*.so in ${bins}`);
  return path.join(bins, lib);
}

/** GGUF files of a bench checkpoint (BF16, then each type by llama.cpp's quantizer), made once. */
function ensureGguf(hfDir: string, types: readonly string[], python: string, lib: string, threads: number,
  log: (s: string) => void): Record<string, string> {
  const out = `${hfDir.replace(/\/+$/, '')}-gguf`;
  const files = Object.fromEntries(types.map((t) => [t, path.join(out, `model-${t}.gguf`)]));
  if (Object.values(files).every((f) => fs.existsSync(f))) return files;
  log(`# llama.cpp peer: converting ${hfDir} to GGUF ${types.join(', ')} in ${out} (once; minutes)...`);
  execFileSync(python, [CONVERT, hfDir, out, lib, types.join(','), String(threads || os.availableParallelism())],
    { stdio: ['ignore', 'ignore', 'inherit'] });
  return files;
}

// The few node-llama-cpp v3 calls used (its types are not a dependency of this repo).
interface NlcSequence {
  evaluateWithoutGeneratingNewTokens(tokens: number[]): Promise<void>;
  evaluate(tokens: number[], opts?: Record<string, unknown>): AsyncGenerator<number, void, void>;
  clearHistory(): Promise<void>;
}
interface NlcContext { getSequence(): NlcSequence; dispose(): Promise<void> }
interface NlcModel { size: number; createContext(o: Record<string, unknown>): Promise<NlcContext>; dispose(): Promise<void> }
interface NlcLlama { loadModel(o: Record<string, unknown>): Promise<NlcModel>; dispose(): Promise<void> }

export interface LlamaPeerInfo { version: string; types: string[]; threads: number; fileBytes: Record<string, number> }

/** One model per GGUF type, each with a context of `sequences` sequences. */
export class LlamaPeer {
  private constructor(private readonly llama: NlcLlama, private readonly models: Map<string, { model: NlcModel; ctx: NlcContext; seqs: NlcSequence[] }>,
    readonly info: LlamaPeerInfo) {}

  static async start(o: { hfDir: string; python: string; types: readonly string[]; threads: number; sequences: number;
    contextSize: number; log: (s: string) => void }): Promise<LlamaPeer> {
    const dir = ensureNodeLlamaCpp(o.log);
    const files = ensureGguf(o.hfDir, o.types, o.python, libllama(dir), o.threads, o.log);
    const entry = path.join(dir, 'node_modules', 'node-llama-cpp', 'dist', 'index.js');
    const nlc = (await import(pathToFileURL(entry).href)) as { getLlama(o: Record<string, unknown>): Promise<NlcLlama> };
    const llama = await nlc.getLlama({ gpu: false, build: 'never', logLevel: 'warn' });
    const threads = o.threads || os.availableParallelism();
    const models = new Map<string, { model: NlcModel; ctx: NlcContext; seqs: NlcSequence[] }>();
    const fileBytes: Record<string, number> = {};
    for (const t of o.types) {
      const model = await llama.loadModel({ modelPath: files[t] });
      const ctx = await model.createContext({ contextSize: o.contextSize * o.sequences, sequences: o.sequences, batchSize: 512, threads });
      models.set(t, { model, ctx, seqs: Array.from({ length: o.sequences }, () => ctx.getSequence()) });
      fileBytes[t] = fs.statSync(files[t]!).size;
    }
    return new LlamaPeer(llama, models, { version: LLAMA_PEER_VERSION, types: [...o.types], threads, fileBytes });
  }

  private get(type: string) {
    const m = this.models.get(type);
    if (!m) throw new Error(`llama.cpp peer: no ${type} model loaded`);
    return m;
  }

  /** Seconds to prefill one prompt (its logits computed; llama.cpp's batch of 512). */
  async prefill(type: string, prompt: number[]): Promise<number> {
    const s = this.get(type).seqs[0]!;
    await s.clearHistory();
    const t0 = performance.now();
    await s.evaluateWithoutGeneratingNewTokens(prompt);
    const ms = performance.now() - t0;
    await s.clearHistory();
    return ms / 1e3;
  }

  /**
   * Greedy decode of prompts.length sequences at once (node-llama-cpp batches the sequences'
   * pending tokens into one llama_decode per step): tokens/s over `steps` steps after the first
   * token of every sequence.
   */
  async decode(type: string, prompts: number[][], steps: number): Promise<number> {
    const m = this.get(type);
    if (prompts.length > m.seqs.length) throw new RangeError(`llama.cpp peer: ${prompts.length} sequences, context has ${m.seqs.length}`);
    const seqs = m.seqs.slice(0, prompts.length);
    await Promise.all(seqs.map((s) => s.clearHistory()));
    const gens = seqs.map((s, i) => s.evaluate(prompts[i]!, { temperature: 0 }));
    await Promise.all(gens.map((g) => g.next()));
    const t0 = performance.now();
    for (let k = 0; k < steps; k++) await Promise.all(gens.map((g) => g.next()));
    const s = (performance.now() - t0) / 1e3;
    await Promise.all(gens.map((g) => g.return()));
    await Promise.all(seqs.map((q) => q.clearHistory()));
    return (prompts.length * steps) / s;
  }

  async close(): Promise<void> {
    for (const { ctx, model } of this.models.values()) {
      await ctx.dispose();
      await model.dispose();
    }
    await this.llama.dispose();
  }
}
