"""``latentrt train MODEL DATA --out DIR``: train a model of either family on a data file.

DATA is a JSON list or JSON Lines of records. A recurrent-depth model fine-tunes with ``train_recurrent`` on
question-answer records (``{question, answer}`` ones as its published fine-tuning script makes them),
``{"messages": [...]}`` conversations and ``{"text": ...}`` (latentrt/train/examples.py); its default recipe is
Huginn's published fine-tuning script's (``TrainOptions.huginn_published``). A Coconut (GPT-2) model trains with
``train_coconut`` through a curriculum on question-answer records (a plain GPT-2 gets the latent markers first,
as Coconut's run.py adds them); its default recipe is the published Coconut optimiser
(``TrainOptions.coconut_published``). ``--recipe scratch`` is latentrt's from-scratch one (the built-in models'
trainer). Under torchrun (``torchrun --nproc_per_node N -m latentrt.cli train ...``) it trains data-parallel.
Without ``--max-steps`` the run makes one pass's worth of steps over the records (per curriculum stage for
Coconut; a published curriculum counts epochs instead). The checkpoint in ``--out`` loads, generates and serves
like any model folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..chat import LOSS_ON, chat_template_file
from ..errors import InputError, env_number, renamed
from ..records import read_records_file
from .coconut import MODES, PUBLISHED_CURRICULA, Curriculum
from .common import TrainOptions

RECIPES = {"huginn": TrainOptions.huginn_published, "coconut": TrainOptions.coconut_published, "scratch": TrainOptions}
LORA_FLAGS = ("lora_alpha", "lora_target", "lora_dropout")  # (each needs --lora-rank)
LORA_LR = 2e-4  # a LoRA run's learning rate unless --lr (QLoRA's and PEFT's examples'; the recipes' are whole-model)
RECURRENT_FLAGS = ("loss_on", "chat_template", "checkpoint_activations", "max_seq_length")
CURRICULUM_FIELDS = (  # the Curriculum fields with a flag of their own (--max-stage ...)
    "max_stage",
    "thoughts_per_step",
    "epochs",
    "epochs_per_stage",
    "start_epoch",
    "reset_optimizer",
    "uniform_prob",
)
COCONUT_FLAGS = ("curriculum", *CURRICULUM_FIELDS, "published_curriculum")


def add_train_args(t: argparse.ArgumentParser) -> None:
    """The command's arguments after MODEL; the choices are the registries' (RECIPES, LOSS_ON, MODES,
    PUBLISHED_CURRICULA), so a new entry is a flag value without touching the parser."""
    t.add_argument(
        "data",
        help="JSON list or JSON Lines of records: {question, steps, answer}, {question, answer}, {messages}, {text}",
    )
    t.add_argument("--out", required=True, help="the checkpoint folder (written whole at each save)")
    t.add_argument(
        "--recipe",
        default=None,
        choices=tuple(RECIPES),
        help="the optimiser: huginn (default for recurrent models) the published fine-tuning script's (lr 5e-7, "
        "warmup-stable-decay, batch 32 in micro-batches of 2, examples cut to 128 tokens); coconut (default for "
        "Coconut models) the published Coconut's (constant lr 1e-4, weight decay 0.01); scratch latentrt's (lr "
        "1e-3, cosine)",
    )
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: one pass over the data)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (the recipe's)")
    t.add_argument("--batch-size", type=int, default=None, help="records per optimizer step and process (32)")
    t.add_argument("--micro-batch-size", type=int, default=None, help="records per forward pass (the recipe's)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--save-every", type=int, default=None, help="also save every N steps (default: at the end)")
    t.add_argument(
        "--checkpoint-activations",
        action="store_true",
        default=None,  # (None: not given, so a Coconut model can refuse it)
        help="recompute each core iteration in backward (recurrent-depth models)",
    )
    t.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help="recurrent: cut each example to N + 1 tokens and pad every batch to that (the huginn recipe's 128, as "
        "published; 0: neither)",
    )
    t.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast on a GPU (the scratch recipe's; the published recipes train in the weights' dtype: "
        "bf16 for recurrent models, fp32 for Coconut, as their scripts do; --dtype float32 --autocast is "
        "Huginn's bf16-mixed)",
    )
    t.add_argument("--resume", default=None, metavar="DIR", help="continue the run whose checkpoint is DIR")
    t.add_argument("--log", default=None, metavar="FILE", help="append each step's loss, depth, lr... as a JSON line")
    t.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    t.add_argument(
        "--loss-on",
        default=None,
        choices=LOSS_ON,
        help="recurrent, conversations: the loss on the assistant's tokens (default) or all",
    )
    t.add_argument(
        "--chat-template", default=None, metavar="FILE", help="recurrent: a jinja chat template (default: the model's)"
    )
    t.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train LoRA adapters of this rank instead of the whole model (latentrt/lora.py); the checkpoint is the "
        f"adapter, in PEFT's layout; the learning rate defaults to {LORA_LR:g} (the recipes' are whole-model rates)",
    )
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA: the update's scale is alpha / rank (16)")
    t.add_argument(
        "--lora-target",
        action="append",
        default=None,
        metavar="NAME",
        help="LoRA: a layer to adapt, by its (last) name, repeated for several (default: every block's attention "
        "and MLP layers: Wqkv, proj, fc on recurrent models, c_attn, c_proj, c_fc on Coconut ones)",
    )
    t.add_argument("--lora-dropout", type=float, default=None, help="LoRA: dropout on an adapter's input (0)")
    t.add_argument("--curriculum", default=None, choices=MODES, help="Coconut: the mode (coconut)")
    t.add_argument("--max-stage", type=int, default=None, help="Coconut: steps replaced by thoughts, at most (3)")
    t.add_argument("--thoughts-per-step", type=int, default=None, help="Coconut: thoughts per replaced step (1)")
    t.add_argument("--epochs", type=int, default=None, help="Coconut: the published epoch schedule, in all")
    t.add_argument("--epochs-per-stage", type=int, default=None, help="Coconut: epochs per stage (1)")
    t.add_argument(
        "--start-epoch",
        type=int,
        default=None,
        help="Coconut: skip the epochs before it (the published resume: a CoT-tuned model skips stage 0, a preempted "
        "run continues from its checkpoint_N; with --published-curriculum too)",
    )
    t.add_argument(
        "--no-reset-optimizer",
        dest="reset_optimizer",
        action="store_false",
        default=None,  # (None: not given)
        help="Coconut: one optimizer for the whole run (default: a fresh one per stage / epoch, as published)",
    )
    t.add_argument(
        "--uniform-prob",
        type=float,
        default=None,
        help="Coconut: per record, the chance of a stage drawn at random (the published analysis runs' 0.3)",
    )
    t.add_argument(
        "--published-curriculum",
        default=None,
        choices=tuple(PUBLISHED_CURRICULA),
        help="Coconut: the curriculum of its args/DATASET_coconut.yaml (stages, thoughts, epochs)",
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# the options' names as this command's flags, where a message names them ("seed must be ...", "batch_size=32")
FLAG_OF = {
    "steps": "--max-steps",
    **{name: _flag(name) for name in ("lr", "batch_size", "micro_batch_size", "seed", "save_every", "max_seq_length")},
    **{name: _flag(name) for name in CURRICULUM_FIELDS},
    "reset_optimizer": "--no-reset-optimizer",
}


def in_flags(exc: InputError) -> InputError:
    """The error with the options it names as the command's flags (``--seed must be ...``, ``--max-steps=3 is
    fewer than ...``) rather than as the trainers' Python options."""
    return InputError(renamed(str(exc), FLAG_OF))


