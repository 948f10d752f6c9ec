"""The CUDA backend's Coconut runners (backends/cuda.py chooses them): every continuous thought of a prompt in
one launch of a thought-loop kernel (csrc/thought_loop.cu, or csrc/stream_thought.cu with the ``stream``
kernel), and, with ``stream``, each answer token in one launch of stream_thought.cu: the GPT-2 layers over
the token's embedding + wpe and the LM head over ln_f of the result, captured with the position's
bookkeeping as one CUDA graph (issue #11 §2: "Coconut thoughts and answer tokens through the same
machinery"). The kernels' arithmetic follows the model's modules' rounding points (bf16 tolerance)."""

from __future__ import annotations

import torch
from torch import Tensor

from .cuda import log_fallback_once, watchdog
from .graph import GraphedRunner
from .triton.column import TANH_GELUS, ColumnRunner


def thought_kernel_refusal(model) -> str | None:
    """Why the thought kernels cannot run this GPT-2 model (None when they can)."""
    if model.dtype != torch.bfloat16:
        return f"dtype {model.dtype} (the kernel is bf16)"
    if model.config.activation_function not in TANH_GELUS:
        return f"activation {model.config.activation_function!r} (the kernel uses GELU's tanh form)"
    return None


class PersistentColumnRunner(ColumnRunner):
    """Coconut: when every sequence thinks in the same columns, all of them run in one launch of the
    thought-loop kernel (``backend.loop_kernel``: ``barrier``, csrc/thought_loop.cu, or ``stream``,
    csrc/stream_thought.cu); otherwise the Triton column runner runs them (``run_all`` returns None)."""

    def __init__(self, backend, cache, embeds: Tensor, latent: Tensor, mask: Tensor) -> None:
        weights_t = backend.fused_layer_weights()
        super().__init__(backend.model, backend.feedback, cache, embeds, latent, mask, weights_t)
        self.backend = backend

    def run_all(self, h_prev: Tensor, first: int, last: int) -> Tensor | None:
        m, cache, ext = self.model, self.cache, self.backend.ext
        n = last - first + 1
        if not bool(self.latent[:, first : last + 1].all()):  # one host read per prompt
            log_fallback_once("Coconut thoughts in different columns per sequence")
            return None
        a = self.backend.thought_args(cache, n)
        streamed = self.backend.loop_kernel == "stream"
        plan = (ext.stream_thought_plan if streamed else ext.thought_plan)(a, m.device.index or 0)
        if not plan["ok"]:
            log_fallback_once(f"{self.backend.loop_kernel} thought kernel: {plan['reason']}")
            return None
        B, d = cache.batch, m.config.n_embd
        chunk = cache.begin(torch.ones(B, n, dtype=torch.bool, device=m.device))
        start, positions = chunk.start, chunk.positions[:, 0].contiguous()
        h = h_prev.reshape(B, d).to(torch.bfloat16).contiguous()
        out = torch.empty(B, n, d, dtype=torch.bfloat16, device=m.device)
        active = torch.ones(B, dtype=torch.uint8, device=m.device)
        if streamed:  # byte-sized buffers, by the plan's grid
            table = torch.empty(ext.stream_thought_table_bytes(a, plan["grid"]), dtype=torch.uint8, device=m.device)
            scratch = torch.empty(ext.stream_thought_scratch_bytes(a, plan["grid"]), dtype=torch.uint8, device=m.device)
            self.watch = watchdog(a)
        else:
            table = torch.empty(ext.thought_table_bytes(a), dtype=torch.uint8, device=m.device)
            scratch = torch.empty(ext.thought_scratch_elems(a), dtype=torch.bfloat16, device=m.device)
        barrier = torch.zeros(2, dtype=torch.int32, device=m.device)
        a.pos, a.positions, a.h, a.out = start, positions.data_ptr(), h.data_ptr(), out.data_ptr()
        a.active, a.layer_table, a.scratch, a.barrier = (
            active.data_ptr(),
            table.data_ptr(),
            scratch.data_ptr(),
            barrier.data_ptr(),
        )
        a.stream = torch.cuda.current_stream(m.device).cuda_stream
        # temporaries are freed stream-ordered: safe to drop after
        (ext.stream_thought if streamed else ext.thought_loop)(a, m.device.index or 0)
        return out


