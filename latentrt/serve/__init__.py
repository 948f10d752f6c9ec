"""Serving: the engine (continuous batching at latent-iteration granularity; ``Engine.generate`` for offline
batches of prompts with their own options), an OpenAI-compatible HTTP server (``latentrt serve``, the
``serve`` extra) and Ray Serve replicas (the ``ray`` extra).

The engine needs only torch; ``latentrt.serve.app`` imports FastAPI and ``latentrt.serve.ray`` Ray.
"""

from .engine import SCHEDULERS, Engine, QueueFull, Request, RequestEvent, ShuttingDown, server_defaults

__all__ = ["Engine", "Request", "RequestEvent", "QueueFull", "ShuttingDown", "SCHEDULERS", "server_defaults"]
