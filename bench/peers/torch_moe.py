#!/usr/bin/env python3
# The PyTorch peer of `npm run bench -- kernels --device cuda`: the same expert FFN (gate_up GEMM,
# SiLU(gate)*up, down GEMM, bf16) through torch._grouped_mm and a per-expert torch.matmul loop,
# the machine's limits (a large bf16 matmul, a device-to-device copy), and the correctness case
# whose inputs and float32 reference it writes for the bench. One JSON object on stdout.
#
#   torch_moe.py --spec FILE.json [--dry-run]        (what the bench runs; the spec is below)
#   torch_moe.py --device cpu --h 64 --inter 128 --experts 4 --rows 1,8 [--check-dir DIR]
#
# Spec: {"device": "cuda:0", "reps": 20, "warmup": 3, "flushBytes": N, "seed": 1,
#        "limits": {"matmulN": 8192, "copyBytes": N, "reps": 10}, "checkDir": DIR | null,
#        "shapes": [{"name", "h", "inter", "experts", "check": {"counts": [...]} | null,
#                    "cases": [{"id", "counts": [...]}]}]}
# Progress goes to stderr.
import argparse
import ctypes
import json
import os
import statistics
import sys
import time

REL_L2_MAX = 1e-2  # above this a variant's result is wrong and it is not timed


def log(msg):
    print(f"# torch peer: {msg}", file=sys.stderr, flush=True)


def validate_spec(spec):
    """Raises ValueError naming the first bad field."""
    for key in ("device", "reps", "warmup", "shapes"):
        if key not in spec:
            raise ValueError(f"spec has no '{key}'")
    if not (spec["device"] == "cpu" or spec["device"] == "cuda" or spec["device"].startswith("cuda:")):
        raise ValueError(f"spec.device is {spec['device']!r}, expected 'cpu', 'cuda' or 'cuda:N'")
    for s in spec["shapes"]:
        for key in ("name", "h", "inter", "experts", "cases"):
            if key not in s:
                raise ValueError(f"spec shape {s.get('name', '?')} has no '{key}'")
        for c in s["cases"]:
            if len(c["counts"]) != s["experts"]:
                raise ValueError(f"case {c['id']}: {len(c['counts'])} counts, expected {s['experts']}")
            if min(c["counts"]) < 0:
                raise ValueError(f"case {c['id']}: negative count")
        chk = s.get("check")
        if chk is not None and min(chk["counts"]) < 0:
            raise ValueError(f"shape {s['name']}: negative check count")


def spec_from_args(a):
    """A one-shape spec from command-line flags (quick runs by hand, e.g. on CPU torch)."""
    rows = [int(r) for r in a.rows.split(",")]
    return {
        "device": a.device, "reps": a.reps, "warmup": a.warmup, "flushBytes": 0, "seed": 1,
        "limits": {"matmulN": a.matmul_n, "copyBytes": a.copy_mib << 20, "reps": 3},
        "checkDir": a.check_dir,
        "shapes": [{
            "name": "custom", "h": a.h, "inter": a.inter, "experts": a.experts,
            "check": {"counts": [1, 0] + [9] * max(0, a.experts - 2)} if a.check_dir else None,
            "cases": [{"id": f"custom/{r}", "counts": [r] * a.experts} for r in rows],
        }],
    }


