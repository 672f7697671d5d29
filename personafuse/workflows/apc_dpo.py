"""APC-DPO: sample, score with APC, pair best against worst, DPO; APC on held-out queries before and after."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from personafuse import PersonaFuseModel
from personafuse.apc import APCScorer, bundled_data_path
from personafuse.apc.dpo import (
    PairFile,
    PersonaDPOTrainer,
    PromptBuilder,
    apc_comparison,
    drop_overlong,
    greedy_apc,
    load_queries,
    make_pairs,
    persona_queries,
    preference_dataset,
)
from personafuse.apc.personas import select_personas
from personafuse.sharding import full_weights, zero3_share
from personafuse.training.checkpointing import last_checkpoint
from personafuse.workflows.run import Run, persona_config

REFERENCES = ("precompute", "copy")


def load_stack(cfg: DictConfig, model, tokenizer) -> PersonaFuseModel:
    if cfg.bundle_dir is None:
        return PersonaFuseModel.from_base(model, persona_config(cfg), tokenizer=tokenizer)
    if not (Path(cfg.bundle_dir) / "personafuse_config.json").is_file():
        raise FileNotFoundError(f"bundle_dir={cfg.bundle_dir} holds no PersonaFuse bundle; run `personafuse pipeline` "
                                "first or pass bundle_dir=null for fresh experts")
    return PersonaFuseModel.from_pretrained(model, cfg.bundle_dir, tokenizer=tokenizer)


def run_apc_dpo(cfg: DictConfig, run: Run, pf: PersonaFuseModel, tokenizer) -> tuple[PersonaFuseModel, dict]:
    """Sample, score and pair on the train queries, DPO, and APC on the held-out ones before and after.

    ``apc.character`` names one character, a list, or ``all``: pooled characters share the DPO run and the
    held-out report, which gives the before/after change a paired bootstrap interval over all their queries.
    """
    a = cfg.apc
    if a.reference not in REFERENCES:
        raise ValueError(f"apc.reference must be one of {REFERENCES}, got {a.reference!r}")
    if zero3_share(pf.model):
        raise ValueError("apc-dpo samples and scores on the main process alone, before any trainer exists, which a base "
                         "that ZeRO-3 partitioned at load cannot run; launch it with launch/deepspeed_zero2.yaml or "
                         "launch/multi_gpu.yaml")
    character = OmegaConf.to_container(a.character) if OmegaConf.is_list(a.character) else a.character
    personas = select_personas(a.persona_file or bundled_data_path("personas.yaml"), character)
    queries_file = a.queries or bundled_data_path("queries.jsonl")
    scorer = APCScorer.from_pretrained(a.discriminators.relevance, a.discriminators.nli,
                                       batch_size=a.discriminators.batch_size)
    train_items, heldout_items = [], []
    for persona in personas:
        prompt = PromptBuilder(persona, scorer, a.system_prompt, a.top_k)
        train_items += persona_queries(persona, load_queries(queries_file, persona.character, "train")[: a.max_train_queries], prompt)
        heldout_items += persona_queries(persona, load_queries(queries_file, persona.character, "heldout")[: a.max_heldout_queries], prompt)
    names = ", ".join(p.character for p in personas)
    sampling = OmegaConf.to_container(a.sampling, resolve=True)

    before = greedy_apc(pf, tokenizer, scorer, heldout_items, a.eval_max_new_tokens)
    run.log(f"[apc] {names}: mean APC before DPO {sum(r.total for r in before) / max(len(before), 1):.3f} "
            f"on {len(heldout_items)} held-out queries")
    with run.state.main_process_first():
        pairs = PairFile(a.pairs_file)
        if run.is_main:
            make_pairs(pf, tokenizer, scorer, train_items, pairs, n=a.num_samples, margin=a.margin,
                       batch_queries=a.batch_queries, seed=cfg.seed, **sampling)
    rows = pairs.dpo_rows()
    run.log(f"[apc] {len(rows)} of {len(pairs.records)} queries gave a pair with APC margin > {a.margin} ({a.pairs_file})")

    pf.set_trainable(a.trainable)
    args = run.trainer_args(cfg.trainer.dpo, run.dir / "checkpoints" / "apc_dpo")
    rows = drop_overlong(rows, tokenizer, args.max_length)
    if rows:
        args.precompute_ref_log_probs = a.reference == "precompute"
        ref_model = copy.deepcopy(pf).requires_grad_(False).eval() if a.reference == "copy" else None
        with run.state.main_process_first():
            dataset = preference_dataset(rows, Path(a.pairs_file).parent / "dpo_dataset")
        trainer = PersonaDPOTrainer(model=pf, ref_model=ref_model, args=args, train_dataset=dataset,
                                    processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir) if cfg.resume else None)
    else:
        run.log("[apc] no pairs: DPO skipped (raise apc.num_samples or lower apc.margin)")
    pf.eval()

    after = greedy_apc(pf, tokenizer, scorer, heldout_items, a.eval_max_new_tokens)
    report = {"characters": [p.character for p in personas], "statements": {p.character: len(p.statements) for p in personas},
              "pairs": len(rows), "queries_sampled": len(pairs.records),
              **apc_comparison(heldout_items, before, after),
              "examples": [{"character": item.persona.character, "query": r.query, "before": b.response,
                            "after": r.response, "apc_before": b.total, "apc_after": r.total}
                           for item, b, r in zip(heldout_items, before, after, strict=True)]}
    with full_weights(pf):  # a collective under ZeRO-3 / FSDP2: every rank gathers, the main one writes
        if run.is_main:
            pf.save_pretrained(Path(cfg.apc_bundle_dir), overwrite=True)
            (run.dir / "apc_report.json").write_text(json.dumps(report, indent=2))
    change = report["change"]
    run.log(f"[apc] {names}: mean APC before {report['mean_apc_before']:.3f} -> after {report['mean_apc_after']:.3f} "
            f"on {len(heldout_items)} held-out queries; change {change['delta']:+.3f} "
            f"(95% CI [{change['ci_low']:+.3f}, {change['ci_high']:+.3f}]); bundle in {cfg.apc_bundle_dir}")
    if after:
        run.log(f"[apc] example: user: {after[0].query}\n{heldout_items[0].persona.character}: {after[0].response}\n"
                f"{after[0].explain()}")
    return pf, report
