// A MoE transformer built from a ModelSpec and checkpoint tensors: embedding, decoder layers
// (attention + dense FFN or MoE), final norm and LM head. forward() runs one batched step over
// the paged KV cache and returns the logits of the requested rows and every MoE layer's routing.
import { loadNative, type ExpertTable, type PackedWeight, type PrefetchList } from '../native/index.js';
import { SingleRankComm, type CommDelta, type ExpertComm } from '../moe/comm.js';
import { EpsPlanner, loadOrCalibrate, type ExpertKernel } from '../moe/eps-planner.js';
import { MoeLayer, type MoeHooks, type PipelineChunks } from '../moe/moe-layer.js';
import { GqaAttention, MlaAttention, type AttentionBlock, type LayerCache } from './attention.js';
import { Scratch, type ForwardBatch, type ForwardModel, type ForwardResult } from './forward-batch.js';
import { allocHostKvArray, type KvDtype } from './kv-dtype.js';
import type { ModelSpec } from './spec.js';
import { withWeightPrefix, type HostTensor, type TensorSource } from './tensor-source.js';
import { GatedDeltaNet, linearStateFloats, type LinearLayerState } from './linear-attention.js';
import { moeTensors } from './moe-tensors.js';
import { packMxfp4Expert } from './mxfp4.js';
import { checkShape, denseFfnTable, packExpert, packFp8Expert, packIntFfn, packLinear, vectorF32 } from './weights.js';
import { denseQuantize, lmHeadQuantize, type QuantizeSpec } from './quantize.js';

export interface ModelOptions {
  /** bf16 dot products for activations (fast mode) instead of f32 (reference mode). */
  fast: boolean;
  comm?: ExpertComm;
  /** Called for each expert while loading; return false to leave it out of the table (offloader). */
  loadExpert?: (moeLayer: number, expert: number) => boolean;
  /**
   * --quantize: routed experts quantized at load, with `dense` the attention projections, dense FFNs
   * and shared experts too, with `lmHead` the LM head (null/absent = the checkpoint's precision).
   */
  quantize?: QuantizeSpec | null;
}

/** One attention + FFN sub-block: x += Attn(LN(x)); x += FFN(LN(x)). */
interface SubBlock {
  inputNorm: Float32Array;
  postNorm: Float32Array;
  /** Full attention, or null where the layer's mixer is linear attention. */
  attn: AttentionBlock | null;
  /** KV cache index of this attention (-1 for a linear-attention layer). */
  cacheIndex: number;
  /** Gated DeltaNet (hybrid models), with its index among the linear layers (state pool); else null. */
  linear: GatedDeltaNet | null;
  linearIndex: number;
  dense: ExpertTable | null;
}

interface Layer {
  /** One sub-block, or two for a shortcut-connected (LongCat-Flash / ScMoE) layer. */
  subs: SubBlock[];
  /** The MoE: the FFN of a plain layer, or the shortcut branch of a ScMoE layer. */
  moe: MoeLayer | null;
  shortcut: boolean;
}

export class MoeModel implements ForwardModel<LayerCache[]> {
  readonly device = 'cpu';
  readonly kvDtypes: readonly KvDtype[] = ['f32', 'bf16', 'fp8'];
  readonly layers: Layer[] = [];
  readonly moeLayers: MoeLayer[] = [];
  private readonly embed: HostTensor;
  private readonly finalNorm: Float32Array;
  private readonly lmHead: PackedWeight;
  private readonly scratch = new Scratch();
  /**
   * Read-ahead: while a step's serial code runs (norms, rope, routing, JS), the pool's idle workers
   * read the next dense weights into the cache (NativeAddon.prefetch). Per layer, then after the LM
   * head: the list posted there. On unless EXPERTD_READ_AHEAD=0; results never depend on it.
   */
  private readonly readAhead: PrefetchList[];
  readAheadOn = process.env.EXPERTD_READ_AHEAD !== '0';
  readonly comm: ExpertComm;
  /** KV caches: one per attention (two per LongCat-Flash layer). */
  readonly numCaches: number;
  /** Linear-attention layers (hybrid models): their per-sequence state slots, once allocated. */
  readonly numLinearLayers: number;
  private linearStates: LinearLayerState[] = [];
  private stateSlots = 0;
  get numMoeLayers(): number {
    return this.moeLayers.length;
  }
  hooks: MoeHooks = {};
  fast: boolean;
  /**
   * ScMoE: overlap the shortcut MoE with the dense sub-blocks (the schedule); false runs it whole
   * where it is routed, as a plain MoE would (same numbers; the bench's baseline).
   */
  shortcutOverlap = true;
  /**
   * Resident bytes of the weights outside the routed experts (attention, dense FFNs, shared experts,
   * router, lm_head; codes and scales where --quantize-dense / --quantize-lm-head quantized them), and of the routed
   * experts this model holds itself (0 for those the offloader or other ranks hold).
   */
  readonly residentWeightBytes = { dense: 0, experts: 0 };

