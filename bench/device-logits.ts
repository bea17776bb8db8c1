// `npm run bench -- device-logits`: the device engine's logits on the bench checkpoints, teacher-forced
// along the CPU f32 engine's greedy continuation of a prompt, against that f32 engine, beside the CPU's
// own bf16 mode. The bench checkpoints carry random weights: their logits spread over a few units with
// top-2 gaps of hundredths, so a greedy text can part on a near-tie between two engines that are both
// right to bf16 rounding. This says whether a difference is such a tie (error well under the gap) or a
// real fault (error of the order of the logits' range).
import { parseArgs } from 'node:util';

import { loadCudaModel, loadModel } from '../src/model/load.js';
import type { ForwardModel } from '../src/model/forward-batch.js';
import { quantizeSpec } from '../src/model/quantize.js';
import { ModelTokenizer } from '../src/model/tokenizer.js';
import { loadNative, noCudaDeviceReason } from '../src/native/index.js';
import { withEnv } from '../test/helpers/env.js';
import { DirectRunner, relToRange } from '../test/helpers/model-runner.js';
import { BENCH_MODEL_NAMES, ensureBenchModel, type BenchModelName } from './bench-models.js';
import { fmt, markdownTable, parsePositiveInt, runInfo, writeJson, type Cell } from './harness.js';

interface Row { model: string; format: string; engine: string; position: number; token: number; relToRange: number; argmaxAgrees: boolean;
  refGap: number; range: number }

function argmaxAndGap(row: Float32Array): { argmax: number; gap: number; range: number } {
  let a = 0, b = -1, lo = row[0]!;
  for (let j = 1; j < row.length; j++) {
    lo = Math.min(lo, row[j]!);
    if (row[j]! > row[a]!) { b = a; a = j; } else if (b < 0 || row[j]! > row[b]!) b = j;
  }
  return { argmax: a, gap: row[a]! - row[b]!, range: row[a]! - lo };
}

/** Logits after the prompt and after each of `ids` but the last: one prefill step, every row kept. */
function forced(model: ForwardModel, prompt: number[], ids: number[]): Float32Array[] {
  const r = new DirectRunner(model, 16, 64);
  const res = r.step([r.newSeq()], [[...prompt, ...ids.slice(0, -1)]], true);
  const V = res.logits.length / (prompt.length + ids.length - 1);
  return ids.map((_, i) => res.logits.slice((prompt.length - 1 + i) * V, (prompt.length + i) * V));
}

