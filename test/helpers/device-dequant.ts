// References for the device engine's quantized paths: a checkpoint source whose quantized weights are
// the values the device's kernels multiply, bf16(f32(code x scale)) (cuda-quant.ts's layout and
// dequantMatrixBf16), so that the CPU engine in bf16 mode over it is the same model in bf16 arithmetic.
import { deviceQuantOf, dequantMatrixBf16, quantizeMatrix, type DeviceQuant } from '../../src/model/cuda-quant.js';
import type { QuantizeSpec } from '../../src/model/quantize.js';
import type { ModelSpec } from '../../src/model/spec.js';
import type { HostTensor, TensorSource } from '../../src/model/tensor-source.js';
import { f32ToBf16 } from '../../src/model/kv-dtype.js';
import { toF32 } from '../../src/model/weights.js';
import assert from 'node:assert/strict';
import { dequantInt } from '../../src/model/compressed-tensors.js';
import type { ForwardModel } from '../../src/model/forward-batch.js';
import { CheckpointSource, loadCudaModel, loadModel } from '../../src/model/load.js';
import { MoeModel } from '../../src/model/model.js';
import { logitsVsRef, runAll } from './model-runner.js';
import type { CudaAddon } from '../../src/native/index.js';
import { createCudaEmulator, withLazyStreams } from './cuda-emu.js';
import type { Offloader } from '../../src/offload/offloader.js';
import { attachDeviceOffloader } from '../../src/offload/setup.js';
import { emulatorSkip, needsCudaDevice } from './cuda-skip.js';

/** Values that are bf16 already (dequantMatrixBf16's), as a bf16 tensor: the CPU engine then takes the
 * path a bf16 checkpoint takes (an f32 tensor would keep it on its f32 weight path). */
function bf16Tensor(shape: number[], v: Float32Array): HostTensor {
  return { dtype: 'bf16', shape, data: Uint16Array.from(v, f32ToBf16) };
}

/** [rows, k] quantized in layout q (one matrix, not gate_up) and dequantised as the kernels see it. */
export function deviceDequant(q: DeviceQuant, t: HostTensor): Float32Array {
  const [n, k] = t.shape as [number, number];
  return dequantMatrixBf16(q, quantizeMatrix(q, t, null, n, k), n, k, false, new Float32Array(n * k));
}

/**
 * `src` with gpt-oss's routed experts (gate_up_proj [E, H, 2I] interleaved, down_proj [E, I, H])
 * replaced by their device-dequantised values: each expert's gate, up and down quantized as the
 * device packs them (gate [I, H] and up [I, H] as one gate_up matrix: fp8 keeps a scale grid each).
 */
export function gptOssDequantExperts(spec: ModelSpec, src: TensorSource, quantize: QuantizeSpec): TensorSource & { replaced: number } {
  const q = deviceQuantOf(quantize);
  const H = spec.hidden, I = spec.moe.intermediate, E = spec.moe.numExperts;
  const out = {
    replaced: 0,
    has: (name: string) => src.has(name),
    get(name: string): HostTensor {
      const t = src.get(name);
      if (name.endsWith('.experts.gate_up_proj')) {
        const w = toF32(t), data = new Float32Array(E * H * 2 * I);
        const gate = new Float32Array(I * H), up = new Float32Array(I * H), gu = new Float32Array(2 * I * H);
        for (let e = 0; e < E; e++) {
          for (let h = 0; h < H; h++)
            for (let i = 0; i < I; i++) {
              gate[i * H + h] = w[e * H * 2 * I + h * 2 * I + 2 * i]!;
              up[i * H + h] = w[e * H * 2 * I + h * 2 * I + 2 * i + 1]!;
            }
          const blob = quantizeMatrix(q, { dtype: 'f32', shape: [I, H], data: gate }, { dtype: 'f32', shape: [I, H], data: up }, I, H);
          dequantMatrixBf16(q, blob, 2 * I, H, true, gu);
          for (let h = 0; h < H; h++)
            for (let i = 0; i < I; i++) {
              data[e * H * 2 * I + h * 2 * I + 2 * i] = gu[i * H + h]!;
              data[e * H * 2 * I + h * 2 * I + 2 * i + 1] = gu[(I + i) * H + h]!;
            }
        }
        out.replaced++;
        return bf16Tensor(t.shape, data);
      }
      if (name.endsWith('.experts.down_proj')) {
        const w = toF32(t), data = new Float32Array(E * I * H), d = new Float32Array(H * I);
        for (let e = 0; e < E; e++) {
          for (let i = 0; i < I; i++) for (let h = 0; h < H; h++) d[h * I + i] = w[e * I * H + i * H + h]!;
          const deq = deviceDequant(q, { dtype: 'f32', shape: [H, I], data: d });
          for (let i = 0; i < I; i++) for (let h = 0; h < H; h++) data[e * I * H + i * H + h] = deq[h * I + i]!;
        }
        out.replaced++;
        return bf16Tensor(t.shape, data);
      }
      return t;
    },
  };
  return out;
}