  constructor(readonly spec: ModelSpec, checkpointSrc: TensorSource, opts: ModelOptions) {
    const src = withWeightPrefix(checkpointSrc, spec.weightPrefix);
    this.fast = opts.fast;
    // Zero-centred RMSNorm weights (Qwen3-Next): x * (1 + w), with 1 + w formed once here in f32.
    const norm = (name: string, n: number): Float32Array => {
      const w = vectorF32(src, name, n);
      if (spec.zeroCentredNorms) for (let i = 0; i < n; i++) w[i] = 1 + w[i]!;
      return w;
    };
    this.comm = opts.comm ?? new SingleRankComm();
    const H = spec.hidden;
    this.embed = src.get('model.embed_tokens.weight');
    checkShape('model.embed_tokens.weight', this.embed, [spec.vocabSize, H]);
    this.finalNorm = norm('model.norm.weight', H);
    // --quantize-lm-head: tied embeddings get a quantized copy for the LM head; the lookup keeps the table.
    const lq = lmHeadQuantize(opts.quantize);
    if (spec.tieWordEmbeddings && !src.has('lm_head.weight'))
      this.lmHead = loadNative().packWeight(this.embed.data, this.embed.dtype, spec.vocabSize, H, lq?.format, lq?.group);
    else this.lmHead = packLinear(src, 'lm_head.weight', spec.vocabSize, H, lq);
    this.residentWeightBytes.dense += this.lmHead.sizeBytes;
    const dq = denseQuantize(opts.quantize);
    const denseFfn = (prefix: string, inter: number): ExpertTable => {
      const d = denseFfnTable(src, prefix, H, inter, dq);
      this.residentWeightBytes.dense += d.sizeBytes;
      return d.table;
    };
    let moeIndex = 0;
    let cacheIndex = 0;
    let linearIndex = 0;
    // A layer's own window (gpt-oss layer_types) overrides the model's.
    const attention = (p: string, i: number): AttentionBlock => {
      const w = spec.layers[i]!.slidingWindow;
      const a = w === undefined ? spec.attention : { ...spec.attention, slidingWindow: w };
      const block = a.kind === 'mla' ? new MlaAttention(a, src, p, H, dq)
        : new GqaAttention(a, src, p, H, spec.rmsNormEps, dq, spec.zeroCentredNorms ? 1 : 0);
      this.residentWeightBytes.dense += block.weightBytes;
      return block;
    };
    for (let i = 0; i < spec.numLayers; i++) {
      const p = `model.layers.${i}.`;
      const ls = spec.layers[i]!;
      if (ls.shortcut) {
        // LongCat-Flash: sub-blocks j = 0, 1 with indexed norms, attentions and MLPs.
        const subs = [0, 1].map((j) => ({
          inputNorm: vectorF32(src, `${p}input_layernorm.${j}.weight`, H),
          postNorm: vectorF32(src, `${p}post_attention_layernorm.${j}.weight`, H),
          attn: attention(`${p}self_attn.${j}.`, i),
          cacheIndex: cacheIndex++, linear: null, linearIndex: -1,
          dense: denseFfn(`${p}mlps.${j}.`, spec.denseIntermediate),
        }));
        const moe = this.buildMoe(src, p, moeIndex++, opts);
        this.moeLayers.push(moe);
        this.layers.push({ subs, moe, shortcut: true });
        continue;
      }
      let moe: MoeLayer | null = null;
      let dense: ExpertTable | null = null;
      if (ls.ffn === 'moe') {
        moe = this.buildMoe(src, p, moeIndex++, opts);
        this.moeLayers.push(moe);
      } else {
        dense = denseFfn(`${p}mlp.`, spec.denseIntermediate);
      }
      const linear = ls.mixer === 'linear_attention'
        ? new GatedDeltaNet(spec.linearAttention!, src, `${p}linear_attn.`, H, spec.rmsNormEps, dq) : null;
      if (linear) this.residentWeightBytes.dense += linear.weightBytes;
      this.layers.push({
        subs: [{
          inputNorm: norm(`${p}input_layernorm.weight`, H),
          postNorm: norm(`${p}post_attention_layernorm.weight`, H),
          attn: linear ? null : attention(`${p}self_attn.`, i), cacheIndex: linear ? -1 : cacheIndex++, dense,
          linear, linearIndex: linear ? linearIndex++ : -1,
        }],
        moe, shortcut: false,
      });
    }
    // Read-ahead while a step's serial code runs: after layer i, the next two stages' dense weights
    // (a stage is a layer's attention projections and router, then the LM head; after the head,
    // the next step's first layers).
    const stages = this.layers.map((l) => [
      ...l.subs.flatMap((sub) => (sub.attn ?? sub.linear)?.projections ?? []),
      ...(l.moe ? [l.moe.weights.gate] : []),
    ]);
    const L = this.layers.length;
    const stage = (i: number) => (i < L ? stages[i]! : i === L ? [this.lmHead] : stages[(i - L - 1) % L]!);
    const n = loadNative();
    this.readAhead = Array.from({ length: L + 1 }, (_, i) => n.prefetchList(...stage(i + 1), ...stage(i + 2)));
    this.numCaches = cacheIndex;
    this.numLinearLayers = linearIndex;
  }

