"""The recipes end to end on a tiny random chat model (CPU): in-process through Hydra's compose API,
multirun, config and data errors, resume after ``kill -9``, 2-process DDP and DeepSpeed ZeRO-2."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RECIPES = REPO / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))

from pipeline import show_examples  # noqa: E402

from personafuse.data import DataError, bundled_seed_paths  # noqa: E402
from personafuse.traits import BIG_FIVE  # noqa: E402
from personafuse.workflows.experts import run_experts  # noqa: E402
from personafuse.workflows.router import build_stack, run_router  # noqa: E402
from personafuse.workflows.run import Run, load_data, load_model  # noqa: E402

ALL_POLES = list(BIG_FIVE.expert_names)
ALL_POLES_ONCE = "trainer.expert.max_steps=5"  # batches of 2 interleave the poles: every expert trains
TINY = [
    "experts.r=2", "experts.alpha=4",
    "trainer.expert.max_steps=2", "trainer.expert.per_device_train_batch_size=2", "trainer.router.max_steps=2",
    "data.max_length=512", "trainer.expert.disable_tqdm=true", "+trainer.router.disable_tqdm=true",
]
SUBPROCESS_TIMEOUT = 300


def tiny_overrides(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """TINY settings; an ``extra`` override of the same key replaces the TINY one."""
    by_key = {o.split("=", 1)[0]: o for o in [f"model.path={model_dir}", f"run_dir={run_dir}", *TINY, *extra]}
    return list(by_key.values())


def compose_cfg(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def assert_peft_loads(model_dir: Path, adapter_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters()), adapter_dir
    nonzero_b = [t for k, t in adapter_tensors(adapter_dir).items() if "lora_B" in k]
    assert nonzero_b and any(t.abs().sum() > 0 for t in nonzero_b), f"{adapter_dir}: lora_B never trained"


def assert_expert_set(run_dir: Path, expected: list[str]) -> None:
    experts_dir = run_dir / "experts"
    found = sorted(p.name for p in experts_dir.iterdir())
    assert found == sorted(expected), f"{experts_dir} holds {found}, expected {sorted(expected)}"
    for name in expected:
        assert (experts_dir / name / "adapter_model.safetensors").is_file()
        assert (experts_dir / name / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------------------------
# subprocess helpers


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def tail(text: str, lines: int = 60) -> str:
    """The last lines, plus every traceback line before them (a crashed rank's error is often earlier)."""
    all_lines = text.splitlines()
    earlier = [line for line in all_lines[:-lines] if "Error" in line or line.lstrip().startswith("File ")]
    return "\n".join([*earlier[-40:], "...", *all_lines[-lines:]])


def run_cmd(cmd: list[str], env: dict[str, str] | None = None, timeout: int = SUBPROCESS_TIMEOUT) -> str:
    """Run ``cmd`` from the repository root; returns stdout+stderr, fails with its tail."""
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n--- output tail ---\n{tail(out)}")
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n--- output tail ---\n{tail(proc.stdout)}"
    return proc.stdout


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(*launch_args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *launch_args]


# --------------------------------------------------------------------------------------------------
# in-process: Hydra compose + the recipes' run functions


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    """All ten experts, then the router, in one run dir (train_experts.yaml, then train_router.yaml)."""
    run_dir = tmp_path_factory.mktemp("e2e")
    cfg = compose_cfg("train_experts", tiny_overrides(tiny_model_dir, run_dir, ALL_POLES_ONCE))
    model, tokenizer = load_model(cfg)
    run_experts(cfg, Run(cfg), model, tokenizer)

    cfg = compose_cfg("train_router", tiny_overrides(tiny_model_dir, run_dir))
    model, tokenizer = load_model(cfg)
    run_router(cfg, Run(cfg), build_stack(cfg, model, tokenizer), tokenizer)
    return run_dir


def test_train_experts_writes_loadable_peft_adapters(trained_run, tiny_model_dir):
    assert_expert_set(trained_run, ALL_POLES)
    for name in ("openness_high", "neuroticism_low"):
        assert_peft_loads(tiny_model_dir, trained_run / "experts" / name)
    assert not list((trained_run / "experts").glob(".*")), "temporary dirs left in experts/"


def test_train_router_writes_bundle_report_and_heatmap(trained_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personafuse import PersonaFuseModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pf = PersonaFuseModel.from_pretrained(base, trained_run / "bundle", tokenizer=tokenizer)
    assert sorted(pf.expert_names) == sorted(ALL_POLES)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = pf(**ids).logits
    assert torch.isfinite(logits).all()

    report = json.loads((trained_run / "routing_report.json").read_text())
    assert 0.0 <= report["top_pole_accuracy"] <= 1.0
    assert 0.0 <= report["top_trait_accuracy"] <= 1.0
    _, heldout = bundled_seed_paths()
    assert len(report["ids"]) == sum(1 for line in heldout.read_text().splitlines() if line.strip())
    assert sorted(report["load"]) == sorted(ALL_POLES)

    heatmap = trained_run / "routing_heatmap.png"
    assert heatmap.is_file() and heatmap.stat().st_size > 0
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_only_router_trains_on_cached_features_with_pole_gating(trained_run, tiny_model_dir, tmp_path):
    """router=poles with loss.lm=0: contexts are encoded once into the run dir and the head fits on them."""
    overrides = tiny_overrides(tiny_model_dir, tmp_path, "router=poles", f"experts_dir={trained_run / 'experts'}",
                               "trainer.router.max_steps=20")
    cfg = compose_cfg("train_router", overrides)
    model, tokenizer = load_model(cfg)
    pf, report = run_router(cfg, Run(cfg), build_stack(cfg, model, tokenizer), tokenizer)
    assert (tmp_path / "router_features.safetensors").is_file()
    assert not list((tmp_path / "checkpoints").glob("router/checkpoint-*"))  # no Trainer run
    assert pf.persona_config.router.gating == "poles" and (tmp_path / "bundle" / "personafuse_config.json").is_file()
    gates = torch.tensor(report["predicted_activations"])
    assert gates.shape == (len(report["ids"]), 5) and gates.abs().max() > 0


def test_labels_only_router_refuses_a_base_partitioned_at_load(tiny_model_dir, tmp_path, capsys):
    """Cached features are encoded outside the trainer, which a ZeRO-3 partitioned base cannot run."""
    from personafuse import PersonaFuseModel
    from personafuse.workflows.run import persona_config

    cfg = compose_cfg("train_router", tiny_overrides(tiny_model_dir, tmp_path, "router=poles"))
    model, tokenizer = load_model(cfg)
    pf = PersonaFuseModel.from_base(model, persona_config(cfg), tokenizer=tokenizer)
    weight = model.get_input_embeddings().weight  # marked the way DeepSpeed marks a partitioned parameter
    weight.ds_id, weight.ds_numel, weight.ds_tensor = 0, weight.numel(), weight.detach().flatten()[: weight.numel() // 2]
    with pytest.raises(ValueError, match="router.cached_features=true .* ZeRO-3 partitioned at load"):
        run_router(cfg, Run(cfg), pf, tokenizer)
    held = weight.numel() // 2
    assert f"[zero3] base partitioned at load: this rank holds {held:,} of {weight.numel():,}" in capsys.readouterr().out
    assert not (tmp_path / "router_features.safetensors").exists()


def test_pipeline_resumes_finished_experts_and_prints_demo(trained_run, tiny_model_dir, tmp_path, capsys):
    """pipeline.yaml in-process: finished experts are skipped (resume), the missing one trains, the router
    trains, and the demo prints activations and both replies."""
    run_dir = tmp_path / "pipeline"
    missing = "agreeableness_low"
    for name in ALL_POLES:
        if name != missing:
            shutil.copytree(trained_run / "experts" / name, run_dir / "experts" / name)
    cfg = compose_cfg("pipeline", tiny_overrides(tiny_model_dir, run_dir, "demo=true", "demo_examples=1",
                                                 "demo_max_new_tokens=4"))
    run = Run(cfg)
    model, tokenizer = load_model(cfg)
    pf = run_experts(cfg, run, model, tokenizer)
    pf, report = run_router(cfg, run, pf, tokenizer)
    show_examples(cfg, pf, tokenizer, run)
    out = capsys.readouterr().out
    skipped = next(line for line in out.splitlines() if "already trained" in line)
    assert skipped.split("skipping: ")[1].split(", ") == [n for n in ALL_POLES if n != missing]
    assert f"[experts] training 1 expert(s) in one run: {missing}" in out
    assert_expert_set(run_dir, ALL_POLES)
    assert (run_dir / "bundle").is_dir() and (run_dir / "routing_report.json").is_file()
    for line in ("router: ", "target: ", "PersonaFuse: ", "base model: "):
        assert line in out, out


def test_one_pole_trains_only_that_expert(tiny_model_dir, tmp_path):
    cfg = compose_cfg("train_experts", tiny_overrides(tiny_model_dir, tmp_path, "experts.only=extraversion_high"))
    model, tokenizer = load_model(cfg)
    run_experts(cfg, Run(cfg), model, tokenizer)
    assert_expert_set(tmp_path, ["extraversion_high"])
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "experts").iterdir()) == ["extraversion_high"]


@pytest.mark.slow
def test_multirun_two_poles(tiny_model_dir, tmp_path):
    out = run_cmd([sys.executable, "recipes/train_experts.py", "-m", "experts.only=openness_high,openness_low",
                   *tiny_overrides(tiny_model_dir, tmp_path)])
    assert_expert_set(tmp_path, ["openness_high", "openness_low"])
    assert out.count("[experts] 1 expert(s) in ") == 2, tail(out)
    for name in ("openness_high", "openness_low"):
        assert_peft_loads(tiny_model_dir, tmp_path / "experts" / name)


# --------------------------------------------------------------------------------------------------
# config and data errors name what is wrong


@pytest.mark.parametrize("override, key", [
    ("trainer.expert.lerning_rate=1", "lerning_rate"),
    ("experts.rank=4", "rank"),
    ("data.max_lenght=64", "max_lenght"),
    ("trainer.router.max_step=3", "max_step"),
])
def test_mistyped_override_fails_naming_the_key(tiny_model_dir, tmp_path, override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("train_router", tiny_overrides(tiny_model_dir, tmp_path, override))
    assert key in str(err.value) + str(err.value.__cause__)


def test_appended_unknown_trainer_key_fails_naming_the_key(tiny_model_dir, tmp_path):
    """``+trainer.expert.x=...`` gets past Hydra; the trainer config class still rejects it by name."""
    cfg = compose_cfg("train_experts", tiny_overrides(tiny_model_dir, tmp_path, "+trainer.expert.lerning_rate=1"))
    with pytest.raises(TypeError, match="lerning_rate"):
        Run(cfg).trainer_args(cfg.trainer.expert, tmp_path / "out")


def test_unknown_expert_in_only_fails_naming_it(tiny_model_dir, tmp_path):
    cfg = compose_cfg("train_experts", tiny_overrides(tiny_model_dir, tmp_path, "experts.only=extraversion_hihg"))
    model, tokenizer = load_model(cfg)
    with pytest.raises(KeyError, match="extraversion_hihg"):
        run_experts(cfg, Run(cfg), model, tokenizer)
    assert not (tmp_path / "experts").exists()


def _seed_record() -> dict:
    train, _ = bundled_seed_paths()
    return json.loads(next(line for line in train.read_text().splitlines() if line.strip()))


def _bad_missing_pole(record: dict) -> str:
    del record["responses"]["conscientiousness_low"]
    return json.dumps(record)


def _bad_activation(record: dict) -> str:
    record["activations"]["extraversion"] = 1.5
    return json.dumps(record)


def _bad_trait(record: dict) -> str:
    record["activations"]["humour"] = 0.2
    return json.dumps(record)


@pytest.mark.parametrize("make_bad_line, field, message", [
    (lambda record: json.dumps(record)[:-7], None, "invalid JSON"),
    (_bad_missing_pole, "responses.conscientiousness_low", "conscientiousness_low"),
    (_bad_activation, "activations.extraversion", "[-1, 1]"),
    (_bad_trait, "activations.humour", "humour"),
], ids=["bad_json", "missing_pole", "activation_out_of_range", "unknown_trait"])
def test_data_errors_name_file_and_line(tiny_model_dir, tmp_path, make_bad_line, field, message):
    good = _seed_record()
    lines = [json.dumps({**good, "id": f"ok-{i}"}) for i in range(2)]
    lines.insert(1, "")  # blank lines are skipped but still counted
    lines.append(make_bad_line({**json.loads(json.dumps(good)), "id": "bad"}))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = compose_cfg("train_experts", tiny_overrides(tiny_model_dir, tmp_path / "run", f"data.train={path}"))
    model, tokenizer = load_model(cfg)
    with pytest.raises(DataError) as err:
        run_experts(cfg, Run(cfg), model, tokenizer)
    text = str(err.value)
    assert f"{path}:4:" in text, text
    assert message in text, text
    assert err.value.line == 4 and Path(err.value.path) == path
    if field is not None:
        assert err.value.field == field and repr(field) in text, text
    # the same through the heldout path and the recipes' shared loader
    cfg = compose_cfg("train_router", tiny_overrides(tiny_model_dir, tmp_path / "run", f"data.heldout={path}"))
    with pytest.raises(DataError, match=rf"{path}:4:"):
        load_data(cfg, BIG_FIVE)


# --------------------------------------------------------------------------------------------------
# resume after kill -9


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_adapter(tiny_model_dir, tmp_path):
    pole = "conscientiousness_high"
    # save_total_limit=null keeps every checkpoint, so the test can see which ones the rerun rewrote
    steps = ["trainer.expert.max_steps=8", "trainer.expert.save_steps=2", "trainer.expert.save_total_limit=null",
             f"experts.only={pole}"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "recipes/train_experts.py", *tiny_overrides(tiny_model_dir, killed, *steps)]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        checkpoint = killed / "checkpoints" / "experts" / pole / "checkpoint-4"
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        try:
            while not checkpoint.exists():
                if proc.poll() is not None:
                    pytest.fail(f"run ended (exit {proc.returncode}) before {checkpoint.name} appeared\n"
                                f"{tail(log.read_text())}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {checkpoint} after {SUBPROCESS_TIMEOUT} s\n{tail(log.read_text())}")
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    final = killed / "experts" / pole
    assert not (final / "adapter_model.safetensors").exists(), "killed too late: the final adapter was already written"

    kept = {p.name: p.stat().st_ino for p in checkpoint.parent.glob("checkpoint-*")}
    assert "checkpoint-4" in kept, kept
    run_cmd(cmd)  # resume=true is the default
    after = {p.name: p.stat().st_ino for p in checkpoint.parent.glob("checkpoint-*")}
    assert {"checkpoint-6", "checkpoint-8"} <= after.keys(), after
    # resumed, not restarted: the complete checkpoints of the killed run were not rewritten
    assert all(after[name] == ino for name, ino in kept.items()), (kept, after)
    assert not list((checkpoint.parent / ".staging").glob("checkpoint-*")), "half-staged checkpoint left behind"
    resumed = adapter_tensors(final)
    assert_peft_loads(tiny_model_dir, final)

    # the uninterrupted run, same seed and config, in-process (saves a process start-up)
    reference_dir = tmp_path / "uninterrupted"
    cfg = compose_cfg("train_experts", tiny_overrides(tiny_model_dir, reference_dir, *steps))
    model, tokenizer = load_model(cfg)
    run_experts(cfg, Run(cfg), model, tokenizer)
    reference = adapter_tensors(reference_dir / "experts" / pole)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], rtol=0, atol=1e-6), \
            f"{key}: max diff {(resumed[key] - reference[key]).abs().max():.3g}"