def driver_versions():
    """(driver, CUDA driver API version) from NVML, else (None, None)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        cv = pynvml.nvmlSystemGetCudaDriverVersion()
        drv = drv.decode() if isinstance(drv, bytes) else drv
        return drv, f"{cv // 1000}.{(cv % 1000) // 10}"
    except Exception:  # noqa: BLE001 - NVML is optional
        return None, None


def grouped_mm_fn(torch):
    """The grouped GEMM entry of this torch, its name, and why not when absent."""
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm, "torch._grouped_mm", None
    f = getattr(torch.nn.functional, "grouped_mm", None)
    if f is not None:
        return f, "torch.nn.functional.grouped_mm", None
    return None, None, f"torch {torch.__version__} has no torch._grouped_mm"


class Timer:
    """Times fn on the device: synchronize, (flush), record, run, record, synchronize; ms per rep.

    The synchronize before the start event keeps the host's launch time inside the measured
    window, as it is for expertd's calls from JS (no queue of earlier work hides it)."""

    def __init__(self, torch, device, flush_bytes):
        self.torch = torch
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device) if flush_bytes > 0 else None

    def __call__(self, fn, warmup, reps):
        torch = self.torch
        times = []
        for r in range(warmup + reps):
            if self.flush is not None:
                self.flush.fill_(r & 0xFF)  # evicts L2: weights are read once per step in a model
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times.append(ms)
        return times


def measure_limits(torch, device, timer, lim):
    """Dense bf16 matmul rate and device-to-device copy bandwidth (read + write bytes)."""
    out = {}
    n = int(lim.get("matmulN", 8192))
    reps = int(lim.get("reps", 10))
    if n > 0:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # random: zeros run faster
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        t = timer(lambda: torch.matmul(a, b, out=c), 3, reps)
        out["matmul"] = {"n": n, "dtype": "bf16", "timesMs": t,
                         "tflops": 2 * n ** 3 / (statistics.median(t) / 1e3) / 1e12}
        del a, b, c
    nbytes = int(lim.get("copyBytes", 2 << 30))
    if nbytes > 0:
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t = timer(lambda: dst.copy_(src), 3, reps)
        out["copy"] = {"bytes": nbytes, "timesMs": t,
                       "gbps": 2 * nbytes / (statistics.median(t) / 1e3) / 1e9}
        del src, dst
    return out


def make_weights(torch, device, gen, e, h, inter):
    """gate_up [E, 2I, H] (gate rows then up rows) and down [E, H, I], bf16, std 1/sqrt(fan-in)."""
    gu = torch.randn(e, 2 * inter, h, device=device, dtype=torch.float32, generator=gen)
    gu = (gu / h ** 0.5).to(torch.bfloat16)
    dn = torch.randn(e, h, inter, device=device, dtype=torch.float32, generator=gen)
    dn = (dn / inter ** 0.5).to(torch.bfloat16)
    return gu, dn


def make_x(torch, device, gen, rows, h):
    return torch.randn(rows, h, device=device, dtype=torch.float32, generator=gen).to(torch.bfloat16)


class Ffn:
    """The expert FFN over expert-contiguous rows: x [rows, H] bf16 -> y [rows, H] bf16."""

    def __init__(self, torch, gu, dn, counts, device, gmm):
        self.torch, self.gu, self.dn, self.counts, self.gmm = torch, gu, dn, list(counts), gmm
        self.inter = dn.shape[2]
        # cumulative end offsets, int32 on the device: what grouped_mm takes
        self.offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        self.gu_t = gu.transpose(-2, -1)  # [E, H, 2I], column-major per expert as grouped_mm wants
        self.dn_t = dn.transpose(-2, -1)  # [E, I, H]

    def act(self, g):
        F = self.torch.nn.functional
        return F.silu(g[:, : self.inter]) * g[:, self.inter:]

    def grouped(self, x):
        g = self.gmm(x, self.gu_t, offs=self.offs)   # [rows, 2I] bf16
        return self.gmm(self.act(g), self.dn_t, offs=self.offs)  # [rows, H] bf16

    def loop(self, x, y):
        r0 = 0
        for e, m in enumerate(self.counts):
            if m == 0:
                continue
            g = self.torch.matmul(x[r0:r0 + m], self.gu[e].t())  # [m, 2I] bf16 (cuBLAS)
            self.torch.matmul(self.act(g), self.dn[e].t(), out=y[r0:r0 + m])
            r0 += m
        return y

    def reference(self, x):
        """float32 with full-precision matmuls (no tf32) on the same bf16 values."""
        torch = self.torch
        y = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        r0 = 0
        for e, m in enumerate(self.counts):
            if m == 0:
                continue
            g = x[r0:r0 + m].float() @ self.gu[e].float().t()
            y[r0:r0 + m] = self.act(g) @ self.dn[e].float().t()
            r0 += m
        return y