/**
 * The weights --quantize with --quantize-dense quantizes, by name, the CPU engine's choice (as
 * test/quantize-model.test.ts names them): attention projections (not MLA's kv_b_proj), Gated
 * DeltaNet in_proj q / k / v / z and out_proj (not in_proj_ba), dense FFN, shared and routed expert
 * projections; not routers, norms, embeddings or lm_head.
 */
export function isQuantizedDense(name: string, t: HostTensor): boolean {
  return t.shape.length === 2 && /(_proj|in_proj_qkvz|in_proj_qkv|in_proj_z)(_with_mqa)?\.weight$/.test(name) &&
    !name.includes('kv_b_proj') && !name.startsWith('lm_head');
}

/**
 * `src` with every weight isQuantizedDense names replaced by its device-dequantised values, each
 * quantized as one matrix (per-row int8 / int4 do not care how the device splits or stacks rows; fp8
 * blocks do: use it for fp8 only where the device keeps each tensor as one matrix).
 */
export function dequantDenseSource(src: TensorSource, quantize: QuantizeSpec): TensorSource & { replaced: number } {
  const q = deviceQuantOf(quantize);
  const out = {
    replaced: 0,
    has: (name: string) => src.has(name),
    get(name: string): HostTensor {
      const t = src.get(name);
      if (!isQuantizedDense(name, t)) return t;
      out.replaced++;
      return bf16Tensor(t.shape, deviceDequant(q, t));
    },
  };
  return out;
}

/**
 * `src` with every weight it stores as int8 / int4 codes (compressed-tensors, GPTQ) replaced by the values
 * the device multiplies, bf16(f32(code x scale)), as bf16 tensors (and no int codes left to read): the CPU
 * engine's bf16 mode over it is the device model of the checkpoint in bf16 arithmetic.
 */
export function intDequantSource(src: TensorSource): TensorSource & { replaced: number } {
  const out = {
    replaced: 0,
    has: (name: string) => src.has(name),
    get(name: string): HostTensor {
      const iw = src.getInt?.(name);
      if (!iw) return src.get(name);
      out.replaced++;
      return bf16Tensor([iw.rows, iw.cols], dequantInt(iw));
    },
  };
  return out;
}

/**
 * A device model of the int-code checkpoint at `dir` against the CPU engine's bf16 mode over the same
 * checkpoint with its int weights as the device multiplies them (intDequantSource), over `prompts`
 * (model-runner.ts logitsVsRef): asserts the routing equal everywhere and the logits within `meanTol` /
 * `worstTol` of their range; returns the figures for the test's diagnostic.
 */
export function assertMatchesIntDequant(device: ForwardModel, dir: string, prompts: number[][], meanTol: number, worstTol: number):
    string {
  const base = loadModel(dir, { fast: true });
  const src = intDequantSource(new CheckpointSource(base.checkpoint));
  const ref = new MoeModel(base.spec, src, { fast: true });
  try {
    const { mean, worst, skipped, total } = logitsVsRef(device, ref, prompts);
    assert.equal(skipped, 0, `the device routes every token as the reference does (${skipped}/${total} from a flip on)`);
    assert.ok(mean <= meanTol && worst <= worstTol,
      `logits off the reference by ${(mean * 100).toFixed(3)}% of their range on average, up to ${(worst * 100).toFixed(3)}%`);
    return `${src.replaced} weights replaced; mean ${(mean * 100).toFixed(4)}%, worst ${(worst * 100).toFixed(4)}% of the logits' range`;
  } finally {
    ref.dispose();
    base.model.dispose();
  }
}

/** Where the int-checkpoint device tests run: the emulator (unless EXPERTD_SKIP_EMULATOR=1) and a CUDA device when present. */
export const INT_DEVICE_BACKENDS: { label: string; cuda: () => CudaAddon | undefined; skip: string | false }[] = [
  { label: 'emulator', cuda: () => createCudaEmulator(), skip: emulatorSkip },
  { label: 'gpu', cuda: () => undefined, skip: needsCudaDevice },
];

/**
 * The checkpoint at `dir` on the emulator through the device expert cache (half the experts; streams held
 * back until ordered): its slots hold `slotFormat`, its greedy tokens and logits equal the all-resident
 * device `model`'s bit for bit, and the cache missed and evicted. Returns the cache's stats.
 */
export function assertDeviceCacheMatches(model: ForwardModel, dir: string, slotFormat: string): ReturnType<Offloader['stats']> {
  const want = runAll(model, null);
  const cached = withLazyStreams(createCudaEmulator());
  const loaded = loadCudaModel(dir, { device: 0, cuda: cached, loadExperts: false });
  const off = attachDeviceOffloader(loaded, { policy: 'lru', fraction: 0.5 }, cached);
  try {
    assert.equal(off.store.slotFormat, slotFormat);
    const got = runAll(loaded.model, off);
    assert.deepEqual(got.tokens, want.tokens, 'greedy tokens through the cache');
    got.logits.forEach((l, i) => assert.deepEqual(l, want.logits[i], `logits of step ${i} through the cache`));
    const st = off.stats();
    assert.ok(st.misses > 0 && off.cache.evictions > 0, JSON.stringify(st));
    return st;
  } finally {
    off.dispose();
    loaded.model.dispose();
  }
}
