// The device side of the model: weights uploaded once (bf16 for the tensor-core GEMMs, f32 for norms,
// biases and reference-precision GEMMs), a grow-only arena of per-step device buffers, and the one
// linear() that picks the tensor-core GEMM or the CUDA-core f32 GEMM by shape and precision.
import { loadNative, type CudaAddon, type CudaBuffer, type CudaStream, type DType } from '../native/index.js';
import { deviceQuantDenseError, intMatrix, quantizeMatrix, type DeviceQuant } from './cuda-quant.js';
import type { HostTensor, IntWeight, TensorSource } from './tensor-source.js';
import { checkShape } from './weights.js';

/** A Linear weight [n, k] on the device. */
export interface DeviceWeight {
  buf: CudaBuffer;
  n: number;
  k: number;
  dtype: 'f32' | 'bf16';
  /** Run on CUDA cores with f32 activations (routers, gates, MLA absorption, odd shapes). */
  reference: boolean;
  /** --quantize-dense: buf holds the weight's codes and scales in this layout (cudaDenseGemmQuant). */
  quant?: DeviceQuant;
  /** An act-order weight (GPTQ desc_act) held in group order: its input order [k] i32, which gemm() gathers x by. */
  inputOrder?: CudaBuffer;
}

export const F32 = 4;
export const BF16 = 2;
export const I32 = 4;

/** Host data of a tensor as bf16 (a copy when it is not bf16 already; f32 -> bf16 rounds to nearest even). */
export function bf16Of(t: HostTensor): Uint16Array {
  if (t.dtype === 'bf16') return t.data as Uint16Array;
  const out = new Uint16Array(t.data.length);
  loadNative().convert(t.data, t.dtype, out, 'bf16');
  return out;
}

function hostF32(t: HostTensor): Float32Array {
  if (t.dtype === 'f32') return t.data as Float32Array;
  const out = new Float32Array(t.data.length);
  loadNative().convert(t.data, t.dtype, out, 'f32');
  return out;
}

/** Grow-only device buffers by name (one step's activations), like the CPU Scratch. */
export class DeviceScratch {
  private readonly bufs = new Map<string, CudaBuffer>();

  constructor(private readonly dev: Device) {}

  /** A view of at least `bytes` bytes of the buffer called `name`. */
  get(name: string, bytes: number): CudaBuffer {
    const need = Math.max(16, bytes);
    let b = this.bufs.get(name);
    if (!b || b.sizeBytes < need) {
      if (b) {
        // Work queued on other streams may still read the old buffer.
        this.dev.cu.cudaSynchronize();
        b.dispose();
      }
      b = this.dev.cu.cudaBuffer(Math.max(need, Math.ceil((b?.sizeBytes ?? 0) * 1.5)));
      this.bufs.set(name, b);
    }
    return b.view(0, need);
  }

  dispose(): void {
    for (const b of this.bufs.values()) b.dispose();
    this.bufs.clear();
  }
}

/** A CUDA device with the op surface (the native addon, or the emulator in tests). */
export class Device {
  readonly scratch: DeviceScratch;
  private readonly owned: CudaBuffer[] = [];
  /** Bytes of weights uploaded. */
  weightBytes = 0;
  /** The stream of the forward pass (null: the device's default stream). */
  main: CudaStream | null = null;
  /** A second stream (ScMoE: the shortcut MoE runs on it beside the dense sub-blocks). */
  side: CudaStream | null = null;
  /** --quantize-dense: the layout of the weights that denseLinear() quantizes (null: none). */
  denseQuant: DeviceQuant | null = null;

  constructor(readonly cu: CudaAddon, readonly index: number) {
    this.scratch = new DeviceScratch(this);
  }

  /** Uploads host data into a new device buffer owned by the model. */
  upload(data: ArrayBufferView): CudaBuffer {
    const b = this.cu.cudaBuffer(Math.max(16, data.byteLength));
    this.cu.cudaCopyToDevice(b, 0, data);
    this.owned.push(b);
    this.weightBytes += data.byteLength;
    return b;
  }

  /** A 1-D tensor (norm weight, bias) as f32 on the device. */
  vector(v: Float32Array): CudaBuffer {
    return this.upload(v);
  }

  /**
   * A Linear weight [n, k]: bf16 for the tensor cores when n and k are multiples of 8 (the GEMMs'
   * 16-byte rows), else, or when `reference`, kept for the f32 CUDA-core GEMM in its stored
   * precision (bf16 stays bf16; f16 widens to f32 exactly).
   */
  linear(name: string, t: HostTensor, n: number, k: number, reference = false): DeviceWeight {
    checkShape(name, t, [n, k]);
    const tc = !reference && n % 8 === 0 && k % 8 === 0;
    if (tc || t.dtype === 'bf16') return { buf: this.upload(bf16Of(t)), n, k, dtype: 'bf16', reference: !tc };
    return { buf: this.upload(hostF32(t)), n, k, dtype: 'f32', reference: true };
  }

