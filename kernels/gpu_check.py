"""One-call GPU check of the fused routing kernels: correctness, then timings against the PyTorch paths.

Usage (a CUDA machine, under 5 minutes on an H100)::

    python kernels/gpu_check.py --out gpu_results --commit "$(git rev-parse --short HEAD)"

writes ``gpu_results/results.json`` and ``gpu_results/results.md`` (the table for BENCHMARKS.md) and
exits 1 if any correctness check failed. ``--dry-run`` runs the same code on the CPU through Triton's
interpreter at tiny shapes (fp32/fp16 only, wall-clock timer instead of ``do_bench``): it checks this
script, not the kernels' speed.

Correctness: fused forward and all four gradients vs ``routed_lora_reference`` in float64, per dtype,
routing mode and gating; the router vs ``compute_gates_torch``. Timings: median of
``triton.testing.do_bench`` for fused vs ``routed_lora_torch`` (two GEMMs) vs ``routed_lora_reference``
(per-expert loop), forward (inference, no grad) and forward+backward (all inputs need grad). Achieved
GB/s and TFLOP/s use the minimal-traffic model in BENCHMARKS.md; ``floor %`` is the roofline time,
``max(bytes / copy bandwidth, flops / matmul rate)`` with both measured here, over the measured time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so before importing them

import personafuse.kernels.routed_lora as fused  # noqa: E402
import personafuse.kernels.router as fused_router  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from personafuse.routing import compute_gates_torch, routed_lora_reference, routed_lora_torch  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
IMPLS = {"fused": fused.routed_lora, "torch": routed_lora_torch, "loop": routed_lora_reference}
SCALING = 2.0


def shapes(dry_run: bool) -> dict:
    if dry_run:
        return {"check": (2, 9, 20, 18, 4, 3), "d_in": 32, "d_out": (24, 40), "experts": 4, "rank": 3,
                "tokens": (16, 32), "seq_len": 16, "dtype": torch.float32}
    return {"check": (2, 300, 512, 700, 10, 16), "d_in": 4096, "d_out": (4096, 14336), "experts": 10, "rank": 16,
            "tokens": (512, 8192), "seq_len": 512, "dtype": torch.bfloat16}


def make_inputs(n, t, d_in, d_out, k, r, per_token, top_k, dtype, device):
    x = torch.randn(n, t, d_in, device=device)
    a = torch.randn(k * r, d_in, device=device) / d_in**0.5
    b = torch.randn(d_out, k * r, device=device) / (k * r) ** 0.5
    logits = torch.randn(n, t, k, device=device) if per_token else torch.randn(n, k, device=device)
    gates, _ = compute_gates_torch(logits, 1.0, top_k)
    return [v.to(dtype) for v in (x, a, b, gates)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def check_routed_lora(dims, per_token, top_k, dtype, device) -> dict:
    inputs = [v.requires_grad_() for v in make_inputs(*dims, per_token, top_k, dtype, device)]
    ref_inputs = [v.detach().double().requires_grad_() for v in inputs]
    y = fused.routed_lora(*inputs, SCALING)
    ref = routed_lora_reference(*ref_inputs, SCALING)
    dy = torch.randn_like(y)
    errors = {"y": rel_err(y, ref)}
    grads = torch.autograd.grad(y, inputs, dy)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.double())
    for name, got, want in zip(("dx", "dA", "dB", "dgates"), grads, ref_grads, strict=True):
        errors[name] = rel_err(got, want)
    base = torch.randn_like(y)
    want_acc = base.double() + ref.detach()
    errors["y_inplace"] = rel_err(fused.routed_lora(*(v.detach() for v in inputs), SCALING, out=base), want_acc)
    return errors


def check_router(dtype, device) -> dict:
    logits = (3 * torch.randn(333, 10, device=device)).to(dtype)
    errors = {}
    for top_k in (None, 2):
        gates, load = fused_router.compute_gates(logits, 0.7, top_k)
        ref_gates, ref_load = compute_gates_torch(logits.float(), 0.7, top_k)
        tag = "dense" if top_k is None else f"top{top_k}"
        errors[f"router_{tag}_gates"] = rel_err(gates, ref_gates.double())
        errors[f"router_{tag}_load"] = rel_err(load, ref_load.double())
    return errors


def correctness(dims, dtypes, device) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for per_token in (False, True):
            for top_k in (None, 2):
                errors = check_routed_lora(dims, per_token, top_k, dtype, device)
                rows.append(_row(dtype, "token" if per_token else "sequence", top_k, errors))
        rows.append(_row(dtype, "-", None, check_router(dtype, device)))
    return rows


def _row(dtype, routing, top_k, errors) -> dict:
    return {"dtype": str(dtype).removeprefix("torch."), "routing": routing, "gating": "dense" if top_k is None else f"top{top_k}",
            "max_rel_err": errors, "passed": all(e < TOL[dtype] for e in errors.values())}


class Timer:
    """``do_bench`` median on CUDA; in a dry run a wall-clock median, since do_bench needs CUDA events."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, grad_to_none=None) -> float:
        if self.cuda:
            return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
        samples = []
        for _ in range(3):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)


