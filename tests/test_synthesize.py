import json
import logging
import time

import pytest
import torch

from personafuse.data import (
    AnnotationError,
    ChatGenerator,
    DataError,
    GenerationError,
    HFChatGenerator,
    OpenAIChatGenerator,
    annotator_prompt,
    load_situations,
    make_generator,
    parse_activations,
    pole_prompt,
    situation_prompt,
    synthesize,
)
from personafuse.traits import BIG_FIVE
from tests.openai_fixture_server import FakeOpenAIServer, canned_answer
from tests.tiny import make_tiny_llama, make_tiny_tokenizer

CONVERSATIONS = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]


class CannedGenerator:
    """In-process generator with the fixture server's answers; ``interrupt_after`` simulates a kill."""

    def __init__(self, interrupt_after=None, answer=canned_answer):
        self.calls, self.interrupt_after, self.answer = 0, interrupt_after, answer

    def generate(self, conversations, **sampling):
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        return [self.answer(c) for c in conversations]


def stubs(n, prefix="in"):
    return [{"id": f"{prefix}{i}", "domain": "travel", "situation": [{"role": "user", "content": f"Trip {i} got cancelled."}]}
            for i in range(n)]


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def client(server, **options):
    return OpenAIChatGenerator(server.base_url, "fake-model", **{"timeout": 0.2, "backoff": 0.01, **options})


def test_openai_generator_returns_replies_in_order(server):
    with client(server, concurrency=3, api_key="k") as gen:
        assert isinstance(gen, ChatGenerator)
        replies = gen.generate(CONVERSATIONS, temperature=0.0, max_new_tokens=12)
    assert replies == [f"[plain] reply to: question {i}" for i in range(5)]
    assert all(r["model"] == "fake-model" and r["max_tokens"] == 12 and r["temperature"] == 0.0
               and r["top_p"] == 0.95 for r in server.requests)


def test_openai_generator_reads_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    with client(server) as gen:
        assert gen.client.headers["authorization"] == "Bearer from-env"


def test_openai_generator_retries_a_server_error(server):
    server.fail_first = 1
    with client(server, max_retries=2) as gen:
        assert gen.generate(CONVERSATIONS[:1]) == ["[plain] reply to: question 0"]
    assert len(server.requests) == 2


def test_openai_generator_gives_up_on_persistent_errors(server):
    server.fail_first = 100
    with client(server, max_retries=2) as gen, pytest.raises(GenerationError) as info:
        gen.generate(CONVERSATIONS[:1])
    assert f"POST {server.base_url}/chat/completions failed after 3 attempts" in str(info.value)
    assert "status 500" in str(info.value) and "injected failure" in str(info.value)
    assert len(server.requests) == 3


def test_openai_generator_does_not_retry_client_errors(server):
    server.fail_first, server.fail_status = 1, 400
    with client(server, max_retries=3) as gen, pytest.raises(GenerationError, match="failed with status 400"):
        gen.generate(CONVERSATIONS[:1])
    assert len(server.requests) == 1


def test_openai_generator_times_out_and_retries(server):
    server.delay = 1.0
    start = time.monotonic()
    with client(server, max_retries=1) as gen, pytest.raises(GenerationError, match="after 2 attempts.*Timeout"):
        gen.generate(CONVERSATIONS[:1])
    assert time.monotonic() - start < 1.5  # waiting out the server would take 2 s
    assert len(server.requests) == 2


def test_openai_generator_rate_limits_request_starts(server):
    with client(server, requests_per_minute=600, concurrency=3) as gen:
        start = time.monotonic()
        gen.generate(CONVERSATIONS[:3])
    assert time.monotonic() - start >= 0.2  # three starts 0.1 s apart


