"""Offline batched generation through the serving engine (vLLM's ``LLM.generate``; ``LLM.chat``, the same after
the chat template): many prompts, each with its own options, scheduled by continuous batching instead of one
batch that waits for its slowest sequence.

Each prompt becomes an engine request; every prompt is validated before any runs (a bad one is an error
naming its index, and nothing is queued); the results are ``generate()``'s, one single-prompt
``GenerationResult`` per prompt in the prompts' order, each equal to ``generate(model, prompt, options)``
alone (the engine's guarantee: tests/test_serve_engine.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple

from ..chat import apply_chat_template
from ..engine import GenerationResult
from ..errors import InputError, LatentRTError
from ..logprobs import TokenLogprob
from ..options import GenerateOptions


def _prompt_list(prompts) -> list:
    """One prompt (a str, a list of ids) or a sequence of them, as a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
        raise InputError(
            f"prompts must be a prompt (text, a list of token ids) or a list of them, got {type(prompts).__name__}"
        )
    if not prompts:
        raise InputError("prompts is empty: give at least one prompt")
    return list(prompts)


def _options_per_prompt(options, n: int) -> list:
    """``options``: None, one GenerateOptions for every prompt, or a list with one (or None) per prompt."""
    if options is None or isinstance(options, GenerateOptions):
        return [options] * n
    if not isinstance(options, (list, tuple)):
        raise InputError(f"options must be a GenerateOptions or a list of them, got {type(options).__name__}")
    if len(options) != n:
        raise InputError(f"options has {len(options)} entries for {n} prompts: give one per prompt (or one for all)")
    return list(options)


def _per_prompt(name: str, value, n: int) -> list:
    """A keyword given for every prompt, or as a list with one per prompt (each checked by the engine)."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise InputError(f"{name} has {len(value)} entries for {n} prompts: give one per prompt (or one for all)")
    return list(value)


def kv_bytes(engine, req) -> int:
    """What ``generate()`` alone reports as ``kv_bytes`` for a finished request: the bytes of K/V its cache
    holds for the positions filled (the prompt as run, then every token sampled but the last, which ends the
    sequence without being run: a stop token the output leaves out counts), in the request's KV mode at the
    model's dtype."""
    with engine.lock:  # (a server thread's step may be replacing the program: latentrt/serve/engine.py's _reset)
        per_position = engine.program.pool.position_bytes(engine.program.kv_mode(req.decoder))
    sampled = len(req.tokens) + req.stop_token_left_out
    return per_position * (req.prompt_tokens + max(sampled - 1, 0))


def generate_all(engine, prompts, options=None, *, priority=0, adapter=None, **kwargs) -> list[GenerationResult]:
    """``Engine.generate``: see the module docstring. ``options``: one ``GenerateOptions`` or a list with one
    per prompt; ``priority``: one for every prompt or a list with one per prompt (vLLM's keyword: under the
    engine's "priority" scheduling policy, the lower first); ``adapter``: the served LoRA adapter's name, one for
    every prompt or one per prompt (vLLM's ``lora_request``; None: the base model); ``kwargs`` replace fields of
    every prompt's options (as ``generate()``'s keywords)."""
    prompts = _prompt_list(prompts)
    per_prompt = _options_per_prompt(options, len(prompts))
    priorities = _per_prompt("priority", priority, len(prompts))
    adapters = _per_prompt("adapter", adapter, len(prompts))
    requests = []
    for i, (prompt, opts) in enumerate(zip(prompts, per_prompt)):
        try:
            requests.append(
                engine.request(
                    prompt, opts, text_per_token=False, priority=priorities[i], adapter=adapters[i], **kwargs
                )
            )
        except LatentRTError as exc:
            raise type(exc)(f"prompts[{i}]: {exc}") from None
    for req in requests:  # (the caller holds every prompt: the engine's max_queue is the server's backpressure)
        engine.enqueue(req, beyond_max_queue=True)
    if engine.looping:  # another thread runs the engine (a server): wait for ours
        for req in requests:
            req.done.wait()
    else:
        while not all(req.finished for req in requests):
            engine.step()
    for i, req in enumerate(requests):
        if req.error is not None:
            error = req.error
            raise (type(error)(f"prompts[{i}]: {error}") if isinstance(error, LatentRTError) else error) from None
    return [result_of(engine, req) for req in requests]


def chat_all(
    engine,
    conversations,
    options=None,
    *,
    template=None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
    tools: list[dict] | None = None,
    **kwargs,
) -> list[GenerationResult]:
    """``Engine.chat`` (vLLM's ``LLM.chat``): each conversation (OpenAI-style messages; one conversation or a list of
    them) rendered by the model's chat template as ``apply_chat_template`` renders it (the server's chat route;
    ``tools``: the functions it shows, vLLM's keyword), then ``generate_all``. A conversation the template
    cannot render is an error naming its index, before any runs."""
    if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
        conversations = [conversations]  # (one conversation)
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise InputError(
            f"conversations must be a list of messages or a list of such lists, got {conversations!r:.200}"
        )
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise InputError(f"chat_template_kwargs must be a dict, got {chat_template_kwargs!r:.200}")
    prompts = []
    for i, messages in enumerate(conversations):
        try:
            prompts.append(
                apply_chat_template(
                    engine.model,
                    messages,
                    template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    tools=tools,
                    **(chat_template_kwargs or {}),
                )
            )
        except LatentRTError as exc:
            raise type(exc)(f"conversations[{i}]: {exc}") from None
    return generate_all(engine, prompts, options, **kwargs)


def result_of(engine, req) -> GenerationResult:
    """A finished request as ``generate()`` alone returns its single prompt."""
    thoughts = req.decoder.thoughts_per_sequence(req.batch)[0]
    return GenerationResult(
        tokens=list(req.tokens),
        steps=list(req.steps),
        text=req.text if req.sequence_text is not None else None,
        kv_bytes=kv_bytes(engine, req),
        finish_reasons=[req.finish_reason],
        num_thoughts=thoughts,
        backend=engine.model.backend.name,
        prefill_steps=None if req.prefill_steps is None else list(req.prefill_steps),
        logprobs=None if req.options.logprobs is None else [TokenLogprob(*astuple(lp)[:3]) for lp in req.logprobs],
    )
