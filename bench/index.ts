// `npm run bench -- NAME [flags]`: the benchmark dispatcher. Each bench prints a markdown table
// and can write JSON (--json FILE) and charts (--plot FILE.png). Benchmarks are never tests.
import { runCommBench } from './comm.js';
import { runDeltanet } from './deltanet.js';
import { runDecodeStep } from './decode-step.js';
import { runDeviceLogits } from './device-logits.js';
import { runDeviceStep } from './device-step.js';
import { runE2e } from './e2e.js';
import { runEp } from './ep.js';
import { runFidelity } from './fidelity.js';
import { runGpuServe } from './gpu-serve.js';
import { runHugePages } from './huge-pages.js';
import { runKernels } from './kernels.js';
import { runKernelsQuant } from './kernels-cuda-quant.js';
import { runKernelsDeltanet } from './kernels-cuda-deltanet.js';
import { runKvAttention } from './kv-attention.js';
import { runMxfp4Bench } from './mxfp4.js';
import { runOffloadBench } from './offload.js';
import { runProbeBench } from './probe-bench.js';
import { runSamplerBench } from './sampler.js';
import { runQuantBench } from './quant.js';
import { runQuantKernels } from './quant-kernels.js';
import { runSelftest } from './selftest.js';
import { runServe } from './serve.js';
import { runTraceBench } from './trace.js';

