// Drives a model (CPU or device) directly (no scheduler) for fidelity tests: teacher-forced logits over a
// prompt, greedy continuation, and several sequences batched in one step.
import assert from 'node:assert/strict';

import type { ForwardBatch, ForwardModel, ForwardResult } from '../../src/model/forward-batch.js';
import type { KvDtype } from '../../src/model/kv-dtype.js';
import type { MoeModel } from '../../src/model/model.js';
import type { PackedWeight } from '../../src/native/index.js';
import type { Offloader } from '../../src/offload/offloader.js';

/** slot: the sequence's linear-attention state slot (hybrid models). */
export interface SeqState { blocks: number[]; len: number; slot: number }

/** State slots a DirectRunner allocates for hybrid models: sequences per runner at most. */
const RUNNER_STATE_SLOTS = 16;

export class DirectRunner<C = unknown> {
  readonly cache: C;
  private nextBlock = 0;
  private nextSlot = 0;

  constructor(readonly model: ForwardModel<C>, readonly blockSize = 4, readonly numBlocks = 256,
              readonly kvDtype: KvDtype = 'f32') {
    this.cache = model.allocateKvCache(numBlocks, blockSize, kvDtype);
    if (model.stateBytesPerSlot) model.allocateStateCache!(RUNNER_STATE_SLOTS);
  }

  newSeq(): SeqState {
    if (this.model.stateBytesPerSlot && this.nextSlot >= RUNNER_STATE_SLOTS) throw new Error('DirectRunner: out of state slots');
    // Slots in a scrambled order, like blocks, so that a sequence never gets slot == its index by chance.
    return { blocks: [], len: 0, slot: (this.nextSlot++ * 7) % RUNNER_STATE_SLOTS };
  }

  /** One step over several sequences; chunks[i] are the new tokens of seqs[i]. */
  step(seqs: SeqState[], chunks: number[][], allLogits: boolean): ForwardResult {
    const T = chunks.reduce((a, c) => a + c.length, 0);
    const tokenIds = new Int32Array(T);
    const positions = new Int32Array(T);
    const slots = new Int32Array(T);
    const seqInfo = new Int32Array(seqs.length * 3);
    const logitRows: number[] = [];
    let row = 0;
    for (let s = 0; s < seqs.length; s++) {
      const seq = seqs[s]!;
      const chunk = chunks[s]!;
      const start = row;
      for (const id of chunk) {
        const pos = seq.len;
        while (seq.blocks.length * this.blockSize <= pos) {
          if (this.nextBlock >= this.numBlocks) throw new Error('DirectRunner: out of KV blocks');
          // Hand out blocks in a scrambled order so block tables are not trivially contiguous.
          seq.blocks.push((this.nextBlock++ * 37) % this.numBlocks);
        }
        tokenIds[row] = id;
        positions[row] = pos;
        slots[row] = seq.blocks[Math.floor(pos / this.blockSize)]! * this.blockSize + (pos % this.blockSize);
        if (allLogits || row === start + chunk.length - 1) logitRows.push(row);
        seq.len++;
        row++;
      }
      seqInfo.set([start, chunk.length, seq.len], s * 3);
    }
    const maxBlocks = Math.max(1, ...seqs.map((s) => s.blocks.length));
    const blockTables = new Int32Array(seqs.length * maxBlocks);
    seqs.forEach((s, i) => blockTables.set(s.blocks, i * maxBlocks));
    const batch: ForwardBatch = {
      tokenIds, positions, numSeqs: seqs.length, seqInfo, blockTables, maxBlocks, slots,
      logitRows: Int32Array.from(logitRows), stateSlots: Int32Array.from(seqs, (s) => s.slot),
    };
    return this.model.forward(batch, this.cache, this.blockSize);
  }

  /** Greedy continuation of a prompt (argmax, ties to the lower id). */
  greedy(prompt: number[], n: number): number[] {
    const seq = this.newSeq();
    const V = this.model.spec.vocabSize;
    let res = this.step([seq], [prompt], false);
    const out: number[] = [];
    for (let i = 0; i < n; i++) {
      const next = argmax(res.logits.subarray(0, V));
      out.push(next);
      if (i + 1 < n) res = this.step([seq], [[next]], false);
    }
    return out;
  }
}

/**
 * Each prompt alone (prefill, then one greedy decode step), and all prompts batched in one prefill
 * step then one decode step: [prefill logits, decode logits] per prompt, both ways.
 */
