"""Worker for test_train.py's DDP test: run under torchrun with 2 processes (gloo on CPU)."""

import sys

import torch
from _tiny_train import CONFIG, TOK

from latentrt.families import build_model, parse_config
from latentrt.train import distributed
from latentrt.train.common import TrainOptions
from latentrt.train.data import generate_dataset
from latentrt.train.recurrent import train_recurrent

out = sys.argv[1]
cfg = parse_config(CONFIG)
model = build_model(cfg, seed=0)
train_recurrent(
    model,
    TOK,
    generate_dataset(16, (1, 2)),
    TrainOptions(steps=3, batch_size=4, micro_batch_size=2, progress=False, out=out),
)  # micro-batches: the first backward skips the all-reduce (no_sync), the second makes it
rank, world, _ = distributed.init()
torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
print(f"rank {rank} of {world} done")
distributed.shutdown()
