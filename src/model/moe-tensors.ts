// Which checkpoint tensors make one MoE block, by role, for every architecture's naming (hub and
// transformers 5.x layouts): shared by the CPU model and the device model, which only differ in
// where they put them.
import type { ModelSpec } from './spec.js';
import type { Fp8Weight } from './safetensors.js';
import type { HostTensor, IntWeight, TensorSource } from './tensor-source.js';
import { checkShape, rowsOf, ShapeError, sliceOf, toF32, vectorF32, type ExpertSource } from './weights.js';
import { dequantMxfp4, gptOssMxfp4, type Mxfp4Weight } from './mxfp4.js';

interface MoeNames { block: string; router: string; gate: string; up: string; down: string }

/** Checkpoint names of the MoE block (router and expert projections) per architecture. */
function moeNames(spec: ModelSpec, src: TensorSource, layerPrefix: string): MoeNames {
  if (spec.modelType === 'longcat_flash')
    return { block: 'mlp.', router: 'router.classifier', gate: 'gate_proj', up: 'up_proj', down: 'down_proj' };
  if (spec.modelType === 'gpt_oss')
    return { block: 'mlp.', router: 'router', gate: 'gate_up_proj', up: 'gate_up_proj', down: 'down_proj' };
  // Mixtral and MiniMax-M2 hub checkpoints use block_sparse_moe.* (w1/w3/w2); transformers 5.x saves mlp.*.
  if ((spec.modelType === 'mixtral' || spec.modelType === 'minimax_m2') && !src.has(`${layerPrefix}mlp.gate.weight`))
    return { block: 'block_sparse_moe.', router: 'gate', gate: 'w1', up: 'w3', down: 'w2' };
  return { block: 'mlp.', router: 'gate', gate: 'gate_proj', up: 'up_proj', down: 'down_proj' };
}

export interface MoeTensors {
  /** Prefix of the block, e.g. 'model.layers.3.mlp.' (names experts in errors). */
  prefix: string;
  routerName: string;
  router: HostTensor;                   // [E + Z, H]
  routerBias: Float32Array | null;      // [E + Z] (LongCat-Flash router_bias)
  correctionBias: Float32Array | null;  // [E + Z] (DeepSeek-V3, GLM-4.5, MiniMax-M2, LongCat-Flash)
  /** Expert e's projections (views into fused tensors where the checkpoint fuses them; read lazily). */
  expert(e: number): ExpertSource;
  /** Expert e's projections as FP8 codes and block scales when the checkpoint stores them so
   * (DeepSeek-V3 style, per-expert tensors) and the source can keep FP8; else null. */
  expertFp8(e: number): { gate: Fp8Weight; up: Fp8Weight; down: Fp8Weight } | null;
  /** Expert e as int8 / int4 codes and scales when the checkpoint stores it so (compressed-tensors,
   * per-expert tensors), else absent or null. */
  expertInt?(e: number): { names: string[]; gate: IntWeight | null; up: IntWeight | null; down: IntWeight | null } | null;
  /** Expert e as MXFP4 blocks and scales when the checkpoint stores it so (gpt-oss), else absent or null. */
  expertMxfp4?(e: number): { gate: Mxfp4Weight; up: Mxfp4Weight; down: Mxfp4Weight } | null;
  /**
   * gpt-oss expert biases, f32: gateUp [E, 2I] as [gate (I) | up (I)] per expert (the order of
   * packGateUp's output), down [E, H]. null for the other families.
   */
  expertBias: { gateUp: Float32Array; down: Float32Array } | null;
  /** gate/up/down_proj of the shared experts fused as one FFN, or null. */
  sharedPrefix: string | null;
  sharedGate: HostTensor | null;        // [1, H] (Qwen2-MoE)
}

