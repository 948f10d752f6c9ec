"""Coconut trainer: the multi-stage curriculum replacing reasoning steps by continuous thoughts.

At stage s (0 <= s <= max_stage) the first s reasoning steps are removed and s*c thoughts inserted between
<|start-latent|> and <|end-latent|>; after the last stage every step is removed and the thoughts stay at
max_stage*c. Two schedules: ``opts.steps`` optimizer steps split evenly over the stages, each taking its batches
from shuffled passes over the records and resetting the optimizer at its start; or, with ``Curriculum.epochs``,
the published one (Coconut's run.py): epoch e trains stage e // ``epochs_per_stage`` (the final stage from
max_stage + 1 on), each epoch one shuffled pass over the records in batches, the optimizer reset at every epoch
(its ``reset_optimizer``; off for its CoT config), the first ``start_epoch`` epochs skipped (its ``resume``:
GSM8k's Coconut starts at epoch 3 from a CoT-tuned model). ``uniform_prob`` mixes stages as its analysis runs
do. The loss covers only the remaining steps and the answer (not the question, the markers or the thoughts).
Thoughts run as KV-cached single-position passes (the runtime's own run_prompt over a differentiable cache), so
gradients flow through the chain. Baselines by mode (run.py's methods): ``cot`` (steps in language), ``nocot``
(answer only), ``pause`` (the same layout as Coconut with the latent tokens as ordinary "pause" tokens),
``nothoughts`` (Coconut's curriculum removing the steps with nothing in their place: its ``no_thoughts``, "w/o
thought").
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..cache import GrowingKVCache
from ..caller import warn_at_caller
from ..decode.coconut import PROMPT_MODES, thought_prompt, trained_mode
from ..errors import InputError, check_int, is_choice
from ..hooks import HookList
from ..records import Record, as_records
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

MODES = PROMPT_MODES
STAGED_MODES = ("coconut", "pause", "nothoughts")  # the modes whose stages remove steps (cot / nocot: one stage)
# Coconut's args/{dataset}_coconut.yaml: (max_latent_stage, c_thought, num_epochs, epochs_per_stage, resume)
PUBLISHED_CURRICULA = {"prosqa": (6, 1, 50, 5, 0), "prontoqa": (6, 1, 50, 5, 0), "gsm": (3, 2, 25, 3, 3)}


@dataclass
class Curriculum:
    mode: str = "coconut"
    max_stage: int = 3  # stages 0..max_stage, then a final stage with every step removed
    thoughts_per_step: int = 1  # c
    epochs: int | None = None  # None: opts.steps split over the stages; else the published epoch schedule
    epochs_per_stage: int = 1
    start_epoch: int = 0  # the published ``resume``: the epochs before it are skipped (the epoch schedule only)
    reset_optimizer: bool = True  # a fresh optimizer (and learning-rate schedule) per stage / epoch, as published
    uniform_prob: float = 0.0  # per record and stage / epoch, the chance of a stage drawn from 0..its step count

    @classmethod
    def published(cls, dataset: str = "prosqa", mode: str = "coconut") -> Curriculum:
        """The curriculum of Coconut's args/{dataset}_coconut.yaml: ProsQA and ProntoQA 6 stages of 1 thought,
        5 epochs each, 50 epochs; GSM8k 3 stages of 2 thoughts, 3 epochs each, 25 epochs from epoch 3 (its
        ``resume: 3``: it starts from a CoT-tuned model, skipping stage 0). ``cot`` / ``nocot``: its CoT config
        (args/gsm_cot.yaml, the only one it ships): one stage, 25 epochs on GSM8k (the dataset's epochs
        elsewhere), one optimizer for the whole run (``reset_optimizer: False``)."""
        if not is_choice(dataset, PUBLISHED_CURRICULA):
            raise InputError(f"no published Coconut curriculum for {dataset!r}; known: {sorted(PUBLISHED_CURRICULA)}")
        max_stage, c, epochs, per_stage, resume = PUBLISHED_CURRICULA[dataset]
        if mode in STAGED_MODES:
            return cls(mode, max_stage, c, epochs, per_stage, start_epoch=resume)
        return cls(mode, max_stage, c, epochs, per_stage, reset_optimizer=False)

    def stages(self) -> list[int]:
        return list(range(self.max_stage + 2)) if self.mode in STAGED_MODES else [0]

    def stage_of_epoch(self, epoch: int) -> int:
        """The published schedule: stage epoch // epochs_per_stage (0 for cot / nocot); every stage past
        max_stage is the final one (they encode alike)."""
        if self.mode not in STAGED_MODES:
            return 0
        return min(epoch // self.epochs_per_stage, self.max_stage + 1)

    def validate(self) -> None:
        if self.epochs is not None:  # None: the step schedule
            check_int("epochs", self.epochs, 1)
        check_int("epochs_per_stage", self.epochs_per_stage, 1)
        check_int("max_stage", self.max_stage, 0)
        check_int("thoughts_per_step", self.thoughts_per_step, 0)
        check_int("start_epoch", self.start_epoch, 0)
        if self.start_epoch and (self.epochs is None or self.start_epoch >= self.epochs):
            raise InputError(
                f"start_epoch={self.start_epoch} skips epochs of the published epoch schedule: it needs epochs "
                f"greater than it (epochs={self.epochs})"
            )
        if not isinstance(self.reset_optimizer, bool):
            raise InputError(f"reset_optimizer must be True or False, got {self.reset_optimizer!r}")
        p = self.uniform_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise InputError(f"uniform_prob must be a probability in [0, 1], got {p!r}")
        if p and self.mode not in STAGED_MODES:
            raise InputError(
                f"uniform_prob acts only where the curriculum has stages to mix ({', '.join(STAGED_MODES)}); mode "
                f"{self.mode!r} has one"
            )

    def thoughts_at(self, stage: int, n_steps: int) -> tuple[int, int]:
        """(steps removed, thoughts inserted) at ``stage``: the published get_cot_latent_dataset's (every
        published config pads the final stage's thoughts to max_stage * c)."""
        if self.mode not in STAGED_MODES:
            return 0, 0
        c = 0 if self.mode == "nothoughts" else self.thoughts_per_step  # run.py: c_thought 0 for no_thoughts
        if stage > self.max_stage:
            return n_steps, self.max_stage * c
        return min(stage, n_steps), stage * c

    def record_stages(self, n_steps: list[int], stage: int, seed: tuple[int, ...]) -> list[int]:
        """Each record's stage in a segment training ``stage``: that stage, or with probability ``uniform_prob``
        one drawn uniformly from 0 to the record's step count (the published get_cot_latent_dataset's mixing,
        "0.3 for analysis experiments"; drawn anew per epoch, or per stage on the step schedule). ``seed``: ints
        only (their hash is not randomised), so a resumed run draws the same."""
        if not self.uniform_prob:
            return [stage] * len(n_steps)
        rng = random.Random(seed.__hash__())
        return [rng.randrange(n + 1) if rng.random() < self.uniform_prob else stage for n in n_steps]


