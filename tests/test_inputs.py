"""Bad inputs fail early and clearly: config values, data files, the export recipe's blend options, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.cli import main
from personafuse.data import DataError, bundled_seed_paths, load_situations
from personafuse.export import BLEND_FILE, ExportError, blend_gates
from personafuse.inference import generate_replies
from personafuse.traits import BIG_FIVE
from personafuse.workflows.export import run_export
from personafuse.workflows.run import Run, load_data
from tests.tiny_models import randomize_experts

REPO = Path(__file__).resolve().parents[1]

TINY_STACK = dict(r=2, alpha=4.0, dropout=0.0)


def compose_cfg(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def seed_record(**changes) -> dict:
    train, _ = bundled_seed_paths()
    record = json.loads(next(line for line in train.read_text().splitlines() if line.strip()))
    return {**record, **changes}


@pytest.fixture(scope="module")
def stack(tiny_model_dir) -> PersonaFuseModel:
    """A stack with random (non-zero) experts on the tiny chat model, and its bundle beside it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pf = PersonaFuseModel.from_base(model, PersonaFuseConfig(**TINY_STACK), tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    randomize_experts(pf)
    return pf.eval()


@pytest.fixture(scope="module")
def bundle(stack, tmp_path_factory) -> Path:
    return stack.save_pretrained(tmp_path_factory.mktemp("inputs") / "bundle")


# --------------------------------------------------------------------------------------------------
# config values: checked by name before any model loads


@pytest.mark.parametrize("kwargs, error, message", [
    ({"alpha": 0}, ValueError, "alpha must be > 0"),
    ({"alpha": -1.0}, ValueError, "alpha must be > 0"),
    ({"r": "8"}, TypeError, "r must be an integer, got '8'"),
    ({"r": True}, TypeError, "r must be an integer"),
    ({"dropout": "0.1"}, TypeError, "dropout must be a number"),
    ({"router": {"temperature": "hot"}}, TypeError, "router.temperature must be a number"),
])
def test_persona_config_rejects_wrong_types_and_do_nothing_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        PersonaFuseConfig(**kwargs)


@pytest.mark.parametrize("override, error, message", [
    ("experts.alpha=0", ValueError, "experts.alpha must be > 0"),
    ("experts.r=abc", TypeError, "experts.r must be an integer, got 'abc'"),
    ("router.config.temperature=abc", TypeError, "router.config.temperature must be a number"),
    ("trainer.expert.max_steps=0", ValueError, "trainer.expert.max_steps=0 trains nothing"),
    ("trainer.expert.max_steps=abc", TypeError, "trainer.expert.max_steps must be an integer, got 'abc'"),
    ("trainer.router.max_steps=-5", ValueError, "trainer.router.max_steps=-5 trains nothing"),
    ("trainer.expert.learning_rate=0", ValueError, "trainer.expert.learning_rate must be > 0"),
    ("trainer.router.save_steps=often", TypeError, "trainer.router.save_steps must be a number"),
    ("trainer.expert.completion_only_loss=maybe", TypeError, "trainer.expert.completion_only_loss must be true or false"),
    ("data.max_length=abc", TypeError, "data.max_length must be an integer"),
    ("+trainer.expert.packing=true", ValueError, r"trainer.expert.packing=true is not supported.*packing=false"),
    ("+trainer.dpo.padding_free=true", ValueError, r"trainer.dpo.padding_free=true is not supported"),
])
def test_recipe_config_errors_name_the_key_before_the_model_loads(tmp_path, override, error, message):
    """``Run(cfg)`` is the first thing every recipe builds, before ``load_model``."""
    cfg = compose_cfg("pipeline", [f"run_dir={tmp_path}", "model.path=/nonexistent", override])
    with pytest.raises(error, match=message):
        Run(cfg)


def test_valid_recipe_configs_pass_the_checks(tmp_path):
    for name in ("train_experts", "train_router", "pipeline", "apc_dpo", "persona_sft", "train_discriminator"):
        Run(compose_cfg(name, [f"run_dir={tmp_path}"]))


# --------------------------------------------------------------------------------------------------
# data files


def test_utf16_file_is_a_data_error_at_line_1(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_text(json.dumps(seed_record()) + "\n", encoding="utf-16")
    with pytest.raises(DataError, match=rf"{path}:1: not UTF-8 text \(the file looks like UTF-16\)"):
        load_situations(path)


def test_undecodable_byte_names_its_line_and_a_utf8_bom_is_fine(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(seed_record(id="a")).encode()
    bad = json.dumps(seed_record(id="b", domain="café"), ensure_ascii=False).encode().replace("é".encode(), "é".encode("latin-1"))
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n\n" + bad + b"\n")
    with pytest.raises(DataError, match=rf"{path}:3: not UTF-8 text: byte 0xe9"):
        load_situations(path)
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert [s.id for s in load_situations(path)] == ["a"]


def test_lone_surrogate_is_rejected_with_file_line_and_field(tmp_path):
    record = seed_record()
    text = json.dumps(record).replace(json.dumps(record["situation"][-1]["content"]), '"half an emoji \\ud83d"', 1)
    path = tmp_path / "surrogate.jsonl"
    path.write_text(json.dumps(seed_record(id="ok")) + "\n" + text + "\n")
    last = len(record["situation"]) - 1
    with pytest.raises(DataError, match=rf"{path}:2: field 'situation\[{last}\].content': contains an unpaired surrogate"):
        load_situations(path)


@pytest.mark.parametrize("key", ["train", "heldout"])
def test_empty_data_file_is_named(tmp_path, key):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = compose_cfg("train_router", [f"run_dir={tmp_path}", f"data.{key}={empty}"])
    with pytest.raises(DataError, match=rf"{empty}: data.{key} holds no situations"):
        load_data(cfg, BIG_FIVE)


def fresh(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_train_file_without_pole_replies_names_the_file(tiny_model_dir, tmp_path):
    from personafuse.workflows.experts import run_experts

    path = tmp_path / "router_only.jsonl"
    record = seed_record()
    del record["responses"]
    path.write_text(json.dumps(record) + "\n")
    cfg = compose_cfg("train_experts", [f"run_dir={tmp_path}", f"model.path={tiny_model_dir}", f"data.train={path}"])
    with pytest.raises(DataError, match=rf"{path}: no situation has 'responses'"):
        run_experts(cfg, Run(cfg), *fresh(tiny_model_dir))


def test_max_length_shorter_than_the_contexts_is_an_error_not_a_nan_loss(tiny_model_dir, tmp_path):
    from personafuse.workflows.experts import run_experts
    from personafuse.workflows.router import run_router

    model, tokenizer = fresh(tiny_model_dir)
    pf = PersonaFuseModel.from_base(model, PersonaFuseConfig(**TINY_STACK), tokenizer=tokenizer)
    cfg = compose_cfg("train_router", [f"run_dir={tmp_path}", f"model.path={tiny_model_dir}", "data.max_length=64"])
    with pytest.raises(DataError, match=r"so data.max_length=64 leaves no room for the reply"):
        run_router(cfg, Run(cfg), pf, tokenizer)
    assert not (tmp_path / "checkpoints").exists(), "router training started"
    cfg = compose_cfg("train_experts", [f"run_dir={tmp_path}", f"model.path={tiny_model_dir}",
                                        "trainer.expert.max_length=64", "experts.r=2"])
    with pytest.raises(DataError, match=r"trainer.expert.max_length=64 leaves no room"):
        run_experts(cfg, Run(cfg), *fresh(tiny_model_dir))
    assert not (tmp_path / "checkpoints").exists(), "expert training started"


def test_empty_heldout_fails_before_router_training_and_a_late_failure_keeps_the_bundle(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    from personafuse.workflows import router as train_router

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    model, tokenizer = fresh(tiny_model_dir)
    pf = PersonaFuseModel.from_base(model, PersonaFuseConfig(**TINY_STACK), tokenizer=tokenizer)
    base = [f"run_dir={tmp_path}", f"model.path={tiny_model_dir}", "data.max_length=512", "trainer.router.max_steps=1",
            "trainer.router.per_device_train_batch_size=2", "+trainer.router.disable_tqdm=true"]
    cfg = compose_cfg("train_router", [*base, f"data.heldout={empty}"])
    with pytest.raises(DataError, match="data.heldout holds no situations"):
        train_router.run_router(cfg, Run(cfg), pf, tokenizer)
    assert not (tmp_path / "checkpoints").exists(), "router training started"

    def broken_report(*args, **kwargs):
        raise RuntimeError("report failed")

    monkeypatch.setattr(train_router, "routing_report", broken_report)
    cfg = compose_cfg("train_router", base)
    with pytest.raises(RuntimeError, match="report failed"):
        train_router.run_router(cfg, Run(cfg), pf, tokenizer)
    assert (tmp_path / "bundle" / "router.safetensors").is_file(), "the trained router was lost"


# --------------------------------------------------------------------------------------------------
# the export recipe: every blend option of the README


def _expected(pf, **blend):
    return blend_gates(pf, **blend)


@pytest.mark.parametrize("overrides, folder, blend", [
    ([], "counselor", {"preset": "counselor"}),
    (["preset=tutor"], "tutor", {"preset": "tutor"}),
    (["preset=support_agent", "kind=adapter"], "support_agent", {"preset": "support_agent"}),
    (["preset=null", "activations={openness: 0.8, extraversion: 0.6}"], "custom",
     {"activations": {"openness": 0.8, "extraversion": 0.6}}),
    (["preset=null", "gates={extraversion_high: 0.7, agreeableness_high: 0.3}"], "custom",
     {"gates": {"extraversion_high": 0.7, "agreeableness_high": 0.3}}),
    (["preset=null", "gates=[0.5,0,0,0,0.5,0,0,0,0,0]"], "custom", {"gates": [0.5, 0, 0, 0, 0.5, 0, 0, 0, 0, 0]}),
    (["preset=null", "context='My order is late again.'"], "custom", {"context": "My order is late again."}),
], ids=["default", "preset", "preset_adapter", "activations", "gates_mapping", "gates_list", "context"])
def test_export_recipe_blend_options(stack, tiny_model_dir, tmp_path, overrides, folder, blend):
    cfg = compose_cfg("export", [f"run_dir={tmp_path}", f"model.path={tiny_model_dir}", *overrides])
    out = run_export(cfg, stack)
    assert out == tmp_path / "export" / folder
    written = json.loads((out / BLEND_FILE).read_text())["gates"]
    expected = _expected(stack, **blend)
    assert torch.allclose(torch.tensor([written[n] for n in stack.expert_names]), expected, atol=1e-6)
    assert (out / ("adapter_model.safetensors" if "kind=adapter" in overrides else "config.json")).is_file()


def test_export_recipe_preset_file_and_out_dir(stack, tiny_model_dir, tmp_path):
    preset = tmp_path / "calm.yaml"
    preset.write_text("activations: {neuroticism: -0.9, agreeableness: 0.5}\n")
    cfg = compose_cfg("export", [f"run_dir={tmp_path}", f"model.path={tiny_model_dir}", f"preset={preset}", "kind=adapter"])
    assert run_export(cfg, stack) == tmp_path / "export" / "calm"
    cfg = compose_cfg("export", [f"run_dir={tmp_path}", f"model.path={tiny_model_dir}", f"out_dir={tmp_path / 'mine'}",
                                 "kind=adapter"])
    assert run_export(cfg, stack) == tmp_path / "mine"


def test_all_zero_gates_and_string_gates_are_refused(stack, tiny_model_dir, tmp_path):
    cfg = compose_cfg("export", [f"run_dir={tmp_path}", f"model.path={tiny_model_dir}", "preset=null",
                                 "gates=[0,0,0,0,0,0,0,0,0,0]"])
    with pytest.raises(ExportError, match="gates are all zero"):
        run_export(cfg, stack)
    assert not (tmp_path / "export").exists()
    with pytest.raises(TypeError, match=r"gates must be a tensor or list of 10 numbers .* got str '0.1'"), \
            stack.fixed_gates("0.1"):
        pass


# --------------------------------------------------------------------------------------------------
# generation length


def test_max_new_tokens_is_capped_at_the_context_left(stack, monkeypatch):
    config = stack.model.config
    prompt = stack.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                 tokenize=False)
    prompt_length = len(stack.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(config, "max_position_embeddings", prompt_length + 3)
    requested = []
    generate = stack.generate

    def recording_generate(**kwargs):
        requested.append(kwargs["max_new_tokens"])
        if kwargs["max_new_tokens"] > 3:
            raise AssertionError(f"asked for {kwargs['max_new_tokens']} new tokens; only 3 fit")
        return generate(**kwargs)

    monkeypatch.setattr(stack, "generate", recording_generate)
    with pytest.warns(UserWarning, match="max_new_tokens=100000000 capped at 3"):
        reply = generate_replies(stack, ["hi"], max_new_tokens=100_000_000)[0]
    assert requested == [3]
    assert len(stack.tokenizer(reply.text, add_special_tokens=False)["input_ids"]) <= 3
    monkeypatch.setattr(config, "max_position_embeddings", prompt_length)
    with pytest.raises(ValueError, match=f"the prompt is {prompt_length} tokens and fills the model's context"):
        generate_replies(stack, ["hi"], max_new_tokens=5)


# --------------------------------------------------------------------------------------------------
# the CLI


def test_explain_out_directory_writes_inside_it_and_prints_the_path(bundle, tmp_path, capsys):
    existing = tmp_path / "plots"
    existing.mkdir()
    for out in (existing, tmp_path / "new_dir"):
        assert main(["explain", "--bundle", str(bundle), "--context", "hello", "--out", str(out)]) == 0
        assert capsys.readouterr().out.strip() == f"wrote {out / 'explain.png'}"
        assert (out / "explain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new_dir", "plots"], "wrote beside the directory"
    assert main(["explain", "--bundle", str(bundle), "--context", "hello", "--out", str(tmp_path / "e.svg")]) == 0
    assert (tmp_path / "e.svg").read_text().lstrip().startswith("<?xml")


def error_lines(err: str) -> list[str]:
    """stderr without transformers' weight-loading progress bar."""
    return [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]


def test_cli_user_errors_are_one_line_and_exit_2(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PERSONAFUSE_DEBUG", raising=False)
    zero = ["export", "--bundle", str(bundle), "--out", str(tmp_path / "x"), "--gates", ",".join(["0"] * 10)]
    assert main(zero) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("personafuse export: error: ") and "gates are all zero" in err[0], err
    assert not (tmp_path / "x").exists()

    assert main(["generate", "--bundle", str(tmp_path / "missing"), "hi"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(tmp_path / "missing") in err[0], err
    assert main(["generate", "--bundle", str(bundle), "hi", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be >= 1" in capsys.readouterr().err

    with pytest.raises(ExportError, match="gates are all zero"):
        main(["--debug", *zero])
    with pytest.raises(ExportError):
        main([*zero, "--debug"])
    monkeypatch.setenv("PERSONAFUSE_DEBUG", "1")
    with pytest.raises(ExportError):
        main(zero)


def test_evaluate_data_without_a_path_is_a_usage_error(bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--bundle", str(bundle), "--out", str(tmp_path), "--data", "situations"])
    assert exit_.value.code == 2
    assert "expected KEY=PATH (e.g. situations=heldout.jsonl), got 'situations'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the hf generator backend loads like every other model: local files only, "embedded" resolved


def test_hf_generator_is_offline_and_resolves_embedded(tiny_model_dir, tmp_path, monkeypatch):
    import personafuse.base_models as base_models
    from personafuse.data import HFChatGenerator, make_generator

    monkeypatch.setattr(base_models, "embedded_model_path", lambda: tiny_model_dir)
    generator = make_generator({"backend": "hf", "model": "embedded", "device": "cpu", "max_new_tokens": 2,
                                "temperature": 0.0})
    assert isinstance(generator, HFChatGenerator)
    assert len(generator.generate([[{"role": "user", "content": "hi"}]])) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="loads local checkpoints only"):
        make_generator({"backend": "hf", "model": "someone/some-model", "device": "cpu"})