export function moeTensors(spec: ModelSpec, src: TensorSource, layerPrefix: string): MoeTensors {
  const H = spec.hidden;
  const m = spec.moe;
  const E = m.numExperts;
  const ET = E + (m.zeroExperts ?? 0);
  const I = m.intermediate;
  const names = moeNames(spec, src, layerPrefix);
  const p = layerPrefix + names.block;
  const r = `${p}${names.router}`;
  const router = src.get(`${r}.weight`);
  checkShape(`${r}.weight`, router, [ET, H]);
  // LongCat-Flash and MiniMax-M2 keep the correction bias beside the router, the others on it.
  const biasName = spec.modelType === 'longcat_flash' ? `${p}router.e_score_correction_bias`
    : spec.modelType === 'minimax_m2' ? `${p}e_score_correction_bias` : `${r}.e_score_correction_bias`;
  // transformers 5.x stores experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]. LongCat
  // stores gate_up for the identity experts too ([E + Z, 2I, H]); they are never read.
  if (spec.modelType === 'gpt_oss') return gptOssTensors(spec, src, p, r);
  const fused = src.has(`${p}experts.gate_up_proj`);
  const gateUpAll = fused ? src.get(`${p}experts.gate_up_proj`) : null;
  const downAll = fused ? src.get(`${p}experts.down_proj`) : null;
  if (gateUpAll) checkShape(`${p}experts.gate_up_proj`, gateUpAll, [ET, 2 * I, H]);
  if (downAll) checkShape(`${p}experts.down_proj`, downAll, [E, H, I]);
  const expert = (e: number): ExpertSource => {
    if (gateUpAll && downAll) {
      const gu = sliceOf(gateUpAll, e);
      return { gate: rowsOf(gu, 0, I), up: rowsOf(gu, I, 2 * I), down: sliceOf(downAll, e) };
    }
    const ep = `${p}experts.${e}.`;
    return {
      gate: src.get(`${ep}${names.gate}.weight`), up: src.get(`${ep}${names.up}.weight`),
      down: src.get(`${ep}${names.down}.weight`),
    };
  };
  const expertFp8 = (e: number) => {
    if (gateUpAll || !src.getFp8) return null;
    const ep = `${p}experts.${e}.`;
    const gate = src.getFp8(`${ep}${names.gate}.weight`);
    if (!gate) return null;
    const up = src.getFp8(`${ep}${names.up}.weight`), down = src.getFp8(`${ep}${names.down}.weight`);
    if (!up || !down) throw new ShapeError(`${ep}: gate_proj is FP8 but up_proj or down_proj is not`);
    const want = (w: Fp8Weight, rows: number, cols: number, what: string) => {
      if (w.rows !== rows || w.cols !== cols)
        throw new ShapeError(`${ep}${what} is [${w.rows}, ${w.cols}], expected [${rows}, ${cols}]`);
    };
    want(gate, I, H, names.gate);
    want(up, I, H, names.up);
    want(down, H, I, names.down);
    return { gate, up, down };
  };
  const names_ = names;
  const expertInt = (e: number) => {
    if (gateUpAll || !src.getInt) return null;
    const ep = `${p}experts.${e}.`;
    const names = [names_.gate, names_.up, names_.down].map((n) => `${ep}${n}.weight`);
    const [gate, up, down] = names.map((n) => src.getInt!(n));
    return gate || up || down ? { names, gate: gate ?? null, up: up ?? null, down: down ?? null } : null;
  };
  const shared = m.sharedIntermediate > 0;
  return {
    prefix: p, routerName: `${r}.weight`, router, expertFp8, expertInt,
    routerBias: m.routerBias ? vectorF32(src, `${r}.bias`, ET) : null,
    correctionBias: m.router.hasCorrectionBias ? vectorF32(src, biasName, ET) : null,
    expert, expertBias: null,
    sharedPrefix: shared ? (singleSharedExpert(spec) ? `${p}shared_expert.` : `${p}shared_experts.`) : null,
    sharedGate: shared && m.sharedGate ? src.get(`${p}shared_expert_gate.weight`) : null,
  };
}

/**
 * gpt-oss: gate_up_proj [E, H, 2I] (x @ W, gate = even columns, up = odd), down_proj [E, I, H]
 * (h @ W), biases beside them. Each expert is transposed and de-interleaved at load into the
 * gate [I, H], up [I, H], down [H, I] every expert kernel reads (a copy; the checkpoint dtype kept).
 */
