"""Prompt normalisation: str / list[str] / list[int] / list[list[int]] / LongTensor (or an integer numpy array)
-> left-padded ids + mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .caller import warn_at_caller
from .errors import InputError, check_unicode

# what generate() takes as a prompt: one text or id list (a 1-D tensor / array), or a batch of them
Prompt = str | list[str] | list[int] | list[list[int]] | Tensor | np.ndarray


@dataclass
class Batch:
    ids: Tensor  # [B, S] long, left-padded
    mask: Tensor  # [B, S] bool, False on padding
    single: bool  # the caller passed one prompt (results are unwrapped)

    def lengths(self) -> list[int]:
        """Real tokens per sequence (host values)."""
        return self.mask.sum(1).tolist()


def padding_note(cfg) -> str:
    """Why ids between the vocabulary and the embedding's rows are refused too."""
    if cfg.padded_vocab_size == cfg.vocab_size:
        return ""
    rows = f"{cfg.vocab_size}-{cfg.padded_vocab_size - 1}"
    return f" (the vocabulary has {cfg.vocab_size} tokens; embedding rows {rows} are padding)"


def check_ids(ids, cfg, device: torch.device | str) -> Tensor:
    """Validate a [B,S] (or [S]) id tensor against the vocabulary and block size."""
    if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str)):
        raise InputError("input_ids must be token ids, not text: encode it first (model.tokenizer.encode(text).ids)")
    if not isinstance(ids, Tensor):
        try:
            ids = torch.as_tensor(ids, device="cpu")  # host values, checked here, then moved
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise InputError(f"input_ids must be a tensor or nested list of ints in range: {exc}") from None
    if ids.numel() == 0:  # (an empty list becomes a float tensor: say what is wrong, not its dtype)
        raise InputError(f"input_ids is empty (shape {tuple(ids.shape)}): a prompt needs at least one token")
    if ids.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
        raise InputError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise InputError(f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(ids.shape)}")
    if ids.shape[1] > cfg.block_size:
        raise InputError(f"prompt has {ids.shape[1]} tokens, longer than the model's context ({cfg.context()})")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise InputError(f"token id out of range [0, {cfg.vocab_size}){padding_note(cfg)}: min {lo}, max {hi}")
    return ids.to(device=device, dtype=torch.long)


