#!/usr/bin/env python3
# The HF transformers peer of `npm run bench -- e2e`: loads one checkpoint in bf16 on the CPU, then
# times workloads on request (one JSON command per stdin line, one JSON answer per stdout line), so
# the bench can alternate our repetitions with the peer's and both see the same machine load.
#   {"cmd": "prefill", "prompt": [ids]}                   -> {"s": seconds, "next": id}
#   {"cmd": "decode", "prompts": [[ids]], "steps": N}     -> {"step_s": [...], "tokens": [row 0]}
#   {"cmd": "quit"}
# Progress goes to stderr.
import json
import os
import sys
import time


def log(msg):
    print(f"# hf peer: {msg}", file=sys.stderr, flush=True)


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    model_dir, threads = sys.argv[1], int(sys.argv[2])
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.eval()
    load_s = time.perf_counter() - t0
    log(f"loaded {model_dir} in {load_s:.1f} s ({threads} threads)")

    def prefill(ids):
        """One forward over the prompt(s) with the KV cache; the greedy pick included."""
        x = torch.tensor(ids, dtype=torch.long)
        t = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        nxt = out.logits[:, -1, :].float().argmax(-1)
        return time.perf_counter() - t, nxt, out.past_key_values

    def decode(prompts, steps):
        """Greedy decode after an untimed prefill: per-step seconds and row 0's tokens."""
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

    send({
        "ready": True, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "load_s": load_s,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    })
    with torch.inference_mode():
        for line in sys.stdin:
            if not line.strip():
                continue
            job = json.loads(line)
            if job["cmd"] == "quit":
                break
            if job["cmd"] == "prefill":
                s, nxt, _ = prefill([job["prompt"]])
                send({"s": s, "next": int(nxt[0])})
            elif job["cmd"] == "decode":
                times, toks = decode(job["prompts"], int(job["steps"]))
                send({"step_s": times, "tokens": toks})
            else:
                send({"error": f"unknown command {job['cmd']}"})


if __name__ == "__main__":
    main()
