"""APC: persona faithfulness as constraint satisfaction (Peng & Shang, NeurIPS 2024), its
discriminators, their distillation, and APC-based preference pairs for DPO."""

from personafuse.apc.discriminators import Discriminator, DiscriminatorError
from personafuse.apc.labels import load_labelled
from personafuse.apc.personas import Persona, bundled_data_path, load_persona, load_personas
from personafuse.apc.score import APCResult, APCScorer, StatementScore, apc_terms, persona_system_prompt
from personafuse.apc.templates import NLI_LABELS, RELEVANCE_LABELS, nli_text, relevance_text

__all__ = [
    "NLI_LABELS",
    "RELEVANCE_LABELS",
    "APCResult",
    "APCScorer",
    "Discriminator",
    "DiscriminatorError",
    "Persona",
    "StatementScore",
    "apc_terms",
    "bundled_data_path",
    "load_labelled",
    "load_persona",
    "load_personas",
    "nli_text",
    "persona_system_prompt",
    "relevance_text",
]
