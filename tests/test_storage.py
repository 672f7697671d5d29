"""Storage promises: atomic writes that never delete what they should not, recovery after a kill, output modes,
and loads that name the broken file instead of running on corrupt weights."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from personafuse import CheckpointError, PersonaFuseModel
from personafuse.checkpoint import CONFIG_FILE, ROUTER_FILE, atomic_dir
from personafuse.export import blend_gates, export_blended_adapter, export_merged
from personafuse.training.checkpointing import last_checkpoint
from tests.test_model import make
from tests.tiny_models import tiny_llama

EXPERT = "experts/openness_high/adapter_model.safetensors"


@pytest.fixture
def bundle(tmp_path):
    """A saved bundle and the stack loaded back from it (so it knows its source)."""
    make().save_pretrained(tmp_path / "work" / "bundle")
    return tmp_path / "work" / "bundle"


def _load(path):
    return PersonaFuseModel.from_pretrained(tiny_llama(0), path)


def test_save_pretrained_refuses_by_default_and_never_replaces_a_foreign_folder(tmp_path):
    pf = make()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pf.save_pretrained(notes)
    with pytest.raises(FileExistsError, match=f"no {CONFIG_FILE}"):
        pf.save_pretrained(notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "mine"
    pf.save_pretrained(tmp_path / "bundle")
    pf.save_pretrained(tmp_path / "bundle", overwrite=True)  # an earlier bundle is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "notes"]


def test_export_refuses_a_target_holding_or_inside_its_source_bundle(bundle):
    pf = _load(bundle)
    gates = blend_gates(pf, preset="counselor")
    for out in (bundle.parent, bundle, bundle / "merged"):  # `export --bundle X/bundle --out X --overwrite`
        with pytest.raises(FileExistsError, match="is made from"):
            export_merged(pf, out, gates, overwrite=True)
        with pytest.raises(FileExistsError, match="is made from"):
            export_blended_adapter(pf, out, gates, overwrite=True)
    assert _load(bundle) is not None and not (bundle / "merged").exists()


def test_export_over_a_file_is_refused_before_anything_is_written(tmp_path):
    pf = make()
    target = tmp_path / "model.bin"
    target.write_text("user data")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_merged(pf, target, blend_gates(pf, preset="tutor"), overwrite=True)
    assert target.read_text() == "user data" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    export_merged(pf, tmp_path / "merged", blend_gates(pf, preset="tutor"))
    export_merged(pf, tmp_path / "merged", blend_gates(pf, preset="counselor"), overwrite=True, label="second")
    assert json.loads((tmp_path / "merged" / "personafuse_blend.json").read_text())["label"] == "second"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_kill_between_the_two_renames_is_recovered_on_the_next_write_or_load(tmp_path):
    pf = make()
    pf.save_pretrained(tmp_path / "bundle")
    expected = load_file(tmp_path / "bundle" / ROUTER_FILE)
    hidden = tmp_path / f".bundle.old-{socket.gethostname()}-{_dead_pid()}"
    os.replace(tmp_path / "bundle", hidden)  # the first rename happened, then the writer was killed
    loaded = _load(tmp_path / "bundle")
    assert torch.equal(loaded.router.state_dict()["head.weight"], expected["head.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

    os.replace(tmp_path / "bundle", hidden)
    pf.save_pretrained(tmp_path / "bundle", overwrite=True)  # the next write also restores, then replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_stale_staging_dirs_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".out.tmp-{host}-{_dead_pid()}-abc123"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-xyz789"
    other_host = tmp_path / f".out.tmp-elsewhere.example-{_dead_pid()}-abc"
    for d in (dead, live, other_host):
        d.mkdir()
        (d / "shard.safetensors").write_bytes(b"0" * 100)
    with atomic_dir(tmp_path / "out", marker="done") as tmp:
        (tmp / "done").write_text("")
    assert not dead.exists() and live.exists() and other_host.exists()


def test_a_failed_write_leaves_the_previous_output_in_place(tmp_path):
    with atomic_dir(tmp_path / "out", marker="done") as tmp:
        (tmp / "done").write_text("first")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(tmp_path / "out", overwrite=True, marker="done") as tmp:
        (tmp / "done").write_text("second")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="left no done"), atomic_dir(tmp_path / "out", True, marker="done"):
        pass
    assert (tmp_path / "out" / "done").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_umask_modes(umask, tmp_path):
    previous = os.umask(umask)
    try:
        make().save_pretrained(tmp_path / "bundle")
    finally:
        os.umask(previous)
    paths = [tmp_path / "bundle", *(tmp_path / "bundle").rglob("*")]
    modes = {(p.is_dir(), p.stat().st_mode & 0o777) for p in paths}
    assert modes == {(True, 0o777 & ~umask), (False, 0o666 & ~umask)}


@pytest.mark.parametrize("relative", [ROUTER_FILE, EXPERT])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected_naming_file_and_tensor(bundle, relative, value):
    path = bundle / relative
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = value
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"{path.name}: tensor '{key}' holds 1 non-finite"):
        _load(bundle)


@pytest.mark.parametrize("relative", [ROUTER_FILE, EXPERT])
@pytest.mark.parametrize("damage", ["truncated", "not_safetensors"])
def test_corrupt_weights_name_the_file(bundle, relative, damage):
    path = bundle / relative
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else torch.save.__doc__.encode()[:400])
    with pytest.raises(CheckpointError, match=rf"{relative}: not a readable safetensors file"):
        _load(bundle)


@pytest.mark.parametrize("keys", [("base_model",), ("base_model", "fingerprint"), ("config",)])
def test_bundle_config_gaps_name_the_file_and_key(bundle, keys):
    meta = json.loads((bundle / CONFIG_FILE).read_text())
    parent = meta
    for key in keys[:-1]:
        parent = parent[key]
    del parent[keys[-1]]
    (bundle / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: missing key '{'.'.join(keys)}'"):
        _load(bundle)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lora_alpha", None, "missing key 'lora_alpha'"),
    ("r", "2", r"'r' must be a number \(integer\), got '2' \(str\)"),
    ("lora_alpha", "8", r"'lora_alpha' must be a number, got '8' \(str\)"),
])
def test_adapter_config_gaps_and_types_name_the_file_and_key(bundle, key, value, message):
    path = bundle / "experts" / "openness_high" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if value is None:
        del cfg[key]
    else:
        cfg[key] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: {message}"):
        _load(bundle)


def test_router_tensor_of_wrong_shape_names_the_file(bundle):
    tensors = load_file(bundle / ROUTER_FILE)
    tensors["head.weight"] = torch.zeros(3, tensors["head.weight"].shape[1])
    save_file(tensors, bundle / ROUTER_FILE)
    with pytest.raises(CheckpointError, match=rf"{ROUTER_FILE}: wrong tensor shape for head.weight \(3, "):
        _load(bundle)


def _trainer_checkpoint(path, step):
    (path / "personafuse").mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.ones(64)}, path / "personafuse" / ROUTER_FILE)
    torch.save({"step": step}, path / "optimizer.pt")


@pytest.mark.parametrize(("damaged_file", "damage"), [
    ("trainer_state.json", b'{"global_step": '),
    (f"personafuse/{ROUTER_FILE}", None),
    ("optimizer.pt", None),
])
def test_resume_skips_a_damaged_latest_checkpoint_naming_it(tmp_path, damaged_file, damage):
    for step in (1, 2):
        _trainer_checkpoint(tmp_path / f"checkpoint-{step}", step)
    path = tmp_path / "checkpoint-2" / damaged_file
    path.write_bytes(damage if damage is not None else path.read_bytes()[:-10])
    with pytest.warns(UserWarning, match=rf"checkpoint-2: {damaged_file}.*resuming from .*checkpoint-1"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-1" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint.*checkpoint-2.*checkpoint-1: trainer_state.json is missing"):
        last_checkpoint(tmp_path)
    assert last_checkpoint(tmp_path / "absent") is None


def test_trait_classifier_file_errors_name_the_file(tmp_path):
    from personafuse.eval.trait_expression import TraitClassifier

    path = TraitClassifier(["openness"], torch.ones(1, 8), torch.zeros(1)).save(tmp_path / "clf.safetensors")
    assert list(TraitClassifier.load(path).traits) == ["openness"]
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"clf.safetensors: not a readable safetensors file"):
        TraitClassifier.load(path)
    save_file({"weight": torch.ones(1, 8)}, path)
    with pytest.raises(CheckpointError, match=r"clf.safetensors: not a TraitClassifier file"):
        TraitClassifier.load(path)