export async function runDeviceLogits(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      models: { type: 'string', default: 'mixtral-like,qwen3moe-like' },
      prompt: { type: 'string', default: 'The quick brown fox' },
      tokens: { type: 'string', default: '16' },
      formats: { type: 'string', default: 'bf16' },
      'no-device': { type: 'boolean', default: false },
      json: { type: 'string' },
    },
  });
  const names = values.models.split(',').map((s) => s.trim()).filter(Boolean);
  for (const n of names) if (!(BENCH_MODEL_NAMES as readonly string[]).includes(n)) throw new Error(`--models: unknown bench model "${n}" (${BENCH_MODEL_NAMES.join(', ')})`);
  const N = Math.max(1, parsePositiveInt('tokens', values.tokens, 16));
  const caps = loadNative().capabilities();
  const noDevice = values['no-device'] ? 'skipped (--no-device)' : noCudaDeviceReason(caps);
  if (noDevice) console.log(`# device-logits: no device engine: ${noDevice}; the CPU bf16 mode alone`);
  const formats = values.formats.split(',').map((s) => s.trim()).filter(Boolean);
  // --quantize per format (int4 in groups of 32); each format's reference is the CPU f32 engine with
  // the same quantized weights (exact dequantised codes x scales, f32 activations).
  const specs = formats.map((f) => [f, f === 'bf16' ? null : quantizeSpec(f, 32)] as const);
  const rows: Row[] = [];
  for (const name of names) {
    const dir = ensureBenchModel(name as BenchModelName, (s) => console.log(`# ${s}`));
    const prompt = ModelTokenizer.load(dir).encode(values.prompt);
    for (const [format, quantize] of specs) {
      const q = quantize ? { quantize } : {};
      const ref = loadModel(dir, { fast: false, ...q }).model;
      let ids: number[];
      let refRows: Float32Array[];
      try {
        ids = new DirectRunner(ref, 16, 64).greedy(prompt, N);
        refRows = forced(ref, prompt, ids);
      } finally {
        ref.dispose();
      }
      // [label, make the model, EXPERTD_FP8_ACT while it runs]
      const engines: [string, () => ForwardModel & { dispose(): void }, string | undefined][] =
        [['cpu bf16', () => loadModel(dir, { fast: true, ...q }).model, undefined]];
      if (!noDevice) {
        const cuda = (): ForwardModel & { dispose(): void } => loadCudaModel(dir, { device: 0, ...q }).model;
        engines.push([format === 'fp8' ? 'cuda (fp8 dequantised)' : 'cuda', cuda, '0']);
        // The FP8-activation GroupGemm (x and h quantized per row and 128 k to e4m3): opt-in today.
        if (format === 'fp8') engines.push(['cuda (FP8 activations)', cuda, '1']);
      }
      for (const [engine, make, fp8Act] of engines) {
        const m = make();
        try {
          withEnv('EXPERTD_FP8_ACT', fp8Act, () => forced(m, prompt, ids)).forEach((row, i) => {
            const ours = argmaxAndGap(row), want = argmaxAndGap(refRows[i]!);
            rows.push({ model: name, format, engine, position: i, token: ids[i]!, relToRange: relToRange(row, refRows[i]!),
              argmaxAgrees: ours.argmax === want.argmax, refGap: want.gap, range: want.range });
          });
        } finally {
          m.dispose();
        }
        // As it goes, so that a run cut short keeps what it measured.
        const rs = rows.filter((r) => r.model === name && r.format === format && r.engine === engine);
        const rels = rs.map((r) => r.relToRange).sort((x, y) => x - y);
        console.log(`# ${name} ${format} ${engine}: median error ${fmt(100 * rels[Math.floor(rels.length / 2)]!, 3)}%, ` +
          `worst ${fmt(100 * rels.at(-1)!, 3)}%, argmax as f32 ${rs.filter((r) => r.argmaxAgrees).length}/${rs.length}`);
      }
    }
  }
  const table: Cell[][] = [];
  for (const name of names) for (const format of formats) {
    for (const engine of [...new Set(rows.filter((r) => r.model === name && r.format === format).map((r) => r.engine))]) {
      const rs = rows.filter((r) => r.model === name && r.format === format && r.engine === engine);
      const rels = rs.map((r) => r.relToRange).sort((x, y) => x - y);
      const flips = rs.filter((r) => !r.argmaxAgrees);
      table.push([name, format, engine, rs.length, `${fmt(100 * rels[Math.floor(rels.length / 2)]!, 3)}%`, `${fmt(100 * rels.at(-1)!, 3)}%`,
        `${rs.length - flips.length}/${rs.length}`,
        flips.length ? flips.map((f) => `pos ${f.position}: gap ${fmt(100 * f.refGap / f.range, 2)}% of range`).join('; ') : '-',
        `${fmt(100 * Math.min(...rs.map((r) => r.refGap / r.range)), 2)}%`]);
    }
  }
  console.log(`\n## device-logits: teacher-forced along the CPU f32 engine's greedy ${N} tokens of ${JSON.stringify(values.prompt)} (a quantized format: the f32 engine over the same quantized weights); error = max |logit - f32's| / f32's range\n`);
  console.log(markdownTable(['model', 'format', 'engine', 'positions', 'median error', 'worst error', 'argmax as f32', 'where not (f32\'s top-2 gap)', 'smallest top-2 gap'], table));
  if (values.json) writeJson(values.json, { bench: 'device-logits', run: runInfo(), prompt: values.prompt, tokens: N, formats, noDevice, rows });
}