const BENCHES: Record<string, { run: (argv: string[]) => Promise<void>; about: string }> = {
  comm: { run: runCommBench, about: 'all2allv over Gloo (2, 3 rank processes) vs the in-process loopback group at one MoE layer\'s dispatch sizes of the bench models [--json F] [--reps N] [--warmup N] [--tokens 1,8,64,512] [--worlds 2,3] [--models a,b]' },
  deltanet: { run: runDeltanet, about: 'Gated DeltaNet ops of a qwen3_next-like layer (conv, delta rule, gated norm): prefill 512 and decode b1/b8 vs HF transformers\' torch functions (optional) and the state\'s read bound [--json F] [--reps N] [--warmup N] [--tokens T] [--batches 1,8] [--decay 1.5] [--threads N] [--python PATH] [--no-peer]' },
  'device-logits': { run: runDeviceLogits, about: 'the device engine\'s logits on the bench checkpoints, teacher-forced along the CPU f32 engine\'s greedy continuation, vs that f32 engine beside the CPU bf16 mode: error of the logits\' range, argmax agreement, top-2 gaps (is a greedy difference a near-tie or a fault?) [--json F] [--models a,b] [--prompt TEXT] [--tokens N] [--no-device]' },
  'device-step': { run: runDeviceStep, about: 'GPU: where a decode step of the device engine spends its host time: each cuda* call timed on the host, stream/event waits apart, the JS between (launch-bound or not?) [--json F] [--model NAME] [--batches 1,8] [--steps N] [--prompt-len N] [--standin: the CPU emulator on the mixtral fixture, plumbing only]' },
  e2e: { run: runE2e, about: 'whole model (bench checkpoints, bf16): prefill 512, decode b1/b8 vs the bandwidth bound and HF transformers [--json F] [--plot F.png] [--reps N] [--python PATH] [--no-peer] [--models a,b] [--steps N] [--batches 1,8]; with --formats bf16,int8,fp8,int4: the quant bench below; --profile [--formats bf16,int4-full]: per-op time shares of prefill and decode' },
  ep: { run: runEp, about: 'EPS-MoE pipeline (PN 1, best, planner) and ScMoE overlap over in-process ranks, real and SIMULATED links (25/50/150 GB/s) [--json F] [--plot F.png: step time vs PN, and F-timeline.png: one step of the pipeline per MoE layer] [--reps N] [--warmup N] [--tokens T] [--ranks N] [--chunks 1,2,4] [--link-scale 1,auto] [--no-real] [--no-scmoe]' },
  fidelity: { run: runFidelity, about: 'the device engine on every fixture vs HF goldens and the CPU bf16 engine (logit error, routing agreement), on the emulator of the cuda* ops [--gpu: the real device; --kv: the CPU engine per KV cache dtype; --quant: top-1 and KL vs the f32 model per --quantize format, mode and KV dtype; --trained: the same on test/fixtures-trained]' },
  'gpu-serve': { run: runGpuServe, about: 'expertd serve --device cuda vs --device cpu through the API on a bench checkpoint: prefill, decode b1/b8 tok/s, greedy agreement [--json F] [--model NAME | --model-dir DIR] [--prompt-len N] [--max-tokens N] [--reps N] [--devices cuda,cpu]' },
  'huge-pages': { run: runHugePages, about: 'a decode step with weights and KV cache on 4 KiB pages (EXPERTD_HUGE_PAGES=0) vs 2 MiB pages: two copies of a bench model in one process, steps alternating [--json F] [--model NAME] [--formats bf16,int8-full,fp8-full,int4-full] [--steps N per arm] [--prompt-len N] [--threads N]' },
  kernels: { run: runKernels, about: 'CPU MoE kernels vs machine limits and the OpenBLAS loop [--json F] [--plot F.png] [--reps N] [--warmup N] [--tokens 1,8] [--models mixtral-like,qwen3moe-like] [--threads N] [--ctx N] [--hot] [--no-peer] [--simd amx|noamx: the fast GEMMs also at that dispatch level, and the time ratios] [--device cpu]; GPU: --device cuda[:N] vs torch grouped_mm and a matmul loop [--rows 1,8] [--models mixtral-like,deepseek-like|NAME:H:I:E] [--python PATH] [--matmul-n N] [--copy-mib N]' },
  'kernels-deltanet': { run: runKernelsDeltanet, about: 'GPU: the device gated delta rule (f32) of a qwen3_next-like layer: chunked prefill of T tokens, the same by the recurrence, decode b1/b64, vs HF transformers\' torch functions and fla on the same GPU [--json F] [--tokens 4096] [--batches 1,64] [--shape Hk:Hv:Dk:Dv] [--reps N] [--warmup N] [--python PATH] [--no-peer] [--standin: the CPU emulator, plumbing only]' },
  'kernels-quant': { run: runKernelsQuant, about: 'GPU: the quantized GroupGemm (int8, int4 g32/g128, fp8 dequantised and FP8 activations, mxfp4; and the opt-in decode kernel, EXPERTD_QGEMV=1, as *-gemv) vs bf16 and torch (matmul loop, _scaled_mm e4m3) [--json F] [--rows 1,16,256] [--shape NAME:H:I:E:ACTIVE] [--formats bf16,int8,...] [--reps N] [--warmup N] [--python PATH] [--no-peer] [--standin: the CPU emulator, plumbing only]' },
  mxfp4: { run: runMxfp4Bench, about: 'an MXFP4 gpt-oss-like checkpoint vs the same experts in bf16: load memory (RssAnon, RssFile), experts held, decode b1 vs each format\'s read bound [--json F] [--reps N] [--steps N] [--threads N]' },
  offload: { run: runOffloadBench, about: 'expert cache: replay hit rates (eam, lru, lfu, Belady) on structured and generation traces, live decode tok/s [--json F] [--plot F.png] [--reps N] [--tokens N] [--link-gbps G] [--link-latency-us U] [--no-live] [--no-replay]' },
  'decode-step': { run: runDecodeStep, about: 'CPU time of one decode step of a bench model by batch and KV cache dtype (in-process engine, greedy) [--json F] [--model NAME] [--batches 16,32,64] [--kv-cache-dtype f32,bf16] [--prompt-len N] [--steps N] [--threads N] [--format bf16|int8-full|int4-full|...: --quantize as the quant bench names it] [--profile: time shares by op family]' },
  'kv-attention': { run: runKvAttention, about: 'decode attention over an f32, bf16 and fp8 KV cache (bench models\' attention shape), interleaved, as ratios to f32 [--json F] [--reps N] [--seqs 16,64] [--ctx 160,1024] [--threads N]' },
  probe: { run: runProbeBench, about: 'machine limits (bandwidth, peak FMA) and the OpenBLAS peer at the kernels shapes [--json F] [--reps N] [--threads N]' },
  sampler: { run: runSamplerBench, about: 'sampler time per step, JS row by row vs the native batched call, batch 1/16/64, vocab 32K/152K, greedy / top_p / logprobs 5; its share of a batch-64 decode step on the bench models [--json F] [--reps N] [--warmup N] [--batches 1,16,64] [--vocabs 32000,152064] [--models a,b] [--steps N] [--share-modes top_p,greedy,logprobs5] [--threads N] [--no-share] [--modes greedy,top_p,logprobs5,top_k,min_p] [--rows lm|flat] [--no-js]' },
  quant: { run: runQuantBench, about: 'quantized experts (--quantize int8, fp8, int4 beside bf16) on the bench checkpoints: prefill, decode b1/b8 vs each format\'s read bound (the run\'s best read rate, and the probes beside each rep; split by the machine\'s bandwidth state when it moves), experts held [--json F] [--reps N] [--models a,b] [--formats bf16,int8,fp8,int4,int4-g128] [--prefill N] [--steps N] [--batches 1,8] [--python PATH: makes the GGUF files] [--no-peer: without llama.cpp Q8_0 / Q4_K_M]' },
  serve: { run: runServe, about: 'the daemon under 1..32 concurrent streams: tok/s, TTFT and ITL p50/p99 [--json F] [--plot F.png] [--concurrency 1,2,4] [--rounds N] [--max-tokens N] [--prompt-len N] [--kv-cache-dtype f32,bf16,fp8] [--kv-cache-gb G] [--temperature 0,0.7 --top-p 0.9] [--baseline-bin OTHER/bin/expertd.js]: output and aggregate decode tok/s (tokens after each first token over the decoding time); --structured [--pairs N] [--items N]: JSON-schema decode tok/s vs unconstrained; --shared-prefix: a 1,000-token system prompt and short questions with prefix caching on and off, warm vs cold TTFT and throughput [--system-len N] [--question-len N] [--reps N] [--warm N] [--concurrency C] [--rounds N]' },
  trace: { run: runTraceBench, about: 'the routing trace writer on the engine thread: append() time per step, async queue vs synchronous appends, on a local file and a slow FIFO [--json F] [--reps N] [--steps N] [--fifo-kbps K]' },
  'quant-kernels': { run: runQuantKernels, about: 'the quantized DenseGemm kernels alone (int8, fp8, int4 g32/g128, fast mode) vs bf16 at one shape, round-robin: ms, GB/s read, ratio [--json F] [--reps N] [--n N] [--k K] [--rows 1,8,512]; --experts qwen3moe-like|mixtral-like|H:I:E:K [--layers 10]: the GroupGemm of a decode step at that expert shape, weights from memory (--layers 1 and a small E: from cache); --formats int8,fp8,int4-g32,int4-g128,int4-g128-zeros,mxfp4 (bf16 always)' },
  selftest: { run: runSelftest, about: 'checks the harness, the chart writer, the probe and the peer (quick)' },
};

function usage(): string {
  return ['usage: npm run bench -- NAME [flags]', '', ...Object.entries(BENCHES).map(([n, b]) => `  ${n.padEnd(9)} ${b.about}`)].join('\n');
}

async function main(): Promise<void> {
  const [name, ...rest] = process.argv.slice(2);
  if (!name || name === '--help' || name === '-h') {
    console.log(usage());
    return;
  }
  const bench = BENCHES[name];
  if (!bench) {
    console.error(`unknown bench "${name}"\n\n${usage()}`);
    process.exitCode = 2;
    return;
  }
  await bench.run(rest);
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? `error: ${err.message}` : err);
  process.exitCode = 1;
});