def validated(options: TrainOptions | Curriculum) -> TrainOptions | Curriculum:
    """``options`` checked before the trainer runs (``run_train`` names the options in their errors as flags)."""
    options.validate()
    return options


def options_from_args(args, n_records: int, recipe: str, passes: int = 1) -> TrainOptions:
    """The run's TrainOptions: the recipe's, with the flags given on top; by default ``passes`` passes'
    worth of steps over ``n_records``."""
    world = env_number("WORLD_SIZE", 1, 1)
    given = {
        name: getattr(args, name)
        for name in ("lr", "batch_size", "micro_batch_size", "seed", "save_every", "autocast")
        if getattr(args, name) is not None
    }
    if getattr(args, "lora_rank", None) is not None:
        given.setdefault("lr", LORA_LR)
    make = RECIPES[recipe]
    batch = given.get("batch_size", make().batch_size)
    steps = args.max_steps if args.max_steps is not None else passes * max(1, math.ceil(n_records / (batch * world)))
    common = dict(out=args.out, overwrite=args.overwrite, checkpoint_activations=bool(args.checkpoint_activations))
    if args.max_seq_length is not None:  # (0: not cut)
        common["max_seq_length"] = args.max_seq_length or None
    return validated(make(steps=steps, **common, **given))


def curriculum_from_args(args):
    """The Coconut curriculum the flags name: a published one (``--start-epoch`` its run.py's ``resume``: a
    preempted run continued from its checkpoint_N), or mode / stages / thoughts / epochs..."""
    if args.published_curriculum is not None:
        mixed = [n for n in COCONUT_FLAGS[1:-1] if getattr(args, n) is not None and n != "start_epoch"]
        if mixed:
            raise InputError(f"--published-curriculum sets the curriculum; drop {FLAG_OF[mixed[0]]}")
        cur = Curriculum.published(args.published_curriculum, args.curriculum or "coconut")
        if args.start_epoch is not None:
            cur = replace(cur, start_epoch=args.start_epoch)
        return validated(cur)
    fields = dict(mode=args.curriculum or "coconut")
    for name in CURRICULUM_FIELDS:
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return validated(Curriculum(**fields))


