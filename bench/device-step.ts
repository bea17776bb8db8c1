// `npm run bench -- device-step`: where a decode step of the device engine spends its host time.
// Every `cuda*` function of the addon is wrapped with a host timer (the time to issue the call:
// argument checks, launches, enqueued copies), and the stream and event waits apart; a step's wall
// time less both is the JS engine code between the calls. If the calls take most of the step and
// the waits little, the step is launch-bound (the GPU waits on the host): what CUDA graphs remove.
// Device-to-host copies count as waits (they block until the stream's earlier work is done).
// --standin runs the CPU emulator of the cuda* ops on the mixtral fixture (plumbing only: there the
// "calls" are the emulated kernels themselves).
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { loadCudaModel } from '../src/model/load.js';
import { loadNative, noCudaDeviceReason, packageRoot, type CudaAddon } from '../src/native/index.js';
import { createCudaEmulator } from '../test/helpers/cuda-emu.js';
import { DirectRunner, argmax } from '../test/helpers/model-runner.js';
import { BENCH_MODEL_NAMES, ensureBenchModel, type BenchModelName } from './bench-models.js';
import { fmt, markdownTable, median, parsePositiveInt, runInfo, writeJson, type Cell } from './harness.js';

interface OpEntry { calls: number; ms: number }

/** Host timers around cu's cuda* functions and its streams' and events' waits, on while `on`. */
class HostTimers {
  on = false;
  readonly ops = new Map<string, OpEntry>();
  private restore: (() => void)[] = [];

  constructor(cu: CudaAddon) {
    const obj = cu as unknown as Record<string, unknown>;
    for (const name of Object.keys(obj)) {
      const f = obj[name];
      if (!name.startsWith('cuda') || typeof f !== 'function') continue;
      obj[name] = this.wrap(name, f as (...a: unknown[]) => unknown);
      this.restore.push(() => { obj[name] = f; });
    }
    for (const [cls, label] of [[cu.CudaStream, 'stream.synchronize (wait)'], [cu.CudaEvent, 'event.synchronize (wait)']] as const) {
      const proto = (cls as unknown as { prototype: Record<string, unknown> }).prototype;
      const f = proto.synchronize;
      if (typeof f !== 'function') continue;
      proto.synchronize = this.wrap(label, f as (...a: unknown[]) => unknown);
      this.restore.push(() => { proto.synchronize = f; });
    }
  }

  private wrap(name: string, f: (...a: unknown[]) => unknown): (...a: unknown[]) => unknown {
    const self = this;
    return function (this: unknown, ...args: unknown[]) {
      if (!self.on) return f.apply(this, args);
      const t0 = performance.now();
      try {
        return f.apply(this, args);
      } finally {
        const e = self.ops.get(name) ?? { calls: 0, ms: 0 };
        e.calls++;
        e.ms += performance.now() - t0;
        self.ops.set(name, e);
      }
    };
  }

  uninstall(): void {
    for (const r of this.restore) r();
    this.restore = [];
  }
}

// Calls that block until the device has caught up: the syncs, and device-to-host copies (into
// pageable memory a copy waits for the stream's earlier work).
const isWait = (name: string) => name.endsWith('(wait)') || name === 'cudaSynchronize' || name === 'cudaCopyToHost';

