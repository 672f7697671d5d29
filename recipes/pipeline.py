"""Experts -> router -> bundle in one command; with ``demo=true`` it shows what the model learned,
and with ``apc_dpo=true`` it distils the APC discriminators and makes the bundle more faithful to a persona.

    python recipes/pipeline.py --config-name demo   # what `make demo` runs
    python recipes/pipeline.py model=qwen25_7b trainer=gpu run_name=qwen-persona
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from personafuse.cli import user_errors
from personafuse.eval import demo_evaluation
from personafuse.eval.candidates import GenerationSettings
from personafuse.eval.io import sample_path
from personafuse.eval.reference import reference_evaluation, report_markdown, spread
from personafuse.export import blend_gates, export_merged
from personafuse.training.runs import shutdown_distributed
from personafuse.workflows.apc_dpo import run_apc_dpo
from personafuse.workflows.discriminators import run_discriminators
from personafuse.workflows.experts import run_experts
from personafuse.workflows.router import run_router
from personafuse.workflows.run import Run, load_data, load_model

PLAIN_TRANSFORMERS_CHECK = """
import sys
sys.modules["personafuse"] = None  # prove the export needs no PersonaFuse
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=40, do_sample=False, repetition_penalty=1.2)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
"""


def export_preset(cfg: DictConfig, pf, run: Run) -> Path:
    """Merge the preset blend into a plain checkpoint and run it in a process without PersonaFuse."""
    target = Path(cfg.run_dir) / "export" / cfg.export_preset
    export_merged(pf, target, blend_gates(pf, preset=cfg.export_preset), overwrite=True, label=cfg.export_preset)
    prompt = "I failed my driving test again and I feel like giving up."
    check = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS_CHECK, str(target.resolve()), prompt],
                           capture_output=True, text=True, cwd=target)
    if check.returncode:
        raise RuntimeError(f"plain transformers could not run the export in {target}:\n{check.stderr[-3000:]}")
    reply = check.stdout.strip()
    run.log(f"\n[export] merged '{cfg.export_preset}' checkpoint in {target}; plain transformers (no personafuse) says:")
    run.log(f"user: {prompt}\n{cfg.export_preset}: {reply}")
    return target


@torch.no_grad()
def show_examples(cfg: DictConfig, pf, tokenizer, run: Run) -> None:
    """Held-out situations: router activations, then the PersonaFuse reply beside the base model's."""
    _, heldout = load_data(cfg, pf.trait_set)
    for situation in heldout[: cfg.demo_examples]:
        inputs = tokenizer.apply_chat_template(situation.situation, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        settings = dict(max_new_tokens=cfg.demo_max_new_tokens, do_sample=False, repetition_penalty=1.2,
                        pad_token_id=tokenizer.pad_token_id)
        start = inputs["input_ids"].shape[1]
        persona = pf.generate(**inputs, **settings)[0, start:]
        activations = pf.trait_activations()[0]
        with pf.adapters_disabled():
            base = pf.model.generate(**inputs, **settings)[0, start:]
        ranked = sorted(zip(pf.trait_set.traits, activations.tolist(), strict=True), key=lambda t: -abs(t[1]))
        run.log(f"\n=== {situation.id} ({situation.domain}) ===")
        run.log(f"user: {situation.situation[-1]['content']}")
        run.log("router: " + ", ".join(f"{t} {a:+.2f}" for t, a in ranked))
        run.log("target: " + ", ".join(f"{t} {a:+.2f}" for t, a in zip(pf.trait_set.traits, situation.activation_vector(pf.trait_set).tolist(), strict=True)))
        run.log(f"PersonaFuse: {tokenizer.decode(persona, skip_special_tokens=True).strip()}")
        run.log(f"base model:  {tokenizer.decode(base, skip_special_tokens=True).strip()}")


def run_reference_evaluation(cfg: DictConfig, pf, tokenizer, run: Run) -> dict:
    """Routing, steerability, end-to-end comparison and capability on the held-out splits (``make reference``)."""
    train, heldout = load_data(cfg, pf.trait_set)
    r = cfg.reference
    settings = GenerationSettings(max_new_tokens=r.max_new_tokens, batch_size=r.batch_size, repetition_penalty=r.repetition_penalty)
    out = Path(cfg.run_dir) / "reference"
    results = reference_evaluation(pf, tokenizer, [*train, *heldout], out, settings,
                                   mc_path=r.multiple_choice or sample_path("multiple_choice.jsonl"),
                                   max_situations=r.max_situations, steer_situations=r.steer_situations)
    run.log(f"\n[reference] {out / 'report.md'}\n" + report_markdown(results))
    return results


@hydra.main(config_path="../conf", config_name="pipeline", version_base="1.3")
@user_errors("pipeline")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    run = Run(cfg)
    model, tokenizer = load_model(cfg)
    pf = run_experts(cfg, run, model, tokenizer)
    pf, _ = run_router(cfg, run, pf, tokenizer)
    if cfg.demo and run.is_main:
        show_examples(cfg, pf, tokenizer, run)
        if cfg.demo_evaluation:
            settings = GenerationSettings(max_new_tokens=cfg.demo_max_new_tokens, batch_size=12, repetition_penalty=1.2)
            demo_evaluation(pf, tokenizer, spread(load_data(cfg, pf.trait_set)[1], cfg.demo_eval_situations),
                            cfg.run_dir, settings)
    if cfg.reference_eval and run.is_main:
        run_reference_evaluation(cfg, pf, tokenizer, run)
    if cfg.export_preset and run.is_main:
        export_preset(cfg, pf, run)
    if cfg.apc_dpo:
        run.log("\n[apc] distilling the APC discriminators, then APC-DPO on the bundle")
        run_discriminators(cfg, run)
        run_apc_dpo(cfg, run, pf, tokenizer)
    run.log(f"\n[pipeline] done in {time.perf_counter() - start:.0f} s; outputs in {run.dir} "
            f"(experts/, bundle/, export/, eval/, routing_report.json, routing_heatmap.png"
            f"{', discriminators/, apc_bundle/, apc_report.json' if cfg.apc_dpo else ''})")
    shutdown_distributed()


if __name__ == "__main__":
    main()
