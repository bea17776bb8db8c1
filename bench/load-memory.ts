// What a model load holds: the routed experts' packed bytes (in the process), and the resident
// memory of the load measured in a child process per load, so that the parent's heap and its other
// loads stay out of it (RssAnon: the model's own memory; RssFile: mapped checkpoint pages). Used by
// the quant and mxfp4 benches.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';

import { loadModel } from '../src/model/load.js';
import type { MoeModel } from '../src/model/model.js';
import type { QuantizeSpec } from '../src/model/quantize.js';

/** Sum of the routed experts' packed bytes over every MoE layer, and one expert's bytes. */
export function expertBytes(model: MoeModel): { total: number; one: number } {
  let total = 0, one = 0;
  for (const layer of model.moeLayers) {
    const t = layer.weights.experts;
    for (let e = 0; e < t.numExperts; e++) {
      const w = t.get(e);
      if (!w) continue;
      const b = w.gateUp.sizeBytes + w.down.sizeBytes;
      total += b;
      one ||= b;
      w.gateUp.dispose();
      w.down.dispose();
    }
  }
  return { total, one };
}

/** /proc/self/status's VmRSS, RssAnon and RssFile in kB. */
function memKb(): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of fs.readFileSync('/proc/self/status', 'utf8').split('\n')) {
    const m = /^(VmRSS|RssAnon|RssFile):\s+(\d+) kB/.exec(line);
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

export interface LoadMemory {
  /** kB before and right after the load (VmRSS, RssAnon, RssFile). */
  before: Record<string, number>;
  after: Record<string, number>;
  expertsHeldBytes: number;
}

/** RssAnon the load added, MiB (the model's own memory). */
export function loadAnonMiB(m: LoadMemory): number {
  return ((m.after['RssAnon'] ?? 0) - (m.before['RssAnon'] ?? 0)) / 1024;
}

/** Loads dir (fast mode, quantized at load by q) in a child process and returns its memory. */
export function measureLoadMemory(dir: string, q: QuantizeSpec | null): LoadMemory {
  const child = spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--load-memory-child', dir, JSON.stringify(q)],
    { encoding: 'utf8' });
  if (child.status !== 0) throw new Error(`load-memory child for ${dir} failed: ${child.stderr}`);
  return JSON.parse(child.stdout.trim().split('\n').pop()!) as LoadMemory;
}

function child(dir: string, q: QuantizeSpec | null): void {
  const before = memKb();
  const { model } = loadModel(dir, q ? { fast: true, quantize: q } : { fast: true });
  const after = memKb();
  console.log(JSON.stringify({ before, after, expertsHeldBytes: expertBytes(model).total } satisfies LoadMemory));
  model.dispose();
}

if (process.argv[2] === '--load-memory-child' && import.meta.url === pathToFileURL(process.argv[1]!).href)
  child(process.argv[3]!, JSON.parse(process.argv[4]!) as QuantizeSpec | null);