# --------------------------------------------------------------------------------------------------
# two processes on the CPU: DDP (gloo) and DeepSpeed ZeRO-2

NOT_DDP = "parallel_mode != ParallelMode.DISTRIBUTED"  # transformers' warning when ranks train alone


DDP_POLE = "openness_high"


@pytest.fixture(scope="module")
def ddp_run(trained_run, tiny_model_dir, tmp_path_factory) -> tuple[Path, str, str]:
    """Both recipes under DDP (2 gloo processes): the reference the ZeRO-3 runs are compared with."""
    run_dir = tmp_path_factory.mktemp("ddp")
    env = subprocess_env(ACCELERATE_USE_CPU="1")
    launch = accelerate_cmd("--multi_gpu", "--num_processes", "2")
    experts = run_cmd([*launch, "recipes/train_experts.py", "launcher=cpu_gloo",
                       *tiny_overrides(tiny_model_dir, run_dir, f"experts.only={DDP_POLE}")], env=env)
    router = run_cmd([*launch, "recipes/train_router.py", "launcher=cpu_gloo", f"experts_dir={trained_run / 'experts'}",
                      *tiny_overrides(tiny_model_dir, run_dir)], env=env)
    return run_dir, experts, router


@pytest.mark.slow
def test_ddp_two_processes_both_recipes(ddp_run, tiny_model_dir):
    run_dir, out, router_out = ddp_run
    assert NOT_DDP not in out, tail(out)
    assert out.count("[experts] 1 expert(s)") == 1, tail(out)  # only rank 0 logs
    assert_expert_set(run_dir, [DDP_POLE])
    assert_peft_loads(tiny_model_dir, run_dir / "experts" / DDP_POLE)
    checkpoints = run_dir / "checkpoints" / "experts" / DDP_POLE
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())
    assert sorted(p.name for p in (checkpoints / "checkpoint-2").glob("rng_state_*.pth")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]
    assert state["global_step"] == 2

    assert NOT_DDP not in router_out, tail(router_out)
    assert router_out.count("[router] held-out top-pole accuracy") == 1, tail(router_out)
    assert (run_dir / "bundle").is_dir()
    report = json.loads((run_dir / "routing_report.json").read_text())
    assert 0.0 <= report["top_pole_accuracy"] <= 1.0
    assert (run_dir / "routing_heatmap.png").stat().st_size > 0
    assert not list(run_dir.glob(".bundle.*")), "temporary bundle dirs left behind"


@pytest.mark.slow
def require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install '.[distributed]')")
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"deepspeed is not importable: {e!r}")


def test_deepspeed_zero2_two_processes_train_experts(tiny_model_dir, tmp_path):
    require_deepspeed()
    env = subprocess_env(ACCELERATE_USE_DEEPSPEED="true")
    run_dir = tmp_path / "zero2"
    # launch/deepspeed_zero2.yaml unchanged (bf16 "auto" follows the recipe, which turns bf16 off on CPU)
    out = run_cmd([*accelerate_cmd("--config_file", "launch/deepspeed_zero2.yaml", "--num_processes", "2"),
                   "recipes/train_experts.py", "launcher=cpu_gloo",
                   *tiny_overrides(tiny_model_dir, run_dir, "experts.only=agreeableness_high")], env=env)
    assert out.count("[experts] 1 expert(s)") == 1, tail(out)
    assert_expert_set(run_dir, ["agreeableness_high"])
    assert_peft_loads(tiny_model_dir, run_dir / "experts" / "agreeableness_high")
    # a ZeRO checkpoint: optimizer state sharded over the two ranks
    step_dir = run_dir / "checkpoints" / "experts" / "agreeableness_high" / "checkpoint-2" / "global_step2"
    shards = sorted(p.name for p in step_dir.glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], \
        f"{step_dir}: {shards}\n{tail(out)}"


