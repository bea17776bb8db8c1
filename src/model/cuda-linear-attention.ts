// Gated DeltaNet linear attention on the device (Qwen3-Next, Qwen3.5): the same math as
// linear-attention.ts (the CPU layer) from the cuda* ops, with each sequence's conv and recurrent
// state in a slot of device pools [slots, ...] that the model owns and the engine's StateSlotPool indexes.
import type { CudaBuffer } from '../native/index.js';
import type { DeviceStep } from './cuda-attention.js';
import { F32, type Device, type DeviceWeight } from './device.js';
import { deltaNetInProj, linearStateFloats } from './linear-attention.js';
import type { LinearAttentionSpec } from './spec.js';
import type { TensorSource } from './tensor-source.js';
import { checkShape, toF32, vectorF32 } from './weights.js';

/** One linear layer's state pools on the device: conv [slots, C, K-1] and recurrent [slots, Hv, Dk, Dv], f32. */
export interface DeviceLinearState {
  conv: CudaBuffer;
  recurrent: CudaBuffer;
}

/** The step's state slots and sequence starts on the device (shared by every linear layer). */
export interface DeviceStateStep {
  slots: CudaBuffer;      // [numSeqs] i32
  seqStarts: CudaBuffer;  // [numSeqs + 1] i32
}

/** The chunk length asked of cudaGatedDeltaRule for prefill chunks (the chunkwise algorithm's). */
const DELTA_CHUNK = 64;

export class CudaGatedDeltaNet {
  // Three GEMMs over the shared bf16 input instead of the CPU's one: each output lands contiguous,
  // as the conv, the gated norm and the gates kernel read it.
  private readonly qkv: DeviceWeight;     // [C, H]: q | k | v
  private readonly z: DeviceWeight;       // [Vd, H]
  private readonly ba: DeviceWeight;      // [2 Hv, H]: b | a
  private readonly out: DeviceWeight;     // [H, Vd]
  private readonly convW: CudaBuffer;     // [C, K] f32
  private readonly negA: CudaBuffer;      // [Hv] -exp(A_log)
  private readonly dtBias: CudaBuffer;    // [Hv]
  private readonly normW: CudaBuffer;     // [Dv]
  private readonly C: number;

  constructor(private readonly dev: Device, private readonly la: LinearAttentionSpec, src: TensorSource, p: string,
              hidden: number, private readonly eps: number) {
    const { keyHeads: Hk, valueHeads: Hv, keyHeadDim: Dk, valueHeadDim: Dv, convKernel: K } = la;
    const H = hidden, Vd = Hv * Dv;
    this.C = 2 * Hk * Dk + Vd;
    const w = deltaNetInProj(la, src, p, H);
    // --quantize-dense: q / k / v / z rows and out_proj (the CPU's choice); b / a set the delta rule's
    // step and decay and keep their precision.
    this.qkv = dev.denseLinear(`${p}in_proj (q, k, v rows)`, w.qkv, this.C, H);
    this.z = dev.denseLinear(`${p}in_proj (z rows)`, w.z, Vd, H);
    this.ba = dev.linear(`${p}in_proj (b, a rows)`, w.ba, 2 * Hv, H);
    this.out = dev.storedLinear(src, `${p}out_proj.weight`, H, Vd);
    const cw = src.get(`${p}conv1d.weight`);
    checkShape(`${p}conv1d.weight`, cw, [this.C, 1, K]);
    this.convW = dev.vector(toF32(cw));
    this.negA = dev.vector(vectorF32(src, `${p}A_log`, Hv).map((x) => -Math.exp(x)));
    this.dtBias = dev.vector(vectorF32(src, `${p}dt_bias`, Hv));
    this.normW = dev.vector(vectorF32(src, `${p}norm.weight`, Dv));
  }

  /** This layer's state pools for `slots` sequences, zeroed (disposed by the caller). */
  allocState(slots: number): DeviceLinearState {
    const { cu } = this.dev;
    const [c, r] = linearStateFloats(this.la);
    const conv = cu.cudaBuffer(Math.max(16, slots * c * F32));
    let recurrent: CudaBuffer;
    try {
      recurrent = cu.cudaBuffer(Math.max(16, slots * r * F32));
    } catch (e) {
      conv.dispose();
      throw e;
    }
    cu.cudaFill(conv, 0);
    cu.cudaFill(recurrent, 0);
    return { conv, recurrent };
  }

  private lens = new Int32Array(0);

  /**
   * The step's per-sequence token counts (seqInfo's qLen), the launch hint that keeps a batch of
   * decodes whose total reaches the chunk off the chunked kernel.
   */
  private seqLens(step: DeviceStep): Int32Array | null {
    const S = step.batch.numSeqs;
    if (this.lens.length !== S) this.lens = new Int32Array(S);
    let sum = 0;
    for (let b = 0; b < S; b++) sum += this.lens[b] = step.batch.seqInfo[3 * b + 1]!;
    return sum === step.tokens ? this.lens : null;  // a sub-batch's rows: no hint
  }

  /**
   * x [T, H] f32 -> out [T, H] f32 (overwritten) for the step's sequences, each reading and advancing
   * the state in its slot (the model zeroes the slots of sequences that start at position 0).
   */
  forward(step: DeviceStep, x: CudaBuffer, state: DeviceLinearState, ss: DeviceStateStep, out: CudaBuffer): void {
    const { dev } = this;
    const { cu, scratch } = dev;
    const { keyHeads: Hk, valueHeads: Hv, keyHeadDim: Dk, valueHeadDim: Dv, convKernel: K } = this.la;
    const T = step.tokens, S = step.batch.numSeqs, st = step.stream;
    const { C } = this;
    const Kd = Hk * Dk, Vd = Hv * Dv;
    const qkv = scratch.get('la.qkv', T * C * F32);       // [T, C] conv input, then its output (in place)
    const z = scratch.get('la.z', T * Vd * F32);          // [T, Hv, Dv]
    const ba = scratch.get('la.ba', T * 2 * Hv * F32);    // [T, b (Hv) | a (Hv)]
    dev.gemm(x, T, this.qkv, qkv, null, false, step.xb, st);
    dev.gemm(x, T, this.z, z, null, false, step.xb, st);
    dev.gemm(x, T, this.ba, ba, null, false, step.xb, st);
    const g = scratch.get('la.g', T * Hv * F32);          // [T, Hv] log decay
    const beta = scratch.get('la.beta', T * Hv * F32);    // [T, Hv]
    cu.cudaDeltaGates(ba, T, Hv, this.negA, this.dtBias, g, beta, st);
    cu.cudaCausalConv1d(qkv, T, C, this.convW, null, K, state.conv, ss.slots, ss.seqStarts, S, true, qkv, st);
    const core = scratch.get('la.core', T * Vd * F32);    // [T, Hv, Dv]
    const span = Math.max(4, (T * C - Kd) * F32);
    cu.cudaGatedDeltaRule(qkv, qkv.view(Kd * F32, span), qkv.view(2 * Kd * F32, Math.max(4, (T * C - 2 * Kd) * F32)), g, beta,
      state.recurrent, ss.slots, ss.seqStarts, S, core,
      { T, Hk, Hv, Dk, Dv, l2normQk: true, chunk: DELTA_CHUNK, qStride: C, kStride: C, vStride: C }, st,
      T >= DELTA_CHUNK ? this.seqLens(step) : null);
    cu.cudaGatedRmsNorm(core, z, this.normW, this.eps, T * Hv, Dv, core, st);
    dev.gemm(core, T, this.out, out, null, false, null, st);
  }
}
