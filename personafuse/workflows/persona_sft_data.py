"""Persona-diversified SFT data: a persona bank, then rewrite-and-verify (math) or persona voices (dialogue)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from personafuse.data import bundled_seed_paths, load_situations, make_generator
from personafuse.data.persona_dialogue import diversify_situations
from personafuse.data.persona_math import augment_math, bundled_math_path, format_report, load_problems
from personafuse.data.personas import build_persona_bank, load_personas, save_personas

TASKS = ("math", "dialogue")


def persona_bank(cfg: DictConfig, run_dir: Path):
    if cfg.personas.path:
        return load_personas(cfg.personas.path)
    bank = build_persona_bank(cfg.personas.count, cfg.personas.seed, cfg.personas.near_duplicate_threshold)
    save_personas(run_dir / "personas.jsonl", bank)
    return bank


def build_generator(cfg: DictConfig):
    return make_generator(OmegaConf.to_container(cfg.generator, resolve=True))


def run_data(cfg: DictConfig, generator=None) -> dict:
    """Build the bank, run the task, write and print the stats; returns them."""
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    personas = persona_bank(cfg, run_dir)
    generator = generator or build_generator(cfg)
    limit = slice(cfg.limit)
    if cfg.task == "math":
        problems = load_problems(cfg.input or bundled_math_path())[limit]
        m = cfg.math
        result = augment_math(problems, personas, generator, cfg.output, k1=m.k1, k2=m.k2, seed=cfg.seed,
                              keep_originals=m.keep_originals, chunk_size=m.chunk_size,
                              solve_sampling=OmegaConf.to_container(m.solve), group_by=cfg.personas.group_by,
                              rewrite_sampling=OmegaConf.to_container(m.rewrite), progress=cfg.progress)
        stats = {"run": {"processed": result.processed, "skipped": result.skipped, "failed": result.failed},
                 **result.report}
        print(f"[persona-sft-data] {result.processed} question(s) processed, {result.skipped} already done, "
              f"{result.failed} failed\n{format_report(result.report)}")
    else:
        situations = load_situations(cfg.input or bundled_seed_paths()[0])[limit]
        d = cfg.dialogue
        result = diversify_situations(situations, personas, generator, cfg.output, k=d.k, seed=cfg.seed,
                                      responses=d.responses, sampling=OmegaConf.to_container(d.sampling),
                                      progress=cfg.progress)
        stats = {"run": vars(result)}
        print(f"[persona-sft-data] variants written {result.written}, skipped {result.skipped}, "
              f"duplicates {result.duplicates}, failed {result.failed}")
    (run_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    print(f"[persona-sft-data] data in {cfg.output}, stats in {run_dir / 'stats.json'}")
    return stats