  /** Bytes of one sequence's state over every linear-attention layer (0 for a model without any). */
  get stateBytesPerSlot(): number {
    if (!this.spec.linearAttention) return 0;
    const [c, s] = linearStateFloats(this.spec.linearAttention);
    return this.numLinearLayers * (c + s) * 4;
  }

  /**
   * Allocates (replacing any before) the linear-attention state for `slots` sequences: batch.stateSlots
   * index it. A sequence's state is reset when its first scheduled token is position 0.
   */
  allocateStateCache(slots: number): void {
    this.stateSlots = slots;
    this.linearStates = [];
    for (const l of this.layers) for (const sub of l.subs) if (sub.linear) this.linearStates.push(sub.linear.allocState(slots));
  }

  private buildMoe(src: TensorSource, layerPrefix: string, moeIndex: number, opts: ModelOptions): MoeLayer {
    const n = loadNative();
    const { spec } = this;
    const H = spec.hidden;
    const m = spec.moe;
    const t = moeTensors(spec, src, layerPrefix);
    const gate = n.packWeight(t.router.data, t.router.dtype, t.router.shape[0]!, H);
    this.residentWeightBytes.dense += gate.sizeBytes;
    const experts = new n.ExpertTable(m.numExperts, H, m.intermediate);
    for (let e = 0; e < m.numExperts; e++) {
      if (opts.loadExpert && !opts.loadExpert(moeIndex, e)) continue;
      // FP8 and MXFP4 checkpoints keep their experts so, compressed-tensors ones as int8 / int4 codes
      // (unless --quantize asks for another format).
      const fp8 = opts.quantize ? null : t.expertFp8(e);
      const mx = opts.quantize ? null : t.expertMxfp4?.(e);
      const iw = opts.quantize ? null : t.expertInt?.(e);
      const w = fp8 ? packFp8Expert(fp8) : mx ? packMxfp4Expert(mx)
        : iw ? packIntFfn(iw.names, iw.gate, iw.up, iw.down, H, m.intermediate)
        : packExpert(t.expert(e), `${t.prefix}experts.${e}`, H, m.intermediate, opts.quantize ?? null);
      experts.set(e, w.gateUp, w.down);
      this.residentWeightBytes.experts += w.gateUp.sizeBytes + w.down.sizeBytes;
      w.gateUp.dispose();
      w.down.dispose();
    }
    let shared: ExpertTable | null = null;
    if (t.sharedPrefix) {
      const d = denseFfnTable(src, t.sharedPrefix, H, m.sharedIntermediate, denseQuantize(opts.quantize));
      this.residentWeightBytes.dense += d.sizeBytes;
      shared = d.table;
    }
    if (t.sharedGate) checkShape(`${t.prefix}shared_expert_gate.weight`, t.sharedGate, [1, H]);
    const sharedGate = t.sharedGate ? n.packWeight(t.sharedGate.data, t.sharedGate.dtype, 1, H) : null;
    return new MoeLayer(moeIndex, m, {
      gate, gateBias: t.routerBias, correctionBias: t.correctionBias, experts, shared, sharedGate,
      expertBias: t.expertBias,
    }, H, this.comm);
  }

