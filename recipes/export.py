"""Export a fixed persona blend of a trained bundle: a merged model or a blended PEFT adapter.

    python recipes/export.py preset=counselor                       # outputs/<run>/export/counselor
    python recipes/export.py preset=tutor kind=adapter              # serve with vLLM --enable-lora
    python recipes/export.py preset=my_blend.yaml                   # a preset file of your own
    python recipes/export.py preset=null activations='{openness: 0.8, extraversion: 0.6}' out_dir=/models/pf-tutor
    python recipes/export.py preset=null gates='{extraversion_high: 0.7, agreeableness_high: 0.3}'
    python recipes/export.py preset=null gates='[0.5,0,0,0,0.5,0,0,0,0,0]'   # K gates in expert order
    python recipes/export.py preset=null context='My order is late again.'   # the router chooses
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
    out_dir = cfg.out_dir or Path(cfg.run_dir) / "export" / (Path(cfg.preset).stem if cfg.preset else "custom")
    if cfg.kind == "adapter":
        return export_blended_adapter(pf, out_dir, gates, overwrite=cfg.overwrite, label=label)
    return export_merged(pf, out_dir, gates, dtype=cfg.dtype, dequantize=cfg.dequantize, overwrite=cfg.overwrite,
                         max_shard_size=cfg.max_shard_size, label=label)


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model, tokenizer = instantiate(cfg.model)
    pf = PersonaFuseModel.from_pretrained(model, cfg.bundle_dir, tokenizer=tokenizer)
    print(f"[export] wrote {run_export(cfg, pf)}")


if __name__ == "__main__":
    main()
