"""Export a fixed persona blend of a trained bundle: a merged model or a blended PEFT adapter.

    python recipes/export.py preset=counselor                       # outputs/<run>/export/counselor
    python recipes/export.py preset=null activations='{openness: 0.8, extraversion: 0.6}' out_dir=/models/pf-tutor
    python recipes/export.py preset=support_agent kind=adapter      # serve with vLLM --enable-lora
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
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
    if cfg.kind == "adapter":
        return export_blended_adapter(pf, cfg.out_dir, gates, overwrite=cfg.overwrite, label=label)
    return export_merged(pf, cfg.out_dir, gates, dtype=cfg.dtype, dequantize=cfg.dequantize, overwrite=cfg.overwrite,
                         max_shard_size=cfg.max_shard_size, label=label)


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model, tokenizer = instantiate(cfg.model)
    pf = PersonaFuseModel.from_pretrained(model, cfg.bundle_dir, tokenizer=tokenizer)
    print(f"[export] wrote {run_export(cfg, pf)}")


if __name__ == "__main__":
    main()
