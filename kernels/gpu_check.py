"""One-shot GPU check of the fused routing kernels: environment, correctness, integration, timings.

Run from a plain checkout on a CUDA machine (torch and Triton are all it needs; nothing is installed)::

    python kernels/gpu_check.py --out gpu_results --budget-s 420

``--out`` defaults to ``$OUT`` when set. ``results.json`` and ``results.md`` are rewritten after every
section, so a run killed by a time limit still leaves everything finished before it. Every case runs in
its own ``try``; a failure records its traceback and the run goes on. Timing cases are ordered most
important first and skipped (recorded as such) once the next one might overrun ``--budget-s``. The exit
status is 1 if any correctness, integration or CUDA-graph case failed.

``--dry-run`` runs the same code on the CPU through Triton's interpreter at tiny shapes (fp32/fp16;
the GPU-only sections record ``skipped: no CUDA``): it checks this script, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so before importing them


def _use_checkout() -> str:
    """Make ``personafuse.routing`` and ``personafuse.kernels`` importable from this checkout.

    ``personafuse/__init__.py`` imports the model stack (transformers, safetensors, ...), which a bare GPU
    machine lacks, and ``personafuse.kernels`` only exists as such after an install. So the package is
    stubbed by its path, and ``kernels/`` registered under its installed name.
    """
    if "personafuse" in sys.modules:
        return "already imported"
    pkg = types.ModuleType("personafuse")
    pkg.__path__ = [str(ROOT / "personafuse")]
    sys.modules["personafuse"] = pkg
    spec = importlib.util.spec_from_file_location(
        "personafuse.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["personafuse.kernels"] = module
    pkg.kernels = module
    spec.loader.exec_module(module)
    return "checkout shim"


IMPORTED_VIA = _use_checkout()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

fused = importlib.import_module("personafuse.kernels.routed_lora")
fused_router = importlib.import_module("personafuse.kernels.router")
routing = importlib.import_module("personafuse.routing")

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
INTEGRATION_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
SCALING = 2.0
TOP_K = {"dense": None, "top2": 2, "onehot": 1}
NO_CUDA = "skipped: no CUDA"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Results:
    """Everything the run learns; ``save`` rewrites results.json and results.md atomically."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "sections_done": []}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, value) -> None:
        self.data[name] = value
        self.data["sections_done"].append(name)
        self.save()

    def save(self) -> None:
        for fname, text in (("results.json", json.dumps(self.data, indent=2, default=str)), ("results.md", markdown(self.data))):
            tmp = self.out / f".{fname}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / fname)


def run_case(name: str, fn, **fields) -> dict:
    """``fn()`` returns a dict merged into the row; an exception is recorded with its traceback."""
    row = {"case": name, **fields}
    started = time.perf_counter()
    try:
        row.update(fn())
    except Exception:  # noqa: BLE001  (one broken case must not end the run)
        row.update(passed=False, error=traceback.format_exc())
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------- environment
def environment(device: str, dry_run: bool, commit: str | None, timer) -> dict:
    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "cuda_runtime": torch.version.cuda, "imported_via": IMPORTED_VIA, "commit": commit or _git_commit()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sms=props.multi_processor_count, memory_GiB=round(props.total_memory / 2**30, 1),
                   l2_MiB=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), capability=f"{props.major}.{props.minor}",
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        env["gpu"] = "none (CPU, Triton interpreter)"
    env.update(device_peaks(timer, device, dry_run))
    return env


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({type(err).__name__})"


def _git_commit() -> str:
    head = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "kernels", "personafuse/routing.py"])
    return head + (" (kernels modified)" if dirty and not dirty.startswith("unknown") else "")


