"""Recurrent-depth LM (Huginn-0125 layout): prelude -> core block looped r times -> coda.

The config (as published in config.json, model_type huginn_raven) and the reference model. Parameter
names equal the published state-dict keys (``transformer.core_block.0.attn.Wqkv.weight``...). The three
methods ``prelude``, ``core_iteration`` and ``head`` are the units the decoder (latentrt/decode/recurrent.py)
loops over; ``core_iteration`` is the seam a fast backend replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..cache import Chunk, KVCache
from ..config import ModelConfig, require_nonnegative, require_positive
from ..errors import ConfigError, InputError, NonFiniteStateError, check_int, plain_scalar
from ..errors import check_finite as check_finite_number
from .base import CacheLayout, LatentModel
from .layers import Embedding, Packed, RMSNorm, apply_rope, attention, rope_tables


@dataclass(frozen=True)
class RecurrentConfig(ModelConfig):
    """Recurrent-depth LM (Huginn-0125, model_type huginn_raven): prelude, looped core block, coda."""

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "n_embd",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "block_size",
        "n_layers_in_prelude",
        "n_layers_in_recurrent_block",
        "n_layers_in_coda",
        "mean_recurrence",
    )
    ALIASES: ClassVar[dict[str, str]] = {"n_heads": "num_attention_heads"}
    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {
            "architecture_class_name",
            "block_class_name",
            "norm_class_name",
            "mlp_class_name",
            "nonlin_name",
            "init_strategy",
            "init_orthogonal",
            "sampling_scheme",
            "activation_checkpoint_impl",
            "init_values",
            "test_time_noise",
            "test_time_noise_type",
            "effective_expected_depth",
            "num_hidden_layers",
            "n_layers",
            "head_dim",
            "embed_step",
            "n_embd_init",
            "attn_impl",
            "rope_settings",
            "randomize_embedding",
            "simple_ops",
            "strategy",
            "loss_shape",
            "mod_capacity",
            "state_init_std",
            "local_rank",
        }
    )

    n_embd: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    block_size: int
    n_layers_in_prelude: int
    n_layers_in_recurrent_block: int
    n_layers_in_coda: int
    mean_recurrence: int
    num_key_value_heads: int = 0  # 0: same as num_attention_heads
    padded_vocab_size: int | None = None  # rows of the embedding and head; None: vocab_size (as published)
    padding_multiple: int = 1  # read, and ignored as by the published config
    mean_backprop_depth: int = 8
    norm_eps: float = 1e-6
    rope_base: float = 50000.0
    qk_bias: bool = True
    tie_embeddings: bool = True
    bias: bool = False
    injection_type: str = "linear"
    state_init: str = "like-init"
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    model_type: str = "huginn_raven"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.num_attention_heads

    @property
    def tied_head(self) -> bool:
        return self.tie_embeddings

    @property
    def keys_per_query_head(self) -> bool:
        """One KV head with qk_bias: as published, the key broadcasts to every query head, each adding its own
        key bias, so K (and V, repeated) are cached per query head (MQA with per-head keys)."""
        return self.qk_bias and self.num_key_value_heads == 1 and self.num_attention_heads > 1

    @property
    def cache_kv_heads(self) -> int:
        """K/V heads the cache holds per position and layer."""
        return self.num_attention_heads if self.keys_per_query_head else self.num_key_value_heads

    def weight_bytes(self, element_size: int) -> int:
        """Bytes of the weights at ``element_size`` plus the fp32 RoPE tables: what a load allocates."""
        d, hd, f = self.n_embd, self.head_dim, self.intermediate_size
        attn = d * (self.num_attention_heads + 2 * self.num_key_value_heads) * hd + d * d
        if self.qk_bias:
            attn += 2 * self.num_attention_heads * hd
        layer = attn + 2 * f * d + f * d + 4 * d
        layers = self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda
        head = 0 if self.tie_embeddings else self.padded_vocab_size * d
        params = self.padded_vocab_size * d + head + layers * layer + 2 * d * d + d
        rope = min(self.block_size, RecurrentDepthLM.ROPE_POSITIONS) * hd * 4  # the tables at first
        return params * element_size + rope

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)

    @property
    def init_std(self) -> float:
        return math.sqrt(2 / (5 * self.n_embd))

    def validate(self) -> None:
        require_positive(
            self,
            "n_embd",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "padded_vocab_size",
            "block_size",
            "n_layers_in_recurrent_block",
            "mean_recurrence",
            "padding_multiple",
        )
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(
                f"padded_vocab_size={self.padded_vocab_size} is smaller than vocab_size={self.vocab_size}"
            )
        require_nonnegative(self, "n_layers_in_prelude", "n_layers_in_coda", "mean_backprop_depth")
        if self.n_embd % self.num_attention_heads:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.injection_type != "linear":
            raise ConfigError(f"injection_type={self.injection_type!r} is not supported (only 'linear')")
        if self.state_init not in ("like-init", "zero"):
            raise ConfigError(f"state_init={self.state_init!r} is not supported ('like-init' or 'zero')")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ConfigError(f"norm_eps must be a finite number > 0, got {self.norm_eps}")
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ConfigError(f"rope_base must be a finite number > 1, got {self.rope_base}")

    @classmethod
    def check_ignored(cls, raw: dict[str, Any], source: str) -> None:
        """The published model reads two of the fields latentrt ignores: ``test_time_noise`` (noise injected
        into the state every iteration when > 0) and ``init_values["std"]`` (the initial state's std, derived
        from n_embd unless a saved config carries another). Either one away from its neutral value is an
        error."""
        noise = raw.get("test_time_noise")
        if noise not in (None, 0):
            raise ConfigError(
                f"{source}: test_time_noise={noise!r} (the published test-time noise injection) is not "
                "implemented by latentrt; set it to 0"
            )
        std = raw.get("init_values", {}).get("std") if isinstance(raw.get("init_values"), dict) else None
        d = raw.get("n_embd")
        if std is not None and isinstance(d, int) and d > 0 and not math.isclose(std, math.sqrt(2 / (5 * d))):
            raise ConfigError(
                f"{source}: init_values.std={std!r} differs from the published sqrt(2 / (5 n_embd)) = "
                f"{math.sqrt(2 / (5 * d))!r}, which latentrt uses for the initial state"
            )

    @classmethod
    def fill_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Published nulls: no KV-head count means one per attention head; no rope_base the default."""
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if values.get("rope_base") is None:
            values["rope_base"] = 50000.0
        if values.get("padded_vocab_size") is None:  # the published config: padded = vocab_size
            values["padded_vocab_size"] = values["vocab_size"]
        return values


