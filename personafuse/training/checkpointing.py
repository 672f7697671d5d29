"""Trainer checkpoints that are never half-written: staged in a hidden dir, then renamed."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from personafuse.checkpoint import CheckpointError, load_weights, safetensors_problem
from personafuse.sharding import full_weights

STAGING = ".staging"
TORCH_FILES = (".pt", ".pth", ".bin")


def checkpoint_problem(path: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None. Reads headers only: every JSON file parses,
    every safetensors header covers its file, every torch file is a complete zip (truncation breaks each)."""
    if not (path / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path)
        if file.suffix == ".json":
            try:
                json.loads(file.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return f"{name} is not valid JSON ({e})"
        elif file.suffix == ".safetensors" and (problem := safetensors_problem(file)):
            return f"{name.parent / problem}"
        elif file.suffix in TORCH_FILES and not zipfile.is_zipfile(file):
            return f"{name} is truncated or not a torch file"
    return None


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``. Damaged newer ones (a kill mid-write outside our
    staging, a full disk) are named in a warning and skipped; if every one is damaged, that is an error."""
    output_dir = Path(output_dir)
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = sorted(((int(m.group(1)), p) for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                    if p.is_dir() and (m := pattern.match(p.name))), reverse=True) if output_dir.is_dir() else []
    damaged = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                warnings.warn(f"skipping damaged checkpoint(s) {'; '.join(damaged)}; resuming from {path}", stacklevel=2)
            return str(path)
        damaged.append(f"{path}: {problem}")
    if damaged:
        raise CheckpointError(f"no complete checkpoint to resume from: {'; '.join(damaged)}. Delete them to start "
                              f"over, or pass resume=false")
    return None


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
        # transformers calls ``_save`` on every rank under DeepSpeed and FSDP full state dicts: under ZeRO-3 /
        # FSDP2 every rank joins the gather of the expert and router weights (not the base), one rank writes.
        # Trainer's ``state_dict`` is not used: under ZeRO-3 it is a 16-bit copy of the whole model
        # (stage3_gather_16bit_weights_on_model_save), here the fp32 masters are written.
        self._save_bundle(output_dir)

    def _save_bundle(self, output_dir: str) -> None:
        pf = self.accelerator.unwrap_model(self.model)
        with full_weights(pf):
            if self.args.should_save:
                pf.save_pretrained(Path(output_dir) / self.BUNDLE, overwrite=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            self._save_bundle(output_dir or self.args.output_dir)  # a sharded state dict never reaches ``_save``

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pf = self.accelerator.unwrap_model(model or self.model)
        with full_weights(pf, write_back=True):
            load_weights(pf, Path(resume_from_checkpoint) / self.BUNDLE)
