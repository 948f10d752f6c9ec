"""What a skilled PyTorch user gets without custom kernels: the same decode ops at fixed depth with static
shapes (a full-length cache under a position mask), so torch.compile can fuse them and a CUDA graph can
replay one whole token. Any KV mode at fixed depth: iteration t writes and reads core slot t mod K (shared
K = 1, ring-K, full K = r: at fixed depth every earlier position wrote every slot, so the slot is a plain
slice). It reads and writes the engine's KVCache tensors, so its output can be checked against generate().

``compiled_step`` compiles one core iteration (the same code for every t: one compile per batch size,
whatever r or the KV mode) and captures the whole token (prelude, r compiled iterations, head) in one
CUDA graph: cheap enough to time beside every acceptance row of a run (issue #11's yardstick)."""

from __future__ import annotations

import torch
from torch import Tensor

from latentrt.cache import KVCache


class StaticDecoder:
    """One token for B sequences at one position, r core iterations, slot t mod K of the cache's K."""

    def __init__(self, model, cache: KVCache, steps: int) -> None:
        self.model, self.cache, self.steps = model, cache, steps
        self.iteration = core_iteration  # replaced by its compiled form in compiled_step
        B, T = cache.batch, cache.max_len
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=model.device)  # timeline index being written
        self.rope_pos = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        self.valid = cache.valid  # [B, T] (read: the cache owns its timeline)
        self.t_idx = torch.arange(T, device=model.device)

    def _kv(self, k_buf: Tensor, v_buf: Tensor):
        return _kv_writer(self.pos, k_buf, v_buf)

    def step(self) -> Tensor:
        """Logits [B, V] of the next token; reads self.tok / self.pos / self.rope_pos."""
        m, c, t_ = self.model, self.cache, self.model.transformer
        cos, sin = m.rope_cos[self.rope_pos], m.rope_sin[self.rope_pos]
        mask = ((self.t_idx[None, :] <= self.pos) & (self.valid | (self.t_idx[None, :] == self.pos)))[:, None, None]
        x = t_.wte(self.tok) * m.config.embed_scale
        for i, blk in enumerate(t_.prelude):
            x = blk(x, cos, sin, mask, self._kv(c.plain_k[i], c.plain_v[i]))
        e, s = x, torch.zeros_like(x)
        for t in range(self.steps):
            slot = c.slot(t)
            s = self.iteration(m, self.pos, s, e, cos, sin, mask, c.core_k[:, slot], c.core_v[:, slot])
        h = t_.ln_f(s)
        base = m.config.n_layers_in_prelude
        for i, blk in enumerate(t_.coda):
            h = blk(h, cos, sin, mask, self._kv(c.plain_k[base + i], c.plain_v[base + i]))
        return m.lm_head(t_.ln_f(h)).float()[:, -1]

    def set_token(self, tok: Tensor, timeline_index: int) -> None:
        """Place the next token (in place, so a captured graph sees it) at the cache's next timeline index."""
        assert timeline_index == self.cache.length, "tokens are placed at the end of the cache's timeline"
        chunk = self.cache.begin(torch.ones(self.cache.batch, 1, dtype=torch.bool, device=self.tok.device))
        self.tok.copy_(tok.view(-1, 1))
        self.pos.fill_(timeline_index)
        self.rope_pos.copy_(chunk.positions)


def _kv_writer(pos: Tensor, k_buf: Tensor, v_buf: Tensor):
    """A layer's K/V hook: write the new entry at timeline index ``pos``, read the whole buffer."""

    def write(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k_buf.index_copy_(2, pos, k)
        v_buf.index_copy_(2, pos, v)
        return k_buf, v_buf

    return write


def core_iteration(
    model, pos: Tensor, s: Tensor, e: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, k: Tensor, v: Tensor
) -> Tensor:
    """One iteration: the adapter, then every core layer with its K/V in ``k[j]`` / ``v[j]`` [B,H,T,D]. A
    module-level function of the model, so torch.compile's cache serves every decoder of that model (one
    compile per batch size)."""
    t_ = model.transformer
    s = t_.adapter(torch.cat([s, e], -1))
    for j, blk in enumerate(t_.core_block):
        s = blk(s, cos, sin, mask, _kv_writer(pos, k[j], v[j]))
    return s


def compiled_step(decoder: StaticDecoder, *, cuda_graph: bool = True, mode: str = "default", backend="inductor"):
    """torch.compile the core iteration (``mode``: "default", or "max-autotune-no-cudagraphs" for the
    strongest baseline at the price of minutes of autotuning); on CUDA capture the whole token in a graph and
    return its replay function (the step's logits, in a static buffer)."""
    tuning = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    decoder.iteration = torch.compile(core_iteration, fullgraph=True, dynamic=False, backend=backend, **tuning)
    fn = decoder.step
    if not (cuda_graph and decoder.model.device.type == "cuda"):
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay
