"""Worker for test_train.py's DDP test: run under torchrun with 2 processes (gloo on CPU)."""

import sys

import torch

from latentrt.families import build_model, parse_config
from latentrt.train import distributed
from latentrt.train.common import TrainOptions
from latentrt.train.data import build_tokenizer, generate_dataset
from latentrt.train.recurrent import train_recurrent

out = sys.argv[1]
tok = build_tokenizer()
cfg = parse_config(
    dict(
        model_type="huginn_raven",
        n_embd=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=tok.get_vocab_size(),
        block_size=256,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        mean_recurrence=4,
        mean_backprop_depth=2,
    )
)
model = build_model(cfg, seed=0)
train_recurrent(model, tok, generate_dataset(16, (1, 2)), TrainOptions(steps=3, batch_size=4, progress=False, out=out))
rank, world, _ = distributed.init()
torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
print(f"rank {rank} of {world} done")
distributed.shutdown()
