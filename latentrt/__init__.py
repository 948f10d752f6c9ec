"""latentrt: a runtime for language models that reason in latent space.

Public surface: ``load``, ``generate``, ``GenerationResult``, ``LatentEvent`` (hooks) and the errors.
"""

from .engine import GenerationResult, generate
from .errors import CheckpointError, ConfigError, InputError, LatentRTError, NonFiniteStateError
from .hooks import LatentEvent
from .loader import load

__version__ = "0.1.0"
__all__ = [
    "load",
    "generate",
    "GenerationResult",
    "LatentEvent",
    "LatentRTError",
    "ConfigError",
    "CheckpointError",
    "InputError",
    "NonFiniteStateError",
    "__version__",
]
