"""``latentrt train MODEL DATA --out DIR``: fine-tune a recurrent-depth model on a data file.

DATA is a JSON list or JSON Lines of records (question-answer, ``{"messages": [...]}`` conversations,
``{"text": ...}``; latentrt/train/examples.py). The default recipe is Huginn's published fine-tuning script's
(``TrainOptions.huginn_published``); ``--recipe scratch`` is latentrt's from-scratch one (the built-in models'
trainer). Without ``--max-steps`` the run makes one pass's worth of steps over the records (the published
script's one epoch). The checkpoint in ``--out`` loads, generates and serves like any model folder.
"""

from __future__ import annotations

import math
import os

from ..chat import chat_template_file
from ..errors import InputError
from ..records import read_records_file
from .common import TrainOptions

RECIPES = ("huginn", "scratch")


def options_from_args(args, n_records: int) -> TrainOptions:
    """The run's TrainOptions: the recipe's, with the flags given on top."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    given = {
        name: getattr(args, name)
        for name in ("lr", "batch_size", "micro_batch_size", "seed", "save_every")
        if getattr(args, name) is not None
    }
    batch = given.get("batch_size", 32)
    steps = args.max_steps if args.max_steps is not None else max(1, math.ceil(n_records / (batch * world)))
    common = dict(out=args.out, overwrite=args.overwrite, checkpoint_activations=args.checkpoint_activations)
    if args.recipe == "huginn":
        return TrainOptions.huginn_published(steps=steps, **common, **given)
    return TrainOptions(steps=steps, **common, **given)


def run_train(model, args) -> int:
    """The CLI's train command on a loaded model."""
    from ..models.recurrent import RecurrentConfig
    from .recurrent import train_recurrent

    if not isinstance(model.config, RecurrentConfig):
        raise InputError(
            "latentrt train fine-tunes recurrent-depth models (model_type huginn_raven); a Coconut (gpt2) model "
            "trains through its curriculum: latentrt.train.coconut.train_coconut (README, Built-in models and "
            "training)"
        )
    if model.tokenizer is None:
        raise InputError("training needs a model with a tokenizer.json")
    records = read_records_file(args.data)
    if not isinstance(records, list) or not records:
        raise InputError(f"{args.data} holds no records (a JSON list, or JSON Lines, of records)")
    opts = options_from_args(args, len(records))
    template = None if args.chat_template is None else chat_template_file(args.chat_template, model.folder)
    log = train_recurrent(
        model, model.tokenizer, records, opts, resume=args.resume, loss_on=args.loss_on, chat_template=template
    )
    if log:
        first, last = log[0], log[-1]
        print(f"steps {first['step']}-{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}")
    print(f"checkpoint: {args.out} (latentrt generate {args.out} PROMPT)")
    return 0
