"""The CUDA backend: every core iteration of a decode token in one persistent kernel launch
(csrc/recurrent_loop.cu, implementing the rules of latentrt/recurrence.py); for Coconut, every continuous
thought of a prompt in one launch (csrc/thought_loop.cu).

Two kernels run the latent loop (``CudaBackend.loop_kernel``): ``barrier`` (recurrent_loop.cu: grid barriers
between GEMVs, every criterion, batch <= 16) and ``stream`` (stream_loop.cu, issue #11: a producer warp per SM
streams the weights through a shared-memory ring while the consumers wait on dependency counters; batch <= 32,
criteria none / latent-diff / cosine / KL). ``barrier`` stays the default: on an H200 (2026-12-04,
benchmarks/RESULTS.md) ``stream`` was correct, slower than it at batch 1 (66.5 against 55.6 ms a token at r=32:
the ring's copies cap the weight stream; the probe says what to change), faster at batch 8 (107 against 211 ms)
and slower than Triton at every batch unless tokens exit after one iteration; where the chosen kernel cannot
run a call the other paths take over as below. For Coconut, ``stream`` runs the thoughts on the same ring
(stream_thought.cu) instead of thought_loop.cu, and each answer token too (the layers and the LM head in one
launch); the Coconut runners are backends/cuda_coconut.py. The streamed latent loop's attention
(``CudaBackend.stream_attention``, env LATENTRT_STREAM_ATTENTION): ``split`` over positions by every warp of
the grid (default), or ``cta``, one (row, head) per CTA (the barrier kernel's loop; slower in every row the
H200 measured, kept as the GPU script's fallback). The streamed kernels' input (``CudaBackend.stream_input``,
env LATENTRT_STREAM_INPUT): each ring stage's input chunk ``staged`` in shared memory once per stage (default:
as fast at batch 1 and 1.4-2.4x faster from batch 4 in the probe), or read from ``l2`` by every consumer warp.
How the streamed latent loop's producer copies the weights (``CudaBackend.stream_copy``, env
LATENTRT_STREAM_COPY): ``rows``, one bulk copy per weight-row segment (default), or ``tensor``, 2D tensor-map
boxes (csrc/stream_tensor_map.h): the 2026-12-04 probe streamed those alone at 3.4-3.7 TB/s against 0.9-2.4,
and the kernel taking them was correct on its first runs that day, but its consumers read that layout more
slowly, so rows stay the default. Which units
multiply the streamed latent loop's weights (``CudaBackend.stream_gemv``, env LATENTRT_STREAM_GEMV): ``auto``,
CUDA-core dot products up to batch 4 and mma.sync tensor cores above (default), or ``tensor-cores`` at every
batch (the batch padded to the mma's 8 columns: about half the instructions per weight byte; the probe's
``ring-mma`` lines at batch 1 and 4 measure it first).

The prelude and the head around it run as in the Triton backend; between them one cooperative launch
runs up to r_max iterations for the whole batch, decides convergence on the device (latent-diff, cosine,
or KL with the coda and lm_head inside the kernel) and writes the iterations each sequence used. Where
the launch cannot serve a generate() call (dtype, batch > 16, shared memory, another exit criterion) the
Triton path runs instead and the reason is logged once.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import Tensor

from ..errors import InputError, env_number
from .base import Capabilities
from .triton import TritonBackend
from .triton.column import ColumnRunner
from .triton.recurrent_layers import DecodePosition
from .triton.token import RecurrentTokenRunner

log = logging.getLogger("latentrt")
LOOP_KERNEL_ENV = "LATENTRT_CUDA_LOOP"  # the latent loop's kernel, one of LOOP_KERNELS (default: barrier)
LOOP_KERNELS = ("barrier", "stream")
STREAM_ATTENTION_ENV = "LATENTRT_STREAM_ATTENTION"  # the streamed kernel's attention (default: split)
STREAM_ATTENTIONS = ("split", "cta")  # over positions by every warp of the grid / one (row, head) per CTA
STREAM_INPUT_ENV = "LATENTRT_STREAM_INPUT"  # the streamed kernels' input chunks (default: staged)
STREAM_INPUTS = ("staged", "l2")  # copied to shared memory once per stage / read from L2 by every warp
STREAM_COPY_ENV = "LATENTRT_STREAM_COPY"  # how the streamed latent loop copies its weights (default: rows)
STREAM_COPIES = ("rows", "tensor")  # a bulk copy per row segment / 2D tensor-map boxes
STREAM_GEMV_ENV = "LATENTRT_STREAM_GEMV"  # what multiplies the streamed latent loop's weights (default: auto)
STREAM_GEMVS = ("auto", "tensor-cores")  # CUDA cores to batch 4, tensor cores above / tensor cores at every batch
WATCHDOG_ENV = "LATENTRT_STREAM_WATCHDOG"  # seconds a streamed-kernel wait may last (default 2; 0: off)
_watches: list[Tensor] = []  # the latest runners' watchdog buffers (pinned host memory), for the report
CRITERIA = {"none": 0, "latent-diff": 1, "cosine": 2, "kl": 3}
_logged: set[str] = set()


def _one_of(name: str, allowed: tuple[str, ...], source: str) -> str:
    """``name`` if it is one of ``allowed``, else an InputError naming where it came from."""
    if name not in allowed:
        raise InputError(f"{source} must be one of {list(allowed)}, got {name!r}")
    return name


def log_fallback_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning("latentrt: persistent CUDA kernel not used (%s); running the Triton path", reason)


class PersistentTokenRunner(RecurrentTokenRunner):
    """A token runner whose latent loop is one launch of a persistent kernel. ``barrier``: run eagerly (the
    token's timeline index is a launch argument). ``stream``: the kernel reads the index from the runner's
    device buffer, so the whole token (prelude, the launch, head) is captured as one CUDA graph like the
    Triton runner's (where the capture fails it warns once and runs eagerly: backends/graph.py)."""

    def __init__(self, backend, cache, spec, ext, plan_args, kernel: str = "barrier") -> None:
        super().__init__(backend, cache, spec)
        self.ext, self.args, self.kernel = ext, plan_args, kernel
        model = self.model
        cfg, B = model.config, cache.batch
        dev = model.device
        self.state = torch.zeros(B, cfg.n_embd, dtype=model.dtype, device=dev)
        self.ref_state = torch.zeros_like(self.state)  # the state of the last check (latentrt/recurrence.py)
        self.term = torch.zeros_like(self.state)
        self.cos = torch.zeros(B, cfg.head_dim // 2, dtype=torch.float32, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.active = torch.zeros(B, dtype=torch.uint8, device=dev)
        self.used = torch.zeros(B, dtype=torch.long, device=dev)
        V = cfg.padded_vocab_size
        kl = spec.criterion.name == "kl"
        self.logits = torch.zeros(B, V if kl else 1, dtype=torch.float32, device=dev)
        self.prev_logp = torch.zeros_like(self.logits)
        if kernel == "stream":  # a byte workspace and the plan's tile table, uploaded once
            self.scratch = torch.empty(ext.stream_loop_scratch_bytes(plan_args), dtype=torch.uint8, device=dev)
            table = ext.stream_loop_table(plan_args, dev.index or 0)
            self.table = torch.tensor(table, dtype=torch.int32, device="cpu").to(dev)
            plan_args.table = self.table.data_ptr()
            plan_args.pos_ptr = self.pos.data_ptr()  # the timeline index on the device: capturable
            self.launch = ext.stream_loop
            self.watch = watchdog(plan_args)
        else:
            self.scratch = torch.empty(ext.loop_scratch_elems(plan_args), dtype=torch.bfloat16, device=dev)
            self.launch = ext.latent_loop
        self.barrier = torch.zeros(2, dtype=torch.int32, device=dev)
        a = self.args
        a.term, a.cos, a.sin, a.state = (t.data_ptr() for t in (self.term, self.cos, self.sin, self.state))
        a.ref_state = self.ref_state.data_ptr()
        a.active, a.used = self.active.data_ptr(), self.used.data_ptr()
        a.logits, a.prev_logp = self.logits.data_ptr(), self.prev_logp.data_ptr()
        a.scratch, a.barrier = self.scratch.data_ptr(), self.barrier.data_ptr()
        self.timeline_index = 0

    def prepare(self, tok: Tensor, alive: Tensor, s0: Tensor, timeline_index: int) -> None:
        super().prepare(tok, alive, s0, timeline_index)
        self.timeline_index = timeline_index

    def __call__(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.kernel != "stream":
            return self.run()
        return super().__call__()

    def loop(self, where: DecodePosition, e_term: Tensor):
        """The whole loop in one kernel launch: no boundary (a generator that yields nothing)."""
        return self.recurrence(where, e_term)
        yield

    def recurrence(self, where: DecodePosition, e_term: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, crit = self.args, self.spec.criterion
        self.term.copy_(e_term)
        self.cos.copy_(where.cos)
        self.sin.copy_(where.sin)
        self.state.copy_(self.s0)
        self.ref_state.copy_(self.s0)
        self.active.copy_(self.alive)
        self.used.zero_()
        if crit.name == "kl":
            self.prev_logp.fill_(-math.log(self.logits.shape[1]))  # uniform, as latentrt.exits.ExitTracker starts
            self.logits.zero_()
        a.pos = self.timeline_index
        a.stream = torch.cuda.current_stream(self.model.device).cuda_stream
        self.launch(a, self.model.device.index or 0)
        s = self.state.clone()
        # kl: the kernel leaves each sequence the logits of its exit or of the last check (rule 5)
        kl_logits = crit.name == "kl" and self.spec.ever_checks
        out = self.logits.clone() if kl_logits else self._head(s, self.alive, where)
        return s, self.used.clone(), out


def stream_watchdog_report() -> str | None:
    """What the streamed kernel's watchdog recorded when a wait hung (the launch then failed with a trap),
    or None. Reads pinned host memory only, so it works after the CUDA context has died."""
    for buf in reversed(_watches):
        code, phase, cta, a, b, c, _, _ = buf.tolist()
        if code == 1:
            return f"streamed loop hang: CTA {cta} waited at consumer barrier {phase} ({a} of {b} arrivals)"
        if code == 2:
            return f"streamed loop hang: CTA {cta} consumer warp {a} waited for ring stage {b} (parity {c})"
    return None


def watchdog(args) -> Tensor | None:
    """The streamed kernels' watchdog buffer for a launch's arguments (LoopArgs / ThoughtLoopArgs): written by
    the kernel when a wait hangs, readable after the context died (stream_watchdog_report); None when
    LATENTRT_STREAM_WATCHDOG is 0."""
    seconds = env_number(WATCHDOG_ENV, 2.0)
    if seconds <= 0:
        return None
    watch = torch.zeros(8, dtype=torch.int32, device="cpu").pin_memory()
    args.watch, args.watch_cycles = watch.data_ptr(), int(seconds * 2e9)
    _watches[:] = [*_watches[-15:], watch]
    return watch


def loop_args(ext, model, cache, spec):
    """The launch's static arguments (weights, cache, shapes); per-token buffers are set by the runner."""
    cfg, t_ = model.config, model.transformer
    a = ext.LoopArgs()
    a.batch, a.d, a.n_head, a.n_kv = cache.batch, cfg.n_embd, cfg.num_attention_heads, cfg.num_key_value_heads
    a.head_dim, a.ffn, a.max_len, a.vocab = cfg.head_dim, cfg.intermediate_size, cache.max_len, cfg.padded_vocab_size
    a.r_max, a.min_steps, a.check_every = spec.r_max, spec.min_steps, spec.check_every
    a.criterion = CRITERIA[spec.criterion.name]
    a.eps, a.threshold = float(cfg.norm_eps), spec.criterion.kernel_threshold(torch.bfloat16)

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
    capabilities = Capabilities(devices=("cuda",), dtypes=(torch.bfloat16,), criteria=frozenset(CRITERIA), max_batch=16)
    barrier_mode = 0  # grid barrier: 0 cooperative groups, 1 counters in global memory (benchmarks compare)
    loop_kernel = (
        "barrier"  # "barrier" (recurrent_loop.cu, thought_loop.cu) or "stream" (stream_loop.cu, stream_thought.cu)
    )
    stream_attention = "split"  # the streamed kernel's attention, one of STREAM_ATTENTIONS (benchmarks compare)
    stream_input = "staged"  # the streamed kernels' input chunks, one of STREAM_INPUTS (the probe compares)
    stream_copy = "rows"  # the streamed latent loop's weight copies, one of STREAM_COPIES
    stream_gemv = "auto"  # what multiplies the streamed latent loop's weights, one of STREAM_GEMVS

    def __init__(self, model, reason: str = "") -> None:
        super().__init__(model, reason)
        # the CLI, the server and the benchmarks take the latent loop's kernel from the environment too
        env = os.environ.get
        self.loop_kernel = _one_of(env(LOOP_KERNEL_ENV, type(self).loop_kernel), LOOP_KERNELS, LOOP_KERNEL_ENV)
        attention = env(STREAM_ATTENTION_ENV, type(self).stream_attention)
        self.stream_attention = _one_of(attention, STREAM_ATTENTIONS, STREAM_ATTENTION_ENV)
        self.stream_input = _one_of(env(STREAM_INPUT_ENV, type(self).stream_input), STREAM_INPUTS, STREAM_INPUT_ENV)
        self.stream_copy = _one_of(env(STREAM_COPY_ENV, type(self).stream_copy), STREAM_COPIES, STREAM_COPY_ENV)
        self.stream_gemv = _one_of(env(STREAM_GEMV_ENV, type(self).stream_gemv), STREAM_GEMVS, STREAM_GEMV_ENV)

    @classmethod
    def unavailable(cls, model, auto: bool = False) -> str | None:
        from .. import cuda_ext

        built, why_not = cuda_ext.available()
        if not built:
            return why_not
        device = getattr(model, "device", None)
        if getattr(device, "type", "") != "cuda":
            return "the model is not on a CUDA device"
        not_triton = TritonBackend.unavailable(model)
        if not_triton is not None:
            return not_triton  # the prelude and head run on the Triton kernels
        if auto and model.dtype != torch.bfloat16:
            return f"dtype {model.dtype} (the kernels are bf16)"
        return None

    @property
    def ext(self):
        from .. import cuda_ext

        return cuda_ext._ext()

    def column_runner(self, cache, embeds: Tensor, latent: Tensor, mask: Tensor) -> ColumnRunner:
        """Coconut thoughts in one launch of a thought-loop kernel (backends/cuda_coconut.py) where the model
        allows, else the Triton column runner."""
        from .cuda_coconut import PersistentColumnRunner, thought_kernel_refusal

        why = thought_kernel_refusal(self.model)
        if why is not None:
            log_fallback_once(why)
            return super().column_runner(cache, embeds, latent, mask)
        return PersistentColumnRunner(self, cache, embeds, latent, mask)

    def answer_runner(self, cache):
        """With the ``stream`` kernel, a Coconut answer token (the layers and the LM head) in one launch of
        csrc/stream_thought.cu (backends/cuda_coconut.py); else, or where it cannot run, the column runner's."""
        if self.loop_kernel == "stream":
            from .cuda_coconut import streamed_answer_runner

            runner = streamed_answer_runner(self, cache)
            if runner is not None:
                return runner
        return super().answer_runner(cache)

    def _stage_input(self) -> int:
        """The launch arguments' ``stage_input`` for ``stream_input`` (set after the backend, maybe)."""
        return int(_one_of(self.stream_input, STREAM_INPUTS, "stream_input") == "staged")

    def stream_options(self, args) -> None:
        """The streamed latent loop's options (attention, input, weight copies, GEMV units) into its launch
        arguments ``args`` (a LoopArgs), each checked (they may have been set after the backend)."""
        args.split_attention = int(_one_of(self.stream_attention, STREAM_ATTENTIONS, "stream_attention") == "split")
        args.stage_input = self._stage_input()
        args.tensor_copy = int(_one_of(self.stream_copy, STREAM_COPIES, "stream_copy") == "tensor")
        args.tensor_core_gemv = int(_one_of(self.stream_gemv, STREAM_GEMVS, "stream_gemv") == "tensor-cores")

    def thought_args(self, cache, n_thoughts: int):
        """Static launch arguments of the thought loop; Conv1D weights transposed once per backend."""
        m, ext = self.model, self.ext
        cfg, t_ = m.config, m.transformer
        transposed = self.conv1d_transposed()
        a = ext.ThoughtLoopArgs()
        a.batch, a.d, a.n_head, a.head_dim = cache.batch, cfg.n_embd, cfg.n_head, cfg.head_dim
        a.ffn, a.max_len, a.n_thoughts, a.eps = cfg.inner_size, cache.max_len, n_thoughts, cfg.layer_norm_epsilon
        layers = []
        for i, (blk, w) in enumerate(zip(t_.h, transposed)):
            L = ext.Gpt2LayerArgs()
            L.ln_1_w, L.ln_1_b = blk.ln_1.weight.data_ptr(), blk.ln_1.bias.data_ptr()
            L.ln_2_w, L.ln_2_b = blk.ln_2.weight.data_ptr(), blk.ln_2.bias.data_ptr()
            L.attn_w, L.attn_b = w["attn"].data_ptr(), blk.attn.c_attn.bias.data_ptr()
            L.proj_w, L.proj_b = w["proj"].data_ptr(), blk.attn.c_proj.bias.data_ptr()
            L.fc_w, L.fc_b = w["fc"].data_ptr(), blk.mlp.c_fc.bias.data_ptr()
            L.out_w, L.out_b = w["out"].data_ptr(), blk.mlp.c_proj.bias.data_ptr()
            L.k_cache, L.v_cache, L.scale = cache.plain_k[i].data_ptr(), cache.plain_v[i].data_ptr(), blk.attn.scale
            layers.append(L)
        a.layers = layers
        a.ln_f_w, a.ln_f_b, a.wpe = t_.ln_f.weight.data_ptr(), t_.ln_f.bias.data_ptr(), t_.wpe.weight.data_ptr()
        a.valid, a.barrier_mode = cache.valid.data_ptr(), self.barrier_mode
        a.stage_input = self._stage_input()
        return a

    def token_runner(self, cache, spec) -> RecurrentTokenRunner | None:
        from .. import cuda_ext

        m = self.model
        why = None
        if m.dtype != torch.bfloat16:
            why = f"dtype {m.dtype} (the kernel is bf16)"
        elif spec.criterion.name not in CRITERIA:
            why = f"exit criterion {spec.criterion.name!r} is not implemented in the kernel"
        elif m.config.keys_per_query_head:
            why = "a single KV head with qk_bias (a key per query head) is not implemented in the kernel"
        elif not cache.kv_mode.ring_lookup:
            why = f"kv_sharing {cache.kv_mode.name!r} is not implemented in the kernel (t mod K slots only)"
        elif any(not p.is_contiguous() for p in m.parameters()):
            why = "non-contiguous weights"
        if why is None:
            ext = cuda_ext._ext()
            args = loop_args(ext, m, cache, spec)
            args.barrier_mode = self.barrier_mode
            _one_of(self.loop_kernel, LOOP_KERNELS, "loop_kernel")  # both may have been set after the backend
            self.stream_options(args)
            planner = ext.stream_loop_plan if self.loop_kernel == "stream" else ext.loop_plan
            plan = planner(args, m.device.index or 0)
            if plan["ok"]:
                return PersistentTokenRunner(self, cache, spec, ext, args, self.loop_kernel)
            why = f"{self.loop_kernel} kernel: {plan['reason']}"
        log_fallback_once(why)
        return super().token_runner(cache, spec)