def device_peaks(timer, device: str, dry_run: bool) -> dict:
    """Copy bandwidth (read + write of a 1 GiB tensor) and the bf16 (fp32 in a dry run) matmul rate."""
    numel, n, dtype = (2**18, 64, torch.float32) if dry_run else (2**29, 8192, torch.bfloat16)
    src = torch.empty(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = timer(lambda: torch.matmul(a, b))
    return {"copy_GBps": 2 * src.nbytes / copy_ms / 1e6, "matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9, "matmul_dtype": _dt(dtype)}


# ---------------------------------------------------------------------------------------------- correctness
def correctness_cases(dry_run: bool) -> list[dict]:
    """The grid (dtype x routing x gating x gate grad) at a base shape, then one sweep per property."""
    if dry_run:
        base = {"n": 2, "t": 9, "d_in": 20, "d_out": 18, "k": 4, "r": 3}
        grid_dtypes, sweep_dtypes = [torch.float32], [torch.float32]
        extra = [("fp16", {"dtype": torch.float16})]
        ragged = {"d_in": 37, "d_out": 29}
        ranks, experts = (8,), (1, 10)
    else:
        base = {"n": 2, "t": 300, "d_in": 512, "d_out": 704, "k": 10, "r": 16}
        grid_dtypes, sweep_dtypes = [torch.bfloat16, torch.float16, torch.float32], [torch.bfloat16, torch.float32]
        extra = []
        ragged = {"d_in": 517, "d_out": 701}
        ranks, experts = (8, 32), (1, 64)
    cases = []
    for dtype in grid_dtypes:
        for routing_mode in ("sequence", "token"):
            for gating in ("dense", "top2", "onehot"):
                for grad_gates in (True, False):
                    cases.append({**base, "dtype": dtype, "routing": routing_mode, "gating": gating, "grad_gates": grad_gates})
    sweeps = [("ragged", ragged)] + [(f"r{r}", {"r": r}) for r in ranks] + [(f"K{k}", {"k": k}) for k in experts]
    sweeps += [("noncontig_x", {"layout": "noncontig_x"}), ("stride0_gates", {"layout": "stride0_gates", "routing": "token"}),
               ("decode_rows", {"n": 2, "t": 5}), ("wide_stack", {"k": 24, "r": 16})]
    for dtype in sweep_dtypes:
        for tag, change in sweeps:
            case = {**base, "dtype": dtype, "routing": "sequence", "gating": "top2", "grad_gates": True, "tag": tag, **change}
            if case["k"] < 2:
                case["gating"] = "dense"
            cases.append(case)
    for tag, change in extra:
        cases.append({**base, "routing": "token", "gating": "top2", "grad_gates": True, "tag": tag, **change})
    for seed, case in enumerate(cases):
        case.setdefault("layout", "contiguous")
        case["seed"] = seed
        case["path"] = fused.forward_path(case["n"] * case["t"], case["k"], case["r"])
    return cases


def check_routed_lora(c: dict, device: str) -> dict:
    n, t, d_in, d_out, k, r, dtype = c["n"], c["t"], c["d_in"], c["d_out"], c["k"], c["r"], c["dtype"]
    gen = torch.Generator(device=device).manual_seed(c["seed"])
    pad = 7 if c["layout"] == "noncontig_x" else 0
    per_seq_logits = c["routing"] == "sequence" or c["layout"] == "stride0_gates"
    logits = torch.randn(n, k, generator=gen, device=device) if per_seq_logits else torch.randn(n, t, k, generator=gen, device=device)
    gates, _ = routing.compute_gates_torch(logits, 1.0, TOP_K[c["gating"]])
    leaves = [torch.randn(n, t, d_in + pad, generator=gen, device=device), torch.randn(k * r, d_in, generator=gen, device=device) / d_in**0.5,
              torch.randn(d_out, k * r, generator=gen, device=device) / (k * r) ** 0.5, gates]
    leaves = [v.to(dtype).requires_grad_(i < 3 or c["grad_gates"]) for i, v in enumerate(leaves)]

    def args(vs):
        x, a, b, g = vs
        if c["layout"] == "stride0_gates":
            g = g[:, None, :].expand(n, t, k)
        return x[..., :d_in], a, b, g

    y = fused.routed_lora(*args(leaves), SCALING)
    ref_leaves = [v.detach().double().requires_grad_(v.requires_grad) for v in leaves]
    ref = routing.routed_lora_reference(*args(ref_leaves), SCALING)
    errors = {"y": rel_err(y, ref)}
    dy = torch.randn(y.shape, generator=gen, device=device).to(dtype)
    wanted = [i for i, v in enumerate(leaves) if v.requires_grad]
    grads = torch.autograd.grad(y, [leaves[i] for i in wanted], dy)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in wanted], dy.double())
    for i, got, want in zip(wanted, grads, ref_grads, strict=True):
        name = ("dx", "dA", "dB", "dgates")[i]
        errors[name] = rel_err(got[..., :d_in] if i == 0 else got, want[..., :d_in] if i == 0 else want)
    base = torch.randn(y.shape, generator=gen, device=device).to(dtype)
    want_out = base.double() + ref.detach()
    got_out = fused.routed_lora(*args([v.detach() for v in leaves]), SCALING, out=base)
    errors["y_out"] = rel_err(got_out, want_out)
    row = {"max_rel_err": errors, "passed": all(e < TOL[dtype] for e in errors.values())}
    unselected = (gates == 0).reshape(-1, k).all(0)
    if unselected.any():  # experts no sequence selected: their weight gradients must be exactly zero
        da, db = grads[wanted.index(1)].view(k, r, d_in), grads[wanted.index(2)].view(d_out, k, r)
        row["unselected_experts"] = int(unselected.sum())
        row["unselected_grads_zero"] = not (da[unselected].any() or db[:, unselected].any())
        row["passed"] = row["passed"] and row["unselected_grads_zero"]
    return row