# --------------------------------------------------------------------------------------------------
# two processes on the CPU: DeepSpeed ZeRO-3 (launch/deepspeed_zero3.yaml unchanged: zero3_init_flag on)

ZERO3_PARTITIONED = "[zero3] base partitioned at load: this rank holds"


def zero3_launch() -> tuple[list[str], dict[str, str]]:
    require_deepspeed()
    return (accelerate_cmd("--config_file", "launch/deepspeed_zero3.yaml", "--num_processes", "2"),
            subprocess_env(ACCELERATE_USE_DEEPSPEED="true"))


def assert_tensors_close(path: Path, reference: Path, atol: float = 1e-6) -> None:
    ours, theirs = load_file(str(path)), load_file(str(reference))
    assert ours.keys() == theirs.keys(), f"{path}: keys differ from {reference}"
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, f"{path}: {key} {ours[key].shape} vs {theirs[key].shape}"
        diff = (ours[key] - theirs[key]).abs().max().item()
        assert diff <= atol, f"{path}: {key} differs from {reference} by {diff:.3g}"


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_train_experts_equals_ddp(ddp_run, tiny_model_dir, tmp_path):
    """Expert SFT under ZeRO-3 with the base partitioned at load: the expert equals the DDP run's (same seed,
    same 2 x 2 batches); only LoRA and router weights are gathered to write it."""
    launch, env = zero3_launch()
    ddp_dir = ddp_run[0]
    run_dir = tmp_path / "zero3"
    out = run_cmd([*launch, "recipes/train_experts.py", "launcher=cpu_gloo",
                   *tiny_overrides(tiny_model_dir, run_dir, f"experts.only={DDP_POLE}")], env=env)
    assert out.count(ZERO3_PARTITIONED) == 1, tail(out)
    assert_expert_set(run_dir, [DDP_POLE])
    assert_peft_loads(tiny_model_dir, run_dir / "experts" / DDP_POLE)
    assert_tensors_close(run_dir / "experts" / DDP_POLE / "adapter_model.safetensors",
                         ddp_dir / "experts" / DDP_POLE / "adapter_model.safetensors")
    step_dir = run_dir / "checkpoints" / "experts" / DDP_POLE / "checkpoint-2"
    # the checkpoint's bundle (Trainer._save: every rank gathers, rank 0 writes) is the DDP checkpoint's
    ddp_step_dir = ddp_dir / "checkpoints" / "experts" / DDP_POLE / "checkpoint-2"
    for name in ("router.safetensors", f"experts/{DDP_POLE}/adapter_model.safetensors"):
        assert_tensors_close(step_dir / "personafuse" / name, ddp_step_dir / "personafuse" / name)
    # the frozen base is never gathered into a 16-bit copy at save (stage3_gather_16bit_weights_on_model_save)
    assert not list(step_dir.glob("*.safetensors")) and not list(step_dir.glob("pytorch_model*")), \
        sorted(p.name for p in step_dir.iterdir())


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_train_router_equals_ddp(ddp_run, trained_run, tiny_model_dir, tmp_path):
    """Router training under ZeRO-3 over the same experts: bundle, held-out gates and base fingerprint equal the
    DDP run's, and the bundle loads onto an unsharded base."""
    launch, env = zero3_launch()
    ddp_dir = ddp_run[0]
    run_dir = tmp_path / "zero3"
    out = run_cmd([*launch, "recipes/train_router.py", "launcher=cpu_gloo", f"experts_dir={trained_run / 'experts'}",
                   *tiny_overrides(tiny_model_dir, run_dir)], env=env)
    assert out.count(ZERO3_PARTITIONED) == 1 and out.count("[router] held-out top-pole accuracy") == 1, tail(out)
    bundle, ddp_bundle = run_dir / "bundle", ddp_dir / "bundle"
    assert_tensors_close(bundle / "router.safetensors", ddp_bundle / "router.safetensors")
    for name in ALL_POLES:
        assert_tensors_close(bundle / "experts" / name / "adapter_model.safetensors",
                             ddp_bundle / "experts" / name / "adapter_model.safetensors")
    # the fingerprint of the partitioned base (computed on gathered values) is the unpartitioned one
    meta = json.loads((bundle / "personafuse_config.json").read_text())["base_model"]
    assert meta == json.loads((ddp_bundle / "personafuse_config.json").read_text())["base_model"]
    routed = json.loads((run_dir / "routing_report.json").read_text())["predicted_activations"]
    expected = json.loads((ddp_dir / "routing_report.json").read_text())["predicted_activations"]
    assert torch.allclose(torch.tensor(routed), torch.tensor(expected), atol=1e-5)

    from transformers import AutoModelForCausalLM

    from personafuse import PersonaFuseModel

    pf = PersonaFuseModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), bundle)
    assert sorted(pf.expert_names) == sorted(ALL_POLES)


