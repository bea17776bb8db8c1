// Flags shared by the subcommands that run a model (serve, generate).
import type { FlagSpec } from './options.js';

export const modelFlags: FlagSpec[] = [
  { name: 'model', type: 'string', arg: 'DIR', help: 'Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json); empty = the built-in demo model', default: '' },
  { name: 'device', type: 'string', default: 'auto', arg: 'DEV',
    help: 'cpu, cuda or cuda:N: where weights, KV cache and compute live (auto = cuda:0 when the full build sees a CUDA device, else cpu)' },
  { name: 'expert-parallel', type: 'int', min: 1, max: 64, default: 1, arg: 'N',
    help: 'Expert parallelism in this process: N ranks (worker threads; with --device cuda rank r on cuda:r, all2all over NCCL), each holding 1/N of the routed experts, the MoE layers dispatching and combining rows over all2all (1 = off)' },
  { name: 'expert-placement', type: 'string', default: '', arg: 'FILE',
    help: 'With --expert-parallel N, or rank processes with --dist-moe expert (N = every rank of the group): which rank holds which routed experts, a JSON file listing each rank\'s expert ids, e.g. [[0,2,4,6],[1,3,5,7]] (empty = contiguous slices, sizes differing by at most one)' },
  { name: 'compute-dtype', type: 'string', choices: ['auto', 'f32', 'bf16'], default: 'auto',
    help: 'Activation precision: f32 is the reference mode, bf16 the fast mode (auto = bf16 where the CPU has bf16 dot products)' },
  { name: 'quantize', type: 'string', choices: ['none', 'int8', 'int4', 'fp8'], default: 'none',
    help: 'Quantize the routed experts at load and keep them so: int8 (one scale per output row), int4 (groups of --quantize-group), fp8 e4m3 (128x128 block scales); the kernels read them directly, activations stay in the compute dtype (CPU engine)' },
  { name: 'quantize-group', type: 'int', min: 1, max: 1 << 20, default: 32, arg: 'N',
    help: 'With --quantize int4: weights per scale along k, 32 or 128' },
  { name: 'expert-kernel', type: 'string', choices: ['auto', 'group', 'dense'], default: 'auto',
    help: 'Expert GEMMs: auto = EPS-MoE choice per layer and step from a calibrated cost model (cached under ~/.cache/expertd); group = one GroupGemm over all experts; dense = a DenseGemm per expert' },
  { name: 'pipeline-chunks', type: 'string', default: 'auto', arg: 'auto|N',
    help: 'EPS-MoE pipeline with --expert-parallel: each MoE layer splits its tokens into chunks whose all2all overlaps the other chunks\' expert GEMMs; auto = the planner\'s count per layer and step (cost model of the experts and the link), N = always N chunks (1 = no pipelining); on devices auto is 1' },
  { name: 'threads', type: 'int', min: 0, max: 1024, default: 0, help: 'CPU threads for the kernels (0 = all cores)' },
  { name: 'kv-cache-gb', type: 'number', min: 0, default: 0, arg: 'GB', help: 'KV cache size in GiB (0 = sized from --kv-cache-blocks)' },
  { name: 'kv-cache-blocks', type: 'int', min: 0, default: 0, arg: 'N', help: 'KV cache size in blocks (0 = enough for --max-num-seqs full contexts, capped at 1 GiB)' },
  { name: 'block-size', type: 'int', min: 1, max: 1024, default: 16, help: 'Tokens per KV cache block' },
  { name: 'max-num-seqs', type: 'int', min: 1, max: 65536, default: 16, help: 'Sequences decoded together in one step' },
  { name: 'max-num-batched-tokens', type: 'int', min: 1, max: 1 << 20, default: 512, help: 'Token budget of one step (prefill chunks + decodes)' },
];
