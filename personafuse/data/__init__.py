"""Situation data: the JSONL format, its loader, chat generators and the synthesis pipeline."""

from personafuse.data.generators import (
    ChatGenerator,
    GenerationError,
    HFChatGenerator,
    OpenAIChatGenerator,
    make_generator,
)
from personafuse.data.schema import (
    DataError,
    Situation,
    blend_sft_rows,
    bundled_seed_paths,
    expert_sft_rows,
    load_situations,
    read_jsonl,
    save_situations,
    validate_activations,
)
from personafuse.data.synthesize import (
    AnnotationError,
    SynthesisStats,
    annotator_prompt,
    parse_activations,
    pole_prompt,
    situation_prompt,
    synthesize,
)

__all__ = [
    "AnnotationError",
    "ChatGenerator",
    "DataError",
    "GenerationError",
    "HFChatGenerator",
    "OpenAIChatGenerator",
    "Situation",
    "SynthesisStats",
    "annotator_prompt",
    "blend_sft_rows",
    "bundled_seed_paths",
    "expert_sft_rows",
    "load_situations",
    "make_generator",
    "parse_activations",
    "read_jsonl",
    "pole_prompt",
    "save_situations",
    "situation_prompt",
    "synthesize",
    "validate_activations",
]