def check_with_config(c: dict, config, device: str) -> dict:
    """``check_routed_lora`` with the row-tile kernel forced to one of the tuner's candidates."""
    fused.ROW_TILE_CONFIG = config
    try:
        return check_routed_lora(c, device)
    except triton.runtime.errors.OutOfResources as err:  # the tuner skips such a config too
        return {"skipped": f"out of resources: {err}"[:200]}
    finally:
        fused.ROW_TILE_CONFIG = None


def config_cases(device: str, dry_run: bool) -> list[tuple[dict, object]]:
    """The base case (bf16, sequence top-2, gate grad) once per row-tile config the tuner may pick, so a
    wrong config cannot hide behind the tuner's choice (dry run: the first two)."""
    base = correctness_cases(dry_run)[2]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 4
    block_c = max(16, triton.next_power_of_2(base["k"] * base["r"]))
    configs = fused.row_tile_configs(base["n"] * base["t"], base["d_out"], block_c, sms)
    return [({**base, "tag": f"config {i}", "config": str(config)}, config) for i, config in enumerate(configs[:2] if dry_run else configs)]


def check_large(device: str) -> dict:
    """tokens x features > 2^31 elements: every offset past int32. Rows are independent, so the check
    compares the last rows (those with the largest offsets) against float64."""
    d, k, r, dtype = 2048, 4, 16, torch.bfloat16
    tokens = 2**31 // d + 4096
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, tokens, d, generator=gen, device=device, dtype=dtype).requires_grad_()
    a = (torch.randn(k * r, d, generator=gen, device=device) / d**0.5).to(dtype)
    b = (torch.randn(d, k * r, generator=gen, device=device) / (k * r) ** 0.5).to(dtype)
    gates = torch.softmax(torch.randn(1, tokens, k, generator=gen, device=device), -1).to(dtype)
    y = fused.routed_lora(x, a, b, gates, SCALING)
    tail = slice(tokens - 256, tokens)
    ref = routing.routed_lora_reference(x[:, tail].detach().double(), a.double(), b.double(), gates[:, tail].double(), SCALING)
    dy = torch.ones_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref_dx = routing.routed_lora_reference(dy[:, tail].double(), b.t().double(), a.t().double(), gates[:, tail].double(), SCALING)
    base = torch.zeros_like(y)
    got_out = fused.routed_lora(x.detach(), a, b, gates, SCALING, out=base)
    errors = {"y": rel_err(y[:, tail], ref), "dx": rel_err(dx[:, tail], ref_dx), "y_out": rel_err(got_out[:, tail], ref)}
    return {"elements": tokens * d, "max_rel_err": errors, "passed": all(e < TOL[dtype] for e in errors.values())}


