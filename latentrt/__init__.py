"""latentrt: a runtime for language models that reason in latent space.

Public surface: ``load``, ``generate`` (options as keywords or a ``GenerateOptions``), its results
(``GenerationResult``, ``GenerationStream``, ``StreamEvent``), ``apply_chat_template`` (a conversation's
prompt ids), ``LatentEvent`` (hooks) and the errors.
"""

from .chat import apply_chat_template
from .engine import GenerationResult, GenerationStream, StreamEvent, generate
from .errors import CheckpointError, ConfigError, InputError, LatentRTError, NonFiniteStateError, PromptError
from .hooks import LatentEvent
from .loader import load
from .options import GenerateOptions
from .prompts import UnknownWordsWarning
from .version import __version__

__all__ = [
    "load",
    "generate",
    "apply_chat_template",
    "GenerateOptions",
    "GenerationResult",
    "GenerationStream",
    "StreamEvent",
    "LatentEvent",
    "LatentRTError",
    "ConfigError",
    "CheckpointError",
    "InputError",
    "PromptError",
    "NonFiniteStateError",
    "UnknownWordsWarning",
    "__version__",
]
