// One sampler call per engine step: every sequence's logits row goes to the native batched sampler
// (native/cpu/sampling.cc, threaded over rows) with its knobs, penalty lists, RNG state and
// optional grammar bitmask. Same tokens as Sampler (sampler.ts) for the same seed; that class
// stays the reference the tests hold this one to.
import { loadNative, type NativeAddon, type SampleBatchArgs, type SampleBatchOut } from '../native/index.js';
import { MAX_TOP_LOGPROBS, bitmaskWords, type SampleResult, type SamplingState } from './sampler.js';

const PARAM_COLS = 8;

/** Grows a typed array to at least n elements (contents not kept). */
function room<T extends Int32Array | Float32Array | Float64Array | Uint32Array>(
  a: T, n: number, make: (n: number) => T): T {
  return a.length >= n ? a : make(Math.max(n, a.length * 2));
}

/**
 * Samples a step's rows. Owns reusable argument buffers: keep one per engine worker and do not
 * share it between threads.
 */
export class BatchSampler {
  readonly vocabSize: number;
  readonly words: number;
  private readonly native: NativeAddon;
  private args: SampleBatchArgs;
  private out: SampleBatchOut;

  constructor(vocabSize: number, native: NativeAddon = loadNative()) {
    if (!Number.isInteger(vocabSize) || vocabSize < 1) {
      throw new RangeError(`vocabSize is ${vocabSize}, expected a positive integer`);
    }
    this.vocabSize = vocabSize;
    this.words = bitmaskWords(vocabSize);
    this.native = native;
    this.args = {
      params: new Float64Array(0), rngState: new Uint32Array(0),
      biasOffsets: new Int32Array(1), biasIds: new Int32Array(0), biasValues: new Float32Array(0),
      seenOffsets: new Int32Array(1), seenIds: new Int32Array(0),
      countOffsets: new Int32Array(1), countIds: new Int32Array(0), countValues: new Int32Array(0),
      bitmask: null, bitmaskRows: null,
    };
    this.out = {
      tokenIds: new Int32Array(0), logprobs: new Float64Array(0), topIds: new Int32Array(0),
      topLogprobs: new Float64Array(0), topCounts: new Int32Array(0),
    };
  }