def check_router(dtype, top_k, device: str) -> dict:
    """Tie-free logits (a permutation of distinct values) so top-k is unambiguous in every dtype."""
    gen = torch.Generator(device=device).manual_seed(5)
    rows, k = 333, 10
    ranks = torch.argsort(torch.rand(rows, k, generator=gen, device=device), -1).float()
    logits = (ranks * 0.75 - 3).to(dtype).requires_grad_()
    gates, load = fused_router.compute_gates(logits, 0.7, top_k)
    ref_logits = logits.detach().double().requires_grad_()
    ref_gates, ref_load = routing.compute_gates_torch(ref_logits, 0.7, top_k)
    dg = torch.randn(rows, k, generator=gen, device=device)
    (dz,) = torch.autograd.grad(gates, logits, dg.to(dtype))
    (ref_dz,) = torch.autograd.grad(ref_gates.double(), ref_logits, dg.double())
    errors = {"gates": rel_err(gates, ref_gates), "load": rel_err(load, ref_load), "dlogits": rel_err(dz, ref_dz)}
    return {"max_rel_err": errors, "passed": all(e < TOL[dtype] for e in errors.values())}


def correctness(device: str, dry_run: bool) -> list[dict]:
    rows = []
    for c in correctness_cases(dry_run):
        fields = {key: (_dt(v) if isinstance(v, torch.dtype) else v) for key, v in c.items()}
        rows.append(run_case("routed_lora", lambda c=c: check_routed_lora(c, device), **fields))
    for c, config in config_cases(device, dry_run):
        fields = {key: (_dt(v) if isinstance(v, torch.dtype) else v) for key, v in c.items()}
        rows.append(run_case("routed_lora", lambda c=c, config=config: check_with_config(c, config, device), **fields))
    rows.append({"case": "int64_offsets", "skipped": NO_CUDA} if device != "cuda" else run_case("int64_offsets", lambda: check_large(device)))
    for dtype in ([torch.float32, torch.float16] if dry_run else [torch.bfloat16, torch.float16, torch.float32]):
        for gating in ("dense", "top2"):
            rows.append(run_case("router", lambda d=dtype, g=gating: check_router(d, TOP_K[g], device), dtype=_dt(dtype), gating=gating))
    return rows


