#!/usr/bin/env python3
# The PyTorch peer of `npm run bench -- kernels-quant`: the expert FFN (gate_up, SiLU(gate)*up, down)
# over `experts` experts with `rows` rows each, as a bf16 torch.matmul loop and with FP8 weights and
# activations through torch._scaled_mm (e4m3, row-wise scales: per token for x and h, per output
# channel for the weights; the nearest recipe torch exposes to 128 x 128 blocks). One JSON line on stdout.
#
#   torch_quant.py --spec FILE.json     {"device": "cuda:0", "h", "inter", "experts", "rows": [1, 16], "reps", "warmup"}
import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    spec = json.load(open(ap.parse_args().spec))
    out = {"ok": False}
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"ok": False, "error": f"no torch: {e}"}))
        return
    out["torch"] = torch.__version__
    dev = torch.device(spec["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "torch": torch.__version__, "error": "torch has no CUDA device"}))
        return
    h, inter, experts = spec["h"], spec["inter"], spec["experts"]
    g = torch.Generator(device="cpu").manual_seed(1)
    gu = [(torch.rand(2 * inter, h, generator=g) * 0.02 - 0.01).to(dev, torch.bfloat16) for _ in range(experts)]
    dn = [(torch.rand(h, inter, generator=g) * 0.02 - 0.01).to(dev, torch.bfloat16) for _ in range(experts)]
    f8 = torch.float8_e4m3fn

    def quant_rows(t):  # row-wise e4m3 and f32 scales [rows, 1]
        s = (t.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        return (t.float() / s).to(f8), s

    wq = [(quant_rows(a), quant_rows(b)) for a, b in zip(gu, dn)]
    recipe = "torch._scaled_mm e4m3, row-wise scales (x, h per token; weights per output channel)"

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn, reps, warmup):
        for _ in range(warmup):
            fn()
        sync()
        ms = []
        for _ in range(reps):
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ms.append(a.elapsed_time(b))
            else:
                import time
                t = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ms)

    results = {}
    for r in spec["rows"]:
        xs = [torch.rand(r, h, generator=g).to(dev, torch.bfloat16) for _ in range(experts)]
        res = {}

        def bf16():
            for e in range(experts):
                t = xs[e] @ gu[e].t()
                hh = torch.nn.functional.silu(t[:, :inter]) * t[:, inter:]
                hh @ dn[e].t()

        res["bf16Ms"] = timed(bf16, spec["reps"], spec["warmup"])

        def fp8():
            for e in range(experts):
                (wg, sg), (wd, sd) = wq[e]
                xq, sx = quant_rows(xs[e])
                t = torch._scaled_mm(xq, wg.t(), scale_a=sx, scale_b=sg.t(), out_dtype=torch.bfloat16)
                hh = torch.nn.functional.silu(t[:, :inter]) * t[:, inter:]
                hq, sh = quant_rows(hh)
                torch._scaled_mm(hq, wd.t(), scale_a=sh, scale_b=sd.t(), out_dtype=torch.bfloat16)

        try:
            res["fp8Ms"] = timed(fp8, spec["reps"], spec["warmup"])
        except Exception as e:  # noqa: BLE001
            res["error"] = f"_scaled_mm: {str(e).splitlines()[0]}"
        results[str(r)] = res
        print(f"# torch quant peer: rows {r}: {res}", file=sys.stderr, flush=True)
    out.update({"ok": True, "fp8Recipe": recipe, "results": results})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
