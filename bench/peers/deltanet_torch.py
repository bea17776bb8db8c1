#!/usr/bin/env python3
# The PyTorch peer of `npm run bench -- deltanet`: HF transformers' own Gated DeltaNet functions
# (qwen3_next: causal_conv1d_fn / torch_causal_conv1d_update, torch_chunk_gated_delta_rule,
# torch_recurrent_gated_delta_rule, Qwen3NextRMSNormGated) on CPU in f32, at the bench's shapes,
# with the same thread count. One JSON object on stdout; progress on stderr.
#
#   deltanet_torch.py --spec FILE.json
# Spec: {"T": 512, "Hk": 16, "Hv": 32, "Dk": 128, "Dv": 128, "K": 4, "batches": [1, 8],
#        "reps": 10, "warmup": 2, "threads": N, "flushBytes": N}
import argparse
import json
import sys
import time


def log(msg):
    print(f"# deltanet torch peer: {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    spec = json.load(open(ap.parse_args().spec))
    try:
        import torch
        import torch.nn.functional as F
        from transformers.models.qwen3_next import modeling_qwen3_next as m
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"ok": False, "error": f"cannot import torch/transformers: {e}"}))
        return
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(1)
    T, Hk, Hv, Dk, Dv, K = (spec[k] for k in ("T", "Hk", "Hv", "Dk", "Dv", "K"))
    C = 2 * Hk * Dk + Hv * Dv
    reps, warmup = spec["reps"], spec["warmup"]
    flush = torch.ones(max(1, spec["flushBytes"] // 4))

    def timed(fn, before=None):
        """Wall and CPU (this process, all threads) milliseconds of each rep."""
        wall, cpu = [], []
        for r in range(warmup + reps):
            if before:
                before()
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            dc = (time.process_time() - c0) * 1e3
            if r >= warmup:
                wall.append(dt)
                cpu.append(dc)
        return {"wall": wall, "cpu": cpu}

    def do_flush():
        flush.sum()

    rep = Hv // Hk
    norm = m.Qwen3NextRMSNormGated(Dv, eps=1e-6)
    w = torch.randn(C, K) * 0.5
    results = {}

    # ---- prefill T tokens of one sequence (f32)
    x = torch.randn(1, C, T)
    conv = lambda: m.causal_conv1d_fn(x, w, None, activation="silu")
    mixed = conv().transpose(1, 2)
    q, k, v = torch.split(mixed, [Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
    q = q.reshape(1, T, Hk, Dk)
    k = k.reshape(1, T, Hk, Dk)
    v = v.reshape(1, T, Hv, Dv)
    g = -torch.rand(1, T, Hv) * spec.get("decay", 1.5)
    beta = torch.rand(1, T, Hv)
    z = torch.randn(T * Hv, Dv)
    state0 = torch.zeros(1, Hv, Dk, Dv)

    def delta():
        qq = q.repeat_interleave(rep, dim=2)
        kk = k.repeat_interleave(rep, dim=2)
        return m.torch_chunk_gated_delta_rule(qq, kk, v, g=g, beta=beta, initial_state=state0,
                                              output_final_state=True, use_qk_l2norm_in_kernel=True)

    core, _ = delta()
    core2 = core.reshape(-1, Dv)
    with torch.no_grad():
        log(f"prefill {T}")
        results["prefill"] = {
            "conv": timed(conv),
            "delta": timed(delta),
            "norm": timed(lambda: norm(core2, z)),
        }
        for B in spec["batches"]:
            log(f"decode batch {B}")
            xs = torch.randn(B, C, 1)
            conv_state = torch.randn(B, C, K)
            qd = torch.randn(B, 1, Hk, Dk)
            kd = torch.randn(B, 1, Hk, Dk)
            vd = torch.randn(B, 1, Hv, Dv)
            gd = -torch.rand(B, 1, Hv)
            bd = torch.rand(B, 1, Hv)
            st = torch.randn(B, Hv, Dk, Dv) * 0.1
            zd = torch.randn(B * Hv, Dv)
            cored = torch.randn(B * Hv, Dv)

            def step_delta():
                qq = qd.repeat_interleave(rep, dim=2)
                kk = kd.repeat_interleave(rep, dim=2)
                return m.torch_recurrent_gated_delta_rule(qq, kk, vd, g=gd, beta=bd, initial_state=st,
                                                          output_final_state=True,
                                                          use_qk_l2norm_in_kernel=True)

            results[f"decode{B}"] = {
                "conv": timed(lambda: m.torch_causal_conv1d_update(xs, conv_state, w, None, "silu")
                              if hasattr(m, "torch_causal_conv1d_update")
                              else m.causal_conv1d_update(xs, conv_state, w, None, "silu"), do_flush),
                "delta": timed(step_delta, do_flush),
                "norm": timed(lambda: norm(cored, zd), do_flush),
            }
    print(json.dumps({"ok": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "results": results}))


if __name__ == "__main__":
    main()
