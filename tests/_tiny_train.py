"""The tiny recurrent model and tokenizer the training worker scripts train (_fault_train.py, _ddp_train.py)."""

from latentrt.train.data import build_tokenizer

TOK = build_tokenizer()
CONFIG = dict(
    model_type="huginn_raven",
    n_embd=32,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=TOK.get_vocab_size(),
    block_size=256,
    n_layers_in_prelude=1,
    n_layers_in_recurrent_block=2,
    n_layers_in_coda=1,
    mean_recurrence=4,
    mean_backprop_depth=2,
)