# ---------------------------------------------------------------------------------------------- integration
def integration(device: str, dry_run: bool, timer) -> dict:
    """``MoELoraLinear`` in a tiny Llama, torch vs Triton backend: logits, LoRA grads, gate grads, time."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        from personafuse.layer import MoELoraLinear, RoutingState
    except ImportError as err:
        return {"skipped": f"needs transformers ({err})"}
    hidden, layers, vocab, batch, seq = (32, 1, 64, 2, 8) if dry_run else (512, 2, 1024, 4, 256)
    k, r = 10, 16
    dtype = torch.float32 if dry_run else torch.bfloat16
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2 * seq)
    model = LlamaForCausalLM(config).to(device)
    model.requires_grad_(False)
    state = RoutingState()
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                wrapped = MoELoraLinear(getattr(parent, name), k, r, 16.0, 0.0, state)
                torch.nn.init.normal_(wrapped.lora_B, std=0.02)
                setattr(parent, name, wrapped)
    lora = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    logits_gen = torch.Generator(device=device).manual_seed(3)
    gate_logits = torch.randn(batch, k, device=device, generator=logits_gen).requires_grad_()

    def step():
        for p in lora:
            p.grad = None
        gate_logits.grad = None
        state.gates, _ = routing.compute_gates_torch(gate_logits, 1.0, 2)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids).logits
        out.float().square().mean().backward()
        return out.detach().float(), [p.grad.float() for p in lora], gate_logits.grad.float()

    results = {}
    registered = routing._registry["triton"]
    if dry_run:  # the interpreter runs CPU tensors, which ``supports`` rightly refuses outside tests
        routing.register_backend("triton", routing.Kernels(registered.routed_lora, registered.compute_gates, lambda t: True))
    try:
        for backend in ("torch", "triton"):
            routing.set_backend(backend)
            results[backend] = step()
            results[backend + "_ms"] = timer(step)
    finally:
        routing.set_backend(None)
        routing.register_backend("triton", registered)
    (y_t, g_t, dz_t), (y_f, g_f, dz_f) = results["torch"], results["triton"]
    errors = {"logits": rel_err(y_f, y_t), "lora_grads": max(rel_err(a, b) for a, b in zip(g_f, g_t, strict=True)),
              "gate_logits_grad": rel_err(dz_f, dz_t)}
    return {"dtype": _dt(dtype), "layers": layers, "hidden": hidden, "tokens": batch * seq, "experts": k, "r": r,
            "rel_err_triton_vs_torch": errors, "passed": all(e < INTEGRATION_TOL[dtype] for e in errors.values()),
            "fwd_bwd_ms": {"torch": results["torch_ms"], "triton": results["triton_ms"]}}


# ---------------------------------------------------------------------------------------------- graphs / compile
def _graph_inputs(device):
    gen = torch.Generator(device=device).manual_seed(9)
    x = torch.randn(4, 128, 1024, generator=gen, device=device, dtype=torch.bfloat16)
    a = (torch.randn(160, 1024, generator=gen, device=device) / 32).to(torch.bfloat16)
    b = (torch.randn(1024, 160, generator=gen, device=device) / 13).to(torch.bfloat16)
    gates, _ = routing.compute_gates_torch(torch.randn(4, 10, generator=gen, device=device), 1.0, 2)
    return x, a, b, gates.to(torch.bfloat16)


def cuda_graph(device: str) -> dict:
    x, a, b, gates = _graph_inputs(device)
    base = torch.zeros(4, 128, 1024, device=device, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            fused.routed_lora(x, a, b, gates, SCALING)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = fused.routed_lora(x, a, b, gates, SCALING)
        fused.routed_lora(x, a, b, gates, SCALING, out=base)
    x.copy_(torch.randn_like(x))
    base.zero_()
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        want = fused.routed_lora(x, a, b, gates, SCALING)
    errors = {"y": rel_err(y, want), "y_out": rel_err(base, want)}
    return {"max_rel_err": errors, "passed": all(e < 1e-6 for e in errors.values())}


def compile_smoke(device: str) -> dict:
    import torch._dynamo

    x, a, b, gates = _graph_inputs(device)
    x.requires_grad_()

    def fn(x, a, b, gates):
        return torch.nn.functional.silu(fused.routed_lora(x, a, b, gates, SCALING)).sum()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(x, a, b, gates)
    torch._dynamo.reset()
    compiled = torch.compile(fn)
    got = compiled(x, a, b, gates)
    (dx,) = torch.autograd.grad(got, x)
    want = fn(x, a, b, gates)
    (want_dx,) = torch.autograd.grad(want, x)
    errors = {"y": rel_err(got, want), "dx": rel_err(dx, want_dx)}
    return {"graph_breaks": explanation.graph_break_count, "graphs": explanation.graph_count,
            "break_reasons": [str(reason.reason) for reason in explanation.break_reasons][:5],
            "max_rel_err": errors, "passed": all(e < TOL[torch.bfloat16] for e in errors.values())}


# ---------------------------------------------------------------------------------------------- timings
class Timer:
    """``do_bench`` median on CUDA; in a dry run one wall-clock sample (do_bench needs CUDA events)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, grad_to_none=None) -> float:
        if self.cuda:
            return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
        for v in grad_to_none or ():
            v.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class Budget:
    """Wall-clock budget of the whole run; a timing case starts only if one as long as the longest so far fits."""

    def __init__(self, seconds: float, started: float):
        self.seconds, self.started, self.longest = seconds, started, 0.0

    def allows_next(self) -> bool:
        return time.perf_counter() - self.started + self.longest <= self.seconds

    def record(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


GATINGS = [("sequence", "top2"), ("sequence", "dense"), ("token", "top2"), ("token", "dense"), ("sequence", "onehot")]


def timing_cases(dry_run: bool) -> list[dict]:
    """Most important first, so a budget cut drops the least informative cases."""
    if dry_run:
        shapes, tokens, gatings, k, r = [(32, 24)], [16], GATINGS[:1] + GATINGS[3:4], 4, 3
    else:
        shapes, tokens, gatings, k, r = [(4096, 4096), (4096, 14336), (14336, 4096)], [8192, 512, 32768, 16, 1], GATINGS, 10, 16
    cases = []
    for n in tokens:
        cases += [{"d_in": d_in, "d_out": d_out, "tokens": n, "routing": mode, "gating": gating, "k": k, "r": r, "grad_gates": False}
                  for (d_in, d_out) in shapes for mode, gating in gatings]
        if n == tokens[0]:  # router training: sequence top-2 with the gate gradient (every expert computed)
            cases += [{"d_in": d_in, "d_out": d_out, "tokens": n, "routing": "sequence", "gating": "top2", "k": k, "r": r,
                       "grad_gates": True} for (d_in, d_out) in shapes]
    return cases


def tuned_configs(c: dict) -> dict:
    """The row-tile configs the tuner chose for this case's bucket and shapes (forward d_in->d_out, backward d_out->d_in)."""
    bucket = fused.token_bucket(c["tokens"])
    return {f"{key[2]}->{key[3]} C{key[4]}": str(config) for key, config in fused.TUNER.best.items()
            if key[1] == bucket and key[2:4] in ((c["d_in"], c["d_out"]), (c["d_out"], c["d_in"]))}


def effective_cost(c: dict, elt: int) -> dict:
    """HBM bytes and FLOPs of the ideal kernel, counting only the experts a gate selects.

    Inference adds into the base output (read + write of ``out``); fwd+bwd returns the delta, then reads
    dy and x again, writes dx and reads/writes the selected experts' A and B.
    """
    tokens, d_in, d_out = c["tokens"], c["d_in"], c["d_out"]
    active = c["k"] if c["gating"] == "dense" else TOP_K[c["gating"]]
    weights = active * c["r"] * (d_in + d_out)
    flops = 2 * tokens * active * c["r"] * (d_in + d_out)
    fwd = elt * (tokens * d_in + 2 * tokens * d_out + weights)
    train = elt * (tokens * d_in + tokens * d_out + weights) + elt * (tokens * d_out + 2 * tokens * d_in + 4 * weights)
    return {"fwd": (fwd, flops), "fwd+bwd": (train, 3 * flops)}


def _impls(x, a, b, gates, w, r):
    a_r, b_r = a[:r].contiguous(), b[:, :r].contiguous()
    return {
        "fused": (lambda x, a, b, g: fused.routed_lora(x, a, b, g, SCALING), (x, a, b, gates)),
        "torch": (lambda x, a, b, g: routing.routed_lora_torch(x, a, b, g, SCALING), (x, a, b, gates)),
        "lora_Kr": (lambda x, a, b: F.linear(F.linear(x, a), b) * SCALING, (x, a, b)),
        "lora_r": (lambda x, a, b: F.linear(F.linear(x, a), b) * SCALING, (x, a_r, b_r)),
        "base_gemm": (lambda x, w: F.linear(x, w), (x, w)),
    }


def make_timing_inputs(c: dict, dtype, device):
    gen = torch.Generator(device=device).manual_seed(c["tokens"] + c["d_out"])
    seq = min(c["tokens"], 512)
    n, t, k, r = c["tokens"] // seq, seq, c["k"], c["r"]
    x = torch.randn(n, t, c["d_in"], generator=gen, device=device, dtype=dtype)
    a = torch.randn(k * r, c["d_in"], generator=gen, device=device, dtype=dtype) / c["d_in"] ** 0.5
    b = torch.randn(c["d_out"], k * r, generator=gen, device=device, dtype=dtype) / (k * r) ** 0.5
    w = torch.randn(c["d_out"], c["d_in"], generator=gen, device=device, dtype=dtype) / c["d_in"] ** 0.5
    shape = (n, k) if c["routing"] == "sequence" else (n, t, k)
    gates, _ = routing.compute_gates_torch(torch.randn(shape, generator=gen, device=device), 1.0, TOP_K[c["gating"]])
    return x, a, b, gates.to(dtype), w


def time_case(c: dict, timer, peaks: dict, dtype, device) -> dict:
    x, a, b, gates, w = make_timing_inputs(c, dtype, device)
    base = torch.zeros(*x.shape[:-1], c["d_out"], device=device, dtype=dtype)
    cost = effective_cost(c, x.element_size())
    ms, floor = {"fwd": {}, "fwd+bwd": {}}, {}
    dy = torch.randn_like(base)
    for name, (fn, args) in _impls(x, a, b, gates, w, c["r"]).items():
        if name == "fused":
            def infer():
                with torch.no_grad():
                    fused.routed_lora(x, a, b, gates, SCALING, out=base)
        elif name == "base_gemm":
            def infer(fn=fn, args=args):
                with torch.no_grad():
                    fn(*args)
        else:
            def infer(fn=fn, args=args):
                with torch.no_grad():
                    base.add_(fn(*args))
        ms["fwd"][name] = timer(infer)
        leaves = [v.detach().requires_grad_(v is not gates or c["grad_gates"]) for v in args]
        ms["fwd+bwd"][name] = timer(lambda fn=fn, leaves=leaves: fn(*leaves).backward(dy), grad_to_none=leaves)
    for pass_name, (nbytes, flops) in cost.items():
        floor_ms = 1e3 * max(nbytes / (peaks["copy_GBps"] * 1e9), flops / (peaks["matmul_TFLOPs"] * 1e12))
        floor[pass_name] = {"floor_ms": floor_ms, **{f"{n}_pct": 100 * floor_ms / v for n, v in ms[pass_name].items() if n != "base_gemm"}}
    return {"fused_path": fused.forward_path(c["tokens"], c["k"], c["r"]), "tuned": tuned_configs(c), "ms": ms, "floor": floor, "bytes": {p: v[0] for p, v in cost.items()}, "flops": {p: v[1] for p, v in cost.items()}}


def timings(cases: list[dict], timer, peaks: dict, dtype, device, budget: Budget, results: Results | None = None) -> list[dict]:
    rows = []
    for c in cases:
        if not budget.allows_next():
            rows.append({**c, "skipped": f"budget: {budget.seconds:.0f} s"})
            continue
        row = run_case("timing", lambda c=c: time_case(c, timer, peaks, dtype, device), **c)
        budget.record(row["seconds"])
        rows.append(row)
        if results is not None:  # a long section: keep what is measured even if the run is killed midway
            results.data["timings"] = rows
            results.save()
    return rows


def breakdown(device: str) -> dict:
    """Per-kernel CUDA time of one fused fwd+bwd (8192 tokens, 4096->4096, sequence top-2) and peak memory per impl."""
    from torch.profiler import ProfilerActivity, profile

    c = {"d_in": 4096, "d_out": 4096, "tokens": 8192, "routing": "sequence", "gating": "top2", "k": 10, "r": 16}
    x, a, b, gates, w = make_timing_inputs(c, torch.bfloat16, device)
    dy = torch.randn(*x.shape[:-1], c["d_out"], device=device, dtype=torch.bfloat16)
    peaks = {}
    for name, (fn, args) in _impls(x, a, b, gates, w, c["r"]).items():
        leaves = [v.detach().requires_grad_(v is not gates) for v in args]
        fn(*leaves).backward(dy)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*leaves).backward(dy)
        torch.cuda.synchronize()
        peaks[name] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
    leaves = [v.detach().requires_grad_(v is not gates) for v in (x, a, b, gates)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fused.routed_lora(*leaves, SCALING).backward(dy)
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us:
            kernels[event.key[:80]] = round(us / 3, 1)
    return {"case": c, "kernel_us_per_step": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15]), "peak_extra_MiB": peaks}


