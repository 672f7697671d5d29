"""CPU benchmark suite (``make bench``): what the stacked routing buys, measured against PEFT.

Usage::

    python -m personafuse.bench --out bench_results [--quick]

Three sections, each comparison timed side by side in one run (calls interleaved, warmup first,
median and interquartile range of the repeats), written to ``OUT/results.json`` and ``OUT/results.md``:

1. the routed LoRA delta, forward+backward: stacked two-GEMM path vs the per-expert loop;
2. a full training step (forward, backward, AdamW) on a random Llama: PersonaFuse vs PEFT X-LoRA vs
   plain PEFT LoRA, all timed interleaved in one process; peak memory comes from a fresh process
   per method, since memory one method freed stays with the allocator and would hide the next's peak;
3. the hidden-state router's share of a forward (it runs ``layer`` blocks, not a second full pass).

``--quick`` shrinks shapes and repeats and skips the memory processes: it checks that the suite
runs, not how fast.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import peft
import torch
import transformers
from peft import LoraConfig, XLoraConfig, get_peft_model
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from personafuse import layer as layer_module
from personafuse import routing
from personafuse.config import PersonaFuseConfig
from personafuse.model import PersonaFuseModel
from personafuse.routing import compute_gates, routed_lora_reference, routed_lora_torch

K, R, ALPHA, DROPOUT = 10, 16, 32.0, 0.05
MEMORY_CAP_MIB = 8192
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_CASES = {
    "personafuse": "PersonaFuse, experts train, dense gates (K=10, r=16)",
    "personafuse_top2": "PersonaFuse, experts train, top-2 gates per sequence",
    "personafuse_loop": "PersonaFuse, experts train, dense, per-expert loop",
    "personafuse_router": "PersonaFuse, router trains (hidden-state router, dense)",
    "xlora": "PEFT X-LoRA, adapters train (use_trainable_adapters=True)",
    "xlora_classifier": "PEFT X-LoRA, classifier only",
    "lora_r16": "PEFT LoRA r=16",
    "lora_r32": "PEFT LoRA r=32 (= 2r, top-2's FLOPs)",
    "lora_r160": "PEFT LoRA r=160 (= K·r, dense's FLOPs)",
}
# Each PersonaFuse phase against the PEFT method doing the same work: (case, reference case).
TRAIN_REFERENCES = {"personafuse": "lora_r160", "personafuse_top2": "lora_r32", "personafuse_loop": "lora_r160",
                    "personafuse_router": "xlora_classifier", "xlora": "personafuse", "xlora_classifier": "personafuse_router"}


@dataclass
class Sizes:
    """Everything ``--quick`` shrinks."""

    delta_shapes: tuple[tuple[int, int], ...]
    delta_batch: tuple[int, int]
    model: dict
    train_batch: tuple[int, int]
    warmup: int
    repeats: int
    train_warmup: int
    train_repeats: int
    decode_batch: int
    decode_prompt: int
    decode_new_tokens: int
    decode_repeats: int


# SmolLM2-135M's shapes: its projections (q/k/v/o, gate/up, down) at 2,048 tokens for the routed delta, and a
# random model of its exact config (30 layers, all 7 projections wrapped) at batch 2 x 256 for the steps.
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
FULL = Sizes(((576, 576), (576, 1536), (1536, 576)), (4, 512), SMOLLM2_135M,
             (2, 256), warmup=2, repeats=10, train_warmup=1, train_repeats=4,
             decode_batch=8, decode_prompt=32, decode_new_tokens=48, decode_repeats=5)
QUICK = Sizes(((72, 72), (72, 192)), (2, 64),
              dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172, vocab_size=256),
              (2, 32), warmup=1, repeats=3, train_warmup=0, train_repeats=2,
              decode_batch=3, decode_prompt=8, decode_new_tokens=4, decode_repeats=2)


# timing -------------------------------------------------------------------------------------------
def summarize(seconds: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return {"median_ms": 1e3 * statistics.median(seconds), "iqr_ms": 1e3 * (q3 - q1), "repeats": len(seconds)}


def time_side_by_side(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                      progress: str | None = None) -> dict[str, dict]:
    """Interleaves the candidates call by call, so drift and other load on the machine hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = range(warmup + repeats)
    for i in tqdm(rounds, desc=progress, file=sys.stderr) if progress else rounds:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