def add_latent_markers(model: nn.Module, tokenizer) -> bool:
    """Coconut's run.py on a GPT-2 without the latent markers: ``<|start-latent|>``, ``<|end-latent|>``,
    ``<|latent|>`` added to the tokenizer in that order (ids V, V+1, V+2 after GPT-2's V tokens), the
    embedding (and the head tied to it) grown by their rows, each a copy of the embedding of ``<<`` ("it
    helps stabilize the training"), and the model's marker ids set. Returns whether it added them (a model
    that has them is unchanged)."""
    cfg = model.config
    if all(i is not None for i in model.marker_ids):
        return False
    if getattr(model, "lora", None) is not None:
        raise InputError(
            "LoRA fine-tuning needs a model that has Coconut's latent markers (a Coconut checkpoint): adding them "
            "grows the embedding, which an adapter does not carry; fine-tune the whole model, or give the markers' ids"
        )
    names = (cfg.start_latent_token, cfg.end_latent_token, cfg.latent_token)
    target = tokenizer.token_to_id("<<")
    if target is None:
        raise InputError("the tokenizer has no '<<' token, whose embedding Coconut gives the new latent markers")
    if any(tokenizer.token_to_id(name) is not None for name in names) or tokenizer.get_vocab_size() != cfg.vocab_size:
        raise InputError(
            f"cannot add the latent markers: the tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
            f"{cfg.vocab_size} embedding rows, and some markers already (pass their ids to load())"
        )
    tokenizer.add_tokens(list(names))
    wte = model.transformer.wte
    grown = type(wte)(cfg.vocab_size + 3, cfg.n_embd, device=wte.weight.device, dtype=wte.weight.dtype)
    with torch.no_grad():
        grown.weight[: cfg.vocab_size] = wte.weight
        grown.weight[cfg.vocab_size :] = wte.weight[target]
        head = model.lm_head
        if head.weight is not wte.weight:  # an untied head grows the same way
            new_head = nn.Linear(cfg.n_embd, cfg.vocab_size + 3, bias=False, device=head.weight.device)
            new_head.weight.copy_(torch.cat([head.weight, head.weight[target].expand(3, -1)]))
            model.lm_head = new_head.to(head.weight.dtype).requires_grad_(head.weight.requires_grad)
    model.transformer.wte = grown.requires_grad_(wte.weight.requires_grad)  # (a frozen embedding stays frozen)
    ids = dict(zip(("start_latent_id", "end_latent_id", "latent_id"), map(tokenizer.token_to_id, names)))
    model.config = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 3, **ids)
    model.tie_weights()
    return True


