"""Generation edge cases of a routed model: left padding, beams / num_return_sequences, per-token fixed
gates while decoding with a KV cache, and packed (padding-free) batches, which sequence routing rejects."""

import pytest
import torch

from personafuse import PersonaFuseConfig, PersonaFuseModel
from tests.tiny_models import VOCAB, randomize_experts, tiny_llama

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=6)


@pytest.fixture(scope="module")
def pf():
    model = PersonaFuseModel.from_base(tiny_llama(3, layers=2), PersonaFuseConfig(r=4, alpha=8.0, dropout=0.0))
    randomize_experts(model, 3, std=0.5)
    return model


def prompts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in (6, 3, 9)]


def left_padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
    return ids, mask


def run(pf, ids, mask, **kwargs):
    with torch.no_grad():
        return pf.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                           **{**GREEDY, **kwargs})


def alone(pf, row, **kwargs):
    return run(pf, row[None], torch.ones(1, len(row), dtype=torch.long), **kwargs)


def test_left_padded_batch_equals_each_prompt_alone(pf):
    rows = prompts()
    ids, mask = left_padded(rows)
    batched = run(pf, ids, mask)
    gates = pf.last_gates.clone()
    assert not torch.allclose(gates[0], gates[1], atol=1e-3)  # the rows really route differently
    for i, row in enumerate(rows):
        single = alone(pf, row)
        torch.testing.assert_close(gates[i], pf.last_gates[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batched.sequences[i, ids.shape[1]:], single.sequences[0, len(row):])
        for step_batched, step_single in zip(batched.scores, single.scores, strict=True):
            torch.testing.assert_close(step_batched[i], step_single[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixed", [False, True], ids=["routed", "fixed_per_sequence"])
def test_beams_and_return_sequences_expand_the_gates_like_the_inputs(pf, fixed):
    rows = prompts()
    ids, mask = left_padded(rows)
    gates = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(1)) * 3, -1)
    beams = dict(num_beams=3, num_return_sequences=2)

    def maybe_fixed(g):
        return pf.fixed_gates(g) if fixed else torch.enable_grad()

    with maybe_fixed(gates):
        batched = run(pf, ids, mask, **beams)
    assert pf.last_gates.shape == (9, 10)  # three beams per prompt, each with its prompt's gates
    for i, row in enumerate(rows):
        with maybe_fixed(gates[i]):
            single = alone(pf, row, **beams)
        assert torch.equal(batched.sequences[2 * i : 2 * i + 2, ids.shape[1]:], single.sequences[:, len(row):])
        torch.testing.assert_close(batched.sequences_scores[2 * i : 2 * i + 2], single.sequences_scores,
                                   atol=1e-4, rtol=1e-4)


def test_per_token_fixed_gates_follow_the_position_while_decoding(pf):
    """Cached decoding equals recomputing the whole sequence at each step; tokens past the given gates
    keep the last position's gates."""
    ids, mask = left_padded(prompts()[:2])
    batch, width = ids.shape
    gates = torch.softmax(torch.randn(batch, width + 2, 10, generator=torch.Generator().manual_seed(2)) * 3, -1)
    with pf.fixed_gates(gates):
        out = run(pf, ids, mask, **{**GREEDY, "max_new_tokens": 5})
    assert out.sequences.shape == (batch, width + 5)
    held = torch.cat([gates, gates[:, -1:].expand(batch, 3, 10)], 1)
    sequence, full_mask = ids, mask
    for step in range(5):
        with torch.no_grad(), pf.fixed_gates(held[:, : sequence.shape[1]]):
            position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = pf(input_ids=sequence, attention_mask=full_mask, position_ids=position_ids).logits[:, -1]
        torch.testing.assert_close(out.scores[step], logits, atol=1e-4, rtol=1e-4)
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
        full_mask = torch.cat([full_mask, torch.ones(batch, 1, dtype=torch.long)], 1)
    assert torch.equal(out.sequences, sequence)


def test_per_token_fixed_gates_must_cover_the_prompt(pf):
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with pf.fixed_gates(torch.full((2, 4, 10), 0.1)), pytest.raises(ValueError, match="cover 4 tokens but the input has 5"):
        pf(input_ids=ids)


def test_packed_rows_are_rejected_padding_is_not(pf):
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])  # two sequences in one row, the padding-free layout
    with torch.no_grad(), pytest.raises(ValueError, match="packed / padding-free batches are not supported"):
        pf(input_ids=ids, position_ids=packed)
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        pf(input_ids=ids, attention_mask=left, position_ids=torch.tensor([[1, 1, 0, 1, 2, 3, 4]]))
        pf(input_ids=ids, position_ids=torch.tensor([[0, 0, 0, 1, 2, 3, 4]]))
        pf(input_ids=ids, position_ids=torch.arange(7)[None])
