#!/usr/bin/env python3
# The HF transformers peer of `npm run bench -- e2e`: loads the same checkpoint in bf16 on the CPU
# and times the same workloads (prefill of one prompt; greedy decode at batch 1 and 8 with the KV
# cache). Reads a JSON job on stdin, prints one JSON result on stdout; progress goes to stderr.
import json
import os
import sys
import time


def log(msg):
    print(f"# hf peer: {msg}", file=sys.stderr, flush=True)


def main():
    job = json.load(sys.stdin)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    threads = int(job.get("threads") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16)
    model.eval()
    load_s = time.perf_counter() - t0
    log(f"loaded {job['model']} in {load_s:.1f} s ({threads} threads)")
    experts_impl = getattr(model.config, "_experts_implementation", None)
    attn_impl = getattr(model.config, "_attn_implementation", None)

    def prefill(ids):
        """One forward over the prompt(s); returns (seconds, next ids, cache)."""
        x = torch.tensor(ids, dtype=torch.long)
        t = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        nxt = out.logits[:, -1, :].float().argmax(-1)
        return time.perf_counter() - t, nxt, out.past_key_values

    def decode(prompts, steps):
        """Greedy decode after an untimed prefill; per-step seconds and the tokens of row 0."""
        _, nxt, cache = prefill(prompts)
        times, toks = [], [int(nxt[0])]
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1, :].float().argmax(-1)
            times.append(time.perf_counter() - t)
            cache = out.past_key_values
            toks.append(int(nxt[0]))
        return times, toks

    result = {
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": threads,
        "load_s": load_s, "experts_implementation": experts_impl, "attn_implementation": attn_impl,
        "prefill_s": [], "decode": {},
    }
    reps, warmup = int(job["reps"]), int(job.get("warmup", 1))
    with torch.inference_mode():
        for r in range(warmup + reps):
            s, _, _ = prefill([job["prefill_prompt"]])
            log(f"prefill {len(job['prefill_prompt'])} tokens: {s * 1e3:.0f} ms{' (warm-up)' if r < warmup else ''}")
            if r >= warmup:
                result["prefill_s"].append(s)
        for case in job["decode"]:
            key = str(case["batch"])
            runs = []
            for r in range(warmup + reps):
                times, toks = decode(case["prompts"], int(case["steps"]))
                log(f"decode batch {key}: median step {sorted(times)[len(times) // 2] * 1e3:.1f} ms"
                    f"{' (warm-up)' if r < warmup else ''}")
                if r >= warmup:
                    runs.append({"step_s": times, "tokens": toks})
            result["decode"][key] = runs
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