# 1. routed delta ----------------------------------------------------------------------------------
def delta_fwd_bwd(d_in: int, d_out: int, batch: int, seq: int, per_token: bool, top_k: int | None) -> dict[str, Callable]:
    """One forward+backward of the dense stacked path, the automatic choice (sparse for sequence top-2) and
    the loop, on the same tensors."""
    torch.manual_seed(0)
    x = torch.randn(batch, seq, d_in, requires_grad=True)
    A = (torch.randn(K * R, d_in) / d_in**0.5).requires_grad_()
    B = (torch.randn(d_out, K * R) / R**0.5).requires_grad_()
    gates, _ = compute_gates(torch.randn(*((batch, seq) if per_token else (batch,)), K), top_k=top_k)
    gates.requires_grad_()  # the router trains too, so dgates is part of the real backward
    grad_out = torch.randn(batch, seq, d_out)

    def fwd_bwd(fn):
        def run():
            for t in (x, A, B, gates):
                t.grad = None
            fn(x, A, B, gates, ALPHA / R).backward(grad_out)
        return run

    def dense(*args):
        return routed_lora_torch(*args, path="dense")

    return {"stacked": fwd_bwd(dense), "auto": fwd_bwd(routed_lora_torch), "loop": fwd_bwd(routed_lora_reference)}


def bench_delta(sizes: Sizes) -> list[dict]:
    cases = [(shape, per_token, top_k) for shape in sizes.delta_shapes for per_token in (False, True) for top_k in (None, 2)]
    batch, seq = sizes.delta_batch
    rows = []
    for (d_in, d_out), per_token, top_k in tqdm(cases, desc="routed delta", file=sys.stderr):
        stats = time_side_by_side(delta_fwd_bwd(d_in, d_out, batch, seq, per_token, top_k), sizes.warmup, sizes.repeats)
        auto_path = "sparse" if not per_token and top_k else "dense"
        rows.append({"shape": f"{d_in}→{d_out}", "tokens": batch * seq,
                     "gates": f"{'token' if per_token else 'sequence'}, {'top-2' if top_k else 'dense'}",
                     **stats, "auto_path": auto_path, "ratio": stats["loop"]["median_ms"] / stats["stacked"]["median_ms"],
                     "auto_ratio": stats["auto"]["median_ms"] / stats["stacked"]["median_ms"]})
    return rows