def _kv_hook(cache, chunk, active, layer: int, looped: bool = False, iteration=None):
    """Layer ``layer``'s cache hook (a plain layer's, or with ``looped`` a core layer's at ``iteration``).
    For a chunk: ``kv(k, v)`` writes the chunk's K/V (rows in ``active``) and returns the keys and values to
    attend to. For a ``Packed`` one (a server's pass over pool rows): ``kv(i, q, k, v)`` writes chunk i's
    K/V and returns its attention output (latentrt/kv_pool.py: one fused launch for decode rows where the
    backend has the kernel)."""
    if isinstance(chunk, Packed):
        attend = cache.attend_core if looped else cache.attend_plain
        return lambda i, q, k, v: attend(layer, q, k, v, chunk.chunks[i], chunk.actives[i])
    if looped:
        return lambda k, v: cache.core(layer, k, v, chunk, iteration, active)
    return lambda k, v: cache.plain(layer, k, v, chunk, active)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.keys_per_query_head = cfg.keys_per_query_head
        self.Wqkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=False)
        if cfg.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_head, self.head_dim))
        else:
            self.qk_bias = None
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as [B, heads, S, D]: Wqkv rows are [q; k; v]; qk_bias then interleaved RoPE."""
        B, S, _ = x.shape
        q, k, v = self.Wqkv(x).split(
            [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1
        )
        q = q.view(B, S, self.n_head, self.head_dim)
        k = k.view(B, S, self.n_kv, self.head_dim)
        v = v.view(B, S, self.n_kv, self.head_dim)
        if self.qk_bias is not None:
            q = (q + self.qk_bias[0]).to(x.dtype)
            if self.keys_per_query_head:  # [B,S,1,D] + [1,H,D]: a key per query head (see the config)
                k = (k + self.qk_bias[1]).to(x.dtype)
                v = v.expand(B, S, self.n_head, self.head_dim)
            else:  # GQA keeps each KV head's own bias (the published code cannot run GQA)
                k = (k + self.qk_bias[1][:, : self.n_kv]).to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | Packed, kv) -> Tensor:
        q, k, v = self.project(x, cos, sin)
        if isinstance(mask, Packed):  # several chunks' tokens in one pass: attention per chunk
            y = mask.attend(q, k, v, kv)
        else:
            k_all, v_all = kv(k, v)
            if self.keys_per_query_head:  # the one value head, broadcast by attention as the published code's
                v_all = v_all[:, :1]  # (its copies per query head, expanded, round otherwise in CPU SDPA)
            y = attention(q, k_all, v_all, mask)
        return self.proj(y.transpose(1, 2).flatten(2))


class GatedMLP(nn.Module):
    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=False)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(nn.functional.silu(gate) * up)


class SandwichBlock(nn.Module):
    """x = norm_2(x + attn(norm_1(x))); x = norm_4(x + mlp(norm_3(x)))."""

    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__()
        eps = cfg.norm_eps
        self.norm_1, self.norm_2 = RMSNorm(cfg.n_embd, eps), RMSNorm(cfg.n_embd, eps)
        self.norm_3, self.norm_4 = RMSNorm(cfg.n_embd, eps), RMSNorm(cfg.n_embd, eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = GatedMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv) -> Tensor:
        x = self.norm_2(self.attn(self.norm_1(x), cos, sin, mask, kv) + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x)


class RecurrentDepthLM(LatentModel):
    family = "recurrent"
    # measured on an H200 (benchmarks/RESULTS.md, 2026-11-26)
    AUTO_BACKENDS = (
        (
            "triton",
            "fused Triton kernels in one CUDA graph per token (faster than the persistent kernel for recurrent "
            "decode on an H200: 40.8 against 54.4 ms/token at batch 1, r=32)",
        ),
    )

    LORA_TARGETS = ("Wqkv", "proj", "fc")  # every sandwich block's attention and MLP

    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__(cfg)
        d = cfg.n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=Embedding(cfg.padded_vocab_size, d),
                prelude=nn.ModuleList(SandwichBlock(cfg) for _ in range(cfg.n_layers_in_prelude)),
                adapter=nn.Linear(2 * d, d, bias=cfg.bias),
                core_block=nn.ModuleList(SandwichBlock(cfg) for _ in range(cfg.n_layers_in_recurrent_block)),
                coda=nn.ModuleList(SandwichBlock(cfg) for _ in range(cfg.n_layers_in_coda)),
                ln_f=RMSNorm(d, cfg.norm_eps),
            )
        )
        self.lm_head = nn.Linear(d, cfg.padded_vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.file_rope: tuple[Tensor, Tensor] | None = None  # the checkpoint's freqs_cis (cos, sin), fp32, CPU

    # ---------------------------------------------------------------- setup
    ROPE_POSITIONS = 8192  # positions the RoPE tables cover at first; reserve_positions grows them

    def init_buffers(self, positions: int | None = None) -> None:
        """(Re)compute the fp32 RoPE tables on the model's device, for the first ``positions`` positions
        (default: the context or ROPE_POSITIONS, whichever is smaller: a context of 1e8 costs nothing
        until it is used)."""
        cfg = self.config
        n = min(cfg.block_size, positions or self.ROPE_POSITIONS)
        self.rope_cos, self.rope_sin = self._rope_tables(n, self.transformer.wte.weight.device)

    def _rope_tables(self, n: int, device) -> tuple[Tensor, Tensor]:
        """fp32 cos, sin [n, head_dim / 2]: the checkpoint's values where it has them (as the published model
        reads them), computed beyond."""
        cos, sin = rope_tables(self.config.head_dim, n, self.config.rope_base, device=device)
        if self.file_rope is not None:
            m = min(n, self.file_rope[0].shape[0])
            cos[:m], sin[:m] = (t[:m].to(device) for t in self.file_rope)
        return cos, sin

    # the most positions a saved freqs_cis may hold (published buffer: block_size; 2**20 x 48 pairs: 384 MiB)
    FILE_ROPE_POSITIONS = 1 << 20
    FILE_BUFFERS = ("freqs_cis",)

    def read_file_buffers(self, state_dict: dict) -> None:
        """The published model reads its RoPE table (``freqs_cis`` [1, block_size, 1, head_dim / 2, 2]: cos,
        sin) from the checkpoint, so its values are the file's: rounded to bf16 in a bf16 file. latentrt uses
        them too (else its own fp32 table); a table of another shape is an error, as it is there."""
        table = state_dict.get("freqs_cis")
        if table is None:
            return
        from ..errors import CheckpointError

        pairs = self.config.head_dim // 2
        shape = tuple(table.shape)
        if len(shape) != 5 or shape[0] != 1 or shape[2] != 1 or shape[3:] != (pairs, 2) or shape[1] < 1:
            raise CheckpointError(
                f"tensor 'freqs_cis' has shape {shape}, the config implies (1, positions, 1, {pairs}, 2) "
                f"(the published RoPE table: cos, sin of head_dim / 2 = {pairs} pairs)"
            )
        t = (table.read() if hasattr(table, "read") else table).detach().to("cpu", torch.float32)
        self.file_rope = (t[0, :, 0, :, 0].clone(), t[0, :, 0, :, 1].clone())

    def file_buffers(self) -> dict[str, Tensor]:
        """``freqs_cis`` as the published model holds it (fp32; the loaded file's values where it had them), so
        the published code reads a saved folder's table rather than leave its buffer uninitialised; none for
        a context over FILE_ROPE_POSITIONS."""
        cfg = self.config
        if cfg.block_size > self.FILE_ROPE_POSITIONS:
            return {}
        cos, sin = self._rope_tables(cfg.block_size, "cpu")
        return {"freqs_cis": torch.stack([cos[None, :, None, :], sin[None, :, None, :]], dim=4).contiguous()}

    def reserve_positions(self, n: int) -> None:
        if n > self.rope_cos.shape[0]:
            self.init_buffers(max(n, 2 * self.rope_cos.shape[0]))

    def cache_layout(self) -> CacheLayout:
        cfg = self.config
        plain = cfg.n_layers_in_prelude + cfg.n_layers_in_coda
        return CacheLayout(plain, cfg.n_layers_in_recurrent_block, cfg.cache_kv_heads, cfg.head_dim)

    def default_steps(self) -> int:
        return self.config.mean_recurrence

    def init_depth(self) -> int:
        cfg = self.config
        return cfg.n_layers_in_prelude + cfg.n_layers_in_recurrent_block * cfg.mean_recurrence + cfg.n_layers_in_coda

    # ---------------------------------------------------------------- units of the decode loop
    def rope(self, chunk: Chunk) -> tuple[Tensor, Tensor]:
        return self.rope_cos[chunk.positions], self.rope_sin[chunk.positions]

    def prelude(self, input_ids: Tensor, cache: KVCache, chunk: Chunk, rope: tuple[Tensor, Tensor]) -> Tensor:
        """Embeddings x sqrt(n_embd) through the prelude: the per-token input e of the recurrence."""
        x = self.transformer.wte(input_ids) * self.config.embed_scale
        for i, block in enumerate(self.transformer.prelude):
            x = block(x, *rope, chunk.mask, _kv_hook(cache, chunk, None, i))
        return x

    def initial_state(self, e: Tensor, init_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Truncated normal (std sqrt(2/(5d)) * init_scale, cut at 3 std) x sqrt(d); zeros at scale 0.

        Drawn as the published ``initialize_state`` draws it, so the same generator state gives the same
        state, bit for bit: a standard normal the shape and dtype of ``e`` first (overwritten, but it advances
        the generator, at every scale, 0 included), then the truncated normal in place, in ``e``'s dtype."""
        x = torch.randn(e.shape, dtype=e.dtype, device=e.device, generator=generator)
        std = self.config.init_std * init_scale
        if not (std > 0 and self.config.state_init == "like-init"):
            return x.zero_()
        torch.nn.init.trunc_normal_(x, 0.0, std, -3 * std, 3 * std, generator=generator)
        return x * self.config.embed_scale

    def core_iteration(
        self,
        s: Tensor,
        e: Tensor,
        cache: KVCache,
        chunk: Chunk,
        iteration: int,
        active: Tensor,
        rope: tuple[Tensor, Tensor],
    ) -> Tensor:
        """One iteration: s <- adapter([s, e]) then every core layer (K/V into the iteration's slot)."""
        x = self.transformer.adapter(torch.cat([s, e], dim=-1))
        mask = cache.core_mask(chunk, iteration)
        for j, block in enumerate(self.transformer.core_block):
            x = block(x, *rope, mask, _kv_hook(cache, chunk, active, j, looped=True, iteration=iteration))
        return x

    def head(
        self,
        s: Tensor,
        cache: KVCache,
        chunk: Chunk,
        active: Tensor | None,
        rope: tuple[Tensor, Tensor],
        last_only: bool = False,
        at: Tensor | None = None,
    ) -> Tensor:
        """ln_f -> coda -> ln_f (same weights) -> lm_head; fp32 logits. Coda K/V written for ``active``.
        ``last_only``: logits of the last position only ([B, 1, V]); ``at`` [B]: of each row's position
        ``at[b]`` (right-padded prompts of a server's batch), or with a ``Packed`` chunk the tokens ``at`` of
        the packed sequence ([len(at), 1, V])."""
        x = self.transformer.ln_f(s)
        base = self.config.n_layers_in_prelude
        for i, block in enumerate(self.transformer.coda):
            x = block(x, *rope, chunk.mask, _kv_hook(cache, chunk, active, base + i))
        x = self.transformer.ln_f(x)
        if at is not None and isinstance(chunk, Packed):  # ``at``: token indices of the packed sequence
            x = x[0, at][:, None]
        elif at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), at][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(x).float()

    # ---------------------------------------------------------------- training
    def forward_train(
        self,
        input_ids: Tensor,
        n_no_grad: int,
        n_grad: int,
        *,
        init_scale: float = 1.0,
        checkpoint: bool = False,
        hooks=None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Full causal pass for training: logits [B,S,V]. The first ``n_no_grad`` iterations run without
        gradients and only the last ``n_grad`` carry them (truncated backprop through depth); with
        ``checkpoint`` each gradient iteration recomputes its activations in the backward pass."""
        B, S = input_ids.shape
        self.reserve_positions(S)
        pos = torch.arange(S, device=input_ids.device)[None].expand(B, S)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        mask = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()[None, None]

        def no_cache(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            return k, v

        def run(blocks, x: Tensor) -> Tensor:
            for blk in blocks:
                x = blk(x, cos, sin, mask, no_cache)
            return x

        e = run(self.transformer.prelude, self.transformer.wte(input_ids) * self.config.embed_scale)
        s = self.initial_state(e, init_scale, generator)
        active = torch.ones(B, dtype=torch.bool, device=e.device)

        def iterate(state: Tensor) -> Tensor:
            return run(self.transformer.core_block, self.transformer.adapter(torch.cat([state, e], dim=-1)))

        for t in range(n_no_grad + n_grad):
            if t < n_no_grad:
                with torch.no_grad():
                    s = iterate(s)
            elif checkpoint:
                s = torch.utils.checkpoint.checkpoint(iterate, s, use_reentrant=False)
            else:
                s = iterate(s)
            if hooks:
                s = hooks.on_iteration(t, s, active)
        x = run(self.transformer.coda, self.transformer.ln_f(s))
        return self.lm_head(self.transformer.ln_f(x)).float()

    # ---------------------------------------------------------------- public
    @torch.no_grad()
    def logits(
        self,
        input_ids: Tensor,
        *,
        num_steps: int | None = None,
        init_state: Tensor | None = None,
        init_scale: float = 1.0,
        attention_mask: Tensor | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Logits [B,S,V] (fp32) after ``num_steps`` iterations of the core block (default mean_recurrence), from
        ``init_state`` or a random one (``init_scale``, drawn from ``seed``'s generator), checked as generate()
        checks them."""
        from ..prompts import check_ids, check_left_padding
        from ..sampling import MAX_SEED

        num_steps, init_scale, seed = (plain_scalar(v) for v in (num_steps, init_scale, seed))  # a sweep's numpy
        check_finite_number("init_scale", init_scale, 0)
        if seed is not None:
            check_int("seed", seed, 0, MAX_SEED, high_label="2**63 - 1")
        input_ids = check_ids(input_ids, self.config, self.device)
        B, S = input_ids.shape
        self.reserve_positions(S)
        r = self.config.mean_recurrence if num_steps is None else check_steps(num_steps)
        cache = self.new_cache(B, S)
        valid = check_left_padding(attention_mask, input_ids)
        chunk = cache.begin(valid)
        rope = self.rope(chunk)
        e = self.prelude(input_ids, cache, chunk, rope)
        if init_state is not None:
            s = check_state(init_state, e)
        else:
            gen = None if seed is None else torch.Generator(self.device).manual_seed(seed)
            s = self.initial_state(e, init_scale, gen)
        active = torch.ones(B, dtype=torch.bool, device=self.device)
        for t in range(r):
            cache.mark_iteration(chunk, t, active)
            s = self.core_iteration(s, e, cache, chunk, t, active, rope)
        check_finite(s, chunk.valid, "latent state")
        return self.head(s, cache, chunk, active, rope)


# the most iterations a token may run (and the largest check interval): the backends count iterations in 32-bit
# integers (the CUDA kernels' r_max and check_every); a larger count would wrap there, not run longer
MAX_STEPS = 2**31 - 1


def check_steps(num_steps: int) -> int:
    check_int("num_steps", num_steps, 1, MAX_STEPS, high_label="2**31 - 1")
    return num_steps


def check_state(state: Tensor, like: Tensor) -> Tensor:
    """A user-given latent state: right shape, finite, on the model's device and dtype."""
    if not isinstance(state, Tensor):
        try:  # (a nested list or an array of numbers; anything else says what it got)
            state = torch.as_tensor(state, device="cpu")  # moved to the model's device below
        except (TypeError, ValueError, RuntimeError):
            raise InputError(
                f"init_state must be a tensor of shape {tuple(like.shape)} (or [B, 1, d]), got {type(state).__name__}"
            ) from None
    if state.dim() == 2:
        state = state[None]
    if (
        state.dim() != 3
        or state.shape[-1] != like.shape[-1]
        or state.shape[0] != like.shape[0]
        or (state.shape[1] not in (1, like.shape[1]))
    ):
        raise InputError(f"init_state must have shape {tuple(like.shape)} (or [B, 1, d]), got {tuple(state.shape)}")
    if not torch.isfinite(state).all():
        raise NonFiniteStateError("init_state contains NaN or inf")
    return state.to(device=like.device, dtype=like.dtype).expand_as(like).clone()


def check_finite(x: Tensor, valid: Tensor, what: str, where: str = "") -> None:
    """Raise NonFiniteStateError naming the sequences whose (valid) entries are NaN/inf."""
    bad = ~torch.isfinite(x).all(dim=-1) & valid.to(x.device)
    if bad.any():
        seqs = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise NonFiniteStateError(
            f"non-finite {what}{where} in sequence(s) {seqs}; check the weights and the init_state"
        )