# ---------------------------------------------------------------------------------------------- report
def markdown(data: dict) -> str:
    meta, env = data["meta"], data.get("environment", {})
    lines = [f"# gpu_check {meta['date']}" + (" · DRY RUN (CPU interpreter, numbers meaningless)" if meta["dry_run"] else ""), ""]
    if env:
        lines += [f"{env.get('gpu')} · SMs {env.get('sms', '-')} · L2 {env.get('l2_MiB', '-')} MiB · driver {env.get('driver', '-')} · "
                  f"CUDA {env.get('cuda_runtime')} · torch {env.get('torch')} · triton {env.get('triton')} · commit {env.get('commit')}",
                  f"Measured: copy {env.get('copy_GBps', 0):.0f} GB/s, {env.get('matmul_dtype')} matmul {env.get('matmul_TFLOPs', 0):.1f} TFLOP/s", ""]
    checks = data.get("correctness", [])
    if checks:
        failed = [c for c in checks if c.get("passed") is False]
        lines += [f"## Correctness: {sum(c.get('passed') is True for c in checks)} passed, {len(failed)} failed, "
                  f"{sum('skipped' in c for c in checks)} skipped", "",
                  "| case | dtype | routing | gating | gate grad | K | r | layout | path | passed | worst rel. error |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in checks:
            errs = c.get("max_rel_err") or {}
            worst = max(errs, key=errs.get) if errs else None
            status = c["skipped"] if "skipped" in c else ("yes" if c.get("passed") else "**NO**")
            lines.append(f"| {c.get('tag', c['case'])} | {c.get('dtype', '-')} | {c.get('routing', '-')} | {c.get('gating', '-')} | "
                         f"{c.get('grad_gates', '-')} | {c.get('k', '-')} | {c.get('r', '-')} | {c.get('layout', '-')} | {c.get('path', '-')} | {status} | "
                         + (f"{errs[worst]:.1e} ({worst})" if worst else "error" if "error" in c else "-") + " |")
        lines.append("")
    for name in ("integration", "cuda_graph", "compile"):
        if name in data:
            summary = {key: v for key, v in data[name].items() if key not in ("error", "case")}
            lines += [f"**{name}**: `{json.dumps(summary, default=str)}`" + (" (error: see results.json)" if "error" in data[name] else ""), ""]
    rows = data.get("timings", [])
    if rows:
        lines += ["## Timings (median ms; floor % = roofline time of the effective bytes/FLOPs over measured time)", "",
                  "| d_in→d_out | tokens | routing | gating | pass | fused | torch | LoRA K·r | LoRA r | base GEMM | fused floor % | torch floor % | fused vs torch |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            gating = row["gating"] + (" +dgates" if row.get("grad_gates") else "")
            head = f"| {row['d_in']}→{row['d_out']} | {row['tokens']} | {row['routing']} | {gating} |"
            if "ms" not in row:
                lines.append(f"{head} - | {row.get('skipped') or 'error'} | | | | | | | |")
                continue
            for pass_name, ms in row["ms"].items():
                fl = row["floor"][pass_name]
                lines.append(f"{head} {pass_name} | {ms['fused']:.3f} | {ms['torch']:.3f} | {ms['lora_Kr']:.3f} | {ms['lora_r']:.3f} | "
                             f"{ms['base_gemm']:.3f} | {fl['fused_pct']:.0f} | {fl['torch_pct']:.0f} | {ms['torch'] / ms['fused']:.2f}x |")
        lines.append("")
    if "breakdown" in data:
        lines += [f"**breakdown**: `{json.dumps(data['breakdown'], default=str)}`", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="directory for results.json and results.md (default: $OUT)")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse of this checkout)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds after which timing cases are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required when $OUT is not set")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run to exercise the script on the CPU")

    started = time.perf_counter()
    cuda = not args.dry_run
    device = "cuda" if cuda else "cpu"
    timer = Timer(cuda=cuda)
    results = Results(args.out, {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
                                 "budget_s": args.budget_s, "argv": sys.argv[1:] if argv is None else argv})
    torch.manual_seed(0)

    env = run_case("environment", lambda: environment(device, args.dry_run, args.commit, timer))
    results.section("environment", env)
    results.section("correctness", correctness(device, args.dry_run))
    results.section("integration", run_case("integration", lambda: integration(device, args.dry_run, timer)))
    results.section("cuda_graph", run_case("cuda_graph", lambda: cuda_graph(device)) if cuda else {"skipped": NO_CUDA})
    results.section("compile", run_case("compile", lambda: compile_smoke(device)) if cuda else {"skipped": NO_CUDA})
    if "copy_GBps" in env:
        dtype = torch.bfloat16 if cuda else torch.float32
        rows = timings(timing_cases(args.dry_run), timer, env, dtype, device, Budget(args.budget_s, started), results)
    else:
        rows = [{"skipped": "environment failed: no measured peaks"}]
    results.section("timings", rows)
    results.section("tuning", {"best": {str(key): str(config) for key, config in fused.TUNER.best.items()},
                               "failed": {str(key): [[str(c), err] for c, err in fails] for key, fails in fused.TUNER.failed.items()}})
    results.section("breakdown", run_case("breakdown", lambda: breakdown(device)) if cuda else {"skipped": NO_CUDA})
    results.data["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    results.save()

    print((args.out / "results.md").read_text())
    failed = [c for c in results.data["correctness"] if c.get("passed") is False]
    failed += [results.data[s] for s in ("integration", "cuda_graph", "compile") if results.data[s].get("passed") is False]
    if failed:
        print(f"{len(failed)} check(s) FAILED; see {args.out / 'results.json'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
