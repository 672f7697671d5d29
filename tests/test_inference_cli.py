import pytest
import torch
from transformers import AutoModelForCausalLM

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.cli import main
from personafuse.inference import explain, generate_replies, load_bundle
from tests.test_model import CFG
from tests.tiny import make_tiny_tokenizer
from tests.tiny_models import randomize_experts, tiny_llama


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    tok = make_tiny_tokenizer()
    base = tiny_llama()
    base.resize_token_embeddings(len(tok))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    pf = PersonaFuseModel.from_base(model, PersonaFuseConfig(**CFG), tokenizer=tok)
    randomize_experts(pf)
    with torch.no_grad():
        pf.router.head.bias.normal_(generator=torch.Generator().manual_seed(0))
    pf.save_pretrained(root / "bundle")
    return root


def test_batched_generation_routes_once_per_prompt(bundle):
    pf = load_bundle(bundle / "bundle")
    pf.routing.router_calls = 0
    replies = generate_replies(pf, ["hello there", "I am upset about my order today"], max_new_tokens=5)
    assert pf.routing.router_calls == 1 and len(replies) == 2
    assert replies[0].gates != replies[1].gates
    assert abs(sum(replies[0].gates.values()) - 1) < 1e-5
    assert len(replies[0].top_traits(3)) == 3


def test_cli_generate_explain_export(bundle, tmp_path, capsys):
    assert main(["generate", "--bundle", str(bundle / "bundle"), "hello there", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "> hello there" in out and any(t in out for t in ("openness", "conscientiousness", "extraversion"))

    main(["explain", "--bundle", str(bundle / "bundle"), "--context", "hello friend", "--out", str(tmp_path / "e.png")])
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    main(["export", "--bundle", str(bundle / "bundle"), "--out", str(tmp_path / "merged"), "--preset", "tutor"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None
    main(["export", "--bundle", str(bundle / "bundle"), "--out", str(tmp_path / "adapter"), "--adapter",
          "--activations", "openness=0.5,agreeableness=0.9"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(SystemExit):
        main(["export", "--bundle", str(bundle / "bundle"), "--out", str(tmp_path / "x"), "--gates", "a,b"])


def test_bundle_on_wrong_base_is_refused(bundle, tmp_path):
    other = tiny_llama(seed=7)
    other.resize_token_embeddings(len(make_tiny_tokenizer()))
    other.save_pretrained(tmp_path / "other")
    make_tiny_tokenizer().save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="fingerprint"):
        load_bundle(bundle / "bundle", tmp_path / "other")


def test_explain_api(bundle, tmp_path):
    pf = load_bundle(bundle / "bundle")
    path = explain(pf, [{"role": "user", "content": "my order is late"}], tmp_path / "x.png")
    assert path.stat().st_size > 1000