  /**
   * EPS-MoE: 'auto' calibrates (once per machine and expert shape, cached on disk) and lets each MoE
   * layer pick GroupGemm or per-expert DenseGemm by its load every step; 'group'/'dense' force one.
   */
  setExpertKernel(mode: 'auto' | ExpertKernel): void {
    const { spec } = this;
    const shape = {
      numExperts: spec.moe.numExperts, hidden: spec.hidden, inter: spec.moe.intermediate,
      dtype: this.moeLayers[0]?.weights.gate.dtype ?? 'bf16', fast: this.fast,
    };
    const table = mode === 'auto' && this.moeLayers.length > 0 ? loadOrCalibrate(shape)
      : { key: 'forced', rows: [1], groupMs: [1], denseMs: [1] };
    for (const m of this.moeLayers) m.planner = new EpsPlanner(table, null, mode === 'auto' ? null : mode);
  }

  /** EPS-MoE pipeline chunks per MoE layer: 'auto' (the planner, per layer and step) or a fixed PN. */
  setPipelineChunks(mode: PipelineChunks): void {
    for (const m of this.moeLayers) m.pipelineChunks = mode;
  }

  /** Per MoE layer, the chunks and kernel of the last step. */
  layerPlans(): { chunks: number; kernel: string }[] {
    return this.moeLayers.map((m) => ({ chunks: m.lastPlan?.chunks ?? 1, kernel: m.lastPlan?.kernel ?? 'group' }));
  }