# 2. training step ---------------------------------------------------------------------------------
def random_llama(model_kwargs: dict, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # X-LoRA refuses a model with the KV cache on; the others do not care during training.
    return LlamaForCausalLM(LlamaConfig(**model_kwargs, use_cache=False))


def make_lora_adapters(directory: Path, model_kwargs: dict) -> None:
    """Ten saved random PEFT LoRAs for X-LoRA, one folder each, named like ``adapter_paths`` keys them."""
    for k in range(K):
        lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(random_llama(model_kwargs, seed=k), lora).save_pretrained(directory / str(k))


def adapter_paths(directory: Path | None) -> dict[str, str] | None:
    """X-LoRA's ``adapters`` dict, keyed "0".."9": peft 0.21.2 loads adapters under these index names
    but activates the dict's keys, so any other keys raise KeyError at the first forward."""
    return None if directory is None else {str(k): str(directory / str(k)) for k in range(K)}


def top2_gates(batch: int) -> torch.Tensor:
    """``[batch, K]`` gates, two nonzero per sequence, different experts for different sequences."""
    gates = torch.zeros(batch, K)
    for i in range(batch):
        gates[i, (2 * i) % K], gates[i, (2 * i + 1) % K] = 0.7, 0.3
    return gates


def build_train_case(name: str, model_kwargs: dict, adapters: dict[str, str] | None, batch_size: int = 2):
    """(model, factory of the context each step runs in) for one row of the training table."""
    base = random_llama(model_kwargs)
    if name == "personafuse_router":
        pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS))
        pf.set_trainable("router")  # the router runs on every forward, as X-LoRA's classifier does
        return pf, contextlib.nullcontext
    if name.startswith("personafuse"):
        pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS))
        pf.set_trainable("experts")
        gates = torch.full((K,), 1.0 / K)
        if name == "personafuse_top2":  # each sequence its own two experts, as a top-2 router would pick
            gates = top2_gates(batch_size)

        @contextlib.contextmanager
        def context():
            # entered per step: the loop's patch is process-wide and must not leak into the other rows
            with pf.fixed_gates(gates), (mock.patch.object(layer_module, "routed_lora", routed_lora_reference)
                                         if name == "personafuse_loop" else contextlib.nullcontext()):
                yield
        return pf, context
    if name.startswith("xlora"):
        if adapters is None:
            raise RuntimeError("no LoRA adapters for X-LoRA (creating them failed)")
        # use_trainable_adapters=True trains its experts too (PersonaFuse's expert phase); without, only
        # its classifier trains (PersonaFuse's router phase)
        config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model_kwargs["hidden_size"], adapters=adapters,
                             use_trainable_adapters=name == "xlora")
        return get_peft_model(base, config), contextlib.nullcontext
    rank = {"lora_r16": R, "lora_r32": 2 * R, "lora_r160": K * R}[name]
    lora = LoraConfig(r=rank, lora_alpha=ALPHA * rank / R, lora_dropout=DROPOUT, target_modules=TARGETS)
    return get_peft_model(base, lora), contextlib.nullcontext


