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

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from personafuse import PersonaFuseModel
from personafuse.cli import user_errors
from personafuse.workflows.export import run_export


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@user_errors("export")
def main(cfg: DictConfig) -> None:
    model, tokenizer = instantiate(cfg.model)
    pf = PersonaFuseModel.from_pretrained(model, cfg.bundle_dir, tokenizer=tokenizer)
    print(f"[export] wrote {run_export(cfg, pf)}")


if __name__ == "__main__":
    main()
