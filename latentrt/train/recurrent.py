"""Recurrent-depth trainer: depth sampled per step as published, truncated backprop through depth."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..caller import warn_at_caller
from ..chat import ChatTemplate, chat_template_for
from ..errors import InputError
from ..hooks import HookList
from ..records import Record
from . import distributed
from .checkpoints import load_training, save_training
from .common import (
    TrainOptions,
    accumulate,
    autocast,
    begin_step,
    check_arguments,
    check_vocabulary,
    epoch_batches,
    finish_step,
    make_optimizer,
    micro_batches,
    prepare,
)
from .examples import training_examples


def sample_depth(mean_recurrence: int, backprop_depth: int, generator: torch.Generator) -> tuple[int, int]:
    """tau ~ LogNormal(ln(max(mean, k)) - s^2/2, s = 0.5), r = Poisson(tau) + 1; the last min(k, r)
    iterations carry gradients, the first r - that run under no_grad. Returns (no-grad iterations, grad
    iterations). (The published sampler's log-mean is ln(max(mean - k, 0) + k): the mean, or k when the
    backprop depth is the larger.)"""
    sigma = 0.5
    mu = math.log(max(mean_recurrence, backprop_depth)) - sigma**2 / 2
    tau = torch.empty(1, dtype=torch.float32, device="cpu").log_normal_(mu, sigma, generator=generator)
    r = int(torch.poisson(tau, generator=generator).item()) + 1
    k = min(backprop_depth, r)
    return r - k, k


def cut_examples(data: list[tuple[list[int], list[int]]], max_seq_length: int) -> list[tuple[list[int], list[int]]]:
    """Each example cut to ``max_seq_length`` + 1 tokens, as the published fine-tuning script truncates them
    (its inputs are the first max_seq_length, its targets the last); an example left with no token under the
    loss is left out (in the published run its micro-batch's loss could be a NaN). One warning counts both;
    an InputError if nothing is left."""
    keep = max_seq_length + 1
    cut = [(x[:keep], y[:keep]) for x, y in data]
    kept = [(x, y) for x, y in cut if any(label != -100 for label in y[1:])]
    n_cut = sum(len(x) > keep for x, _ in data)
    if not kept:
        raise InputError(
            f"no record has a token under the loss within max_seq_length + 1 = {keep} tokens: raise max_seq_length, "
            "or turn the cut off (None; 0 on the command line)"
        )
    if n_cut:
        left_out = len(data) - len(kept)
        warn_at_caller(
            f"{n_cut} of {len(data)} records are longer than max_seq_length + 1 = {keep} tokens and are cut there, as "
            f"the published fine-tuning script cuts them"
            + (f"; {left_out} left with no token under the loss are left out" if left_out else "")
            + " (max_seq_length=None, --max-seq-length 0 on the command line, keeps them whole)",
        )
    return kept


def collate(
    examples: list[tuple[list[int], list[int]]], pad: int, device, width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Right-padded ids and labels (causal attention never looks right, so no mask is needed), to ``width``
    columns (default: the longest example's)."""
    width = max(len(ids) for ids, _ in examples) if width is None else width
    ids = torch.full((len(examples), width), pad, dtype=torch.long, device="cpu")
    labels = torch.full((len(examples), width), -100, dtype=torch.long, device="cpu")
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long, device="cpu")
        labels[i, : len(y)] = torch.tensor(y, dtype=torch.long, device="cpu")
    return ids.to(device), labels.to(device)


