"""Trainer checkpoints that are never half-written: staged in a hidden dir, then renamed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.trainer_utils import get_last_checkpoint as _hf_last_checkpoint

STAGING = ".staging"


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (staged leftovers of a killed run are ignored)."""
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir / STAGING, ignore_errors=True)
    return _hf_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


class AtomicCheckpointMixin:
    """Mix into a ``transformers.Trainer``: every rank writes into ``<output_dir>/.staging``, then the
    main process renames the finished ``checkpoint-N`` into place, so a ``kill -9`` mid-save leaves
    only the previous complete checkpoint behind."""

    def _save_checkpoint(self, model, trial):
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING)
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
