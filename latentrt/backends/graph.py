"""A unit of decode work captured once as a CUDA graph and replayed (the runners of backends/base.py).

Everything that changes between calls lives in the runner's static input buffers, so the same launches
serve every call: the first call runs eagerly (compiling the kernels) on the stream the graph is then
captured on; later calls replay it. Off CUDA (tests under TRITON_INTERPRET=1) every call runs eagerly.
"""

from __future__ import annotations

import torch


class GraphedRunner:
    """Subclasses implement ``run`` (the launch sequence, no host reads) and fill their input buffers in
    ``prepare`` before each call."""

    model = None
    _graph = None

    def __call__(self):
        if self._graph is not None:
            self._graph.replay()
            return self._outputs
        if self.model.device.type != "cuda":
            return self.run()
        # the eager call runs on the capture stream, so per-stream library state (cuBLAS workspaces)
        # exists before capture
        self._stream = torch.cuda.Stream(self.model.device)
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = self.run()
        torch.cuda.current_stream().wait_stream(self._stream)
        for t in out if isinstance(out, tuple) else (out,):
            t.record_stream(torch.cuda.current_stream())  # used on this stream from now on
        torch.cuda.synchronize()
        self._capture()
        return out

    def _capture(self) -> None:
        """Record ``run``'s launches as the graph later calls replay (recording executes nothing: the state
        the eager call left is untouched)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            self._outputs = self.run()
        self._graph = graph

    def run(self):
        raise NotImplementedError