export function aloneAndBatched<C>(model: ForwardModel<C>, prompts: number[][], kvDtype: KvDtype = 'f32'):
    { alone: [Float32Array, Float32Array][]; batched: [Float32Array, Float32Array][] } {
  const V = model.spec.vocabSize;
  const alone = prompts.map((p): [Float32Array, Float32Array] => {
    const r = new DirectRunner(model, 4, 256, kvDtype);
    const s = r.newSeq();
    const first = r.step([s], [p], false).logits.slice(0, V);
    const next = r.step([s], [[argmax(first)]], false).logits.slice(0, V);
    return [first, next];
  });
  const r = new DirectRunner(model, 4, 256, kvDtype);
  const seqs = prompts.map(() => r.newSeq());
  const res = r.step(seqs, prompts, false);
  const nextIds = prompts.map((_, i) => [argmax(res.logits.subarray(i * V, (i + 1) * V))]);
  const res2 = r.step(seqs, nextIds, false);
  const batched = prompts.map((_, i): [Float32Array, Float32Array] =>
    [res.logits.slice(i * V, (i + 1) * V), res2.logits.slice(i * V, (i + 1) * V)]);
  return { alone, batched };
}

/** The largest |ours - ref| as a fraction of ref's range (max - min): the logit error the fidelity tests bound. */
export function relToRange(ours: ArrayLike<number>, ref: ArrayLike<number>): number {
  let lo = Infinity, hi = -Infinity, worst = 0;
  for (let i = 0; i < ref.length; i++) {
    lo = Math.min(lo, ref[i]!);
    hi = Math.max(hi, ref[i]!);
    worst = Math.max(worst, Math.abs(ours[i]! - ref[i]!));
  }
  return worst / (hi - lo);
}

/**
 * Two engines' logits over the prompts (each a fresh sequence), relToRange per position against `ref`'s,
 * over the positions before the first where they route a token to different experts (from there on a
 * near-tie flipped, and the positions attending to it are not comparable): mean and worst, with the
 * positions left out.
 */
export function logitsVsRef<C1, C2>(ours: ForwardModel<C1>, ref: ForwardModel<C2>, prompts: number[][]):
    { mean: number; worst: number; n: number; skipped: number; total: number } {
  const V = ours.spec.vocabSize, k = ours.spec.moe.router.topK;
  let sum = 0, n = 0, worst = 0, skipped = 0, total = 0;
  for (const ids of prompts) {
    const a = new DirectRunner(ours), b = new DirectRunner(ref);
    const ra = a.step([a.newSeq()], [ids], true), rb = b.step([b.newSeq()], [ids], true);
    let flip = ids.length;
    for (let m = 0; m < ra.routedIds.length; m++)
      for (let p = 0; p < flip; p++) {
        const set = (r: Int32Array) => Array.from(r.subarray(p * k, (p + 1) * k)).sort().join();
        if (set(ra.routedIds[m]!) !== set(rb.routedIds[m]!)) flip = p;
      }
    total += ids.length;
    skipped += ids.length - flip;
    for (let p = 0; p < flip; p++, n++) {
      const e = relToRange(ra.logits.subarray(p * V, (p + 1) * V), rb.logits.subarray(p * V, (p + 1) * V));
      sum += e;
      worst = Math.max(worst, e);
    }
  }
  return { mean: n ? sum / n : 0, worst, n, skipped, total };
}

/**
 * What a CPU model holds its routed experts and shared experts in, as `expert <gate_up>/<down>` and
 * `shared ...` formats (PackedWeight.quant: 'int8', 'int4', 'fp8', ...; null for floats), once each.
 */
export function heldFormats(model: MoeModel): string[] {
  const out: string[] = [];
  const fmt = (w: PackedWeight) => String(w.quant);
  for (const layer of model.moeLayers) {
    for (let e = 0; e < layer.weights.experts.numExperts; e++) {
      const w = layer.weights.experts.get(e);
      if (!w) continue;
      out.push(`expert ${fmt(w.gateUp)}/${fmt(w.down)}`);
      w.gateUp.dispose();
      w.down.dispose();
    }
    const s = layer.weights.shared?.get(0);
    if (s) {
      out.push(`shared ${fmt(s.gateUp)}/${fmt(s.down)}`);
      s.gateUp.dispose();
      s.down.dispose();
    }
  }
  return [...new Set(out)];
}

/** A fixture's HF transformers goldens (golden.json, test/fixtures/make_fixtures.py's format). */
export interface Golden {
  moe_layers: number[];
  cases: { prompt_ids: number[]; logits: number[][]; greedy: number[]; router: number[][][] }[];
}