class RecurrentLoss(nn.Module):
    """Next-token loss on the coda output; a module so DistributedDataParallel can wrap it. As the published
    fine-tuning script calls the model: the ids but the last (whose prediction has no target) against the
    labels shifted by one, so the random initial state is drawn for those positions as the published
    forward draws it (and the last position costs nothing)."""

    def __init__(self, model: nn.Module, hooks: HookList | None = None, checkpoint: bool = False) -> None:
        super().__init__()
        self.model, self.hooks, self.checkpoint = model, hooks, checkpoint

    def forward(self, ids: Tensor, labels: Tensor, n_no_grad: int, n_grad: int) -> Tensor:
        logits = self.model.forward_train(ids[:, :-1], n_no_grad, n_grad, checkpoint=self.checkpoint, hooks=self.hooks)
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def train_recurrent(
    model: nn.Module,
    tokenizer,
    records: list[Record] | list[dict],
    opts: TrainOptions,
    *,
    hooks=None,
    resume: str | None = None,
    on_step: Callable[[dict], None] | None = None,
    loss_on: str = "assistant",
    chat_template: ChatTemplate | str | None = None,
) -> list[dict]:
    """Train in place; returns the log (step, epoch, loss, depth, grad_norm, lr; ``on_step``, if given, receives each
    entry as it is made, on the main process). Runs under torchrun with DDP. ``records``: question-answer records,
    conversations (``{"messages": [...]}``, through the model's chat template or ``chat_template``, the loss on the
    assistant's tokens or with ``loss_on="all"`` on every token) or texts (``{"text": ...}``), mixed as you like
    (latentrt/train/examples.py). Each step takes ``opts.batch_size`` records from a shuffled pass over them (an
    epoch: every record once, the last batch short; per process under torchrun, as torch's DistributedSampler shares
    them); with ``opts.micro_batch_size`` they run in micro-batches whose gradients add up (each loss divided by
    their number, as the published fine-tuning script does), each at its own sampled depth (the published model
    draws one per forward; the log's ``depth`` is then a list). Checkpoints (``opts.out``) keep the source folder's
    chat template and generation defaults, and ``chat_template`` when one is given (as chat_template.jinja).
    ``resume``: a checkpoint folder of this run (weights, optimizer, RNG and step are restored; the result equals an
    uninterrupted run's bit for bit)."""
    check_arguments(model, tokenizer, records, opts, "huginn_raven", "train_recurrent")
    rank, world, device = prepare(model, tokenizer, opts, resume)
    cfg = model.config
    template = chat_template_for(model, chat_template)
    # a template given for this run is the checkpoint's (chat_template.jinja wins over the source folder's)
    files = {"chat_template.jinja": template.source} if chat_template is not None else None
    data = training_examples(
        records, tokenizer, eos_token_id=getattr(model, "eos_token_id", None), chat_template=template, loss_on=loss_on
    )
    check_vocabulary([x for x, _ in data], cfg)
    if opts.max_seq_length is not None:
        data = cut_examples(data, opts.max_seq_length)
    too_long = [i for i, (x, _) in enumerate(data) if len(x) > cfg.block_size]
    if too_long:
        raise InputError(f"records {too_long[:5]} are longer than block_size={cfg.block_size}")
    pad = tokenizer.token_to_id("<|pad|>")
    pad = data[0][0][-1] if pad is None else pad  # any id: padding is right of every real token, with no loss
    # with the cut, every batch padded to max_seq_length + 1 columns as the script pads it (padding="max_length"):
    # the random initial state is drawn over those positions, so a batch draws the script's numbers
    width = None if opts.max_seq_length is None else min(opts.max_seq_length + 1, cfg.block_size)
    loss_fn = distributed.wrap(RecurrentLoss(model, HookList(hooks), opts.checkpoint_activations), device)
    optimizer = make_optimizer(model, opts)
    start = load_training(resume, model, optimizer)["step"] if resume else 0

    def loss_of(chunk: list, depth_rng: torch.Generator, depths: list[int]) -> Tensor:
        """A micro-batch's loss at its own sampled depth (the published model draws one per forward)."""
        n_no_grad, n_grad = sample_depth(cfg.mean_recurrence, cfg.mean_backprop_depth, depth_rng)
        depths.append(n_no_grad + n_grad)
        ids, labels = collate(chunk, pad, device, width)
        with autocast(device, opts.autocast):
            return loss_fn(ids, labels, n_no_grad, n_grad)

    log: list[dict] = []
    per_epoch = len(epoch_batches(len(data), opts.batch_size, opts.seed, 0, rank, world))
    bar = tqdm(range(start, opts.steps), desc="recurrent", disable=not (opts.progress and distributed.is_main()))
    for step in bar:
        # the depths are functions of (seed, step), identical on every rank, and the batches of (seed, step, rank):
        # shuffled passes over the records (each once per epoch, the last batch short); reproducible on resume
        depth_rng = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
        epoch, k = divmod(step, per_epoch)
        picked = [data[i] for i in epoch_batches(len(data), opts.batch_size, opts.seed, epoch, rank, world)[k]]
        begin_step(optimizer, step, opts)
        depths: list[int] = []
        losses = accumulate(loss_fn, micro_batches(picked, opts), partial(loss_of, depth_rng=depth_rng, depths=depths))
        gnorm = finish_step(loss_fn, optimizer, opts)
        entry = {
            "step": step + 1,
            "epoch": epoch + 1,
            "loss": distributed.mean(sum(losses) / len(losses), device),
            "depth": depths[0] if len(depths) == 1 else depths,
            "grad_norm": gnorm,
            "lr": optimizer.param_groups[0]["lr"],
        }
        log.append(entry)
        if on_step is not None and distributed.is_main():
            on_step(entry)
        if step % max(1, opts.log_every) == 0:
            bar.set_postfix(loss=f"{entry['loss']:.3f}", r=f"{sum(depths) / len(depths):.1f}")
        if opts.out and opts.save_every and (step + 1) % opts.save_every == 0 and distributed.is_main():
            save_training(model, optimizer, opts.out, step + 1, opts, files=files)
    model.eval()
    if opts.out and distributed.is_main():
        save_training(model, optimizer, opts.out, opts.steps, opts, files=files)
    distributed.barrier()
    return log
