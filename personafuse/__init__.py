"""PersonaFuse: Big Five persona experts mixed by a learned context router."""

from personafuse import quiet  # noqa: F401  (first, before anything imports a backend it quiets)
from personafuse.checkpoint import CheckpointError
from personafuse.config import PersonaFuseConfig, RouterConfig
from personafuse.model import PersonaFuseModel
from personafuse.routing import compute_gates, routed_lora
from personafuse.traits import BIG_FIVE, MBTI, TraitSet, get_trait_set

__all__ = [
    "BIG_FIVE",
    "MBTI",
    "CheckpointError",
    "PersonaFuseConfig",
    "PersonaFuseModel",
    "RouterConfig",
    "TraitSet",
    "compute_gates",
    "get_trait_set",
    "routed_lora",
]
__version__ = "0.1.0"