@dataclass(frozen=True)
class TokenizedRecord:
    """A record's pieces, tokenized once: every stage's sequence is assembled from them (``assemble``)."""

    question: list[int]  # the question and its newline
    steps: list[list[int]]  # each step and its newline
    answer: list[int]  # '### ' + answer, then eos


def tokenize_record(tokenizer, rec: Record) -> TokenizedRecord:
    """The published text format (Coconut's dataset.py): the question and each step end in a newline, the
    answer is '### ' + answer."""
    end = tokenizer.token_to_id("<|endoftext|>")
    if end is None:
        raise InputError(
            "Coconut's answers end in <|endoftext|> (its dataset.py appends GPT-2's eos): the tokenizer has none"
        )
    steps = [tokenizer.encode(s + "\n", add_special_tokens=False).ids for s in rec.steps]
    answer = tokenizer.encode("### " + rec.answer, add_special_tokens=False).ids + [end]
    return TokenizedRecord(thought_prompt(tokenizer, rec.question, None), steps, answer)


def latent_markers(tokenizer) -> tuple[int, int, int]:
    """The ids of <|start-latent|>, <|end-latent|>, <|latent|>."""
    return tuple(tokenizer.token_to_id(name) for name in ("<|start-latent|>", "<|end-latent|>", "<|latent|>"))


def assemble(
    rec: TokenizedRecord, cur: Curriculum, stage: int, markers: tuple[int, int, int]
) -> tuple[list[int], list[int], list[int]]:
    """(pre, post, post labels) at ``stage``: pre = question [+ start + thoughts]; post = [end +] the steps left
    + '### answer' eos; the labels leave out the end marker."""
    if cur.mode == "nocot":
        return rec.question, rec.answer, rec.answer
    if cur.mode == "cot":
        post = [t for s in rec.steps for t in s] + rec.answer
        return rec.question, post, post
    skip, k = cur.thoughts_at(stage, len(rec.steps))
    rest = [t for s in rec.steps[skip:] for t in s] + rec.answer
    if cur.mode == "nothoughts":  # no markers (run.py's no_special_marker)
        return rec.question, rest, rest
    start, end, latent = markers
    return rec.question + [start] + [latent] * k, [end] + rest, [-100] + rest


def encode(tokenizer, rec: Record, cur: Curriculum, stage: int) -> tuple[list[int], list[int], list[int]]:
    """``assemble`` of one record at one stage."""
    return assemble(tokenize_record(tokenizer, rec), cur, stage, latent_markers(tokenizer))


def check_lengths(records: list[TokenizedRecord], cur: Curriculum, stages, n_positions: int) -> None:
    """InputError naming the first record longer than the model's positions at a stage it trains on (before
    training starts: a batch drawing it later would fail hours in). Rows are padded to a common width in a
    batch, but positions count each row's own tokens, so each record need only fit alone."""
    for i, rec in enumerate(records):
        for stage in sorted(stages):
            pre, post, _ = assemble(rec, cur, stage, (0, 0, 0))  # its length only
            if len(pre) + len(post) > n_positions:
                raise InputError(
                    f"records: record {i} is {len(pre) + len(post)} tokens long at stage {stage}, more than the "
                    f"model's n_positions={n_positions}"
                )