function gptOssTensors(spec: ModelSpec, src: TensorSource, p: string, r: string): MoeTensors {
  const H = spec.hidden;
  const E = spec.moe.numExperts;
  const I = spec.moe.intermediate;
  const router = src.get(`${r}.weight`);
  checkShape(`${r}.weight`, router, [E, H]);
  const biases = gptOssBiases(src, p, E, H, I);
  const common = {
    prefix: p, routerName: `${r}.weight`, router, routerBias: vectorF32(src, `${r}.bias`, E), correctionBias: null,
    expertFp8: () => null, expertBias: biases, sharedPrefix: null, sharedGate: null,
  };
  if (spec.quantization?.method === 'mxfp4' && src.getU8 && src.has(`${p}experts.gate_up_proj_blocks`)) {
    const expertMxfp4 = gptOssMxfp4(src, p, E, H, I);
    // Dequantised (exact, f32) for what needs plain weights: --quantize re-quantizes from these.
    const expert = (e: number): ExpertSource => {
      const w = expertMxfp4(e);
      const f32 = (x: Mxfp4Weight) => ({ dtype: 'f32' as const, shape: [x.rows, x.cols], data: dequantMxfp4(x) });
      return { gate: f32(w.gate), up: f32(w.up), down: f32(w.down) };
    };
    return { ...common, expert, expertMxfp4 };
  }
  const gu = src.get(`${p}experts.gate_up_proj`);
  const dn = src.get(`${p}experts.down_proj`);
  checkShape(`${p}experts.gate_up_proj`, gu, [E, H, 2 * I]);
  checkShape(`${p}experts.down_proj`, dn, [E, I, H]);
  const expert = (e: number): ExpertSource => {
    const w = gptOssExpertRows(gu.data.subarray(e * H * 2 * I, (e + 1) * H * 2 * I), dn.data.subarray(e * I * H, (e + 1) * I * H), H, I);
    return {
      gate: { dtype: gu.dtype, shape: [I, H], data: w.gate }, up: { dtype: gu.dtype, shape: [I, H], data: w.up },
      down: { dtype: dn.dtype, shape: [H, I], data: w.down },
    };
  };
  return { ...common, expert };
}

/** gpt-oss expert biases as f32: gate_up de-interleaved to [gate (I) | up (I)] per expert, down [E, H]. */
function gptOssBiases(src: TensorSource, p: string, E: number, H: number, I: number):
    { gateUp: Float32Array; down: Float32Array } {
  const guBias = src.get(`${p}experts.gate_up_proj_bias`);
  checkShape(`${p}experts.gate_up_proj_bias`, guBias, [E, 2 * I]);
  const interleaved = toF32(guBias);
  const gateUpBias = new Float32Array(E * 2 * I);
  for (let e = 0; e < E; e++) {
    for (let i = 0; i < I; i++) {
      gateUpBias[e * 2 * I + i] = interleaved[e * 2 * I + 2 * i]!;
      gateUpBias[e * 2 * I + I + i] = interleaved[e * 2 * I + 2 * i + 1]!;
    }
  }
  const downBiasT = src.get(`${p}experts.down_proj_bias`);
  checkShape(`${p}experts.down_proj_bias`, downBiasT, [E, H]);
  return { gateUp: gateUpBias, down: toF32(downBiasT) };
}

/** Qwen2-MoE, Qwen3-Next and Qwen3.5 name their one gated shared expert mlp.shared_expert (DeepSeek: shared_experts). */
export function singleSharedExpert(spec: ModelSpec): boolean {
  return spec.modelType === 'qwen2_moe' || spec.modelType === 'qwen3_next' || spec.modelType === 'qwen3_5_moe';
}

/**
 * One gpt-oss expert from its checkpoint layout, gate_up [H, 2I] (gate = even columns, up = odd) and
 * down [I, H], to the rows every expert kernel reads: gate [I, H], up [I, H], down [H, I] (elements
 * moved, the dtype kept; the expert cache's loads do the same, expert_loader.cc on its copy thread).
 */
export function gptOssExpertRows<T extends Float32Array | Uint16Array>(gateUp: T, down: T, H: number, I: number): { gate: T; up: T; down: T } {
  const make = (n: number) => (gateUp instanceof Float32Array ? new Float32Array(n) : new Uint16Array(n)) as T;
  const gate = make(I * H), up = make(I * H);
  const d = (down instanceof Float32Array ? new Float32Array(H * I) : new Uint16Array(H * I)) as T;
  for (let h = 0; h < H; h++) {
    for (let i = 0; i < I; i++) {
      gate[i * H + h] = gateUp[h * 2 * I + 2 * i]!;
      up[i * H + h] = gateUp[h * 2 * I + 2 * i + 1]!;
    }
  }
  for (let i = 0; i < I; i++) for (let h = 0; h < H; h++) d[h * I + i] = down[i * H + h]!;
  return { gate, up, down: d };
}
