"""Coconut (continuous thought) on GPT-2: the config (HF GPT-2's config.json, model_type gpt2) and the
reference model, with HF GPT-2 parameter names.

A ``<|latent|>`` position's input embedding is the previous position's last hidden state after ln_f
(no projection); positions stay consecutive, so GPT-2 still adds wpe. Every thought is one
single-position pass over the KV cache: the prefix is never recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import Chunk, KVCache
from ..config import ModelConfig, require_positive
from ..errors import ConfigError, InputError, is_choice
from .base import CacheLayout, LatentModel
from .layers import ACTIVATIONS, Embedding, Packed, attention


@dataclass(frozen=True)
class GPT2Config(ModelConfig):
    """GPT-2 as saved by HF transformers (model_type gpt2), run as a Coconut continuous-thought LM."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
    CONTEXT_FIELD: ClassVar[str] = "n_positions"
    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {
            "summary_activation",
            "summary_first_dropout",
            "summary_proj_to_labels",
            "summary_type",
            "summary_use_proj",
            "add_cross_attention",
            "n_ctx",
            "reorder_and_upcast_attn",
            "gradient_checkpointing",
        }
    )

    n_embd: int
    n_head: int
    n_layer: int
    n_positions: int
    vocab_size: int
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    # dropout while training (HF's GPT-2 defaults; the published Coconut trains the model in train mode)
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    latent_token: str = "<|latent|>"
    start_latent_token: str = "<|start-latent|>"
    end_latent_token: str = "<|end-latent|>"
    latent_id: int | None = None
    start_latent_id: int | None = None
    end_latent_id: int | None = None
    model_type: str = "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def block_size(self) -> int:
        return self.n_positions

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def tied_head(self) -> bool:
        return self.tie_word_embeddings

    def weight_bytes(self, element_size: int) -> int:
        """Bytes of the weights at ``element_size``: what a load allocates."""
        d, f = self.n_embd, self.inner_size
        layer = 3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d + 4 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return (self.vocab_size * d + head + self.n_positions * d + self.n_layer * layer + 2 * d) * element_size

    def validate(self) -> None:
        require_positive(self, "n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
        if self.n_inner is not None and self.n_inner <= 0:
            raise ConfigError(f"n_inner must be positive, got {self.n_inner}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not is_choice(self.activation_function, ACTIVATIONS):
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not supported ({sorted(ACTIVATIONS)})"
            )
        if not (math.isfinite(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"layer_norm_epsilon must be a finite number > 0, got {self.layer_norm_epsilon}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if getattr(self, name) is None or not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


def dropping(module: nn.Module) -> bool:
    """Dropout acts while training: the module in train mode with gradients on (a trainer's forward). Inference
    (generate(), the server, evaluate: no gradients) never drops, whatever the mode, so every backend agrees."""
    return module.training and torch.is_grad_enabled()


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: weight stored [in, out]."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.attn_pdrop, self.resid_pdrop = cfg.attn_pdrop, cfg.resid_pdrop

    def forward(self, x: Tensor, mask: Tensor | Packed, kv) -> Tensor:
        B, S, _ = x.shape
        q, k, v = (t.view(B, S, self.n_head, self.head_dim).transpose(1, 2) for t in self.c_attn(x).chunk(3, -1))
        drop = dropping(self)
        if isinstance(mask, Packed):  # a server's pass: attention per chunk, by the pool (scaled 1/sqrt(D))
            y = mask.attend(q, k, v, kv)
        else:
            k_all, v_all = kv(k, v)
            y = attention(q, k_all, v_all, mask, scale=self.scale, dropout_p=self.attn_pdrop if drop else 0.0)
        y = self.c_proj(y.transpose(1, 2).flatten(2))
        return F.dropout(y, self.resid_pdrop) if drop else y


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, cfg.inner_size)
        self.c_proj = Conv1D(cfg.inner_size, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.resid_pdrop = cfg.resid_pdrop

    def forward(self, x: Tensor) -> Tensor:
        y = self.c_proj(self.act(self.c_fc(x)))
        return F.dropout(y, self.resid_pdrop) if dropping(self) else y


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: Tensor, mask: Tensor, kv, ln1x: Tensor | None = None) -> Tensor:
        """``ln1x``: ln_1(x) when the caller already computed it (the fused feedback path)."""
        x = x + self.attn(self.ln_1(x) if ln1x is None else ln1x, mask, kv)
        return x + self.mlp(self.ln_2(x))


class CoconutGPT2(LatentModel):
    family = "coconut"
    # measured on an H200 (benchmarks/RESULTS.md, 2026-11-26)
    AUTO_BACKENDS = (
        (
            "cuda",
            "persistent thought-loop kernel for Coconut thoughts (0.22 ms per thought against Triton's 0.75 ms on "
            "an H200); Triton kernels for the rest",
        ),
        ("triton", "fused Triton kernels, one CUDA graph per GPT-2 column"),
    )

    LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every block's attention and MLP

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__(cfg)
        self.transformer = nn.ModuleDict(
            dict(
                wte=Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=Embedding(cfg.n_positions, cfg.n_embd),
                h=nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()

    def cache_layout(self) -> CacheLayout:
        cfg = self.config
        return CacheLayout(cfg.n_layer, 0, cfg.n_head, cfg.head_dim)

    def init_depth(self) -> int:
        return self.config.n_layer

    def describe(self) -> list[str]:
        from ..decode.coconut import trained_mode, trained_thoughts  # (the decoder reads training.json; on use)

        c, (mode, k) = self.config, trained_thoughts(self)
        if c.latent_id is None:  # (all three or none: bind_tokenizer)
            return ["latent markers: none (a plain GPT-2: prompts run as they are, no continuous thoughts)"]
        markers = f"latent markers: start={c.start_latent_id} latent={c.latent_id} end={c.end_latent_id}"
        if not trained_mode(self)[1]:
            return [
                markers,
                "no training.json: a prompt without markers gets no thought unless num_thoughts gives some",
            ]
        return [
            markers,
            f"trained prompt format: {mode}; a prompt without markers gets {k} "
            + ("pause token(s) (<|latent|> as an ordinary token)" if mode == "pause" else "continuous thought(s)")
            + " (training.json)",
        ]

    @classmethod
    def bind_checkpoint(cls, cfg: GPT2Config, tokenizer, state_dict: dict):
        """A Coconut training checkpoint on top of a GPT-2: its embedding has the three latent markers more
        than the base model's vocabulary (Coconut's run.py adds <|start-latent|>, <|end-latent|>,
        <|latent|> to the tokenizer, in that order, and resizes the embedding). The config takes the
        checkpoint's vocabulary, and the tokenizer the three markers if it lacks them; then the marker ids
        are read from the tokenizer (unless given as overrides)."""
        wte = state_dict.get("transformer.wte.weight", state_dict.get("wte.weight"))
        if wte is not None and wte.shape[0] == cfg.vocab_size + 3:  # else load_weights names the mismatch
            if tokenizer is not None and tokenizer.token_to_id(cfg.latent_token) is None:
                if tokenizer.get_vocab_size() != cfg.vocab_size:
                    raise ConfigError(
                        f"the checkpoint's embedding has {wte.shape[0]} rows, the base {cfg.vocab_size}: its 3 "
                        f"latent markers cannot be placed (the tokenizer has {tokenizer.get_vocab_size()} tokens)"
                    )
                tokenizer.add_tokens([cfg.start_latent_token, cfg.end_latent_token, cfg.latent_token])
            cfg = dataclasses.replace(cfg, vocab_size=wte.shape[0])
        return cls.bind_tokenizer(cfg, tokenizer), tokenizer

    @classmethod
    def bind_tokenizer(cls, cfg: GPT2Config, tokenizer) -> GPT2Config:
        """Fill the three latent-marker ids from tokenizer.json's added tokens unless given as overrides."""
        ids = {}
        for field, tok in (
            ("latent_id", cfg.latent_token),
            ("start_latent_id", cfg.start_latent_token),
            ("end_latent_id", cfg.end_latent_token),
        ):
            given = getattr(cfg, field)
            if given is None and tokenizer is not None:
                given = tokenizer.token_to_id(tok)
            if given is not None and not 0 <= given < cfg.vocab_size:
                raise ConfigError(f"{field}={given} is outside the vocabulary (size {cfg.vocab_size})")
            ids[field] = given
        if len({v is None for v in ids.values()}) > 1:
            raise ConfigError(f"only some latent markers were found: {ids}; pass all three ids to load()")
        if None not in ids.values() and len(set(ids.values())) < 3:
            raise ConfigError(f"the latent markers must be three different tokens, got {ids}")
        return dataclasses.replace(cfg, **ids)

    # ---------------------------------------------------------------- units
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.transformer.wte(input_ids)

    def forward_embeds(self, x: Tensor, cache: KVCache, chunk: Chunk) -> Tensor:
        """Input embeddings [B,n,d] (without positions) -> last hidden state after ln_f."""
        return self.transformer.ln_f(self.forward_residual(x + self.transformer.wpe(chunk.positions), cache, chunk))

    def forward_residual(self, x: Tensor, cache: KVCache, chunk: Chunk, ln1x: Tensor | None = None) -> Tensor:
        """Positioned residual input [B,n,d] through every layer; returns the hidden state before ln_f. While
        training, the input first goes through the embedding dropout (HF's GPT-2 drops embeddings plus positions,
        continuous thoughts included: they enter as ``inputs_embeds``)."""
        if dropping(self) and self.config.embd_pdrop:
            x, ln1x = F.dropout(x, self.config.embd_pdrop), None
        for i, block in enumerate(self.transformer.h):
            if isinstance(chunk, Packed):  # (``packs``: the pool's attention is the model's)
                kv = lambda j, q, k, v, i=i: cache.attend_plain(i, q, k, v, chunk.chunks[j], chunk.actives[j])  # noqa: E731
            else:
                kv = lambda k, v, i=i: cache.plain(i, k, v, chunk)  # noqa: E731
            x = block(x, chunk.mask, kv, ln1x if i == 0 else None)
        return x

    @functools.cached_property
    def packs(self) -> bool:
        """Whether a server's chunks may run as one ``Packed`` pass: the pool attends with scale 1/sqrt(D), as
        GPT-2 does unless its config scales otherwise."""
        cfg = self.config
        return cfg.scale_attn_weights and not cfg.scale_attn_by_inverse_layer_idx

    def lm_logits(self, h: Tensor) -> Tensor:
        return self.lm_head(h).float()

    def feedback(self, h_pre: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """A thought's inputs from the previous position's hidden state before ln_f: the residual input
        x = ln_f(h) + wpe[pos] (the published feedback: last hidden state after ln_f, plus positions) and
        layer 0's ln_1(x)."""
        x = self.transformer.ln_f(h_pre) + self.transformer.wpe(positions)
        return x, self.transformer.h[0].ln_1(x)

    def with_thoughts(self, x: Tensor, fed: Tensor, fed_ln1: Tensor, thought: Tensor) -> tuple[Tensor, Tensor]:
        """A column's residual input and layer 0's ln_1 of it: the fed-back thought (``feedback``'s ``fed``,
        ``fed_ln1``) where ``thought`` (bool, broadcast over x [B,1,d]), the token's input ``x`` elsewhere."""
        x = torch.where(thought, fed.to(x.dtype), x)
        return x, torch.where(thought, fed_ln1.to(x.dtype), self.transformer.h[0].ln_1(x))

    # ---------------------------------------------------------------- markers
    @property
    def marker_ids(self) -> tuple[int | None, int | None, int | None]:
        c = self.config
        return c.start_latent_id, c.latent_id, c.end_latent_id

    def check_markers(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Validate marker structure per row; return the bool map of ``<|latent|>`` positions."""
        if self.marker_ids[1] is None:
            return torch.zeros_like(ids, dtype=torch.bool)
        for b in range(ids.shape[0]):
            self.latent_columns(ids[b][mask[b]].tolist(), b if ids.shape[0] > 1 else None)
        return (ids == self.marker_ids[1]) & mask

    def latent_columns(self, row: list[int], b: int | None = None) -> list[bool]:
        """One sequence's tokens (host ids, no padding): which are ``<|latent|>``, after validating its
        markers (messages name sequence ``b`` of a batch)."""
        start, latent, end = self.marker_ids
        if latent is None:
            return [False] * len(row)
        seq = "" if b is None else f"sequence {b}: "
        depth = 0
        for j, t in enumerate(row):
            if t == start:
                if depth:
                    raise InputError(f"{seq}nested start-latent marker at token {j}")
                depth = 1
            elif t == end:
                if not depth:
                    raise InputError(f"{seq}end-latent marker at token {j} without a start marker")
                depth = 0
            elif t == latent and (start is not None and not depth):
                raise InputError(f"{seq}<|latent|> at token {j} outside start/end-latent markers")
        if depth:
            raise InputError(f"{seq}start-latent marker without a matching end-latent marker")
        if row and row[0] == latent:
            raise InputError(f"{seq}a prompt cannot begin with <|latent|> (no hidden state to feed)")
        return [self.continuous_thoughts and t == latent for t in row]

    @functools.cached_property
    def continuous_thoughts(self) -> bool:
        """Whether ``<|latent|>`` positions run as continuous thoughts: yes, but for a model trained as the
        pause-as-thought baseline (its training.json's mode ``pause``), whose latent tokens are ordinary tokens,
        as its training ran them and the published evaluation runs them (the plain GPT-2's generate)."""
        from ..decode.coconut import trained_mode  # (the decoder reads training.json; imported on use)

        return trained_mode(self)[0] != "pause"

    # ---------------------------------------------------------------- public
    def run_prompt(
        self,
        ids: Tensor,
        mask: Tensor,
        cache: KVCache,
        hooks=None,
        continuous: bool | None = None,
        feedback=None,
        columns=None,
    ) -> tuple[Tensor, Tensor, int]:
        """Process a prompt whose ``<|latent|>`` positions become continuous thoughts.

        The published passes: the prefix before the first latent as one chunk, each column from the first
        latent to the one before the last as a single-position pass (thought inputs = fed-back hidden states),
        then the last latent column and the rest as one chunk (so a trainer's dropout draws its masks as the
        published forward does). Returns (logits [B,S,V], the input embeddings [B,S,d] it ran with, as the
        published forward returns them: a thought's the last hidden state before it, no positions; number of
        thought columns). With
        ``continuous=False`` the latent tokens stay ordinary tokens (the pause-as-thought baseline); None: the
        model's ``continuous_thoughts``. A backend
        may supply ``feedback`` (same contract as ``self.feedback``) and ``columns``, a column runner
        (backends/base.py) that runs every thought column, the last included, as fused, graph-capturable
        launches.
        """
        latent = self.check_markers(ids, mask)
        if not (self.continuous_thoughts if continuous is None else continuous):
            latent = torch.zeros_like(latent)
        feedback = feedback or self.feedback
        B, S = ids.shape
        embeds = self.embed(ids)
        wpe = self.transformer.wpe
        cols = latent.any(0).nonzero()[:, 0].tolist()
        if not cols:
            chunk = cache.begin(mask)
            h = self.transformer.ln_f(self.forward_residual(embeds + wpe(chunk.positions), cache, chunk))
            return self.lm_logits(h), embeds, 0
        first, last = cols[0], cols[-1]
        chunk = cache.begin(mask[:, :first])
        hs = [self.forward_residual(embeds[:, :first] + wpe(chunk.positions), cache, chunk)]  # before ln_f
        thought = 0
        runner = columns(embeds, latent, mask) if columns is not None and not hooks else None
        block = runner.run_all(hs[-1][:, -1:], first, last) if runner is not None else None
        if block is not None:  # every thought in one launch (the persistent CUDA kernel)
            hs.append(block)
            thought = last - first + 1
        rest = last if runner is None else last + 1  # where the final chunk starts
        for col in range(first, rest) if block is None else ():
            if runner is not None:  # device-side indices: one CUDA graph for every column on the GPU
                runner.prepare(hs[-1][:, -1:], col, cache.reserve())
                hs.append(runner().clone())
                thought += col in cols
                continue
            chunk = cache.begin(mask[:, col : col + 1])
            x, ln1x, thought = self._column_input(embeds, col, latent, chunk, hs[-1], feedback, hooks, thought)
            hs.append(self.forward_residual(x, cache, chunk, ln1x))
        if rest < S:
            chunk = cache.begin(mask[:, rest:])
            x, ln1x = embeds[:, rest:] + wpe(chunk.positions), None
            if rest == last:  # the last thought opens the final chunk
                col = self._column_input(embeds, last, latent, chunk, hs[-1], feedback, hooks, thought, width=1)
                x, ln1x, thought = torch.cat([col[0], x[:, 1:]], 1), col[1], col[2]
                if ln1x is not None:
                    ln1x = torch.cat([ln1x, self.transformer.h[0].ln_1(x[:, 1:])], 1)
            hs.append(self.forward_residual(x, cache, chunk, ln1x))
        # the head per pass, as the published forward's (its logits per pass, concatenated): a product's rows
        # round with its row count on the CPU, so one over the whole prompt differs in the last bits
        h = [self.transformer.ln_f(piece) for piece in hs]
        before = torch.cat([h[0][:, :1], *h], 1)[:, :-1].to(embeds.dtype)  # (a prompt never opens on a thought)
        return (
            torch.cat([self.lm_logits(piece) for piece in h], 1),
            torch.where(latent[..., None], before, embeds),
            thought,
        )

    def pass_whole(self, embeds: Tensor) -> Tensor:
        """Input embeddings [B,n,d] (no positions) run whole, from scratch, no cache kept: the last hidden states
        [B,n,d] after ln_f. The published Coconut ``generate``'s pass for each answer token after the first
        (``base_causallm(inputs_embeds=...)``, positions 0..n-1), which rounds otherwise than a pass of the new
        position over the cache."""
        B, n = embeds.shape[:2]
        cache = self.new_cache(B, n)
        chunk = cache.begin(torch.ones(B, n, dtype=torch.bool, device=embeds.device))
        return self.forward_embeds(embeds, cache, chunk)

    def _column_input(self, embeds, col, latent, chunk, h_prev, feedback, hooks, thought, width=None):
        """Column ``col``'s residual input [B,1,d] (positions from the first ``width`` of ``chunk``'s, all when
        None): the token's embedding, or on the rows whose token is ``<|latent|>`` the thought fed back from
        ``h_prev``'s last position (hooks may replace it: they see the column's input, a thought where fed);
        layer 0's ln_1 of it where fed (else None); and the thought count after it."""
        positions = chunk.positions[:, :width] if width else chunk.positions
        x = embeds[:, col : col + 1] + self.transformer.wpe(positions)
        rows = latent[:, col]
        if not rows.any():
            return x, None, thought
        fed, fed_ln1 = feedback(h_prev[:, -1:], positions)
        if hooks:  # the hooks see the column's input (a row not in a thought: its token's, what it runs); the
            # column runs on what they return, its thought rows only (a gradient reaches what they saw)
            x = torch.where(rows[:, None, None], fed.to(x.dtype), x)
            x = torch.where(rows[:, None, None], hooks.on_thought(thought, x, rows), x)
            return x, self.transformer.h[0].ln_1(x), thought + 1
        x, ln1x = self.with_thoughts(x, fed, fed_ln1, rows[:, None, None])
        return x, ln1x, thought + 1

    @torch.no_grad()
    def logits(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        num_steps: int | None = None,
        init_state: Tensor | None = None,
        init_scale: float | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Logits [B,S,V] (fp32); ``<|latent|>`` positions are computed as continuous thoughts. The recurrent-depth
        models' arguments are named so that giving one to this model is an error saying so (as generate()'s)."""
        from ..prompts import check_ids, check_left_padding

        recurrent = dict(num_steps=num_steps, init_state=init_state, init_scale=init_scale, seed=seed)
        given = sorted(name for name, value in recurrent.items() if value is not None)
        if given:
            raise InputError(f"arguments {given} apply to recurrent-depth models, not Coconut")
        ids = check_ids(input_ids, self.config, self.device)
        mask = check_left_padding(attention_mask, ids)
        cache = self.new_cache(ids.shape[0], ids.shape[1])
        return self.run_prompt(ids, mask.to(self.device), cache)[0]
