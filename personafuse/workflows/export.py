"""Export a fixed persona blend of a trained bundle: a merged model or a blended PEFT adapter."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from personafuse import PersonaFuseModel
from personafuse.export import blend_gates, export_blended_adapter, export_merged

KINDS = ("merged", "adapter")


def run_export(cfg: DictConfig, pf: PersonaFuseModel) -> Path:
    if cfg.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {cfg.kind!r}")
    blend = OmegaConf.to_container(cfg, resolve=True)
    gates = blend_gates(pf, preset=blend["preset"], activations=blend["activations"], gates=blend["gates"],
                        context=blend["context"])
    label = cfg.preset or ("router blend" if cfg.context else "custom blend")
    out_dir = cfg.out_dir or Path(cfg.run_dir) / "export" / (Path(cfg.preset).stem if cfg.preset else "custom")
    if cfg.kind == "adapter":
        return export_blended_adapter(pf, out_dir, gates, overwrite=cfg.overwrite, label=label)
    return export_merged(pf, out_dir, gates, dtype=cfg.dtype, dequantize=cfg.dequantize, overwrite=cfg.overwrite,
                         max_shard_size=cfg.max_shard_size, label=label)
