import warnings

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from personafuse.training.runs import FailSafeWandbCallback, configure_logger


def test_none_logger_has_no_callbacks():
    assert configure_logger("none")() == []
    with pytest.raises(ValueError, match="logger.kind"):
        configure_logger("tensorboard")


def test_wandb_failure_never_stops_training(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    callbacks = configure_logger("wandb_offline", run_name="t")()
    assert len(callbacks) == 1 and isinstance(callbacks[0], FailSafeWandbCallback)

    def broken_init(*args, **kwargs):
        raise ConnectionError("wandb service unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setattr(wandb, "run", None)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    callback, state, control = callbacks[0], TrainerState(), TrainerControl()
    state.is_world_process_zero = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(args, state, control, model=None)
        callback.on_log(args, state, control, logs={"loss": 1.0})
    assert callback.failed
    assert any("wandb logging failed" in str(w.message) for w in caught)
