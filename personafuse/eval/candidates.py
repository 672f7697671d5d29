"""The models an evaluation compares, batched deterministic generation, and log-likelihood choice.

A :class:`Candidate` is one way of answering: the base model, the base with a persona system prompt,
a PersonaFuse stack with fixed gates (uniform blend, one expert, a preset) or with dynamic routing,
or any other causal LM (e.g. a single-LoRA SFT checkpoint). Candidates built on one PersonaFuse
model share its weights; only the gates, adapters and system prompt change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from personafuse.eval.io import ResultFile
from personafuse.model import PersonaFuseModel

Conversation = list[dict[str, str]]

# The persona-prompted baseline gets what a user would write without PersonaFuse: a general instruction
# to adapt, not the situation's target traits (that would hand it the labels).
PERSONA_PROMPT = (
    "You are an emotionally intelligent assistant. Adapt your personality to what the situation calls for: "
    "how open, conscientious, extraverted, agreeable and emotionally stable you sound. Reply in 1-3 sentences."
)


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy by default (``do_sample=False``), so results are reproducible and resumable."""

    max_new_tokens: int = 48
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {self.max_new_tokens}, {self.batch_size}")


@dataclass
class Candidate:
    """One model variant. ``gates`` forces a blend; ``adapters=False`` runs the plain base model."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    system: str | None = None
    gates: torch.Tensor | None = None
    adapters: bool = True
    description: str = ""

    @property
    def is_personafuse(self) -> bool:
        return isinstance(self.model, PersonaFuseModel)

    @property
    def routed(self) -> bool:
        """Dynamic routing is active (the router picks the gates per input)."""
        return self.is_personafuse and self.adapters and self.gates is None

    @contextlib.contextmanager
    def active(self):
        if not self.is_personafuse:
            yield self.model
        elif not self.adapters:
            with self.model.adapters_disabled():
                yield self.model
        elif self.gates is not None:
            with self.model.fixed_gates(self.gates):
                yield self.model
        else:
            yield self.model

    def messages(self, conversation: Sequence[dict]) -> Conversation:
        """The conversation with this candidate's system prompt folded into the first system message."""
        turns = [dict(m) for m in conversation]
        if not self.system:
            return turns
        if turns and turns[0]["role"] == "system":
            return [{"role": "system", "content": f"{self.system}\n\n{turns[0]['content']}"}, *turns[1:]]
        return [{"role": "system", "content": self.system}, *turns]

    def fingerprint(self, settings: GenerationSettings | None = None) -> str:
        """Changes when anything that changes the replies changes (retrained weights included), so stale
        resumed rows are ignored."""
        gates = None if self.gates is None else [round(g, 6) for g in self.gates.flatten().tolist()]
        blob = json.dumps([self.name, self.system, gates, self.adapters, asdict(settings) if settings else None,
                           weights_tag(self.model)])
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@torch.no_grad()
def weights_tag(model: torch.nn.Module) -> str:
    """A cheap checksum of the weights (per-tensor sums)."""
    sums = [round(float(p.detach().float().sum()), 4) for p in model.parameters()]
    return hashlib.sha1(json.dumps(sums).encode()).hexdigest()[:12]


def standard_candidates(pf: PersonaFuseModel, tokenizer, names: Sequence[str] = ("base", "prompted", "uniform", "personafuse"),
                        persona_prompt: str = PERSONA_PROMPT) -> list[Candidate]:
    """Candidates on one PersonaFuse model by name.

    ``base`` (adapters off), ``prompted`` (adapters off + :data:`PERSONA_PROMPT`), ``uniform`` (all experts
    at 1/K), ``personafuse`` (dynamic routing), ``expert:<name>`` (one expert at gate 1),
    ``preset:<name>`` (a ``conf/presets`` blend), ``model:<dir>`` (another local checkpoint or PEFT adapter).
    """
    from personafuse.export import blend_gates

    K = pf.trait_set.num_experts
    out = []
    for name in names:
        kind, _, arg = name.partition(":")
        if kind == "base":
            out.append(Candidate(name, pf, tokenizer, adapters=False, description="base model"))
        elif kind == "prompted":
            out.append(Candidate(name, pf, tokenizer, system=persona_prompt, adapters=False,
                                 description="base model + persona system prompt"))
        elif kind == "uniform":
            out.append(Candidate(name, pf, tokenizer, gates=torch.full((K,), 1.0 / K), description="uniform expert blend"))
        elif kind == "personafuse":
            out.append(Candidate(name, pf, tokenizer, description="PersonaFuse, dynamic routing"))
        elif kind == "expert":
            gates = torch.zeros(K)
            gates[pf.trait_set.index(arg)] = 1.0
            out.append(Candidate(name, pf, tokenizer, gates=gates, description=f"single expert {arg}"))
        elif kind == "preset":
            out.append(Candidate(name, pf, tokenizer, gates=blend_gates(pf, preset=arg), description=f"preset {arg}"))
        elif kind == "model":
            model, tok = load_checkpoint(arg, pf)
            out.append(Candidate(name, model, tok, description=f"checkpoint {arg}"))
        else:
            raise ValueError(f"unknown candidate {name!r}: use base, prompted, uniform, personafuse, expert:<name>, "
                             f"preset:<name> or model:<dir>")
    return out