def check_left_padding(mask, ids: Tensor) -> Tensor:
    """A [B, S] mask of the ids' shape, left padding only (0...0 1...1 per row), as bool on their device;
    None: every position is real."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    try:
        mask = torch.as_tensor(mask, device=ids.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"attention_mask must be a tensor of 0/1: {exc}") from None
    if mask.dim() == 1 and ids.shape[0] == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
    if mask.is_floating_point() and not ((mask == 0) | (mask == 1)).all():
        raise InputError("attention_mask must hold 0/1 (or bool) values")
    mask = mask.bool()
    if not mask[:, -1].all():
        raise InputError("attention_mask must use left padding (last position real in every row)")
    if (mask[:, 1:].long() - mask[:, :-1].long() < 0).any():
        raise InputError("attention_mask must be a left-padding mask (0...0 1...1 per row)")
    return mask


def unknown_words(tokenizer, text: str, encoding) -> list[str]:
    """Words of ``text`` the tokenizer mapped to its unknown token (a word-level vocabulary's gaps)."""
    unk = getattr(tokenizer.model, "unk_token", None)
    unk_id = tokenizer.token_to_id(unk) if unk else None
    if unk_id is None:
        return []
    spans = zip(encoding.ids, encoding.offsets, encoding.special_tokens_mask)
    return [text[a:b] for i, (a, b), added in spans if i == unk_id and not added and text[a:b] != unk]


def prompt_ids(encoding) -> list[int]:
    """A text's ids for a generation prompt: with the tokens the tokenizer's post-processor adds before the
    text (a BOS), without those it appends after it (an end-of-text: the prompt continues its text, it does
    not end it; Huginn-0125's card strips that token with ``[:, :-1]``). ``special_tokens_mask`` marks
    exactly the post-processor's tokens, not special tokens written in the text."""
    mask = encoding.special_tokens_mask
    last_text = max((i for i, added in enumerate(mask) if not added), default=None)
    return encoding.ids if last_text is None else encoding.ids[: last_text + 1]


def encode_text(tokenizer, texts: list[str], strict: bool = False, add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text (``prompt_ids``; ``add_special_tokens=False``: the text's tokens alone); a clear
    error for text the tokenizer cannot take (e.g. lone surrogates). Words the tokenizer does not know (they
    become its unknown token) are a warning naming them, or an InputError with ``strict``."""
    out = []
    for i, t in enumerate(texts):
        which = f"prompt {i}" if len(texts) > 1 else "the prompt"  # one prompt: no index to name
        check_unicode(which, t)
        enc = tokenizer.encode(t, add_special_tokens=add_special_tokens)
        unknown = unknown_words(tokenizer, t, enc)
        if unknown:
            msg = (
                f"{len(unknown)} word(s) of {which} are not in the tokenizer's vocabulary and became its unknown "
                f"token: {sorted(set(unknown))[:10]}"
            )
            if strict:
                raise InputError(msg)
            warn_at_caller(msg, UnknownWordsWarning)  # at the caller of generate()
        out.append(prompt_ids(enc))
    return out


class UnknownWordsWarning(UserWarning):
    """A prompt had words outside the tokenizer's vocabulary."""


def prompt_texts(prompt) -> list[str] | None:
    """The texts of a text prompt (a str or a list of str), or None for the other prompt forms."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return None


def make_batch(
    prompt,
    tokenizer,
    cfg,
    device: torch.device | str,
    attention_mask: Tensor | None = None,
    pad_id: int = 0,
    strict: bool = False,
) -> Batch:
    """Turn any accepted prompt form into a left-padded batch (``strict``: unknown words are an error)."""
    if attention_mask is not None and not isinstance(prompt, (Tensor, np.ndarray)):  # it was ignored unsaid
        raise InputError(
            "attention_mask applies to a tensor prompt (input_ids [B, S], left-padded); a list of prompts is padded "
            f"by latentrt (leave attention_mask out), got a {type(prompt).__name__} prompt"
        )
    if isinstance(prompt, np.ndarray) and prompt.dtype.kind in "iufb":  # a tokenizer's return_tensors="np"
        prompt = torch.from_numpy(prompt)
    single = isinstance(prompt, str)
    texts = prompt_texts(prompt)
    if texts is not None:
        if tokenizer is None:
            raise InputError("this model has no tokenizer.json: pass token ids instead of text")
        seqs = encode_text(tokenizer, texts, strict)
    elif (
        isinstance(prompt, (list, tuple))
        and prompt
        and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
    ):
        seqs, single = [list(prompt)], True
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt):
        seqs = [list(p) for p in prompt]
    elif isinstance(prompt, Tensor):
        single = prompt.dim() == 1
        ids = check_ids(prompt, cfg, device)
        mask = check_left_padding(attention_mask, ids)
        return Batch(ids, mask, single)
    elif isinstance(prompt, (list, tuple)) and not prompt:
        raise InputError(f"empty prompt: got an empty {type(prompt).__name__} (no prompt, no token)")
    elif isinstance(prompt, (list, tuple)) and all(isinstance(p, dict) and "role" in p for p in prompt):
        raise InputError(
            "prompt is a conversation (a list of {'role': ..., 'content': ...}): generate() takes text or ids; "
            "pass latentrt.apply_chat_template(model, messages), which renders it as the model was tuned"
        )
    else:
        raise InputError(
            "prompt must be a str, a list of str, a list of token ids, or a LongTensor "
            f"[B, S]; got {type(prompt).__name__}"
        )
    if any(len(s) == 0 for s in seqs):
        raise InputError("empty prompt: every prompt needs at least one token")
    vocab = cfg.vocab_size
    for s in seqs:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in s):
            raise InputError("token ids must be integers")
        out_of_range = [t for t in s if not 0 <= t < vocab]
        if out_of_range:
            raise InputError(f"token id out of range [0, {vocab}){padding_note(cfg)}: {out_of_range[:5]}")
    batch = left_padded(seqs, single, "cpu", pad_id)
    return Batch(check_ids(batch.ids, cfg, device), batch.mask.to(device), single)


def left_padded(seqs: list[list[int]], single: bool, device: torch.device | str, pad_id: int = 0) -> Batch:
    """Token-id lists as one left-padded batch (built on the host, moved once)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros(len(seqs), width, dtype=torch.bool, device="cpu")
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long, device="cpu")
        mask[i, width - len(s) :] = True
    return Batch(ids.to(device), mask.to(device), single)