def rel_l2(torch, out, ref):
    out = out.float()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def write_raw(torch, path, t):
    """Raw little-endian bytes of a contiguous tensor (bf16 as its 16-bit pattern)."""
    c = t.detach().contiguous().cpu()
    nbytes = c.numel() * c.element_size()
    with open(path, "wb") as f:
        f.write(ctypes.string_at(c.data_ptr(), nbytes))
    return nbytes


def run_check(torch, device, gen, shape, gmm, check_dir):
    """The correctness case: inputs and float32 reference to files, torch's own variants' errors."""
    h, inter, counts = shape["h"], shape["inter"], shape["check"]["counts"]
    e = len(counts)
    rows = sum(counts)
    gu, dn = make_weights(torch, device, gen, e, h, inter)
    x = make_x(torch, device, gen, rows, h)
    ffn = Ffn(torch, gu, dn, counts, device, gmm)
    ref = ffn.reference(x)
    d = os.path.join(check_dir, shape["name"])
    os.makedirs(d, exist_ok=True)
    files = {"x": "x.bin", "gateUp": "gate_up.bin", "down": "down.bin", "ref": "ref.bin"}
    write_raw(torch, os.path.join(d, files["x"]), x.view(torch.int16))          # [rows, H] bf16
    write_raw(torch, os.path.join(d, files["gateUp"]), gu.view(torch.int16))    # [E, 2I, H] bf16
    write_raw(torch, os.path.join(d, files["down"]), dn.view(torch.int16))      # [E, H, I] bf16
    write_raw(torch, os.path.join(d, files["ref"]), ref)                        # [rows, H] f32
    out = {"dir": d, "files": files, "h": h, "inter": inter, "counts": counts, "relL2": {}, "errors": {}}
    variants = {"loop": lambda: ffn.loop(x, torch.empty(rows, h, dtype=torch.bfloat16, device=device))}
    if gmm is not None:
        variants["grouped_mm"] = lambda: ffn.grouped(x)
    for name, fn in variants.items():
        try:
            out["relL2"][name] = rel_l2(torch, fn(), ref)
        except Exception as err:  # noqa: BLE001 - reported per variant
            out["errors"][name] = f"{type(err).__name__}: {err}".splitlines()[0]
    return out