def _log_writer(path: str | None) -> Callable[[dict], None] | None:
    """``--log FILE``: each step's log entry appended as a JSON line as it is made (a loss curve to plot while
    the run goes on; a resumed run appends)."""
    if path is None:
        return None
    try:  # before training, a path that cannot be written is an error now; a run refused later leaves no file
        if os.path.exists(path):
            open(path, "a").close()  # (a resumed run appends)
        else:
            open(path, "x").close()
            os.remove(path)
    except OSError as exc:
        raise InputError(f"--log {path!r} cannot be written: {exc.strerror}") from None

    def write(entry: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    return write


def _train_recurrent(model, args, records: list) -> list[dict]:
    from .recurrent import train_recurrent

    opts = options_from_args(args, len(records), args.recipe or "huginn")
    template = None if args.chat_template is None else chat_template_file(args.chat_template, model.folder)
    loss_on = args.loss_on or "assistant"
    return train_recurrent(
        model,
        model.tokenizer,
        records,
        opts,
        resume=args.resume,
        loss_on=loss_on,
        chat_template=template,
        on_step=_log_writer(args.log),
    )


def _train_coconut(model, args, records: list) -> list[dict]:
    from .coconut import train_coconut

    curriculum = curriculum_from_args(args)
    opts = options_from_args(args, len(records), args.recipe or "coconut", len(curriculum.stages()))
    return train_coconut(
        model, model.tokenizer, records, opts, curriculum, resume=args.resume, on_step=_log_writer(args.log)
    )


@dataclass(frozen=True)
class Trainer:
    run: Callable  # (model, args, records) -> the log
    flags: tuple[str, ...]  # the command's flags only this trainer takes
    title: str  # how messages name its models


# model_type -> its trainer: one line per family that can be trained from the command line
TRAINERS = {
    "huginn_raven": Trainer(_train_recurrent, RECURRENT_FLAGS, "recurrent-depth (huginn_raven)"),
    "gpt2": Trainer(_train_coconut, COCONUT_FLAGS, "Coconut (gpt2)"),
}


def summary(log: list[dict]) -> str:
    """The run's line: its steps and the loss at the first and the last. A curriculum's steps count within each
    stage (``stage 0 step 1 to stage 4 step 1``: 'steps 1-1' said nothing)."""
    first, last = log[0], log[-1]
    if "stage" in first:
        where = lambda e: f"stage {e['stage']} step {e['step']}"  # noqa: E731
        steps = f"{len(log)} steps ({where(first)} to {where(last)})"
    else:
        steps = f"steps {first['step']}-{last['step']}"
    return f"{steps}: loss {first['loss']:.4f} -> {last['loss']:.4f}"


def _add_lora(model, args) -> None:
    """``--lora-rank``: the model's adapters, drawn from the run's seed (alike on every torchrun process)."""
    if args.lora_rank is None:
        given = [n for n in LORA_FLAGS if getattr(args, n) is not None]
        if given:
            raise InputError(f"{_flag(given[0])} applies to LoRA runs: give --lora-rank too")
        return
    from ..lora import add_lora

    lora = dict(rank=args.lora_rank, targets=args.lora_target, seed=0 if args.seed is None else args.seed)
    lora.update({k: v for k, v in (("alpha", args.lora_alpha), ("dropout", args.lora_dropout)) if v is not None})
    try:
        add_lora(model, **lora)
    except InputError as exc:
        raise InputError(
            renamed(str(exc), {"rank": "--lora-rank", "alpha": "--lora-alpha", "dropout": "--lora-dropout"})
        ) from None


def run_train(model, args) -> int:
    """The CLI's train command on a loaded model: its family's trainer, the other trainers' flags refused."""
    trainer = TRAINERS.get(model.config.model_type)
    if trainer is None:
        raise InputError(f"latentrt train has no trainer for model_type {model.config.model_type!r}")
    if model.tokenizer is None:
        raise InputError("training needs a model with a tokenizer.json")
    for other in TRAINERS.values():
        misplaced = [n for n in other.flags if n not in trainer.flags and getattr(args, n) is not None]
        if misplaced:
            raise InputError(f"{FLAG_OF.get(misplaced[0], _flag(misplaced[0]))} applies to {other.title} models only")
    records = read_records_file(args.data)
    _add_lora(model, args)
    from . import distributed

    try:
        try:
            log = trainer.run(model, args, records)
        except InputError as exc:
            raise in_flags(exc) from None
        if distributed.is_main():  # under torchrun: one report, by the process that saved
            if log:
                print(summary(log))
            print(f"checkpoint: {args.out} (latentrt generate {args.out} PROMPT)")
    finally:
        distributed.shutdown()
    return 0