def collate(examples, pad: int, device, latent: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The published collator's layout (Coconut's dataset.py, MyCollator): each row holding ``latent`` tokens
    left-padded so that every row's first thought falls in one column (a row without thoughts unpadded), then
    every row right-padded to the longest; labels -100 on the pre-thought part and the padding. Rows of equal
    thought counts thus share their thought columns (one single-position pass per thought for the batch), and
    a run in train mode draws GPT-2's dropout masks over the very tensors the published run does."""
    firsts = [pre.index(latent) if latent in pre else None for pre, _, _ in examples]
    target = max((f for f in firsts if f is not None), default=0)
    shifts = [0 if f is None else target - f for f in firsts]
    width = max(n + len(p) + len(q) for n, (p, q, _) in zip(shifts, examples))
    B = len(examples)
    ids = torch.full((B, width), pad, dtype=torch.long, device="cpu")
    mask = torch.zeros(B, width, dtype=torch.bool, device="cpu")
    labels = torch.full((B, width), -100, dtype=torch.long, device="cpu")
    for i, (n, (p, q, lab)) in enumerate(zip(shifts, examples)):
        ids[i, n : n + len(p) + len(q)] = torch.tensor(p + q, dtype=torch.long, device="cpu")
        mask[i, n : n + len(p) + len(q)] = True
        labels[i, n + len(p) : n + len(p) + len(lab)] = torch.tensor(lab, dtype=torch.long, device="cpu")
    return ids.to(device), mask.to(device), labels.to(device)


