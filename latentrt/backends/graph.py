"""A unit of decode work captured once as a CUDA graph and replayed (the runners of backends/base.py).

Everything that changes between calls lives in the runner's static input buffers, so the same launches
serve every call: the first call runs eagerly (compiling the kernels) on the stream the graph is then
captured on; later calls replay it. Off CUDA (tests under TRITON_INTERPRET=1) every call runs eagerly.
Where capturing fails (a torch version, a driver, a launch the capture refuses) the runner warns once and
runs every later call eagerly; the first call's outputs stand (running it again would count its timeline
entry twice).
"""

from __future__ import annotations

import warnings

import torch


class GraphedRunner:
    """Subclasses implement ``run`` (the launch sequence, no host reads) and fill their input buffers in
    ``prepare`` before each call."""

    model = None
    _graph = None
    capture_error: Exception | None = None  # why capturing failed here (every call then runs eagerly)

    def __call__(self):
        if self._graph is not None:
            self._graph.replay()
            return self._outputs
        if self.model.device.type != "cuda" or self.capture_error is not None:
            return self.run()
        out = self._run_on_capture_stream()
        self._capture()
        return out

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
        """Record ``run``'s launches as the graph later calls replay (recording executes nothing: the state
        the eager call left is untouched); on failure, warn and stay eager."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._outputs = self.run()
        except RuntimeError as exc:
            self.capture_error = exc
            why = f"latentrt: {type(self).__name__} runs eagerly (CUDA graph capture failed: {exc})"
            warnings.warn(why, stacklevel=3)
            return
        self._graph = graph

    def run(self):
        raise NotImplementedError