  /**
   * @param logits [rows, V] f32 with rows = states.length; not modified.
   * @param bitmasks per row a grammar bitmask ([ceil(V/32)] words, bit set = allowed) or null.
   * @param device samples where the logits are instead (ForwardModel.sampleLogits: the device
   *   engine's kernel); `logits` is then unused.
   * Advances each state's RNG as Sampler.sample would; does not record the sampled tokens (call
   * addOutputToken once they are accepted).
   */
  sample(logits: Float32Array, states: readonly SamplingState[],
    bitmasks?: readonly (Int32Array | null | undefined)[],
    device?: (rows: number, batch: SampleBatchArgs, out: SampleBatchOut) => void): SampleResult[] {
    const V = this.vocabSize;
    const R = states.length;
    if (!device && logits.length < R * V) throw new RangeError(`logits.length is ${logits.length}, expected at least ${R * V} (${R} rows of ${V})`);
    if (bitmasks && bitmasks.length !== R) throw new RangeError(`bitmasks.length is ${bitmasks.length}, expected ${R}`);
    if (R === 0) return [];
    const a = this.args;
    a.params = room(a.params, R * PARAM_COLS, (n) => new Float64Array(n));
    a.rngState = room(a.rngState, R * 4, (n) => new Uint32Array(n));
    a.biasOffsets = room(a.biasOffsets, R + 1, (n) => new Int32Array(n));
    a.seenOffsets = room(a.seenOffsets, R + 1, (n) => new Int32Array(n));
    a.countOffsets = room(a.countOffsets, R + 1, (n) => new Int32Array(n));
    let nBias = 0, nSeen = 0, nCounts = 0, nMasks = 0;
    for (const s of states) {
      nBias += s.biasIds.length;
      if (s.params.repetitionPenalty !== 1) nSeen += s.seenIds.size;
      if (s.params.presencePenalty !== 0 || s.params.frequencyPenalty !== 0) nCounts += s.outputCounts.size;
    }
    if (bitmasks) for (const m of bitmasks) if (m) nMasks++;
    a.biasIds = room(a.biasIds, nBias, (n) => new Int32Array(n));
    a.biasValues = room(a.biasValues, nBias, (n) => new Float32Array(n));
    a.seenIds = room(a.seenIds, nSeen, (n) => new Int32Array(n));
    a.countIds = room(a.countIds, nCounts, (n) => new Int32Array(n));
    a.countValues = room(a.countValues, nCounts, (n) => new Int32Array(n));
    if (nMasks > 0) {
      a.bitmask = new Int32Array(nMasks * this.words);
      a.bitmaskRows = new Int32Array(R);
    } else {
      a.bitmask = null;
      a.bitmaskRows = null;
    }

    let bias = 0, seen = 0, counts = 0, mask = 0;
    a.biasOffsets[0] = a.seenOffsets[0] = a.countOffsets[0] = 0;
    for (let r = 0; r < R; r++) {
      const s = states[r]!;
      const p = s.params;
      const o = r * PARAM_COLS;
      a.params[o] = p.temperature;
      a.params[o + 1] = p.topP;
      a.params[o + 2] = p.topK;
      a.params[o + 3] = p.minP;
      a.params[o + 4] = p.repetitionPenalty;
      a.params[o + 5] = p.presencePenalty;
      a.params[o + 6] = p.frequencyPenalty;
      a.params[o + 7] = s.numTopLogprobs;
      a.rngState.set(s.rng.getState(), r * 4);
      a.biasIds.set(s.biasIds, bias);
      a.biasValues.set(s.biasValues, bias);
      bias += s.biasIds.length;
      if (p.repetitionPenalty !== 1) for (const id of s.seenIds) a.seenIds[seen++] = id;
      if (p.presencePenalty !== 0 || p.frequencyPenalty !== 0) {
        for (const [id, c] of s.outputCounts) {
          a.countIds[counts] = id;
          a.countValues[counts++] = c;
        }
      }
      a.biasOffsets[r + 1] = bias;
      a.seenOffsets[r + 1] = seen;
      a.countOffsets[r + 1] = counts;
      const m = bitmasks?.[r];
      if (a.bitmaskRows) {
        if (m) {
          if (m.length !== this.words) throw new RangeError(`bitmasks[${r}].length is ${m.length}, expected ${this.words}`);
          a.bitmask!.set(m, mask * this.words);
          a.bitmaskRows[r] = mask++;
        } else {
          a.bitmaskRows[r] = -1;
        }
      }
    }
    // Exact lengths where the addon reads a list's end from the offsets.
    const args: SampleBatchArgs = {
      ...a,
      biasOffsets: a.biasOffsets.subarray(0, R + 1),
      seenOffsets: a.seenOffsets.subarray(0, R + 1),
      countOffsets: a.countOffsets.subarray(0, R + 1),
    };

    const out = this.out;
    if (out.tokenIds.length < R) {
      const n = Math.max(R, out.tokenIds.length * 2);
      this.out = {
        tokenIds: new Int32Array(n), logprobs: new Float64Array(n), topIds: new Int32Array(n * MAX_TOP_LOGPROBS),
        topLogprobs: new Float64Array(n * MAX_TOP_LOGPROBS), topCounts: new Int32Array(n),
      };
    }
    const o = this.out;
    if (device) device(R, args, o);
    else this.native.sampleBatch(logits, R, V, args, o);

    const results: SampleResult[] = new Array(R);
    for (let r = 0; r < R; r++) {
      const s = states[r]!;
      const st = a.rngState;
      s.rng.setState([st[r * 4]!, st[r * 4 + 1]!, st[r * 4 + 2]!, st[r * 4 + 3]!]);
      const res: SampleResult = { tokenId: o.tokenIds[r]! };
      if (s.numTopLogprobs >= 0) {
        res.logprob = o.logprobs[r]!;
        if (s.numTopLogprobs > 0) {
          const top: { tokenId: number; logprob: number }[] = [];
          for (let j = 0; j < o.topCounts[r]!; j++) {
            const k = r * MAX_TOP_LOGPROBS + j;
            top.push({ tokenId: o.topIds[k]!, logprob: o.topLogprobs[k]! });
          }
          res.top = top;
        }
      }
      results[r] = res;
    }
    return results;
  }
}