  /**
   * A weight that --quantize-dense quantizes (attention projections, Gated DeltaNet in_proj q/k/v/z
   * and out_proj; the CPU engine's choice): with denseQuant, quantized at load with the CPU's rules
   * (cuda-quant.ts's quantizeMatrix, one matrix of its own: fp8's 128 x 128 blocks start at its
   * first row) and multiplied by cudaDenseGemmQuant; else linear().
   */
  denseLinear(name: string, t: HostTensor, n: number, k: number): DeviceWeight {
    const q = this.denseQuant;
    if (!q) return this.linear(name, t, n, k);
    checkShape(name, t, [n, k]);
    const why = deviceQuantDenseError(q, n, k);
    if (why) throw new RangeError(`--quantize-dense ${q.format} on the device: ${name} [${n}, ${k}]: ${why}`);
    return { buf: this.upload(quantizeMatrix(q, t, null, n, k)), n, k, dtype: 'bf16', reference: false, quant: q };
  }

  /**
   * A weight denseLinear() would take, read from `src`: one the checkpoint stores as int8 / int4 codes
   * (compressed-tensors, GPTQ; act-order ones in group order, x gathered) is kept as its codes and scales for
   * cudaDenseGemmQuant where that kernel takes its shape and no --quantize-dense asks for another format; else denseLinear() over its values
   * (an int weight's exact dequantised ones, rounded to bf16 like an FP8 checkpoint's non-expert weights).
   */
  storedLinear(src: TensorSource, name: string, n: number, k: number): DeviceWeight {
    const iw = this.denseQuant ? null : src.getInt?.(name) ?? null;
    if (iw && iw.rows === n && iw.cols === k) {
      const q = intDeviceQuant(iw);
      // Act-order (a perm): the codes in group order, x gathered by the weight's input order (gemm()).
      if (!deviceQuantDenseError(q, n, k))
        return { buf: this.upload(intMatrix(q, iw, null, true)), n, k, dtype: 'bf16', reference: false, quant: q,
          ...(iw.perm ? { inputOrder: this.upload(iw.perm) } : {}) };
    }
    return this.denseLinear(name, src.get(name), n, k);
  }

  /** gate [I, H] and up [I, H] stacked as one bf16 gate_up [2I, H] (the GroupGemm's layout). */
  gateUp(gate: HostTensor, up: HostTensor): CudaBuffer {
    const g = bf16Of(gate), u = bf16Of(up);
    const out = new Uint16Array(g.length + u.length);
    out.set(g, 0);
    out.set(u, g.length);
    return this.upload(out);
  }

  bf16(t: HostTensor): CudaBuffer {
    return this.upload(bf16Of(t));
  }

  /** A table for cudaEmbedding: f32, bf16 and f16 are read as stored. */
  table(t: HostTensor): { buf: CudaBuffer; dtype: DType } {
    return { buf: this.upload(t.data), dtype: t.dtype };
  }

  /**
   * y [m, n] f32 (+)= x [m, k] * w^T (+ bias). x is f32; the tensor-core path converts it to bf16
   * (into `xb` when given, which then must already hold bf16(x) when `xbReady`).
   */
  gemm(x: CudaBuffer, m: number, w: DeviceWeight, y: CudaBuffer, bias: CudaBuffer | null,
       accumulate: boolean, xb: { buf: CudaBuffer; ready: boolean } | null, s: CudaStream | null): void {
    if (m === 0) return;
    const { cu } = this;
    if (w.reference) {
      cu.cudaGemmF32(x, m, w.buf, w.dtype, w.n, w.k, y, bias, accumulate, s);
      return;
    }
    let b: CudaBuffer;
    if (xb?.ready) {
      b = xb.buf;
    } else {
      // One fallback buffer per stream: two streams never share it.
      b = xb?.buf ?? this.scratch.get(s === this.side ? 'gemm.xb.side' : 'gemm.xb', m * w.k * BF16);
      cu.cudaConvert(x, 'f32', b, 'bf16', m * w.k, s);
      if (xb) xb.ready = true;
    }
    if (w.inputOrder) {
      // An act-order weight: x's columns in its input order first.
      const g = this.scratch.get(s === this.side ? 'gemm.xg.side' : 'gemm.xg', m * w.k * BF16);
      cu.cudaGatherExpertColumns(b, null, 1, m, w.k, w.inputOrder, g, s);
      b = g;
    }
    if (w.quant) cu.cudaDenseGemmQuant(b, m, w.buf, w.n, w.k, w.quant, y, bias, accumulate, s);
    else cu.cudaDenseGemm(b, m, w.buf, w.n, w.k, y, bias, accumulate, null, s);
  }

  /** Rows x cols f32 block copy between strided layouts (offsets and pitches in floats). */
  copy2d(dst: CudaBuffer, dstOff: number, dstPitch: number, src: CudaBuffer, srcOff: number,
         srcPitch: number, cols: number, rows: number, s: CudaStream | null): void {
    if (rows === 0 || cols === 0) return;
    this.cu.cudaCopy2D(dst, dstOff * F32, dstPitch * F32, src, srcOff * F32, srcPitch * F32, cols * F32, rows, s);
  }

  dispose(): void {
    if (this.main || this.side) this.cu.cudaSynchronize();
    this.main?.dispose();
    this.side?.dispose();
    this.scratch.dispose();
    for (const b of this.owned) if (!b.disposed) b.dispose();
    this.owned.length = 0;
  }
}

/** The device layout of a checkpoint's int weight: int8 per row, or int4 in its (held) groups. */
export function intDeviceQuant(w: IntWeight): DeviceQuant {
  const z = w.zeros ? { zeros: true as const } : {};
  return w.bits === 8 ? { format: 'int8', group: 0, blockRows: 0, ...z } : { format: 'int4', group: w.group, blockRows: 0, ...z };
}
