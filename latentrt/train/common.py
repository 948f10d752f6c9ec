"""What both trainers share: options, AdamW with warmup + cosine (or warmup-stable-decay), clipping, autocast
(checkpoints: checkpoints.py); ``TrainOptions.coconut_published()`` and ``TrainOptions.huginn_published()``
give the published recipes' optimisers instead."""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from ..errors import InputError, check_bool, check_finite, check_float, check_int, is_choice, plain_scalar
from ..prompts import padding_note
from ..sampling import MAX_SEED


@dataclass
class TrainOptions:
    steps: int = 1000  # optimizer steps in all (Coconut: split evenly over the curriculum's stages)
    batch_size: int = 32  # per process and optimizer step
    micro_batch_size: int | None = None  # rows per forward pass, gradients accumulated up to batch_size (None: all)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # "cosine": warmup, cosine decay; "wsd": warmup, constant, decay over `cooldown` steps
    cooldown: int = 0  # "wsd": the decay's steps (the last ones)
    grad_clip: float | None = 1.0  # None: no clipping (the norm is still reported)
    betas: tuple[float, float] = (0.9, 0.95)
    decay_everything: bool = False  # weight decay on norms, biases and qk_bias too (the published Coconut's AdamW)
    seed: int = 0
    out: str | None = None  # checkpoint folder; None: do not save
    overwrite: bool = False  # replace a checkpoint already in ``out`` (else that is an error, unless resuming it)
    save_every: int = 0  # 0: only at the end (and at each Coconut stage end)
    log_every: int = 20
    checkpoint_activations: bool = False
    # recurrent: each example cut to max_seq_length + 1 tokens (inputs and shifted targets) and every batch padded
    # to that width (the model's context at most), as the published fine-tuning script truncates and pads them
    # (None: not cut, batches padded to their longest example)
    max_seq_length: int | None = None
    # bf16 autocast on a GPU over the weights' own dtype (latentrt's recipe); the published recipes run without
    # it, in the dtype the weights were loaded in (Huginn's script: bf16 weights, its "bf16-true"; Coconut's run.py:
    # fp32, its "bf16: False"). fp32 weights with it are the Huginn script's "bf16-mixed". No effect on a CPU.
    autocast: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy scalars (a sweep's np.arange / np.logspace) as Python numbers
            value = getattr(self, f.name)
            plain = tuple(plain_scalar(v) for v in value) if isinstance(value, tuple) else plain_scalar(value)
            setattr(self, f.name, plain)

    @classmethod
    def coconut_published(cls, **overrides) -> TrainOptions:
        """The optimiser of Coconut's run.py and args/*_coconut.yaml: AdamW at a constant lr 1e-4 (no warmup, no
        decay), weight decay 0.01 on every parameter, torch's default betas, no clipping, batch 32 per process,
        no autocast (run.py trains in fp32 unless its ``bf16``: the weights' own dtype). Its epochs (stages of 5
        epochs, each a shuffled pass, the optimizer reset every epoch) come from the curriculum:
        ``Curriculum.published`` (latentrt/train/coconut.py); the shuffle is latentrt's own seeded one, not the
        datasets library's."""
        published = dict(lr=1e-4, weight_decay=0.01, warmup=0, min_lr_ratio=1.0, grad_clip=None)
        published.update(betas=(0.9, 0.999), decay_everything=True, batch_size=32, autocast=False)
        return cls(**{**published, **overrides})

    @classmethod
    def huginn_published(cls, steps: int = 1000, **overrides) -> TrainOptions:
        """The optimiser of Huginn's published fine-tuning script (``finetuning_simple_example.py``): AdamW at
        lr 5e-7, no weight decay, betas (0.9, 0.95); transformers' warmup-stable-decay schedule with 10% of
        the steps warming up, 10% decaying (cosine) to 0.001 x lr; batch 32 in micro-batches of 2; gradients
        clipped at norm 1e6 (in effect never); each example cut to max_seq_length 128 (+ 1) tokens; no autocast
        (its default precision "bf16-true": the bf16 weights ``load`` gives on a GPU, as they are). Its data:
        ``train_recurrent``'s conversation records ({question, answer} ones as it makes them)."""
        warm = math.ceil(0.1 * steps)
        published = dict(lr=5e-7, weight_decay=0.0, betas=(0.9, 0.95), decay_everything=True, grad_clip=1e6)
        published.update(schedule="wsd", warmup=warm, cooldown=warm, min_lr_ratio=0.001)
        published.update(batch_size=32, micro_batch_size=2, max_seq_length=128, autocast=False)
        return cls(**{**published, "steps": steps, **overrides})

    def validate(self) -> None:
        """InputError naming the first option of the wrong type or out of its range (before any work starts, so
        a typo fails at once rather than as a TypeError inside the optimizer or a NaN loss later)."""
        for name in ("steps", "batch_size"):
            check_int(name, getattr(self, name), 1)
        micro = self.micro_batch_size
        if micro is not None and not (type(micro) is int and micro >= 1 and self.batch_size % micro == 0):
            raise InputError(f"micro_batch_size must divide batch_size={self.batch_size}, got {micro!r}")
        if not is_choice(self.schedule, ("cosine", "wsd")):
            raise InputError(f"schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        for name in ("warmup", "cooldown", "save_every", "log_every"):
            check_int(name, getattr(self, name), 0)
        check_int("seed", self.seed, 0, MAX_SEED, high_label="2**63 - 1")
        if not (check_finite("lr", self.lr) > 0):
            raise InputError(f"lr must be > 0, got {self.lr!r}")
        check_finite("weight_decay", self.weight_decay, 0)
        if self.grad_clip is not None:
            check_float("grad_clip", self.grad_clip, 0)
            if not self.grad_clip > 0:
                raise InputError(f"grad_clip must be > 0 or None (no clipping), got {self.grad_clip!r}")
        check_float("min_lr_ratio", self.min_lr_ratio, 0, 1)
        if not self.min_lr_ratio > 0:
            raise InputError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio!r}")
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_beta(b) for b in betas)):
            raise InputError(f"betas must be two numbers in [0, 1), as AdamW takes them, got {betas!r}")
        if self.max_seq_length is not None:
            check_int("max_seq_length", self.max_seq_length, 1)
        for name in ("decay_everything", "overwrite", "checkpoint_activations", "autocast", "progress"):
            check_bool(name, getattr(self, name))
        if self.out is not None and not isinstance(self.out, (str, os.PathLike)):
            raise InputError(f"out must be a folder path or None, got {self.out!r}")


