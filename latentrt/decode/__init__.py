"""Per-family decoders: prefill and next token for one generate() call (see decode/base.py)."""

from .base import Decoder, TokenOutput

__all__ = ["Decoder", "TokenOutput"]
