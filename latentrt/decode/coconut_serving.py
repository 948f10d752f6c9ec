"""Serving Coconut models: continuous thoughts scheduled like any other pass (decode/serving.py).

A request's prompt runs as generate() runs it (models/coconut.py, ``run_prompt``): the prefix before its
first ``<|latent|>`` as one chunk, then every column up to its last latent as a single-position pass (a
thought's input is the previous pass's hidden state fed back), then the rest as one chunk (a chunk of one
token, often the end marker alone, as a single-position pass: it needs no slot of its own in the captured
pass); then one single-position pass per answer token. A launch runs one pass for every resident request: the
single-position passes of all rows (thoughts and answer tokens of different requests side by side) and the
chunks of the prompts admitted, as one ``Packed`` pass (the layers' weights read once, attention per chunk
by the pool). A request in its thought phase holds its row for k passes; its prompt's unit ends with the
suffix, each answer token's with its pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kernels.reference import nonfinite_flags
from ..lora_serving import pass_over
from ..models.layers import Packed
from ..transfer import to_device
from .coconut_serving_graph import HeadsRunner, PromptChunks, StepPassRunner
from .serving import Ended, ServingProgram, weight_ratio


@dataclass
class _Request:
    request: object
    passes: list = field(default_factory=list)  # ("chunk", ids [n], host ids) / ("column", id, is_latent) to run
    thoughts: int = 0  # latent passes run
    unit_passes: int = 0  # passes of the running unit so far (its row's launches: slot utilisation)


class CoconutServing(ServingProgram):
    def __init__(self, model, rows: int, max_len: int, slot_rows: int) -> None:
        super().__init__(model, rows, max_len, slot_rows)
        self.requests: dict[int, _Request] = {}
        self.results: dict[int, tuple[Tensor, Tensor]] = {}
        self._ended: list[Ended] = []  # the units that ended in the running launch
        self._unread: deque[list[Ended]] = deque()  # per launch whose ends ``ended`` has not given: its units
        t = model.transformer
        # a head pass's weights in a layer pass's (counted in ``weight_reads``; not ``head_cost``: a unit's head
        # runs when it ends, so waiting to sample ended units together would save nothing)
        self.head_weights = weight_ratio([t.ln_f, model.lm_head], t.h)
        # each row's last pass's last hidden state before ln_f (a thought's input, fed back; its unit's logits)
        self.h_rows = torch.zeros(rows, 1, model.config.n_embd, dtype=model.dtype, device=model.device)
        # a step's pass as one captured launch sequence, where the pool's decode and prefill attention are fused
        fused = self.pool.decode_attention is not None and self.pool.prefill_attention is not None
        self.pass_runner = StepPassRunner(self) if fused and model.packs else None
        self.heads_runner = HeadsRunner(self) if self.pass_runner is not None else None
        self._chunk_sets = 0  # steps' prompt chunks begun (their serials)

    def admit(self, request) -> None:
        ids, host = request.batch.ids[0], request.prompt_ids
        latent = self.model.latent_columns(host)  # on the host copy: nothing read back
        cols = [i for i, x in enumerate(latent) if x]
        rec = self.requests[request.row] = _Request(request)

        def chunk(a: int, b: int) -> tuple:  # (a chunk of one token runs as a single-position pass)
            return ("column", ids[a], False) if b - a == 1 else ("chunk", ids[a:b], host[a:b])

        if not cols:
            rec.passes = [chunk(0, len(host))]
            return
        first, last = cols[0], cols[-1]
        rec.passes = [chunk(0, first)] + [("column", ids[c], latent[c]) for c in range(first, last + 1)]
        if last + 1 < len(host):
            rec.passes.append(chunk(last + 1, len(host)))

    def start(self, request, token: Tensor) -> None:
        self.requests[request.row].passes.append(("column", token, False))

    def latent_work(self, request) -> int:
        rec = self.requests.get(request.row)
        return rec.thoughts if rec is not None else 0

    def launch(self, idle: list) -> Tensor:
        """One pass per request with a pass to run: the single-position passes and every prompt chunk as one
        pass (``Packed``: the layers' weights read once; attention per chunk), captured where the pool's
        attention is fused (StepPassRunner), or where the model's attention scaling is not the pool's, the
        single-position passes batched and the chunks one by one. A pass
        always completes, so ``ended`` needs no flags from the device."""
        self._ended = []
        self._unread.append(self._ended)
        columns, chunks = [], []
        for row, rec in sorted(self.requests.items()):
            if rec.passes:
                (columns if rec.passes[0][0] == "column" else chunks).append(row)
        if (columns or chunks) and self.pass_runner is not None:
            self._captured(columns, chunks)
        else:
            parts = ([self._columns(columns)] if columns else []) + [self._chunk(row) for row in chunks]
            self._run([parts] if parts and self.model.packs else [[part] for part in parts])
        self.launched_rows = len(columns) + len(chunks) + len(idle)  # waiting rows count, computing nothing
        return torch.zeros(0, dtype=torch.bool, device="cpu")

    def _columns(self, rows: list[int]) -> tuple:
        """The single-position passes of ``rows`` (a prompt's or an answer's token, or a thought): their chunk,
        positioned inputs and, where a thought is among them, ln_1 of the inputs (the fed-back path's)."""
        model = self.model
        ids, latent = self._take_columns(rows)
        chunk = self.pool.begin(rows, 1)
        x = model.embed(ids[:, None]) + model.transformer.wpe(chunk.positions)
        ln1x = None
        if any(latent):  # a thought's input: the previous pass's hidden state, fed back
            fed = model.feedback(self.h_rows[chunk.rows], chunk.positions)
            x, ln1x = model.with_thoughts(x, *fed, to_device(latent, model.device, torch.bool)[:, None, None])
        return rows, chunk, x, ln1x

    def _captured(self, columns: list[int], chunks: list[int]) -> None:
        """The step's pass through the captured pass over every pool row and a slot for the prompt chunks
        (StepPassRunner): ``columns`` run their single-position passes, ``chunks`` their prompt chunks."""
        ids, latent, chunk, prompts = None, [], None, None
        if columns:  # (the fused attention reads the pool's entries: no mask)
            ids, latent = self._take_columns(columns)
            chunk = self.pool.begin(columns, 1, mask=False)
        if chunks:
            host = [self.requests[r].passes.pop(0)[2] for r in chunks]
            lengths = [len(h) for h in host]
            begun = self.pool.begin(chunks, max(lengths), lengths, mask=False)
            self._chunk_sets += 1
            prompts = PromptChunks(chunks, begun, lengths, host, self._chunk_sets)
        self.pass_runner.prepare(columns, chunk, ids, latent, prompts)
        self.pass_runner()
        self.count_pass(graph=True)
        ended = [r for r in columns + chunks if self._after_pass(r)]
        if ended:
            self._heads(ended)

    def _take_columns(self, rows: list[int]) -> tuple[Tensor, list[bool]]:
        """``rows``' next passes, single-position ones, taken (their thoughts counted): the token ids [R] (0-d
        device tensors stacked: prompt ids, sampled tokens; a thought's is unused) and which are thoughts."""
        passes = [self.requests[r].passes.pop(0) for r in rows]
        latent = [bool(p[2]) for p in passes]
        for r, is_thought in zip(rows, latent):
            self.requests[r].thoughts += is_thought
        return torch.stack([p[1] for p in passes]), latent

    def _chunk(self, row: int) -> tuple:
        """A prompt chunk of ``row``: its chunk and positioned inputs."""
        model, rec = self.model, self.requests[row]
        ids = rec.passes.pop(0)[1]
        chunk = self.pool.begin([row], ids.shape[0])
        return [row], chunk, model.embed(ids[None]) + model.transformer.wpe(chunk.positions), None

    def _run(self, passes: list[list[tuple]]) -> None:
        """Each pass of ``passes`` (a list of parts: rows, chunk, inputs, ln_1 of the inputs or None) through
        the layers; each row's last position's hidden state into ``h_rows``, the units it ends to one head pass."""
        model = self.model
        for parts in passes:
            if len(parts) == 1:
                rows, chunk, x, ln1x = parts[0]
                with pass_over(model, chunk):  # (served LoRA adapters: the chunk's rows' own)
                    outs = [model.forward_residual(x, self.pool, chunk, ln1x)]
            else:
                packed = Packed([p[1] for p in parts], [None] * len(parts))
                ln1x = None
                if any(p[3] is not None for p in parts):
                    ln1 = model.transformer.h[0].ln_1
                    ln1x = packed.pack([p[3] if p[3] is not None else ln1(p[2]) for p in parts])
                outs = packed.unpack(
                    model.forward_residual(packed.pack([p[2] for p in parts]), self.pool, packed, ln1x)
                )
            self.count_pass()
            for (_, chunk, *_), h in zip(parts, outs):  # each row's last position's hidden state
                self.h_rows.index_copy_(0, chunk.rows, h[:, -1:])
            ended = [r for rows, *_ in parts for r in rows if self._after_pass(r)]
            if ended:
                self._heads(ended)

    def _after_pass(self, row: int) -> bool:
        """Count the row's pass; whether no prompt pass is left (the unit ended: its logits are due)."""
        rec = self.requests[row]
        rec.unit_passes += 1
        return not rec.passes

    def _heads(self, rows: list[int]) -> None:
        """The logits of the units of ``rows`` that ended (from their last hidden states), as one head pass
        (ln_f -> lm_head: its weights read once for them all; captured over every pool row where the step's
        pass is: HeadsRunner)."""
        at = to_device(rows, self.model.device)
        if self.heads_runner is not None:
            logits, flags = (t[at] for t in self.heads_runner())
        else:
            logits, flags = self.head(self.h_rows[at][:, 0])
        self.count_pass(self.head_weights, graph=self.heads_runner is not None)
        for i, row in enumerate(rows):
            rec = self.requests[row]
            self.results[row] = (logits[i], flags[i])
            self._ended.append(Ended(rec.request, 0, launches=rec.unit_passes))
            rec.unit_passes = 0

    def head(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states [n, d] before ln_f -> their logits [n, V] (fp32) and non-finite flags [n]."""
        logits = self.model.lm_logits(self.model.transformer.ln_f(h))
        return logits, nonfinite_flags(None, None, logits)

    # a pass always completes, so every end is known on the host when its launch is queued: with asynchronous
    # scheduling the engine takes them before the next launch (``ended_on_host``), and their next units join it
    async_scheduling = True

    def ended(self, flags: list) -> list[Ended]:
        """The oldest launch's ends not given yet (none were read from the device: ``flags`` is empty)."""
        return self._unread.popleft()

    def ended_on_host(self) -> list[Ended]:
        """Every launch's ends not given yet; ``ended`` then gives none of them."""
        out = [e for ends in self._unread for e in ends]
        for ends in self._unread:
            ends.clear()
        return out

    def logits(self, ended: list[Ended]) -> tuple[Tensor, Tensor]:
        got = [self.results.pop(e.request.row) for e in ended]
        return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])

    def retire(self, request) -> None:
        self.requests.pop(request.row, None)
        self.results.pop(request.row, None)
        self.release_row(request)