def _is_beta(value) -> bool:
    """A number in [0, 1) (not a bool): what torch's AdamW accepts as a beta."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < 1


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms / biases / qk_bias do not (all of them with ``decay_everything``)."""
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    decay = [p for n, p in params if p.dim() >= 2 or opts.decay_everything]
    no_decay = [p for n, p in params if not opts.decay_everything and (p.dim() < 2 or n.endswith("qk_bias"))]
    decay = [p for p in decay if all(p is not q for q in no_decay)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.lr,
        betas=tuple(opts.betas),
    )


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr over opts.steps (constant with no warmup and
    min_lr_ratio 1); or with ``schedule="wsd"`` transformers' warmup-stable-decay (``get_wsd_schedule``:
    linear warmup from min_lr_ratio, constant, cosine decay over the last ``cooldown`` steps)."""
    if opts.schedule == "wsd":
        return opts.lr * _wsd_factor(
            step, opts.warmup, opts.steps - opts.warmup - opts.cooldown, opts.cooldown, opts.min_lr_ratio
        )
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = min(1.0, (step - opts.warmup) / max(1, opts.steps - opts.warmup))
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _wsd_factor(step: int, warmup: int, stable: int, decay: int, low: float) -> float:
    """transformers' warmup-stable-decay factor (linear warmup, cosine decay) with ``low`` its min_lr_ratio."""
    if step < warmup:
        return max(0.0, step / max(1, warmup) * (1 - low) + low)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)) * (1 - low) + low)
    return low


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU where ``enabled`` (``TrainOptions.autocast``); else, and on a CPU, none: the
    weights' own dtype."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


def begin_step(optimizer: torch.optim.Optimizer, step: int, opts: TrainOptions) -> None:
    """Set the step's learning rate and clear the gradients (then backward, as many micro-batches as wanted)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, opts)
    optimizer.zero_grad(set_to_none=True)


def finish_step(module: nn.Module, optimizer: torch.optim.Optimizer, opts: TrainOptions) -> float:
    """Clip (or only measure) the gradients' norm and step; returns the norm."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), math.inf if opts.grad_clip is None else opts.grad_clip)
    # AdamW makes its per-parameter step counts on torch's default device at the first step (torch 2.11; 2.13
    # names the CPU): a caller's default device "meta" left them without values (an error), "cuda" would
    # read one back per parameter each step. torch's own default, whatever the caller set:
    with torch.device("cpu"):
        optimizer.step()
    return float(norm)