class CoconutLoss(nn.Module):
    def __init__(self, model: nn.Module, hooks: HookList | None, continuous: bool) -> None:
        super().__init__()
        self.model, self.hooks, self.continuous = model, hooks, continuous

    def forward(self, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        cache = GrowingKVCache(ids.shape[0], self.model.config.n_layer, ids.device)
        logits = self.model.run_prompt(ids, mask, cache, self.hooks, continuous=self.continuous)[0]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def stage_steps(total: int, n_stages: int) -> list[int]:
    """``total`` optimizer steps split evenly over the stages (the remainder in the last)."""
    per = total // n_stages
    return [per] * (n_stages - 1) + [total - per * (n_stages - 1)]


@dataclass
class Segment:
    """A run of optimizer steps on one stage's data with one optimizer (made at its start) and one
    learning-rate schedule: a stage of the step schedule, or an epoch of the published one."""

    stage: int
    steps: int
    epoch: int | None = None  # the published schedule: its epoch, whose batches come from ``batches``

    def batches(self, n_records: int, opts: TrainOptions, rank: int, world: int, n: int) -> list[int]:
        """The records of the segment's ``n``-th step on this process: its epoch's batch, or on the step
        schedule a batch of the stage's shuffled passes over the records (each record once per pass)."""
        if self.epoch is not None:
            return epoch_batches(n_records, opts.batch_size, opts.seed, self.epoch, rank, world)[n]
        per_pass = len(epoch_batches(n_records, opts.batch_size, opts.seed, (self.stage, 0), rank, world))
        p, k = divmod(n, per_pass)
        return epoch_batches(n_records, opts.batch_size, opts.seed, (self.stage, p), rank, world)[k]


def schedule(cur: Curriculum, opts: TrainOptions, n_records: int, world: int) -> list[Segment]:
    """The segments of a run: one per stage (``opts.steps`` split evenly), or with ``cur.epochs`` one per epoch
    (as many steps as its batches)."""
    if cur.epochs is None:
        lengths = stage_steps(opts.steps, len(cur.stages()))
        if min(lengths) < 1:
            raise InputError(f"steps={opts.steps} is fewer than the curriculum's {len(cur.stages())} stages")
        return [Segment(stage, n) for stage, n in zip(cur.stages(), lengths)]
    per_process = -(-n_records // world)  # ceil: the sampler's padding
    steps = -(-per_process // opts.batch_size)
    return [Segment(cur.stage_of_epoch(e), steps, e) for e in range(cur.start_epoch, cur.epochs)]


def _warn_if_no_trained_weights(model: nn.Module, cur: Curriculum) -> None:
    """A curriculum that skips epochs (the published GSM8k one: ``resume: 3``) starts where a trained model left
    off (run.py's ``load_model_path``: for GSM8k a CoT-tuned one). run.py warns when no checkpoint is loaded;
    here, when the model is neither a training run's folder (a training.json) nor loaded with ``weights=``."""
    if trained_mode(model)[1] or getattr(model, "weights_file", None):
        return
    warn_at_caller(
        f"the curriculum skips the first {cur.start_epoch} epoch(s) (it starts at stage "
        f"{cur.stage_of_epoch(cur.start_epoch)}) but the model is no trained checkpoint (no training.json, no "
        "weights file): Coconut's GSM8k run starts there from a CoT-tuned model (its load_model_path); train one "
        "first with the cot curriculum (Curriculum.published(dataset, 'cot'), --curriculum cot) or load it with "
        "load(..., weights=) / --weights",
        UserWarning,
    )


def train_coconut(
    model: nn.Module,
    tokenizer,
    records: list[Record] | list[dict],
    opts: TrainOptions,
    cur: Curriculum,
    *,
    hooks=None,
    resume: str | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train in place through every stage (``schedule``): ``opts.steps`` optimizer steps split evenly over
    the stages, or with ``cur.epochs`` the published epochs (``Curriculum.published``); each segment resets
    the optimizer, as published, and runs its own learning-rate schedule (warmup + cosine, or the published
    constant rate with ``TrainOptions.coconut_published()``); with ``cur.reset_optimizer=False`` one optimizer
    and one schedule span the run. With ``opts.micro_batch_size`` a step's
    batch runs in micro-batches whose gradients add up (the published ``gradient_accumulation_steps``).
    A model without the latent markers (a plain GPT-2) gets them first (``add_latent_markers``).
    Returns the log (``on_step``, if given, receives each entry as it is made, on the main process).
    ``resume``: a checkpoint folder of this run (weights, optimizer, RNG and step are
    restored; the result equals an uninterrupted run's bit for bit)."""
    check_arguments(model, tokenizer, records, opts, "gpt2", "train_coconut")
    if opts.checkpoint_activations:  # (recomputing a block would append its K/V to the thoughts' cache again)
        raise InputError(
            "checkpoint_activations applies to recurrent-depth models (each core iteration recomputed in "
            "backward); the Coconut trainer keeps its activations"
        )
    if opts.max_seq_length is not None:
        raise InputError(
            "max_seq_length applies to recurrent-depth models (Huginn's fine-tuning script cuts its examples); "
            "Coconut's run.py trains on whole sequences"
        )
    if not isinstance(cur, Curriculum):
        raise InputError(f"cur must be a Curriculum (e.g. Curriculum('coconut', max_stage=3)), got {cur!r}")
    if cur.mode not in MODES:
        raise InputError(f"unknown Coconut training mode {cur.mode!r}; choose one of {MODES}")
    cur.validate()
    for i, r in enumerate(records if isinstance(records, (list, tuple)) else []):
        if isinstance(r, dict) and "question" not in r and ("messages" in r or "text" in r):
            raise InputError(
                f"records: record {i}: Coconut trains on question-answer records ({{question, steps, answer}}: its "
                "curriculum replaces the steps by thoughts), not on conversations or texts"
            )
        if isinstance(r, dict) and "question" in r and "answer" in r and "steps" not in r:
            raise InputError(
                f"records: record {i} has no 'steps': Coconut's curriculum replaces a record's reasoning steps by "
                "thoughts, so its records are {question, steps, answer} (Coconut's preprocessing splits the Hub "
                "GSM8k's worked solutions into steps and the final answer)"
            )
    rank, world, device = prepare(model, tokenizer, opts, resume)
    records = as_records(records)
    if cur.start_epoch and not resume and rank == 0:
        _warn_if_no_trained_weights(model, cur)
    segments = schedule(cur, opts, len(records), world)
    pieces = [tokenize_record(tokenizer, r) for r in records]
    trained = set(cur.stages()) if cur.uniform_prob else {seg.stage for seg in segments}  # (mixing: any stage)
    check_lengths(pieces, cur, trained, model.config.n_positions)
    check_vocabulary([p.question + [t for s in p.steps for t in s] + p.answer for p in pieces], model.config)
    if cur.mode in ("coconut", "pause"):  # (after the checks: a refused run leaves the model as it was)
        if add_latent_markers(model, tokenizer):  # a plain GPT-2 gets them as Coconut's run.py adds them, then
            pieces = [tokenize_record(tokenizer, r) for r in records]  # tokenizes (a marker's name is its token)
    pad = tokenizer.token_to_id("<|pad|>")
    pad = tokenizer.token_to_id("<|endoftext|>") if pad is None else pad  # run.py: pad = eos
    loss_fn = distributed.wrap(CoconutLoss(model, HookList(hooks), cur.mode != "pause"), device)
    # training.json's mode and thought count are what generate() appends and eval prompts with by default
    made = {
        "trainer": "coconut",
        "mode": cur.mode,
        "max_stage": cur.max_stage,
        "thoughts_per_step": cur.thoughts_per_step,
    }
    extra = lambda stage: {**made, "stage": stage, "curriculum": cur.__dict__}  # noqa: E731
    done, resumed, optimizer = 0, None, None
    if resume:
        optimizer = make_optimizer(model, opts)
        resumed = load_training(resume, model, optimizer)
        done = resumed["step"]
    whole_run = replace(opts, steps=sum(seg.steps for seg in segments))  # one schedule without resets

    def loss_of(chunk: list) -> Tensor:
        ids, mask, labels = collate(chunk, pad, device, latent_markers(tokenizer)[2])
        with autocast(device, opts.autocast):
            return loss_fn(ids, mask, labels)

    log: list[dict] = []
    start_of_stage, data, encoded = 0, None, None
    for seg in segments:
        stage, n = seg.stage, seg.steps
        first = max(done - start_of_stage, 0)
        if first >= n:  # a segment finished before the resumed checkpoint
            start_of_stage += n
            continue
        key = (opts.seed, -1 if seg.epoch is None else seg.epoch, stage)
        if encoded != (key if cur.uniform_prob else stage):  # (mixing draws anew per segment)
            markers = latent_markers(tokenizer)
            stages = cur.record_stages([len(p.steps) for p in pieces], stage, key)
            data = [assemble(p, cur, s, markers) for p, s in zip(pieces, stages)]
            encoded = key if cur.uniform_prob else stage
        if optimizer is None or (cur.reset_optimizer and (resumed is None or first == 0)):
            optimizer = make_optimizer(model, opts)  # reset at every stage change / epoch, as published
        resumed = None
        # the learning-rate schedule runs over the segment, or over the whole run with one optimizer
        stage_opts, offset = (replace(opts, steps=n), 0) if cur.reset_optimizer else (whole_run, start_of_stage)
        where = f"stage {stage}" + ("" if seg.epoch is None else f" epoch {seg.epoch + 1}")
        bar = tqdm(range(first, n), desc=f"{cur.mode} {where}", disable=not (opts.progress and distributed.is_main()))
        for step in bar:
            picked = seg.batches(len(records), opts, rank, world, step)
            begin_step(optimizer, offset + step, stage_opts)
            losses = accumulate(loss_fn, micro_batches([data[i] for i in picked], opts), loss_of)
            gnorm = finish_step(loss_fn, optimizer, stage_opts)
            entry = {
                "stage": stage,
                **({} if seg.epoch is None else {"epoch": seg.epoch + 1}),
                "step": step + 1,
                "loss": distributed.mean(sum(losses) / len(losses), device),
                "grad_norm": gnorm,
                "lr": optimizer.param_groups[0]["lr"],
            }
            log.append(entry)
            if on_step is not None and distributed.is_main():
                on_step(entry)
            if step % max(1, opts.log_every) == 0:
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
            total = start_of_stage + step + 1
            last_of_stage = step + 1 == n
            due = opts.save_every and total % opts.save_every == 0
            if opts.out and (due or last_of_stage) and distributed.is_main():
                save_training(model, optimizer, opts.out, total, opts, extra=extra(stage))
        start_of_stage += n
    model.eval()
    model.continuous_thoughts = cur.mode != "pause"  # (as its checkpoint's training.json will say)
    distributed.barrier()
    return log