def streamed_answer_runner(backend, cache) -> StreamedAnswerRunner | None:
    """The streamed answer-token runner for the batch, or None (the reason logged once) where the model or
    the plan does not allow it."""
    m = backend.model
    head = m.lm_head
    why = thought_kernel_refusal(m)
    if why is None and (head.bias is not None or not head.weight.is_contiguous()):
        why = "an LM head with a bias or non-contiguous weights"
    if why is None:
        runner = StreamedAnswerRunner(backend, cache)
        plan = backend.ext.stream_thought_plan(runner.args, m.device.index or 0)
        if plan["ok"]:
            runner.allocate(plan["grid"])
            return runner
        why = f"stream answer kernel: {plan['reason']}"
    log_fallback_once(why)
    return None


class StreamedAnswerRunner(GraphedRunner):
    """One Coconut answer token for the batch in one launch of csrc/stream_thought.cu (``embeds`` and
    ``lm_head`` set, one position): ``prepare(embeds [B, 1, d], alive [B])`` reserves the next timeline
    position; calling it marks the position (cache.begin_at), launches, and returns the logits [B, V]
    rounded as the model's bf16 LM head rounds them (fp32). The timeline index is a device scalar and the
    kernel's table is uploaded once, so the whole token is one captured CUDA graph."""

    def __init__(self, backend, cache) -> None:
        m, ext = backend.model, backend.ext
        self.model, self.cache, self.ext, self.device = m, cache, ext, m.device.index or 0
        B, d, dev = cache.batch, m.config.n_embd, m.device
        self.embeds = torch.zeros(B, d, dtype=torch.bfloat16, device=dev)
        self.valid = torch.zeros(B, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(B, 1, d, dtype=torch.bfloat16, device=dev)  # before ln_f (the kernel's `out`)
        self.sums = torch.zeros(B, m.lm_head.weight.shape[0], dtype=torch.float32, device=dev)
        self.active = torch.ones(B, dtype=torch.uint8, device=dev)
        self.barrier = torch.zeros(2, dtype=torch.int32, device=dev)
        a = self.args = backend.thought_args(cache, 1)
        a.embeds, a.h, a.out = self.embeds.data_ptr(), self.embeds.data_ptr(), self.hidden.data_ptr()
        a.lm_head, a.vocab, a.logits = m.lm_head.weight.data_ptr(), self.sums.shape[1], self.sums.data_ptr()
        a.pos_ptr, a.positions, a.active = self.pos.data_ptr(), self.positions.data_ptr(), self.active.data_ptr()
        a.barrier = self.barrier.data_ptr()

    def allocate(self, grid: int) -> None:
        """The workspace and the device table for the plan's grid; the table uploaded once."""
        a, dev = self.args, self.model.device
        self.scratch = torch.empty(self.ext.stream_thought_scratch_bytes(a, grid), dtype=torch.uint8, device=dev)
        self.table = torch.empty(self.ext.stream_thought_table_bytes(a, grid), dtype=torch.uint8, device=dev)
        a.scratch, a.layer_table = self.scratch.data_ptr(), self.table.data_ptr()
        table = self.ext.stream_thought_table(a, self.device)
        self.table.copy_(torch.frombuffer(bytearray(table), dtype=torch.uint8))
        a.table_uploaded = True
        self.watch = watchdog(a)

    def prepare(self, embeds: Tensor, alive: Tensor) -> None:
        self.embeds.copy_(embeds[:, 0])
        self.valid.copy_(alive)
        self.pos.fill_(self.cache.reserve())

    def run(self) -> Tensor:
        self.positions.copy_(self.cache.begin_at(self.pos, self.valid))
        self.args.stream = torch.cuda.current_stream(self.model.device).cuda_stream
        self.ext.stream_thought(self.args, self.device)
        return self.sums.to(torch.bfloat16).float()  # the model's lm_head output is bf16
