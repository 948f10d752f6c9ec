"""The fewest bytes a decode step must move, and its FLOPs: the floor is bytes / measured copy bandwidth.

Recurrent depth, one generated token for B sequences at context T with r iterations: the prelude, coda,
final norm and head weights are read once; per iteration the core layers' weights and the adapter's state
half W[:, :d] (they do not fit in on-chip memory at real sizes); the adapter's input half W[:, d:] once per
token (W[:, d:] e does not change between iterations: computed once, added every iteration); every
attention layer reads its cached K/V and writes one new entry per sequence. Coconut: one pass of GPT-2's
layer weights per thought (a thought never reads the LM head), plus the head for an answer token.
"""

from __future__ import annotations

from latentrt.models import GPT2Config, RecurrentConfig


def sandwich_params(cfg: RecurrentConfig) -> int:
    d, kv = cfg.n_embd, cfg.num_key_value_heads * cfg.head_dim
    qk_bias = 2 * cfg.num_attention_heads * cfg.head_dim if cfg.qk_bias else 0
    return d * (d + 2 * kv) + d * d + d * 2 * cfg.intermediate_size + cfg.intermediate_size * d + 4 * d + qk_bias


def recurrent_step_bytes(
    cfg: RecurrentConfig, *, batch: int, context: int, steps: int, element_size: int = 2
) -> dict[str, int]:
    """Bytes moved to decode one token for ``batch`` sequences after ``context`` cached positions."""
    d = cfg.n_embd
    layer = sandwich_params(cfg)
    plain_layers = cfg.n_layers_in_prelude + cfg.n_layers_in_coda
    per_iteration = cfg.n_layers_in_recurrent_block * layer + d * d  # core layers + adapter W[:, :d]
    per_token = plain_layers * layer + d * d + cfg.padded_vocab_size * d + d  # + adapter W[:, d:], head, ln_f
    weights = (per_token + steps * per_iteration) * element_size
    kv_entry = 2 * cfg.num_key_value_heads * cfg.head_dim * element_size  # K and V of one position
    attn_calls = plain_layers + steps * cfg.n_layers_in_recurrent_block
    kv = batch * attn_calls * (context + 1) * kv_entry  # read the cache, write the new entry
    acts = batch * (steps * 2 + 4) * d * element_size + batch * cfg.padded_vocab_size * 4
    return {"weights": weights, "kv": kv, "activations": acts, "total": weights + kv + acts}


def recurrent_step_flops(cfg: RecurrentConfig, *, batch: int, context: int, steps: int) -> int:
    """FLOPs of the same step: two per weight touched per sequence (the norms' few counted alike), and per
    attention call 4 d (context + 1) per sequence (q k^T and the weighted sum of V). Over the bytes above it is
    the step's arithmetic intensity: far below a GPU's FLOP/byte ratio at batch 1-32, so the bytes bound it."""
    d = cfg.n_embd
    plain_layers = cfg.n_layers_in_prelude + cfg.n_layers_in_coda
    matmul = (
        2
        * batch
        * (
            plain_layers * sandwich_params(cfg)
            + steps * (cfg.n_layers_in_recurrent_block * sandwich_params(cfg) + d * d)
            + d * d
            + cfg.padded_vocab_size * d
        )
    )
    attn = 4 * batch * (plain_layers + steps * cfg.n_layers_in_recurrent_block) * (context + 1) * d
    return matmul + attn


def gpt2_params(cfg: GPT2Config) -> int:
    d, f = cfg.n_embd, cfg.inner_size
    per_layer = d * 3 * d + 3 * d + d * d + d + d * f + f + f * d + d + 4 * d
    return cfg.n_layer * per_layer + cfg.vocab_size * d + cfg.n_positions * d + 2 * d


def coconut_step_bytes(
    cfg: GPT2Config, *, batch: int, context: int, element_size: int = 2, with_head: bool = False
) -> dict[str, int]:
    """One single-position pass: GPT-2's layer weights and final norm (and the head, tied to the token
    embedding, for an answer token: ``with_head``) + KV. A thought reads no head."""
    d = cfg.n_embd
    weights = (gpt2_params(cfg) - cfg.n_positions * d - (0 if with_head else cfg.vocab_size * d)) * element_size
    kv = batch * cfg.n_layer * (context + 1) * 2 * d * element_size
    return {
        "weights": weights,
        "kv": kv,
        "activations": batch * 4 * d * element_size,
        "total": weights + kv + batch * 4 * d * element_size,
    }