/**
 * Each golden case's prompt through the model: its routing equals HF's at every MoE layer and position
 * and its greedy tokens HF's (asserted); returns the logits' largest |difference| from HF's.
 */
export function checkGolden<C>(model: ForwardModel<C>, golden: Golden): number {
  const V = model.spec.vocabSize, k = model.spec.moe.router.topK;
  let worst = 0;
  for (const [ci, c] of golden.cases.entries()) {
    const runner = new DirectRunner(model);
    const res = runner.step([runner.newSeq()], [c.prompt_ids], true);
    for (let m = 0; m < golden.moe_layers.length; m++)
      for (let p = 0; p < c.prompt_ids.length; p++)
        assert.deepEqual(Array.from(res.routedIds[m]!.subarray(p * k, (p + 1) * k)), c.router[m]![p], `case ${ci} layer ${m} position ${p}`);
    for (let p = 0; p < c.prompt_ids.length; p++)
      for (let v = 0; v < V; v++) worst = Math.max(worst, Math.abs(res.logits[p * V + v]! - c.logits[p]![v]!));
    assert.deepEqual(new DirectRunner(model).greedy(c.prompt_ids, c.greedy.length), c.greedy, `case ${ci} greedy`);
  }
  return worst;
}

/** Every golden case's prompt + greedy tokens through the model, teacher-forced: logits per position. */
export function goldenForcedLogits<C>(model: ForwardModel<C>, golden: Golden): Float32Array[] {
  const V = model.spec.vocabSize;
  const logits: Float32Array[] = [];
  for (const c of golden.cases) {
    const ids = [...c.prompt_ids, ...c.greedy];
    const runner = new DirectRunner(model);
    const res = runner.step([runner.newSeq()], [ids], true);
    for (let p = 0; p < ids.length; p++) logits.push(res.logits.slice(p * V, (p + 1) * V));
  }
  return logits;
}

/** The largest |got - want| over rows of logits (teacher-forced positions). */
export function maxAbsDiff(got: Float32Array[], want: Float32Array[]): number {
  assert.equal(got.length, want.length, 'as many rows');
  let worst = 0;
  for (let i = 0; i < want.length; i++)
    for (let v = 0; v < want[i]!.length; v++) worst = Math.max(worst, Math.abs(got[i]![v]! - want[i]![v]!));
  return worst;
}

export function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}

/** Three prompts (the third repeats the first: the EAM collection then has its match). */
export function offloadPrompts(vocab: number): number[][] {
  const r = (i: number) => (i * 7919 + 13) % (vocab - 3) + 3;
  return [
    Array.from({ length: 9 }, (_, i) => r(i)),
    Array.from({ length: 5 }, (_, i) => r(i + 100)),
    Array.from({ length: 9 }, (_, i) => r(i)), // a repeat: the collection now has its match
  ];
}

/**
 * Everything a run produces, concatenated: per-prompt logits, greedy tokens, a batched step of two
 * requests; `off` (an expert cache) is told each step's rows and each request's end.
 */
export function runAll(model: ForwardModel, off: Pick<Offloader, 'beginStep' | 'endStep' | 'finishRequest'> | null):
    { logits: Float32Array[]; tokens: number[][] } {
  const runner = new DirectRunner(model, 4, 256);
  const V = model.spec.vocabSize;
  const logits: Float32Array[] = [];
  const tokens: number[][] = [];
  let reqId = 0;
  for (const p of offloadPrompts(V)) {
    const id = `r${reqId++}`;
    const seq = runner.newSeq();
    off?.beginStep([{ id, rows: p.length }]);
    let res = runner.step([seq], [p], true);
    off?.endStep();
    logits.push(res.logits);
    const out: number[] = [];
    for (let i = 0; i < 4; i++) {
      const next = argmax(res.logits.subarray(res.logits.length - V));
      out.push(next);
      off?.beginStep([{ id, rows: 1 }]);
      res = runner.step([seq], [[next]], false);
      off?.endStep();
      logits.push(res.logits);
    }
    off?.finishRequest(id);
    tokens.push(out);
  }
  // Two sequences in one step (prefill of one, more of another): rows of two requests.
  const a = runner.newSeq();
  const b = runner.newSeq();
  const pa = offloadPrompts(V)[1]!;
  const pb = offloadPrompts(V)[0]!.slice(0, 3);
  off?.beginStep([{ id: 'ba', rows: pa.length }, { id: 'bb', rows: pb.length }]);
  logits.push(runner.step([a, b], [pa, pb], true).logits);
  off?.endStep();
  return { logits, tokens };
}

