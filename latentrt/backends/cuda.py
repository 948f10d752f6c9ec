"""The CUDA backend: every core iteration of a decode token in one persistent kernel launch (csrc/latent_loop.cu).

The prelude and the head around it run as in the Triton backend; between them one cooperative launch
runs up to r_max iterations for the whole batch, decides convergence on the device (latent-diff, cosine,
or KL with the coda and lm_head inside the kernel) and writes the iterations each sequence used. Where
the launch cannot serve a generate() call (dtype, batch > 16, shared memory, another exit criterion) the
Triton path runs instead and the reason is logged once.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .triton import TritonBackend
from .triton_step import TokenInputs, TokenStep

log = logging.getLogger("latentrt")
CRITERIA = {"none": 0, "latent-diff": 1, "cosine": 2, "kl": 3}
_logged: set[str] = set()


def log_fallback_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning("latentrt: persistent CUDA kernel not used (%s); running the Triton path", reason)


class PersistentTokenStep(TokenStep):
    """A TokenStep whose recurrence is one launch of the persistent kernel (no CUDA graph: the token's
    timeline index is a launch argument, and the launch is already one per token)."""

    def __init__(self, model, cache, r_max: int, criterion, min_steps: int, exit_ops, ext, plan_args) -> None:
        super().__init__(model, cache, r_max, criterion, min_steps, exit_ops)
        self.ext, self.args = ext, plan_args
        cfg, B = model.config, cache.batch
        dev = model.device
        self.state = torch.zeros(B, cfg.n_embd, dtype=model.dtype, device=dev)
        self.term = torch.zeros_like(self.state)
        self.cos = torch.zeros(B, cfg.head_dim // 2, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.active = torch.zeros(B, dtype=torch.uint8, device=dev)
        self.used = torch.zeros(B, dtype=torch.long, device=dev)
        V = cfg.padded_vocab_size
        kl = criterion.name == "kl"
        self.logits = torch.zeros(B, V if kl else 1, device=dev)
        self.prev_logp = torch.zeros_like(self.logits)
        self.scratch = torch.empty(ext.loop_scratch_elems(plan_args), dtype=torch.bfloat16, device=dev)
        self.barrier = torch.zeros(2, dtype=torch.int32, device=dev)
        a = self.args
        a.term, a.cos, a.sin, a.state = (t.data_ptr() for t in (self.term, self.cos, self.sin, self.state))
        a.active, a.used = self.active.data_ptr(), self.used.data_ptr()
        a.logits, a.prev_logp = self.logits.data_ptr(), self.prev_logp.data_ptr()
        a.scratch, a.barrier = self.scratch.data_ptr(), self.barrier.data_ptr()
        self.timeline_index = 0

    def prepare(self, tok: Tensor, alive: Tensor, s0: Tensor, timeline_index: int) -> None:
        super().prepare(tok, alive, s0, timeline_index)
        self.timeline_index = timeline_index

    def __call__(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.run()

    def _recurrence(self, step: TokenInputs, term: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, crit = self.args, self.criterion
        self.term.copy_(term)
        self.cos.copy_(step.cos)
        self.sin.copy_(step.sin)
        self.state.copy_(self.s0)
        self.active.copy_(self.alive)
        self.used.zero_()
        if crit.name == "kl":
            self.prev_logp.fill_(-math.log(self.logits.shape[1]))  # uniform, as ExitTracker starts
            self.logits.zero_()
        a.pos = self.timeline_index
        a.stream = torch.cuda.current_stream(self.model.device).cuda_stream
        self.ext.latent_loop(a, self.model.device.index or 0)
        s = self.state.clone()
        out = self.logits.clone() if crit.name == "kl" else self._head(s, self.alive, step)
        return s, self.used.clone(), out


def loop_args(ext, model, cache, r_max: int, criterion, min_steps: int):
    """The launch's static arguments (weights, cache, shapes); per-token buffers are set by the step."""
    cfg, t_ = model.config, model.transformer
    a = ext.LoopArgs()
    a.batch, a.d, a.n_head, a.n_kv = cache.batch, cfg.n_embd, cfg.num_attention_heads, cfg.num_key_value_heads
    a.head_dim, a.ffn, a.max_len, a.vocab = cfg.head_dim, cfg.intermediate_size, cache.max_len, cfg.padded_vocab_size
    a.r_max, a.min_steps, a.criterion = r_max, min_steps, CRITERIA[criterion.name]
    a.eps, a.threshold = float(cfg.norm_eps), float(criterion.threshold)

    def layer(blk, k: Tensor, v: Tensor, slots: int):
        L = ext.SandwichLayer()
        L.norm_1, L.norm_2 = blk.norm_1.weight.data_ptr(), blk.norm_2.weight.data_ptr()
        L.norm_3, L.norm_4 = blk.norm_3.weight.data_ptr(), blk.norm_4.weight.data_ptr()
        L.wqkv, L.wo = blk.attn.Wqkv.weight.data_ptr(), blk.attn.proj.weight.data_ptr()
        L.qk_bias = blk.attn.qk_bias.data_ptr() if blk.attn.qk_bias is not None else 0
        L.wfc, L.wproj = blk.mlp.fc.weight.data_ptr(), blk.mlp.proj.weight.data_ptr()
        L.k_cache, L.v_cache, L.slots = k.data_ptr(), v.data_ptr(), slots
        return L

    a.core = [layer(b, cache.core_k[j], cache.core_v[j], cache.core_slots) for j, b in enumerate(t_.core_block)]
    base = cfg.n_layers_in_prelude
    a.coda = [layer(b, cache.plain_k[base + i], cache.plain_v[base + i], 1) for i, b in enumerate(t_.coda)]
    a.adapter, a.ld_adapter = t_.adapter.weight.data_ptr(), t_.adapter.weight.stride(0)
    a.ln_f, a.lm_head = t_.ln_f.weight.data_ptr(), model.lm_head.weight.data_ptr()
    a.valid, a.written = cache.valid.data_ptr(), cache.written.data_ptr()
    return a


class CudaBackend(TritonBackend):
    name = "cuda"
    barrier_mode = 0  # grid barrier: 0 cooperative groups, 1 counters in global memory (benchmarks compare)

    def token_step(self, cache, r_max: int, criterion, min_steps: int) -> TokenStep | None:
        from .. import cuda_ext

        m = self.model
        why = None
        if m.dtype != torch.bfloat16:
            why = f"dtype {m.dtype} (the kernel is bf16)"
        elif criterion.name not in CRITERIA:
            why = f"exit criterion {criterion.name!r} is not implemented in the kernel"
        elif any(not p.is_contiguous() for p in m.parameters()):
            why = "non-contiguous weights"
        if why is None:
            ext = cuda_ext._ext()
            args = loop_args(ext, m, cache, r_max, criterion, min_steps)
            args.barrier_mode = self.barrier_mode
            plan = ext.loop_plan(args, m.device.index or 0)
            if plan["ok"]:
                return PersistentTokenStep(m, cache, r_max, criterion, min_steps, self.exit_ops, ext, args)
            why = plan["reason"]
        log_fallback_once(why)
        return super().token_step(cache, r_max, criterion, min_steps)