def test_hf_generator_batches_with_left_padding_and_returns_only_new_text():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(tokenizer)
    gen = HFChatGenerator(model, tokenizer, batch_size=2, max_new_tokens=5, temperature=0)
    conversations = [[{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a much longer question"}],
                     [{"role": "user", "content": "third"}]]
    batched = gen.generate(conversations)
    assert batched == [gen.generate([c])[0] for c in conversations]
    prompt = tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    full = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = tokenizer.decode(full[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert batched[0] == new


def test_hf_generator_sampling_is_seeded_and_leaves_global_rng_alone():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(tokenizer)

    def sample(seed):
        return HFChatGenerator(model, tokenizer, max_new_tokens=8, temperature=1.0, seed=seed).generate(CONVERSATIONS)

    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = sample(0)
    assert torch.rand(1) == expected
    assert sample(0) == first
    assert sample(1) != first


def test_make_generator_builds_both_backends(tmp_path, server):
    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf = make_generator({"backend": "hf", "model": str(tmp_path), "dtype": "float32", "device": "cpu",
                         "temperature": 0, "max_new_tokens": 3, "batch_size": 2})
    assert isinstance(hf, HFChatGenerator) and len(hf.generate(CONVERSATIONS)) == 5
    openai = make_generator({"backend": "openai", "base_url": server.base_url + "/", "model": "m", "timeout": 1})
    assert openai.generate(CONVERSATIONS[:1]) == ["[plain] reply to: question 0"]
    with pytest.raises(ValueError, match="'hf' or 'openai'"):
        make_generator({"backend": "vllm"})


def test_pole_prompt_describes_the_pole_and_keeps_the_turns():
    situation = [{"role": "system", "content": "A job interview."}, {"role": "user", "content": "Hi."},
                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me about you."}]
    prompt = pole_prompt(BIG_FIVE, "agreeableness_low", situation)
    system = prompt[0]["content"]
    assert prompt[0]["role"] == "system" and [m["role"] for m in prompt[1:]] == ["user", "assistant", "user"]
    assert "low in agreeableness" in system and "blunt, critical, competitive, sceptical" in system
    assert "1-3 sentences" in system and "A job interview." in system


def test_annotator_prompt_lists_every_trait_and_both_poles():
    text = annotator_prompt(BIG_FIVE, [{"role": "user", "content": "My cat died."}])[-1]["content"]
    assert "user: My cat died." in text and "JSON object" in text
    for trait in BIG_FIVE.traits:
        assert f'"{trait}": +1 = ' in text
    assert "-1 = calm, steady" in text


def test_situation_prompt_varies_the_angle_with_the_seed():
    assert situation_prompt("health", 0)[-1]["content"] != situation_prompt("health", 1)[-1]["content"]
    assert "about health" in situation_prompt("health", 3)[-1]["content"]


SCORES = {"openness": 0.2, "conscientiousness": -0.5, "extraversion": 0, "agreeableness": 1, "neuroticism": -1}


@pytest.mark.parametrize("reply", [
    json.dumps(SCORES),
    f"Sure! Here you go:\n```json\n{json.dumps(SCORES, indent=2)}\n```\nHope it helps {{:}}",
    json.dumps({"activations": {**SCORES, "humour": 3}, "reason": "grief"}),
    "{not json} then " + json.dumps(SCORES),
])
def test_parse_activations_tolerates_wrapping(reply):
    assert parse_activations(reply, BIG_FIVE) == pytest.approx(SCORES)


@pytest.mark.parametrize(("reply", "expected"), [
    ("no json here", "no JSON object"),
    (json.dumps({k: v for k, v in SCORES.items() if k != "neuroticism"}), "missing activation for trait 'neuroticism'"),
    (json.dumps({**SCORES, "openness": 1.2}), "'activations.openness'.*got 1.2"),
    (json.dumps({**SCORES, "openness": "high"}), "finite number"),
])
def test_parse_activations_rejects_incomplete_answers(reply, expected):
    with pytest.raises(AnnotationError, match=expected):
        parse_activations(reply, BIG_FIVE)


def test_synthesize_end_to_end_over_http(tmp_path, server):
    out = tmp_path / "syn.jsonl"
    with client(server, concurrency=4, timeout=5) as gen:
        invented = synthesize({"work": 2, "health": 1}, gen, out, progress=False)
        given = synthesize(stubs(2), gen, out, progress=False)
    assert (invented.written, given.written, invented.failed + given.failed) == (3, 2, 0)
    situations = load_situations(out)
    assert [s.id for s in situations] == ["work-syn-00000", "work-syn-00001", "health-syn-00000", "in0", "in1"]
    assert situations[0].situation == [{"role": "user", "content": "I need help with work, case 0."}]
    assert situations[3].responses["extraversion_high"] == (
        "[You are a person who is strongly high in extraversion:] reply to: Trip 0 got cancelled.")
    assert all(s.activations is not None and s.split == "train" for s in situations)


def test_synthesize_resumes_after_an_interruption(tmp_path):
    out = tmp_path / "syn.jsonl"
    # Each situation takes two calls (pole replies, annotation): the third item is cut mid-way.
    with pytest.raises(KeyboardInterrupt):
        synthesize(stubs(6), CannedGenerator(interrupt_after=5), out, progress=False)
    assert len(out.read_text().splitlines()) == 2
    with open(out, "a") as f:
        f.write('{"id": "in2", "domain": "tra')  # a line cut off by the kill
    stats = synthesize(stubs(6), CannedGenerator(), out, progress=False)
    assert (stats.written, stats.skipped, stats.duplicates, stats.failed) == (4, 2, 0, 0)
    assert sorted(s.id for s in load_situations(out)) == [f"in{i}" for i in range(6)]


def test_synthesize_refuses_to_resume_a_corrupt_file(tmp_path):
    out = tmp_path / "syn.jsonl"
    out.write_text('{"id": "a"}\n')
    with pytest.raises(DataError, match=rf"^{out}:1: cannot resume"):
        synthesize(stubs(1), CannedGenerator(), out, progress=False)


def test_synthesize_drops_exact_duplicates(tmp_path):
    out = tmp_path / "syn.jsonl"
    items = stubs(2)
    items.append({**items[0], "id": "again", "situation": [{"role": "user", "content": "  trip 0 GOT   cancelled. "}]})
    assert synthesize(items, CannedGenerator(), out, progress=False).duplicates == 1
    rerun = synthesize(stubs(1, prefix="new"), CannedGenerator(), out, progress=False)
    assert (rerun.written, rerun.duplicates) == (0, 1)
    assert [s.id for s in load_situations(out)] == ["in0", "in1"]


def test_synthesize_keeps_given_labels_and_skips_annotation(tmp_path):
    out = tmp_path / "syn.jsonl"
    items = [{**stubs(1)[0], "split": "heldout", "activations": SCORES},
             {**stubs(2)[1], "gates": {"openness_high": 1.0}}]
    gen = CannedGenerator()
    assert synthesize(items, gen, out, progress=False).written == 2
    assert gen.calls == 2  # pole replies only
    first, second = load_situations(out)
    assert (first.split, first.activations, second.gates) == ("heldout", SCORES, {"openness_high": 1.0})


def test_synthesize_counts_failures_and_carries_on(tmp_path, caplog):
    def answer(conversation):
        text = conversation[-1]["content"]
        if "Trip 1 " in text and "JSON object" not in text:
            raise GenerationError("POST http://x/chat/completions failed with status 400: bad")
        if "Trip 2 " in text and "JSON object" in text:
            return "I would rather not say."
        return canned_answer(conversation)

    out = tmp_path / "syn.jsonl"
    gen = CannedGenerator(answer=answer)
    with caplog.at_level(logging.WARNING, logger="personafuse.data.synthesize"):
        stats = synthesize(stubs(4), gen, out, annotate_retries=1, progress=False)
    assert (stats.written, stats.failed) == (2, 2)
    assert [s.id for s in load_situations(out)] == ["in0", "in3"]
    assert "'in1' failed: GenerationError" in caplog.text
    assert "'in2' failed: AnnotationError: no usable annotation after 2 attempts" in caplog.text