@pytest.mark.slow
def test_deepspeed_zero3_resumes_after_kill(tiny_model_dir, tmp_path):
    """SIGKILL after the first checkpoint, rerun under ZeRO-3: resumed from the DeepSpeed checkpoint (not
    restarted), and the expert equals the uninterrupted ZeRO-3 run's."""
    launch, env = zero3_launch()
    steps = ["trainer.expert.max_steps=4", "trainer.expert.save_steps=2", "trainer.expert.save_total_limit=null",
             f"experts.only={DDP_POLE}"]
    killed = tmp_path / "killed"
    cmd = [*launch, "recipes/train_experts.py", "launcher=cpu_gloo", *tiny_overrides(tiny_model_dir, killed, *steps)]
    checkpoint = killed / "checkpoints" / "experts" / DDP_POLE / "checkpoint-2"
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        try:
            while not checkpoint.exists():
                if proc.poll() is not None:
                    pytest.fail(f"run ended (exit {proc.returncode}) before {checkpoint.name} appeared\n"
                                f"{tail(log.read_text())}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {checkpoint} after {SUBPROCESS_TIMEOUT} s\n{tail(log.read_text())}")
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    final = killed / "experts" / DDP_POLE
    assert not (final / "adapter_model.safetensors").exists(), "killed too late: the final adapter was already written"
    kept = checkpoint.stat().st_ino

    run_cmd(cmd, env=env)
    assert checkpoint.stat().st_ino == kept, "checkpoint-2 was rewritten: the run restarted instead of resuming"
    assert (checkpoint.parent / "checkpoint-4" / "personafuse" / "router.safetensors").is_file()
    assert_peft_loads(tiny_model_dir, final)

    reference = tmp_path / "uninterrupted"
    run_cmd([*launch, "recipes/train_experts.py", "launcher=cpu_gloo", *tiny_overrides(tiny_model_dir, reference, *steps)],
            env=env)
    assert_tensors_close(final / "adapter_model.safetensors", reference / "experts" / DDP_POLE / "adapter_model.safetensors")