def make_step(name: str, sizes: Sizes, adapters: dict[str, str] | None) -> tuple[Callable[[], None], int]:
    """A closure running one training step of this case, and its trainable parameter count.

    One step runs here, so a method that breaks at its first forward (X-LoRA's adapter keys) fails
    while it is being built, where the caller records the error.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from peft/transformers internals
        model, context = build_train_case(name, sizes.model, adapters, sizes.train_batch[0])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch, seq = sizes.train_batch
    ids = torch.randint(0, sizes.model["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        with context():
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return step, sum(p.numel() for p in params)


def error_text(error: Exception) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def rss_mib(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB; ``None`` off Linux.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's peak into a child across fork and
    exec, so a child started by a large parent reports the parent's size.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def measure_memory(name: str, sizes: Sizes, adapters: dict[str, str] | None) -> dict:
    """Peak RSS growth from building the model through two training steps (the first allocates grads
    and AdamW state); the random base model, the same in every row, is part of it."""
    try:
        before = rss_mib("VmRSS")
        step, _ = make_step(name, sizes, adapters)
        step()
        peak = rss_mib("VmHWM")
    except Exception as error:  # reported by the timing pass too; here it only loses the memory figure
        return {"error": error_text(error)}
    return {"peak_rss_growth_mib": None if before is None or peak is None else max(0.0, peak - before)}


def child_rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def measure_memory_fresh(name: str, adapters_dir: Path | None, cap_mib: float = MEMORY_CAP_MIB) -> dict:
    """A fresh interpreter per case, so no other case's freed memory or peak is counted.

    A child whose RSS passes ``cap_mib`` is stopped (X-LoRA passed 9.8 GiB on a 24 GiB shared machine) and
    reported as ``peak_rss_at_least_mib``: a lower bound, not a measurement.
    """
    cmd = [sys.executable, "-m", "personafuse.bench", "--memory-case", name]
    cmd += ["--adapters", str(adapters_dir)] if adapters_dir else []
    with tempfile.TemporaryFile("w+") as stdout, subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL,
                                                                    text=True) as child:
        while child.poll() is None:
            rss = child_rss_mib(child.pid)
            if rss is not None and rss > cap_mib:
                child.kill()
                child.wait()
                return {"peak_rss_at_least_mib": cap_mib}
            time.sleep(0.2)
        stdout.seek(0)
        lines = stdout.read().strip().splitlines()
    if child.returncode != 0 or not lines:
        return {}
    return {"peak_rss_growth_mib": json.loads(lines[-1]).get("peak_rss_growth_mib")}


def bench_train(sizes: Sizes, quick: bool, work: Path) -> list[dict]:
    """Times all methods interleaved in this process (fair under load); memory comes from fresh processes."""
    adapters_dir: Path | None = work / "xlora_adapters"
    results: dict[str, dict] = {name: {} for name in TRAIN_CASES}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_lora_adapters(adapters_dir, sizes.model)
    except Exception as error:  # X-LoRA then reports this error, the other rows still run
        adapters_dir = None
        for name in ("xlora", "xlora_classifier"):
            results[name]["error"] = f"creating the LoRA adapters for X-LoRA failed: {error_text(error)}"
    # Memory first, each case in a fresh process, while this one holds no model: the timed models and
    # their optimizers would otherwise share the machine with the memory runs (X-LoRA alone needs > 9 GiB).
    for name in tqdm([n for n in TRAIN_CASES if "error" not in results[n]], desc="training step: memory",
                     file=sys.stderr):
        # quick mode skips this: an interpreter start costs more than the whole quick run
        results[name].update({} if quick else measure_memory_fresh(name, adapters_dir))
        results[name].setdefault("peak_rss_growth_mib", None)
    steps = {}
    for name in tqdm(TRAIN_CASES, desc="training step: build", file=sys.stderr):
        if "error" in results[name]:
            continue
        try:
            steps[name], results[name]["trainable_params"] = make_step(name, sizes, adapter_paths(adapters_dir))
        except Exception as error:  # recorded in the results instead: the other rows still get measured
            results[name]["error"] = error_text(error)
    batch, seq = sizes.train_batch
    timed = time_side_by_side(steps, sizes.train_warmup, sizes.train_repeats, "training step: time")
    for name, stats in timed.items():
        results[name].update(step=stats, tokens_per_s=batch * seq / (stats["median_ms"] / 1e3))
    rows = []
    for name, res in results.items():
        row = {"case": name, "method": TRAIN_CASES[name], **res}
        ref = TRAIN_REFERENCES.get(name)
        if ref is not None:
            row["reference"] = ref
            if "step" in res and "step" in results[ref]:
                row["time_vs_reference"] = res["step"]["median_ms"] / results[ref]["step"]["median_ms"]
            mem, ref_mem = res.get("peak_rss_growth_mib"), results[ref].get("peak_rss_growth_mib")
            if mem is not None and ref_mem:
                row["memory_vs_reference"] = mem / ref_mem
        rows.append(row)
    return rows


# 3. router overhead -------------------------------------------------------------------------------
def bench_router(sizes: Sizes) -> dict:
    """Forward with the router vs with fixed gates; the base model alone is the unit the router's
    ``layer / num_layers`` share refers to (it runs base blocks, adapters off)."""
    pf = PersonaFuseModel.from_base(random_llama(sizes.model), PersonaFuseConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
    pf.eval()
    layer, num_layers = pf.routing.context.layer, sizes.model["num_hidden_layers"]
    batch, seq = sizes.train_batch
    ids = torch.randint(0, sizes.model["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    uniform = torch.full((K,), 1.0 / K)

    def fixed():
        with pf.fixed_gates(uniform):
            pf(input_ids=ids)

    def base():
        with pf.adapters_disabled():
            pf(input_ids=ids)

    with torch.no_grad():
        stats = time_side_by_side({"fixed_gates": fixed, "router": lambda: pf(input_ids=ids), "base": base},
                                  sizes.warmup, 2 * sizes.repeats)
    fixed_ms = stats["fixed_gates"]["median_ms"]
    router_ms = stats["router"]["median_ms"] - fixed_ms
    return {"layer": layer, "num_layers": num_layers, "tokens": batch * seq, **stats,
            "router_ms": router_ms, "router_share_of_forward": router_ms / fixed_ms,
            "router_share_of_base_forward": router_ms / stats["base"]["median_ms"],
            "expected_share": layer / num_layers}


# 4. decoding --------------------------------------------------------------------------------------
DECODE_CASES = {"base": "base model (adapters off)", "merged": "merged export (uniform blend)",
                "dense": "PersonaFuse, routed, dense gates", "top2": "PersonaFuse, routed, top-2 gates"}


def decode_model(sizes: Sizes, quick: bool):
    """The embedded SmolLM2-135M-Instruct (a random tiny Llama with ``--quick``) and its config."""
    if quick:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**sizes.model, use_cache=True))
    from personafuse.base_models import load_base_model

    return load_base_model("embedded")[0]


def merged_copy(pf: PersonaFuseModel, gates: torch.Tensor):
    """A plain model with the blend folded into its weights, as ``export_merged`` writes it."""
    from personafuse.export import merged_state_dict

    model = type(pf.model)(pf.model.config)
    model.load_state_dict(merged_state_dict(pf, gates, torch.float32, dequantize=False), strict=False)
    model.tie_weights()
    return model.eval()


def bench_decode(sizes: Sizes, quick: bool) -> dict:
    """Greedy ``generate``: base, merged, and the hidden-state router with dense and top-2 gates, at batch 1
    and at batch ``sizes.decode_batch`` (a different prompt, so different gates, per sequence)."""
    pf = PersonaFuseModel.from_base(decode_model(sizes, quick),
                                    PersonaFuseConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS))
    torch.manual_seed(0)
    for layer in pf.moe_layers.values():  # a trained-like, nonzero delta (B starts at zero)
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    torch.nn.init.normal_(pf.router.head.weight, std=1.0)  # gates that differ between prompts
    pf.eval()
    merged = merged_copy(pf, torch.full((K,), 1.0 / K))
    vocab, new = pf.model.config.vocab_size, sizes.decode_new_tokens
    prompts = torch.randint(0, vocab, (sizes.decode_batch, sizes.decode_prompt),
                            generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def generate(case: str, ids: torch.Tensor):
        def run():
            with torch.no_grad():
                if case == "merged":
                    return merged.generate(input_ids=ids, **settings)
                if case == "base":
                    with pf.adapters_disabled():
                        return pf.generate(input_ids=ids, **settings)
                pf.router.top_k = 2 if case == "top2" else None
                return pf.generate(input_ids=ids, **settings)
        return run

    calls_before = pf.routing.router_calls
    generate("top2", prompts)()
    router_calls, gate_rows = pf.routing.router_calls - calls_before, pf.last_gates
    routing.path_counts.clear()
    cases, batch_sizes = [], (1, sizes.decode_batch)
    for batch in batch_sizes:
        ids = prompts[:batch]
        names = list(DECODE_CASES) if batch == 1 else ["merged", "dense", "top2"]
        stats = time_side_by_side({name: generate(name, ids) for name in names}, 1, sizes.decode_repeats,
                                  f"decode: batch {batch}")
        for name in names:
            cases.append({"batch": batch, "case": name, "label": DECODE_CASES[name], **stats[name],
                          "tokens_per_s": batch * new / (stats[name]["median_ms"] / 1e3),
                          "vs_merged": stats[name]["median_ms"] / stats["merged"]["median_ms"]})
    return {"model": "SmolLM2-135M-Instruct (embedded)" if not quick else "random tiny Llama",
            "new_tokens": new, "prompt_tokens": sizes.decode_prompt, "batch_sizes": list(batch_sizes), "cases": cases,
            "router_calls_per_generate": router_calls, "distinct_gate_rows": int(torch.unique(gate_rows, dim=0).shape[0]),
            "paths": dict(routing.path_counts)}


# report -------------------------------------------------------------------------------------------
def machine_info() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            # other processes on a small machine skew CPU timings badly; this makes that visible
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _ms(stats: dict) -> str:
    return f"{stats['median_ms']:.2f} (IQR {stats['iqr_ms']:.2f})"


def _load(load: list[float] | None) -> str:
    return "n/a" if load is None else "/".join(f"{x:.1f}" for x in load)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['processor'] or m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, "
             f"peft {m['peft']}, {m['date']}, load average (1/5/15 min) at start {_load(m['load_average_at_start'])}, "
             f"at end {_load(m['load_average_at_end'])}"
             f"{' — QUICK run' if results['quick'] else ''}. "
             "Times: median (interquartile range) of the repeats.", "",
             "### Routed LoRA delta, forward+backward, fp32 (K=10, r=16)", "",
             "| shape | tokens | gates | dense stacked ms | auto path | auto ms | per-expert loop ms | loop / dense | "
             "auto / dense |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['tokens']} | {r['gates']} | {_ms(r['stacked'])} | {r['auto_path']} | {_ms(r['auto'])} | "
              f"{_ms(r['loop'])} | {_ratio(r['ratio'])} | {_ratio(r['auto_ratio'])} |" for r in results["delta"]]
    lines += ["", "### Training step (forward + backward + AdamW)", "",
              "| method | trainable params | ms / step | tokens/s | peak RSS growth MiB | compared with | time ratio | "
              "memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in results["train_step"]:
        if "error" in r:
            lines.append(f"| {r['method']} | error: `{r['error'].splitlines()[-1]}` | | | | | | |")
            continue
        mem = r.get("peak_rss_growth_mib")
        mem_text = (f"> {r['peak_rss_at_least_mib']:.0f} (stopped)" if "peak_rss_at_least_mib" in r
                    else "n/a" if mem is None else f"{mem:.0f}")
        ref = TRAIN_CASES[r["reference"]] if "reference" in r else "n/a"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {_ms(r['step'])} | {r['tokens_per_s']:.0f} | "
                     f"{mem_text} | {ref} | {_ratio(r.get('time_vs_reference'))} | {_ratio(r.get('memory_vs_reference'))} |")
    de = results["decode"]
    lines += ["", f"### Greedy decoding ({de['model']}, {de['new_tokens']} new tokens after a {de['prompt_tokens']}-token "
              "prompt, prefill included)", "",
              "| batch | generation | tokens/s (all sequences) | ms / generate | × merged at this batch |", "|---|---|---|---|---|"]
    lines += [f"| {c['batch']} | {c['label']} | {c['tokens_per_s']:.1f} | {_ms(c)} | {_ratio(c['vs_merged'])} |"
              for c in de["cases"]]
    lines += ["", f"Router calls per routed generate: {de['router_calls_per_generate']}; distinct gate rows at batch "
              f"{de['batch_sizes'][-1]}: {de['distinct_gate_rows']}; torch paths taken: {de['paths']}."]
    ro = results["router"]
    lines += ["", f"### Router overhead (forward, no grad, {ro['tokens']} tokens, router at layer "
              f"{ro['layer']} of {ro['num_layers']})", "",
              "| forward | ms | vs fixed gates |", "|---|---|---|",
              f"| base model alone (adapters off) | {_ms(ro['base'])} | {_ratio(ro['base']['median_ms'] / ro['fixed_gates']['median_ms'])} |",
              f"| PersonaFuse, fixed gates | {_ms(ro['fixed_gates'])} | 1.00× |",
              f"| PersonaFuse, hidden-state router | {_ms(ro['router'])} | {_ratio(ro['router']['median_ms'] / ro['fixed_gates']['median_ms'])} |",
              "", f"Router cost: {ro['router_ms']:.2f} ms = {ro['router_share_of_forward']:.2f} of a PersonaFuse forward, "
              f"{ro['router_share_of_base_forward']:.2f} of a base forward (layer / num_layers = {ro['expected_share']:.2f}; "
              "X-LoRA pays a full second forward, 1.0)."]
    return "\n".join(lines) + "\n"


def run(out: Path, quick: bool = False) -> dict:
    sizes = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        results = {"machine": machine_info(), "quick": quick, "sizes": asdict(sizes),
                   "delta": bench_delta(sizes), "train_step": bench_train(sizes, quick, Path(work)),
                   "router": bench_router(sizes), "decode": bench_decode(sizes, quick)}
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    table = to_markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    parser.add_argument("--memory-case", choices=list(TRAIN_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--adapters", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        print(json.dumps(measure_memory(args.memory_case, QUICK if args.quick else FULL, adapter_paths(args.adapters))))
    else:
        run(args.out, args.quick)


if __name__ == "__main__":
    main()
