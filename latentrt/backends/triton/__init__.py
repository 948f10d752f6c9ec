"""The Triton backend (backend.py), its CUDA-graph runners (graph.py): the recurrent decode token
(token.py, on the fused layers of recurrent_layers.py) and the GPT-2 column (column.py)."""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