def run_shape(torch, device, gen, timer, spec, shape, gmm, verdict, results):
    h, inter, e = shape["h"], shape["inter"], shape["experts"]
    log(f"{shape['name']}: H {h} I {inter} E {e}, {len(shape['cases'])} loads")
    gu, dn = make_weights(torch, device, gen, e, h, inter)
    for case in shape["cases"]:
        counts = case["counts"]
        rows = sum(counts)
        res = results.setdefault(case["id"], {})
        try:
            x = make_x(torch, device, gen, rows, h)
            ffn = Ffn(torch, gu, dn, counts, device, gmm)
            y = torch.empty(rows, h, dtype=torch.bfloat16, device=device)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at the largest loads
            msg = f"{type(err).__name__}: {err}".splitlines()[0]
            res["grouped_mm"] = {"error": msg}
            res["loop"] = {"error": msg}
            continue
        variants = {"loop": lambda: ffn.loop(x, y)}
        if gmm is not None:
            variants["grouped_mm"] = lambda: ffn.grouped(x)
        else:
            res["grouped_mm"] = {"error": "n/a"}
        for name, fn in variants.items():
            if verdict.get(name):
                res[name] = {"error": verdict[name]}
                continue
            try:
                res[name] = {"timesMs": timer(fn, spec["warmup"], spec["reps"])}
            except Exception as err:  # noqa: BLE001 - reported per variant and case
                res[name] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
        med = {k: round(statistics.median(v["timesMs"]), 4) for k, v in res.items() if "timesMs" in v}
        log(f"  {case['id']}: {med} ms")
        del x, ffn, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del gu, dn


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", help="JSON spec written by the bench")
    p.add_argument("--dry-run", action="store_true", help="check the spec and torch, run nothing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul-n", type=int, default=512)
    p.add_argument("--copy-mib", type=int, default=64)
    p.add_argument("--check-dir", default=None)
    a = p.parse_args()

    if a.spec:
        with open(a.spec) as f:
            spec = json.load(f)
    else:
        spec = spec_from_args(a)
    out = {"ok": False, "dryRun": a.dry_run, "python": sys.version.split()[0]}
    try:
        validate_spec(spec)
        import torch
    except Exception as err:  # noqa: BLE001 - bad spec or no torch: one JSON answer either way
        out["error"] = f"{type(err).__name__}: {err}"
        print(json.dumps(out))
        return 1

    out["torch"] = torch.__version__
    out["torchCuda"] = torch.version.cuda
    gmm, gmm_name, gmm_reason = grouped_mm_fn(torch)
    out["groupedMm"] = {"fn": gmm_name, "reason": gmm_reason}
    out["driver"], out["cudaDriver"] = driver_versions()
    device = torch.device(spec["device"])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            out["error"] = f"torch {torch.__version__} sees no CUDA device"
            print(json.dumps(out))
            return 0 if a.dry_run else 1
        idx = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", idx)
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        out["device"] = {"type": "cuda", "index": idx, "name": props.name,
                         "capability": f"{props.major}.{props.minor}",
                         "sms": props.multi_processor_count, "totalBytes": props.total_memory}
    else:
        out["device"] = {"type": "cpu", "threads": torch.get_num_threads()}
    if a.dry_run:
        out["ok"] = True
        out["cases"] = sum(len(s["cases"]) for s in spec["shapes"])
        print(json.dumps(out))
        return 0

    # Exact float32 references; bf16 GEMMs keep their usual (fast) accumulation.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator(device=device)
    gen.manual_seed(int(spec.get("seed", 1)))
    timer = Timer(torch, device, int(spec.get("flushBytes", 0)))
    with torch.inference_mode():
        log(f"limits on {out['device'].get('name', 'cpu')}")
        try:
            out["limits"] = measure_limits(torch, device, timer, spec.get("limits", {}))
        except Exception as err:  # noqa: BLE001 - the bench falls back to its own limits
            out["limits"] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
        out["checks"] = {}
        out["results"] = {}
        for shape in spec["shapes"]:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            verdict = {}  # variant -> why it is not timed
            if spec.get("checkDir") and shape.get("check"):
                try:
                    chk = run_check(torch, device, gen, shape, gmm, spec["checkDir"])
                except Exception as err:  # noqa: BLE001 - the bench reports the check as failed
                    chk = {"error": f"{type(err).__name__}: {err}".splitlines()[0], "relL2": {}, "errors": {}}
                out["checks"][shape["name"]] = chk
                for name, err in chk["errors"].items():
                    verdict[name] = f"failed on the check case: {err}"
                for name, rel in chk["relL2"].items():
                    if not rel <= REL_L2_MAX:
                        verdict[name] = f"wrong result: relative L2 {rel:.2e} > {REL_L2_MAX:g}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            try:
                run_shape(torch, device, gen, timer, spec, shape, gmm, verdict, out["results"])
            except Exception as err:  # noqa: BLE001 - e.g. no memory for the weights: this shape's cases fail
                msg = f"{type(err).__name__}: {err}".splitlines()[0]
                log(f"{shape['name']}: {msg}")
                for case in shape["cases"]:
                    res = out["results"].setdefault(case["id"], {})
                    for name in ("grouped_mm", "loop"):
                        res.setdefault(name, {"error": msg})
    out["ok"] = True
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
