"""Train the built-in models shipped in latentrt/builtin/ (reproducible: one command, one seed).

    python -m latentrt.train.builtin --seed 0            # all four, into ./latentrt-builtin/
    python -m latentrt.train.builtin --only recurrent    # one of: recurrent coconut coconut-cot coconut-nocot
    python -m latentrt.train.builtin --overwrite-builtin # replace the models shipped in the package

Data: generated ProsQA-style problems (latentrt.train.data), difficulties 1-3. Models: a tiny
recurrent-depth model (d=128, 1+2x r+1 layers, mean recurrence 4) trained on question -> answer, and tiny
GPT-2s (d=128, 4 layers) trained with the Coconut curriculum and as CoT / no-CoT baselines.
Each folder gets config.json, model.safetensors, tokenizer.json, tokenizer_config.json (a chat template:
the models answer one question, so a conversation becomes its user messages' text) and training.json
(how it was trained). The shipped weights were made before the trainers took their batches from shuffled
passes over the records (2026-12-04; they drew them at random with replacement): their training.json
command now makes other weights of the same recipe, as deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import BUILTIN_DIR, replaced_folder, tied_head_key, write_checkpoint_files
from ..errors import InputError, LatentRTError, check_int
from ..families import build_model, parse_config
from ..sampling import MAX_SEED
from .coconut import Curriculum, train_coconut
from .common import TrainOptions
from .data import build_tokenizer, generate_dataset
from .recurrent import train_recurrent

DIFFICULTIES = (1, 2, 3)  # 1-6 with the same CPU budget stayed at chance (see README)
MODELS = ("recurrent", "coconut", "coconut-cot", "coconut-nocot")
DEFAULT_STEPS = {"recurrent": 1500, "coconut": 2500, "coconut-cot": 2000, "coconut-nocot": 2000}


def recurrent_config(vocab: int):
    return parse_config(
        dict(
            model_type="huginn_raven",
            n_embd=128,
            num_attention_heads=4,
            intermediate_size=256,
            vocab_size=vocab,
            padded_vocab_size=-(-vocab // 64) * 64,  # embedding rows rounded up to a multiple of 64
            padding_multiple=64,
            block_size=512,
            n_layers_in_prelude=1,
            n_layers_in_recurrent_block=2,
            n_layers_in_coda=1,
            mean_recurrence=4,
            mean_backprop_depth=2,
            eos_token_id=0,
        )
    )


def gpt2_config(tok):
    return parse_config(
        dict(
            model_type="gpt2",
            n_embd=128,
            n_head=4,
            n_layer=4,
            n_positions=512,
            vocab_size=tok.get_vocab_size(),
            eos_token_id=0,
            latent_id=tok.token_to_id("<|latent|>"),
            start_latent_id=tok.token_to_id("<|start-latent|>"),
            end_latent_id=tok.token_to_id("<|end-latent|>"),
            # the shipped models were trained without dropout (before the trainer applied GPT-2's): kept, so
            # the command in their training.json makes them again
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
        )
    )


# the chat template of the built-in models (tokenizer_config.json, as Hugging Face stores one)
CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} {% endif %}{% endfor %}"


def tokenizer_config() -> dict:
    return {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}


def train_one(name: str, seed: int, steps: int, out_root: Path, command: str) -> Path:
    tok = build_tokenizer()
    records = generate_dataset(20000, DIFFICULTIES, seed=seed)
    out = out_root / name
    t0 = time.time()
    if name == "recurrent":
        model = build_model(recurrent_config(tok.get_vocab_size()), seed=seed)
        opts = TrainOptions(steps=steps, batch_size=32, lr=2e-3, warmup=50, seed=seed)
        log = train_recurrent(model, tok, records, opts)
        info = {"trainer": "recurrent", "steps": steps}
    else:
        mode = {"coconut": "coconut", "coconut-cot": "cot", "coconut-nocot": "nocot"}[name]
        cur = Curriculum(mode, max_stage=max(DIFFICULTIES), thoughts_per_step=1)
        n_stages = len(Curriculum("coconut", max(DIFFICULTIES)).stages())
        per_stage = steps // n_stages if mode == "coconut" else steps  # train_coconut splits steps over stages
        model = build_model(gpt2_config(tok), seed=seed)
        opts = TrainOptions(steps=steps, batch_size=32, lr=2e-3, warmup=30, seed=seed)
        log = train_coconut(model, tok, records, opts, cur)
        info = {
            "trainer": "coconut",
            "mode": mode,
            "max_stage": cur.max_stage,
            "thoughts_per_step": cur.thoughts_per_step,
            "steps_per_stage": per_stage,
        }
    model.tokenizer = tok
    info.update(
        seed=seed,
        difficulties=list(DIFFICULTIES),
        train_records=len(records),
        final_loss=log[-1]["loss"],
        minutes=round((time.time() - t0) / 60, 1),
        command=command,
        torch=torch.__version__,
    )
    with replaced_folder(out) as tmp:  # the model and how it was made, swapped in together
        write_checkpoint_files(model, tmp, tie_key=tied_head_key(model))
        (tmp / "training.json").write_text(json.dumps(info, indent=1))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    """Train the models; a bad flag prints ``latentrt: error: ...`` (exit 2) before any training, no traceback."""
    ap = argparse.ArgumentParser(
        prog="python -m latentrt.train.builtin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=MODELS, default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (Coconut: split over its stages)")
    ap.add_argument("--out", default="latentrt-builtin", help="folder for the models (one subfolder each)")
    ap.add_argument(
        "--overwrite-builtin",
        action="store_true",
        help=f"write into the package's own built-in models ({BUILTIN_DIR}), replacing the shipped ones",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    names = [args.only] if args.only else list(MODELS)
    try:
        out = checked_out(args, names)
    except LatentRTError as exc:
        print(f"latentrt: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    for name in names:
        steps = args.steps or DEFAULT_STEPS[name]
        where = "--overwrite-builtin" if args.overwrite_builtin else f"--out {args.out}"
        command = f"python -m latentrt.train.builtin --only {name} --seed {args.seed} --steps {steps} {where}"
        path = train_one(name, args.seed, steps, out, command)
        print(f"wrote {path}", flush=True)
    return 0


def checked_out(args: argparse.Namespace, names: list[str]) -> Path:
    """The output folder, once every flag is known good for every model to train (before the first is)."""
    check_int("--seed", args.seed, 0, MAX_SEED, high_label="2**63 - 1")
    check_int("--threads", args.threads, 1)
    if args.steps is not None:
        check_int("--steps", args.steps, 1)
        stages = len(Curriculum("coconut", max(DIFFICULTIES)).stages())
        if "coconut" in names and args.steps < stages:
            raise InputError(f"--steps {args.steps} is fewer than the Coconut curriculum's {stages} stages")
    out = BUILTIN_DIR if args.overwrite_builtin else Path(args.out)
    if not args.overwrite_builtin and out.resolve() == BUILTIN_DIR.resolve():
        raise InputError("--out is the package's built-in folder: pass --overwrite-builtin to replace them")
    return out


if __name__ == "__main__":
    sys.exit(main())
