"""A unit of decode work captured once as a CUDA graph and replayed (the runners of backends/base.py).

Everything that changes between calls lives in the runner's static input buffers, so the same launches
serve every call: the first call runs eagerly (compiling the kernels) on the stream the graph is then
captured on; later calls replay it. Off CUDA (tests under TRITON_INTERPRET=1) every call runs eagerly.
Where capturing fails (a torch version, a driver, a launch the capture refuses) the runner warns once and
runs every later call eagerly; the first call's outputs stand (running it again would count its timeline
entry twice).

A runner may split its launches at boundaries (``segments``, a generator: it yields a marker at each and is
sent whether to skip to its end), where the host reads the device (``stop``) to leave out work that would
change nothing, e.g. latent iterations after every sequence has exited: a graph cannot branch and torch
2.11 has no conditional graph nodes. Each stretch is then its own graph, all in one memory pool, captured
in order; a call replays them in order up to the boundary where ``stop`` says so, then the last one. Data
crosses boundaries only through tensors that stay alive (the runner's buffers, the loop's state).
"""

from __future__ import annotations

import torch

from ..caller import warn_at_caller
from ..recurrence import drive


class GraphedRunner:
    """Subclasses implement ``run`` (the launch sequence, no host reads), or ``segments`` and ``stop`` (see
    the module docstring), and fill their input buffers in ``prepare`` before each call."""

    model = None
    _graph = None  # the first (or only) captured graph
    _graphs: list = []  # every stretch's graph, in order (the last runs after the last boundary)
    _markers: list = []  # what each boundary yielded at capture (``stop`` reads them at replay)
    capture_error: Exception | None = None  # why capturing failed here (every call then runs eagerly)
    captures = 0  # graphs recorded (each costs an eager call, a synchronize, the recording, instantiation)

    def run(self):
        """The call's launches, eagerly (a runner with boundaries: its segments, stopping where ``stop`` says)."""
        return drive(self.segments(), self.stop)

    def segments(self):
        """The call's launches as a generator with boundaries (default: ``run``, none); returns the outputs."""
        return self.run()
        yield  # (a generator without a boundary)

    def stop(self, marker) -> bool:
        """At a boundary: whether the call may skip to its last stretch (a host read; default never)."""
        return False

    def __call__(self):
        if self._graph is not None:
            return self._replay()
        if self.model.device.type != "cuda" or self.capture_error is not None:
            return self.run()
        out = self._run_on_capture_stream()
        self._capture()
        return out

    def _replay(self):
        """The graphs in order, asking ``stop`` at each boundary but the last (the last stretch runs anyway)."""
        last = len(self._graphs) - 1
        for i, graph in enumerate(self._graphs[:last]):
            graph.replay()
            if i + 1 < last and self.stop(self._markers[i]):
                break
        self._graphs[last].replay()
        return self._outputs

    def _run_on_capture_stream(self):
        """The first call, eagerly, on the stream the graph is captured on (so per-stream library state, e.g.
        cuBLAS workspaces, exists before capture); its outputs are then used on the current stream."""
        self._stream = torch.cuda.Stream(self.model.device)
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = self.run()
        torch.cuda.current_stream().wait_stream(self._stream)
        for t in out if isinstance(out, tuple) else (out,):
            t.record_stream(torch.cuda.current_stream())  # used on this stream from now on
        torch.cuda.synchronize()
        return out

    def _capture(self) -> None:
        """Record the call's launches as the graphs later calls replay, one per stretch of ``segments``
        (recording executes nothing: the state the eager call left is untouched); on failure, warn and stay
        eager."""
        graphs, markers, pool, segments = [], [], None, self.segments()
        try:
            while True:  # one graph per stretch, in order, in one pool (none skipped: every boundary says go on)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool, stream=self._stream):
                        marker = segments.send(False if graphs else None)
                except StopIteration as done:
                    graphs.append(graph)
                    self._outputs = done.value
                    break
                graphs.append(graph)
                markers.append(marker)
                pool = graph.pool()
        except RuntimeError as exc:
            self.capture_error = exc
            why = f"latentrt: {type(self).__name__} runs eagerly (CUDA graph capture failed: {exc})"
            warn_at_caller(why)
            return
        self._graphs, self._markers, self._graph = graphs, markers, graphs[0]
        self.captures += 1
