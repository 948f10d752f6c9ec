"""Worker for test_train.py's DDP test: run under torchrun with 2 processes (gloo on CPU); ``lora`` as the
third argument trains LoRA adapters."""

import json
import sys

import torch
from _tiny_train import CONFIG, TOK

from latentrt.families import build_model, parse_config
from latentrt.lora import add_lora
from latentrt.train import distributed
from latentrt.train.common import TrainOptions
from latentrt.train.data import generate_dataset
from latentrt.train.recurrent import train_recurrent

out = sys.argv[1]
syncs = []  # per micro-batch forward: whether its backward all-reduces (DDP's require_backward_grad_sync)
wrap = distributed.wrap


def counting_wrap(module, device):
    wrapped = wrap(module, device)  # (read in a forward pre-hook: with a comm hook counting the all-reduces
    # instead, the worker aborted at exit in 2 of about 30 runs)
    wrapped.register_forward_pre_hook(lambda m, args: syncs.append(m.require_backward_grad_sync))
    return wrapped


distributed.wrap = counting_wrap
rank, world, device = distributed.init()
mean_of_ranks = distributed.mean(rank, device)  # (before training: the worker's last collective stays the trainer's)
cfg = parse_config(CONFIG)
model = build_model(cfg, seed=0)
if sys.argv[3:] == ["lora"]:  # LoRA adapters only (the frozen base weights take no all-reduce)
    add_lora(model, rank=2, seed=0)
log = train_recurrent(
    model,
    TOK,
    generate_dataset(16, (1, 2)),
    TrainOptions(steps=3, batch_size=4, micro_batch_size=2, progress=False, out=out),
)  # micro-batches: the first backward skips the all-reduce (no_sync), the second makes it
torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"losses": [e["loss"] for e in log], "syncs": syncs, "mean": mean_of_ranks}, f)
print(f"rank {rank} of {world} done")
distributed.shutdown()
