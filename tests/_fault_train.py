"""Worker for test_reliability.py's SIGKILL test: train the recurrent model, saving after every step, resuming
from the folder when it holds a checkpoint. The parent kills it at random moments."""

import sys

from _tiny_train import CONFIG, TOK

from latentrt.families import build_model, parse_config
from latentrt.train.common import TrainOptions
from latentrt.train.data import generate_dataset
from latentrt.train.recurrent import train_recurrent

STEPS = 30


def run(out: str | None) -> object:
    from pathlib import Path

    model = build_model(parse_config(CONFIG), seed=0)
    resume = out if out and (Path(out) / "trainer_state.pt").exists() or _interrupted(out) else None
    opts = TrainOptions(steps=STEPS, batch_size=4, progress=False, warmup=3, out=out, save_every=1 if out else 0)
    train_recurrent(model, TOK, generate_dataset(16, (1, 2), seed=3), opts, resume=resume)
    return model


def _interrupted(out: str | None) -> bool:
    """A save was cut between moving the previous checkpoint aside and moving the new one in."""
    from pathlib import Path

    return bool(out) and (Path(out).parent / f".{Path(out).name}.previous").exists()


if __name__ == "__main__":
    print("started", flush=True)
    run(sys.argv[1])
    print("done", flush=True)