export async function runDeviceStep(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: 'string', default: 'mixtral-like' },
      batches: { type: 'string', default: '1,8' },
      steps: { type: 'string', default: '32' },
      'prompt-len': { type: 'string', default: '128' },
      standin: { type: 'boolean', default: false },
      json: { type: 'string' },
    },
  });
  const steps = Math.max(1, parsePositiveInt('steps', values.steps, 32));
  const promptLen = Math.max(1, parsePositiveInt('prompt-len', values['prompt-len'], 128));
  const batches = values.batches.split(',').map((s) => Math.max(1, parsePositiveInt('batches', s.trim(), 1)));
  let cu: CudaAddon;
  let dir: string;
  if (values.standin) {
    cu = createCudaEmulator();
    dir = path.join(packageRoot(), 'test', 'fixtures', 'mixtral');
  } else {
    const why = noCudaDeviceReason(loadNative().capabilities());
    if (why) throw new Error(`device-step: ${why} (--standin runs the CPU emulator)`);
    cu = loadNative() as unknown as CudaAddon;
    if (!(BENCH_MODEL_NAMES as readonly string[]).includes(values.model)) throw new RangeError(`--model: unknown bench model "${values.model}"`);
    dir = ensureBenchModel(values.model as BenchModelName, (s) => console.error(`# ${s}`));
  }
  const { model, spec } = loadCudaModel(dir, { device: 0, ...(values.standin ? { cuda: cu } : {}) });
  const timers = new HostTimers(cu);
  const V = spec.vocabSize;
  const rows: Record<string, unknown>[] = [];
  const table: Cell[][] = [];
  const opTables: string[] = [];
  try {
    for (const B of batches) {
      const blockSize = 16;
      const r = new DirectRunner(model, blockSize, B * Math.ceil((promptLen + steps + 8) / blockSize) + 4);
      const seqs = Array.from({ length: B }, () => r.newSeq());
      const prompts = seqs.map((_, s) => Array.from({ length: promptLen }, (_, i) => 3 + ((i * 7919 + s * 104729 + 13) % (V - 3))));
      let res = r.step(seqs, prompts, false);
      const next = () => seqs.map((_, s) => [argmax(res.logits.subarray(s * V, (s + 1) * V))]);
      for (let i = 0; i < 3; i++) res = r.step(seqs, next(), false);
      const wall: number[] = [], calls: number[] = [], waits: number[] = [], counts: number[] = [];
      timers.ops.clear();
      for (let i = 0; i < steps; i++) {
        const ids = next();
        const before = new Map([...timers.ops].map(([k, v]) => [k, { ...v }]));
        timers.on = true;
        const t0 = performance.now();
        res = r.step(seqs, ids, false);
        const ms = performance.now() - t0;
        timers.on = false;
        let c = 0, w = 0, n = 0;
        for (const [k, v] of timers.ops) {
          const d = v.ms - (before.get(k)?.ms ?? 0);
          if (isWait(k)) w += d; else { c += d; n += v.calls - (before.get(k)?.calls ?? 0); }
        }
        wall.push(ms);
        calls.push(c);
        waits.push(w);
        counts.push(n);
      }
      const step = median(wall);
      table.push([B, fmt(step, 3), fmt(B * 1000 / step, 4), median(counts), fmt(median(calls), 3), fmt(median(waits), 3),
        fmt(Math.max(0, step - median(calls) - median(waits)), 3), `${fmt(100 * median(calls) / step, 3)}%`]);
      const ops = [...timers.ops].sort((a, b) => b[1].ms - a[1].ms).slice(0, 12);
      opTables.push(`\nbatch ${B}: the calls with the most host time (per decode step)\n\n` + markdownTable(['call', 'calls/step', 'host ms/step', 'us/call'],
        ops.map(([k, v]) => [k, fmt(v.calls / steps, 3), fmt(v.ms / steps, 3), fmt(1000 * v.ms / v.calls, 3)])));
      rows.push({ batch: B, stepMs: wall, callMs: calls, waitMs: waits, calls: counts, ops: Object.fromEntries(timers.ops) });
    }
  } finally {
    timers.uninstall();
    model.dispose();
  }
  console.log(`\n## device-step: ${values.standin ? 'STANDIN (CPU emulator, mixtral fixture)' : `${values.model} on ${cu.cudaDeviceInfo(0).name}`}, ` +
    `prompt ${promptLen}, ${steps} decode steps per batch, medians\n`);
  console.log(markdownTable(['batch', 'step ms', 'tok/s', 'cuda* calls', 'host ms issuing calls', 'ms waiting (syncs, D2H copies)', 'ms in JS between', 'issuing / step'], table));
  for (const t of opTables) console.log(t);
  if (values.json) writeJson(values.json, { bench: 'device-step', run: runInfo(), model: values.standin ? 'mixtral fixture (standin)' : values.model, promptLen, steps, rows });
}
