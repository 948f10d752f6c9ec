"""What a skilled PyTorch user gets without custom kernels: the same decode ops at fixed depth with static
shapes (a full-length cache under a position mask, shared KV), so torch.compile can fuse them and a CUDA
graph can replay one whole token. It reads and writes the engine's KVCache tensors, so its output can be
checked against generate()."""

from __future__ import annotations

import torch
from torch import Tensor

from latentrt.cache import KVCache


class StaticDecoder:
    """One token for B sequences at one position, r core iterations, shared KV (core_slots == 1)."""

    def __init__(self, model, cache: KVCache, steps: int) -> None:
        assert cache.core_slots == 1, "the static baseline uses shared KV"
        self.model, self.cache, self.steps = model, cache, steps
        B, T = cache.batch, cache.max_len
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=model.device)  # timeline index being written
        self.rope_pos = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        self.valid = cache.valid  # [B, T] (read: the cache owns its timeline)
        self.t_idx = torch.arange(T, device=model.device)

    def _kv(self, k_buf: Tensor, v_buf: Tensor):
        def write(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            k_buf.index_copy_(2, self.pos, k)
            v_buf.index_copy_(2, self.pos, v)
            return k_buf, v_buf

        return write

    def step(self) -> Tensor:
        """Logits [B, V] of the next token; reads self.tok / self.pos / self.rope_pos."""
        m, c, t_ = self.model, self.cache, self.model.transformer
        cos, sin = m.rope_cos[self.rope_pos], m.rope_sin[self.rope_pos]
        mask = ((self.t_idx[None, :] <= self.pos) & (self.valid | (self.t_idx[None, :] == self.pos)))[:, None, None]
        x = t_.wte(self.tok) * m.config.embed_scale
        for i, blk in enumerate(t_.prelude):
            x = blk(x, cos, sin, mask, self._kv(c.plain_k[i], c.plain_v[i]))
        e, s = x, torch.zeros_like(x)
        for _ in range(self.steps):
            s = t_.adapter(torch.cat([s, e], -1))
            for j, blk in enumerate(t_.core_block):
                s = blk(s, cos, sin, mask, self._kv(c.core_k[j, 0], c.core_v[j, 0]))
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


def compiled_step(decoder: StaticDecoder, *, cuda_graph: bool = True):
    """torch.compile the step; on CUDA capture it in a graph and return a replay function."""
    fn = torch.compile(decoder.step, mode="max-autotune-no-cudagraphs", fullgraph=True, dynamic=False)
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
