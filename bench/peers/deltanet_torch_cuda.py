#!/usr/bin/env python3
# The GPU peer of `npm run bench -- kernels-deltanet`: HF transformers' own gated delta rule
# functions (qwen3_next: torch_chunk_gated_delta_rule for prefill, torch_recurrent_gated_delta_rule
# for decode) on the CUDA device in f32, and fla's Triton kernels (chunk_gated_delta_rule,
# fused_recurrent_gated_delta_rule) when the fla package is installed. q/k heads are repeated to
# the v heads inside the timed call, as HF's module does. Device time by CUDA events. One JSON
# object on stdout; progress on stderr.
#
#   deltanet_torch_cuda.py --spec FILE.json
# Spec: {"device": "cuda:0", "T": 4096, "Hk": 16, "Hv": 32, "Dk": 128, "Dv": 128, "batches": [1, 64],
#        "reps": 10, "warmup": 3}
import argparse
import json
import sys


def log(msg):
    print(f"# deltanet torch cuda peer: {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    spec = json.load(open(ap.parse_args().spec))
    try:
        import torch
        from transformers.models.qwen3_next import modeling_qwen3_next as m
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"ok": False, "error": f"cannot import torch/transformers: {e}"}))
        return
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "torch sees no CUDA device"}))
        return
    fla = None
    fla_error = None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        import fla as fla_pkg
        fla = (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, getattr(fla_pkg, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        fla_error = f"fla not available: {e}"
    dev = torch.device(spec["device"])
    torch.cuda.set_device(dev)
    torch.manual_seed(1)
    T, Hk, Hv, Dk, Dv = (spec[k] for k in ("T", "Hk", "Hv", "Dk", "Dv"))
    reps, warmup = spec["reps"], spec["warmup"]
    rep = Hv // Hk

    def timed(fn):
        """Device milliseconds of each rep (CUDA events around the call)."""
        ms = []
        for r in range(warmup + reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            if r >= warmup:
                ms.append(a.elapsed_time(b))
        return ms

    def inputs(B, n):
        q = torch.randn(B, n, Hk, Dk, device=dev)
        k = torch.randn(B, n, Hk, Dk, device=dev)
        v = torch.randn(B, n, Hv, Dv, device=dev)
        g = -torch.rand(B, n, Hv, device=dev) * 1.5
        beta = torch.rand(B, n, Hv, device=dev)
        st = torch.randn(B, Hv, Dk, Dv, device=dev) * 0.1
        return q, k, v, g, beta, st

    def rep_qk(q, k):
        return q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)

    results = {}
    errors = {}
    with torch.no_grad():
        log(f"prefill {T}")
        q, k, v, g, beta, st = inputs(1, T)

        def hf_chunk():
            qq, kk = rep_qk(q, k)
            return m.torch_chunk_gated_delta_rule(qq, kk, v, g=g, beta=beta, initial_state=st,
                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)

        results["prefill"] = {"hf": timed(hf_chunk)}
        if fla:
            def fla_chunk():
                qq, kk = rep_qk(q, k)
                return fla[0](qq, kk, v, g=g, beta=beta, initial_state=st, output_final_state=True,
                              use_qk_l2norm_in_kernel=True)
            try:
                results["prefill"]["fla"] = timed(fla_chunk)
            except Exception as e:  # noqa: BLE001
                errors["prefill fla"] = str(e).split("\n")[0]
        for B in spec["batches"]:
            log(f"decode batch {B}")
            q, k, v, g, beta, st = inputs(B, 1)

            def hf_step():
                qq, kk = rep_qk(q, k)
                return m.torch_recurrent_gated_delta_rule(qq, kk, v, g=g, beta=beta, initial_state=st,
                                                          output_final_state=True,
                                                          use_qk_l2norm_in_kernel=True)

            results[f"decode{B}"] = {"hf": timed(hf_step)}
            if fla:
                def fla_step():
                    qq, kk = rep_qk(q, k)
                    return fla[1](qq, kk, v, g=g, beta=beta, initial_state=st, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
                try:
                    results[f"decode{B}"]["fla"] = timed(fla_step)
                except Exception as e:  # noqa: BLE001
                    errors[f"decode{B} fla"] = str(e).split("\n")[0]
    print(json.dumps({"ok": True, "torch": torch.__version__, "device": torch.cuda.get_device_name(dev),
                      "fla": fla[2] if fla else None, "flaError": fla_error, "errors": errors,
                      "results": results}))


if __name__ == "__main__":
    main()