def device_peaks(timer: Timer, device: str, dry_run: bool) -> dict:
    """Copy bandwidth (read + write of a 1 GiB tensor) and the bf16 (fp32 in a dry run) matmul rate."""
    numel, n, dtype = (2**20, 128, torch.float32) if dry_run else (2**29, 8192, torch.bfloat16)
    src = torch.empty(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = timer(lambda: torch.matmul(a, b))
    return {"copy_GBps": 2 * src.nbytes / copy_ms / 1e6, "matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9,
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def traffic(tokens, d_in, d_out, kr, elt) -> dict:
    """Minimal HBM bytes and FLOPs (dense-equivalent) for the forward and forward+backward."""
    weights = kr * (d_in + d_out)
    fwd_bytes = elt * (tokens * d_in + tokens * d_out + weights)
    # backward: read dy and x, write dx; read A, B again and write dA, dB
    bwd_bytes = elt * (tokens * d_out + 2 * tokens * d_in + 2 * weights)
    fwd_flops = 2 * tokens * kr * (d_in + d_out)
    return {"fwd": (fwd_bytes, fwd_flops), "fwd+bwd": (fwd_bytes + bwd_bytes, 3 * fwd_flops)}


def timings(cfg, timer: Timer, peaks: dict, device: str) -> list[dict]:
    d_in, k, r, seq_len, dtype = cfg["d_in"], cfg["experts"], cfg["rank"], cfg["seq_len"], cfg["dtype"]
    elt = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for d_out in cfg["d_out"]:
        for tokens in cfg["tokens"]:
            model = traffic(tokens, d_in, d_out, k * r, elt)
            for per_token in (False, True):
                for top_k in (None, 2):
                    inputs = make_inputs(tokens // seq_len, seq_len, d_in, d_out, k, r, per_token, top_k, dtype, device)
                    row = {"d_in": d_in, "d_out": d_out, "tokens": tokens, "routing": "token" if per_token else "sequence",
                           "gating": "dense" if top_k is None else f"top{top_k}", "ms": {}}
                    for pass_name in ("fwd", "fwd+bwd"):
                        row["ms"][pass_name] = {name: _time(timer, impl, inputs, pass_name) for name, impl in IMPLS.items()}
                        nbytes, flops = model[pass_name]
                        fused_s = row["ms"][pass_name]["fused"] / 1e3
                        floor_s = max(nbytes / (peaks["copy_GBps"] * 1e9), flops / (peaks["matmul_TFLOPs"] * 1e12))
                        row.setdefault("fused", {})[pass_name] = {
                            "GBps": nbytes / fused_s / 1e9, "TFLOPs": flops / fused_s / 1e12, "floor_pct": 100 * floor_s / fused_s}
                    rows.append(row)
    return rows


def _time(timer: Timer, impl, inputs, pass_name: str) -> float:
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                impl(*inputs, SCALING)
        return timer(run)
    leaves = [v.detach().requires_grad_() for v in inputs]
    dy = torch.randn(*inputs[0].shape[:-1], inputs[2].shape[0], device=inputs[0].device, dtype=inputs[0].dtype)
    return timer(lambda: impl(*leaves, SCALING).backward(dy), grad_to_none=leaves)


def markdown(meta: dict, checks: list[dict], rows: list[dict]) -> str:
    lines = [
        f"Device: {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · {meta['date']} · commit {meta['commit']}"
        + (" · DRY RUN (CPU interpreter, numbers meaningless)" if meta["dry_run"] else ""),
        f"Measured peaks: copy {meta['copy_GBps']:.0f} GB/s, {meta['matmul_dtype']} matmul {meta['matmul_TFLOPs']:.1f} TFLOP/s",
        "",
        "| dtype | routing | gating | passed | worst rel. error |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        worst = max(c["max_rel_err"], key=c["max_rel_err"].get)
        lines.append(f"| {c['dtype']} | {c['routing']} | {c['gating']} | {'yes' if c['passed'] else 'NO'} | "
                     f"{c['max_rel_err'][worst]:.1e} ({worst}) |")
    lines += ["", "| d_out | tokens | routing | gating | pass | fused ms | torch ms | loop ms | fused vs torch | "
                  "fused vs loop | fused GB/s | fused TFLOP/s | floor % |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for pass_name, ms in r["ms"].items():
            f = r["fused"][pass_name]
            lines.append(
                f"| {r['d_out']} | {r['tokens']} | {r['routing']} | {r['gating']} | {pass_name} | {ms['fused']:.3f} | "
                f"{ms['torch']:.3f} | {ms['loop']:.3f} | {ms['torch'] / ms['fused']:.2f}x | {ms['loop'] / ms['fused']:.2f}x | "
                f"{f['GBps']:.0f} | {f['TFLOPs']:.1f} | {f['floor_pct']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    parser.add_argument("--commit", default="unrecorded", help="commit the run measures (recorded, not checked)")
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run to exercise the script on the CPU")

    device = "cpu" if args.dry_run else "cuda"
    cfg = shapes(args.dry_run)
    torch.manual_seed(0)
    started = time.perf_counter()
    dtypes = [torch.float32, torch.float16] if args.dry_run else [torch.bfloat16, torch.float16, torch.float32]
    checks = correctness(cfg["check"], dtypes, device)
    timer = Timer(cuda=not args.dry_run)
    peaks = device_peaks(timer, device, args.dry_run)
    rows = timings(cfg, timer, peaks, device)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "commit": args.commit,
            "date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
            "seconds": round(time.perf_counter() - started, 1), **peaks}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "correctness": checks, "timings": rows}, indent=2))
    table = markdown(meta, checks, rows)
    (args.out / "results.md").write_text(table)
    print(table)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED; see results.json", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