@functools.lru_cache(maxsize=4)  # (a trainer asks for the same epoch at every step; the shuffle is O(records))
def epoch_batches(
    n_records: int, batch_size: int, seed: int, epoch: int | tuple[int, int], rank: int, world: int
) -> list[list[int]]:
    """An epoch's batches of record indices on this process: one shuffle seeded by (``seed``, ``epoch``) of every
    record (the same on every process; ints only, so no hash randomisation), padded with its first records to a
    multiple of ``world`` as torch's DistributedSampler pads, its share ``rank::world`` in order, cut into batches
    (the last may be short): every process runs as many, and an epoch passes over every record once (the published
    scripts' shuffled DataLoader passes)."""
    order = list(range(n_records))
    random.Random((seed, epoch).__hash__()).shuffle(order)
    order += order[: -len(order) % world]
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def micro_batches(items: list, opts: TrainOptions) -> list[list]:
    """A step's records cut into micro-batches of ``opts.micro_batch_size`` (the whole batch without one)."""
    size = opts.micro_batch_size or len(items)
    return [items[i : i + size] for i in range(0, len(items), size)]


def accumulate(module: nn.Module, chunks: list, loss_of: Callable[[object], torch.Tensor]) -> list[float]:
    """Backward the loss of every micro-batch in ``chunks`` divided by their number (gradients add up to the
    batch's mean loss, as the published scripts' accumulation does); under DistributedDataParallel only the
    last backward all-reduces. ``loss_of(chunk)`` runs the forward. Returns each micro-batch's loss."""
    from . import distributed

    losses = []
    for m, chunk in enumerate(chunks):
        with distributed.no_sync(module, m < len(chunks) - 1):
            loss = loss_of(chunk)
            (loss / len(chunks) if len(chunks) > 1 else loss).backward()
        losses.append(loss.item())
    return losses


def check_arguments(model: nn.Module, tokenizer, records, opts, model_type: str, trainer: str) -> None:
    """A trainer's arguments, before anything else: a latentrt model of the family it trains (``model_type``),
    a tokenizer, records and a TrainOptions; a wrong one is an InputError naming it (it was an AttributeError
    or a ValueError from deep inside)."""
    from ..families import FAMILIES, family_for

    family = family_for(model)  # (anything but a loaded model: its own error)
    if model.config.model_type != model_type:
        raise InputError(f"{trainer} trains {FAMILIES[model_type].title} models; this is a {family.title} model")
    if not all(callable(getattr(tokenizer, name, None)) for name in ("encode", "token_to_id")):  # (a str has encode)
        raise InputError(
            f"{trainer} needs a tokenizer (the model's: model.tokenizer; a model without tokenizer.json has none), "
            f"got {type(tokenizer).__name__}"
        )
    if isinstance(records, (list, tuple)) and not records:
        raise InputError("records is empty: nothing to train on")
    if not isinstance(opts, TrainOptions):
        raise InputError(f"opts must be a TrainOptions, got {type(opts).__name__}")


def check_vocabulary(records: list[list[int]], cfg) -> None:
    """InputError naming the first record holding a token id the model has no vocabulary row for (a tokenizer
    with more tokens than the model, or an end-of-text id outside it), as generate() refuses such a prompt: an
    embedding's padding rows would train silently, an id past them fail deep inside a batch."""
    for i, ids in enumerate(records):
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(
                f"records: record {i} holds token id {bad[0]}, outside the model's vocabulary [0, {cfg.vocab_size})"
                f"{padding_note(cfg)}: the tokenizer and the model do not match"
            )


def prepare(model: nn.Module, tokenizer, opts: TrainOptions, resume: str | None) -> tuple[int, int, torch.device]:
    """Validate options and the output folder, join the process group (torchrun), check that something is
    trainable and that its gradients and AdamW's moments fit beside the weights, seed every process alike, and
    put the model in training mode on its device with the tokenizer attached (so checkpoints carry
    tokenizer.json)."""
    from ..memory import check_fits
    from . import distributed
    from .checkpoints import check_output_folder

    opts.validate()
    check_output_folder(opts.out, resume, opts.overwrite)
    rank, world, device = distributed.init()
    trainable = {id(p): p.numel() * p.element_size() for p in model.parameters() if p.requires_grad}  # tied: once
    if not trainable:
        raise InputError(
            "every parameter of the model is frozen (requires_grad=False): nothing to train; unfreeze what should "
            "train (model.requires_grad_(True), or per module)"
        )
    what = "training's gradients and AdamW's two moments (3 x the trainable weights' bytes, before activations)"
    check_fits(3 * sum(trainable.values()), device, what, InputError)
    # the same seed on every process, as both published trainers seed (Coconut's set_seed, Huginn's
    # seed_everything): dropout masks and initial states drawn alike; each process's data differs by rank
    seed_all(opts.seed)
    model.to(device).train()  # (parameters a user froze stay frozen: the optimizer takes the others, as HF's Trainer)
    model.tokenizer = tokenizer
    return rank, world, device