def load_checkpoint(path: str | Path, pf: PersonaFuseModel | None = None):
    """(model, tokenizer) for a full model directory or a PEFT adapter (merged onto a fresh copy of its base)."""
    from personafuse.base_models import load_base_model

    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base and pf is not None:
            base = getattr(pf.model.config, "_name_or_path", None)
        if not base or not Path(base).is_dir():
            raise FileNotFoundError(f"{path}: the adapter's base {base!r} is not a local directory")
        model, tokenizer = load_base_model(base)
        return PeftModel.from_pretrained(model, path).merge_and_unload().eval(), tokenizer
    if (path / "config.json").exists():
        model, tokenizer = load_base_model(path)
        return model.eval(), tokenizer
    raise FileNotFoundError(f"{path} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json)")


@torch.no_grad()
def generate(candidate: Candidate, conversations: Sequence[Sequence[dict]], settings: GenerationSettings,
             progress: bool = True, desc: str | None = None) -> list[str]:
    """Replies in input order, ``settings.batch_size`` conversations per left-padded ``generate`` call."""
    tokenizer = candidate.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(candidate.model.parameters()).device
    options = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
               "repetition_penalty": settings.repetition_penalty, "pad_token_id": tokenizer.pad_token_id}
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p)
    replies = []
    batches = range(0, len(conversations), settings.batch_size)
    for n, start in enumerate(tqdm(batches, disable=not progress, desc=desc or candidate.name, leave=False)):
        texts = [tokenizer.apply_chat_template(candidate.messages(c), add_generation_prompt=True, tokenize=False)
                 for c in conversations[start:start + settings.batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
        with candidate.active() as model, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed + n)
            output = model.generate(**batch, **options)
        replies.extend(t.strip() for t in tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True))
    return replies


def cached_generate(store: ResultFile, candidate: Candidate, ids: Sequence[str], conversations: Sequence[Sequence[dict]],
                    settings: GenerationSettings, progress: bool = True, desc: str | None = None) -> list[str]:
    """:func:`generate` for the items not yet in ``store``; finished batches are appended as they come."""
    tag = candidate.fingerprint(settings)
    todo = [i for i, item_id in enumerate(ids) if (candidate.name, tag, item_id) not in store]
    step = settings.batch_size
    for start in tqdm(range(0, len(todo), step), disable=not progress or not todo,
                      desc=desc or f"generate {candidate.name}"):
        chunk = todo[start:start + step]
        replies = generate(candidate, [conversations[i] for i in chunk], settings, progress=False)
        store.put_many(((candidate.name, tag, ids[i]), r) for i, r in zip(chunk, replies, strict=True))
    return [store.get((candidate.name, tag, item_id)) for item_id in ids]


@torch.no_grad()
def choice_loglikelihoods(candidate: Candidate, prompt: Sequence[dict], choices: Sequence[str]) -> list[float]:
    """Sum of log p(choice tokens | chat-templated prompt) for each choice, in one right-padded forward.

    The router (for a routed candidate) reads only the prompt tokens, as it would at generation.
    """
    tokenizer = candidate.tokenizer
    text = tokenizer.apply_chat_template(candidate.messages(prompt), add_generation_prompt=True, tokenize=False)
    context = tokenizer(text, add_special_tokens=False)["input_ids"]
    continuations = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    if any(not c for c in continuations):
        raise ValueError(f"every choice must encode to at least one token, got {list(choices)!r}")
    length = len(context) + max(len(c) for c in continuations)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(choices), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(continuations):
        ids[i, :len(context) + len(c)] = torch.tensor(context + c)
        mask[i, :len(context) + len(c)] = 1
    device = next(candidate.model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    kwargs = {}
    if candidate.routed:
        context_mask = torch.zeros_like(mask)
        context_mask[:, :len(context)] = 1
        kwargs["context_mask"] = context_mask
    with candidate.active() as model:
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    scores = []
    for i, c in enumerate(continuations):
        scores.append(logprobs[i, len(context) - 1:len(context) - 1 + len(c)].sum().item())
    return scores
