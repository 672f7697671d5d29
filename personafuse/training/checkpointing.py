"""Trainer checkpoints that are never half-written: staged in a hidden dir, then renamed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.trainer_utils import get_last_checkpoint as _hf_last_checkpoint

from personafuse.checkpoint import load_weights

STAGING = ".staging"


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (staged leftovers of a killed run are ignored)."""
    output_dir = Path(output_dir)
    return _hf_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


class AtomicCheckpointMixin:
    """Mix into a ``transformers.Trainer``: every rank writes into ``<output_dir>/.staging``, then the
    main process renames the finished ``checkpoint-N`` into place, so a ``kill -9`` mid-save leaves
    only the previous complete checkpoint behind."""

    def _save_checkpoint(self, model, trial):
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING)
        if self.args.should_save:  # leftovers of a killed save must not mix into this one
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
        steps = sorted(int(m.group(1)) for p in os.listdir(run_dir) if (m := pattern.match(p)))
        for step in steps[:-limit]:
            shutil.rmtree(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"), ignore_errors=True)


class BundleCheckpointMixin:
    """Mix into a ``transformers.Trainer`` over a ``PersonaFuseModel``: checkpoints hold the bundle
    (router + experts), not a state dict that repeats the frozen base (and trips over tied weights)."""

    BUNDLE = "personafuse"

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:  # transformers calls ``_save`` on every rank; one writer
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(Path(output_dir) / self.BUNDLE, overwrite=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_weights(self.accelerator.unwrap_model(model or self.model), Path(resume_from_checkpoint) / self.BUNDLE)