  /** Kernel choices of the last step: kernel -> MoE layers that used it. */
  kernelChoices(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const m of this.moeLayers) {
      const k = m.lastPlan?.kernel ?? 'group';
      out[k] = (out[k] ?? 0) + 1;
    }
    return out;
  }

  /** Floats per token per layer of KV cache: [k, v]. */
  cacheFloatsPerToken(): [number, number] {
    for (const l of this.layers) for (const sub of l.subs) if (sub.attn) return sub.attn.cacheFloatsPerToken;
    return [0, 0];
  }

  /**
   * Allocates the per-layer paged KV cache of element type `dtype`. fp8 scales are static per layer
   * and kv head: 1.0, vLLM's default when the checkpoint ships none.
   */
  allocateKvCache(numBlocks: number, blockSize: number, dtype: KvDtype = 'f32'): LayerCache[] {
    const [kf, vf] = this.cacheFloatsPerToken();
    const kvHeads = this.cacheKvHeads();
    return Array.from({ length: this.numCaches }, () => ({
      k: allocHostKvArray(dtype, numBlocks * blockSize * kf),
      v: vf > 0 ? allocHostKvArray(dtype, numBlocks * blockSize * vf) : null,
      kScales: dtype === 'fp8' ? new Float32Array(kvHeads).fill(1) : null,
      vScales: dtype === 'fp8' && vf > 0 ? new Float32Array(kvHeads).fill(1) : null,
    }));
  }

  /** KV heads per cache row (1 for MLA's latent). */
  cacheKvHeads(): number {
    const a = this.spec.attention;
    return a.kind === 'mla' ? 1 : a.kvHeads;
  }

  takeCommDelta(): CommDelta | null {
    return this.comm.takeDelta?.() ?? null;
  }

  /** An expert rank's step (expert parallelism): every MoE layer's remote part, in order. */
  serveExperts(): void {
    for (const m of this.moeLayers) m.serveRemote(this.scratch, this.fast);
  }

  forward(batch: ForwardBatch, cache: LayerCache[], blockSize: number): ForwardResult {
    const n = loadNative();
    this.comm.beginStep?.();
    const { spec, scratch } = this;
    const H = spec.hidden;
    const T = batch.tokenIds.length;
    const residual = scratch.f32('residual', T * H);
    const delta = scratch.f32('delta', T * H);   // the sub-block output added to the residual next
    const normed = scratch.f32('normed', T * H);
    n.embedding(this.embed.data, this.embed.dtype, spec.vocabSize, H, batch.tokenIds, delta);
    residual.fill(0);
    const routedIds: Int32Array[] = [];
    const ctx = { batch, tokens: T, fast: this.fast, scratch, blockSize };
    const offsets = scratch.i32('dense.offsets', 2);
    offsets[0] = 0;
    offsets[1] = T;
    const k = spec.moe.router.topK;
    for (let li = 0; li < this.layers.length; li++) {
      const layer = this.layers[li]!;
      if (li > 0 && this.readAheadOn) n.prefetch(this.readAhead[li - 1]!);
      if (layer.shortcut) {
        // ScMoE schedule (LongCat-Flash): x1 = x + MLA0(LN0(x)); the MoE reads LN0'(x1) and is
        // dispatched at once; MLP0 runs while it is in flight, then the expert GEMMs, then MLA1 and
        // MLP1 while the combine is in flight; its output joins at the end.
        const [s0, s1] = layer.subs as [SubBlock, SubBlock];
        n.rmsNorm(delta, T, H, s0.inputNorm, spec.rmsNormEps, normed, residual);
        s0.attn!.forward(ctx, normed, cache[s0.cacheIndex]!, delta);
        n.rmsNorm(delta, T, H, s0.postNorm, spec.rmsNormEps, normed, residual);
        const scX = scratch.f32('sc.x', T * H);
        scX.set(normed);
        const ids = new Int32Array(T * k);
        const pending = layer.moe!.begin(scX, T, scratch, this.hooks, ids);
        routedIds.push(ids);
        const moeOut = scratch.f32('sc.out', T * H);
        if (!this.shortcutOverlap) layer.moe!.finish(pending, moeOut, scratch, this.fast);
        n.groupGemmFfn(normed, offsets, s0.dense!, delta, this.fast);
        // The expert GEMMs here; their combine travels while MLA1 and MLP1 compute.
        layer.moe!.compute(pending, scratch, this.fast);
        n.rmsNorm(delta, T, H, s1.inputNorm, spec.rmsNormEps, normed, residual);
        s1.attn!.forward(ctx, normed, cache[s1.cacheIndex]!, delta);
        n.rmsNorm(delta, T, H, s1.postNorm, spec.rmsNormEps, normed, residual);
        n.groupGemmFfn(normed, offsets, s1.dense!, delta, this.fast);
        layer.moe!.finish(pending, moeOut, scratch, this.fast);
        for (let i = 0; i < T * H; i++) delta[i] = delta[i]! + moeOut[i]!;
        continue;
      }
      const sub = layer.subs[0]!;
      n.rmsNorm(delta, T, H, sub.inputNorm, spec.rmsNormEps, normed, residual);
      if (sub.linear) {
        if (sub.linearIndex >= this.linearStates.length)
          throw new Error(`${spec.modelType} keeps per-sequence state: call allocateStateCache(slots) before forward`);
        checkStateSlots(batch, this.stateSlots);
        sub.linear.forward(ctx, normed, this.linearStates[sub.linearIndex]!, delta);
      } else {
        sub.attn!.forward(ctx, normed, cache[sub.cacheIndex]!, delta);
      }
      n.rmsNorm(delta, T, H, sub.postNorm, spec.rmsNormEps, normed, residual);
      if (layer.moe) {
        const ids = new Int32Array(T * k);
        layer.moe.forward(normed, T, delta, scratch, this.fast, this.hooks, ids);
        routedIds.push(ids);
      } else {
        n.groupGemmFfn(normed, offsets, sub.dense!, delta, this.fast);
      }
    }
    n.rmsNorm(delta, T, H, this.finalNorm, spec.rmsNormEps, normed, residual);
    const R = batch.logitRows.length;
    // A decode-only step wants every row in order: the head reads `normed` in place.
    let inOrder = true;
    for (let r = 0; r < R && inOrder; r++) inOrder = batch.logitRows[r] === r;
    let rows = normed.subarray(0, R * H);
    if (!inOrder) {
      rows = scratch.f32('logit.rows', R * H);
      for (let r = 0; r < R; r++) {
        const t = batch.logitRows[r]!;
        rows.set(normed.subarray(t * H, (t + 1) * H), r * H);
      }
    }
    // [R, vocab]: the caller's buffer when it lends one (the engine does: 8 MB a step at 64 x 32000
    // is otherwise a fresh allocation, zero-fill and page faults every step).
    const out = batch.logitsOut;
    const logits = out && out.length >= R * spec.vocabSize ? out.subarray(0, R * spec.vocabSize)
      : new Float32Array(R * spec.vocabSize);
    n.denseGemm(rows, R, this.lmHead, logits, null, false, this.fast);
    if (this.readAheadOn) n.prefetch(this.readAhead[this.layers.length]!);
    return { logits, routedIds };
  }

  dispose(): void {
    loadNative().prefetch(null);
    this.lmHead.dispose();
    for (const l of this.layers) {
      for (const sub of l.subs) {
        sub.attn?.dispose();
        sub.linear?.dispose();
        sub.dense?.dispose();
      }
      l.moe?.dispose();
    }
  }
}

function checkStateSlots(batch: ForwardBatch, slots: number): void {
  const ss = batch.stateSlots;
  if (!ss || ss.length < batch.numSeqs)
    throw new Error(`batch.stateSlots has ${ss?.length ?? 0} entries, expected one per sequence (${batch.numSeqs})`);
  for (let s = 0; s < batch.numSeqs; s++)
    if (!(ss[s]! >= 0 && ss[s]! < slots)) throw new RangeError(`batch.stateSlots[${s}] is ${ss[s]}, expected 0..${slots - 1}`);
}
