"""CUDA graphs simulated on the CPU: captured runners (latentrt/backends/graph.py) behave as they do on CUDA.

Off CUDA a ``GraphedRunner`` runs every call eagerly, so neither a test nor a count on the CPU sees which of
its calls a GPU would replay and which it would run op by op (a capture's first call, and a
``SlotsRunner``'s calls before its key is captured). Under ``SimulatedGraphs`` each runner takes the
CUDA path: its first call runs eagerly, a capture records a graph, and a replay recomputes the pass from the
runner's static inputs into the outputs fixed at the capture (poisoned with NaN until then), as a real
replay writes them. So a replay of another set's graph, or inputs not refreshed before it, changes what the
caller reads, as on a GPU. Used by the serving tests (the per-set graph policy, exactness under replays) and
by ``benchmarks.serve --profile-steps`` on the CPU (ops a GPU would launch op by op, replays left out).
"""

from __future__ import annotations

import time

import torch

PATCHED = ("model", "_run_on_capture_stream", "_capture")  # each runner's attributes replaced, then restored
GRAPH_STATE = ("_graph", "_graphs", "_markers", "_outputs", "_captured")  # the graphs a runner holds


class _OnCuda:
    """The runner's model as the runner sees it: on a CUDA device (everything else the model's own)."""

    device = torch.device("cuda")

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` of values nothing should read: NaN, an integer's minimum, true."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.ones_like(t) if t.dtype == torch.bool else torch.full_like(t, torch.iinfo(t.dtype).min)


class _Graph:
    """A recorded pass: a replay reruns the owner's launches and writes their results into its outputs."""

    def __init__(self, owner, simulation: SimulatedGraphs) -> None:
        self.owner, self.simulation, self.key = owner, simulation, getattr(owner, "_key", None)

    def replay(self) -> None:
        owner, sim = self.owner, self.simulation
        assert getattr(owner, "_key", None) == self.key, "a replay of another set's graph"
        sim.replays += 1
        sim.replaying += 1
        t0 = time.perf_counter()
        try:
            for static, value in zip(_as_tuple(owner._outputs), _as_tuple(owner.run())):
                static.copy_(value)
        finally:
            sim.replaying -= 1
            sim.replay_seconds += time.perf_counter() - t0


class SimulatedGraphs:
    """Within the block, ``runners`` (GraphedRunner instances on a CPU model, or makers of them: objects with
    ``new_runner`` and ``runners``, whose runners made within the block count too) capture and replay as on CUDA;
    on leaving, the patches and every simulated graph are removed (the runners run eagerly again, their
    captured sets forgotten). ``captured``: (runner class, key) per capture; ``replays``: replays so far,
    ``replay_seconds`` the time they took (device time on a GPU); ``replaying``: nonzero while a replay runs,
    or a capture makes its graph's outputs (what is dispatched then a GPU would not launch op by op). Only the
    runner's own attributes are replaced (a test may wrap its class's ``__call__``)."""

    def __init__(self, runners: list) -> None:
        self.makers = [r for r in runners if hasattr(r, "new_runner")]  # (makers of runners, e.g. Distributions)
        self.runners = [r for r in runners if not hasattr(r, "new_runner")]
        self.captured: list[tuple[str, object]] = []
        self.replays = 0
        self.replay_seconds = 0.0
        self.replaying = 0
        self._saved: list[dict] = []

    def __enter__(self) -> SimulatedGraphs:
        for runner in self.runners:
            self._patch(runner)
        for maker in self.makers:  # the runners it holds and every one it makes within the block

            def made(*args, make=maker.new_runner):
                runner = make(*args)
                self.runners.append(runner)
                self._patch(runner)
                return runner

            for runner in maker.runners.values():
                self.runners.append(runner)
                self._patch(runner)
            maker.new_runner = made
        return self

    def __exit__(self, *exc) -> None:
        for maker in self.makers:
            vars(maker).pop("new_runner", None)
        for runner, saved in zip(self.runners, self._saved):
            for name in PATCHED + GRAPH_STATE:
                vars(runner).pop(name, None)
            vars(runner).update(saved)

    def _patch(self, runner) -> None:
        sim = self

        def first_call():
            runner._first = runner.run()
            return runner._first

        def capture():
            sim.captured.append((type(runner).__name__, getattr(runner, "_key", None)))
            runner.captures += 1
            first = vars(runner).pop("_first")
            sim.replaying += 1  # (the graph's outputs: allocated by the recording, on a GPU)
            poisoned = tuple(_poisoned(o) for o in _as_tuple(first))  # the replays fill them
            sim.replaying -= 1
            runner._outputs = poisoned if isinstance(first, tuple) else poisoned[0]
            runner._graphs, runner._markers = [_Graph(runner, sim)], []
            runner._graph = runner._graphs[0]

        self._saved.append({name: vars(runner)[name] for name in PATCHED if name in vars(runner)})
        runner.model = _OnCuda(runner.model)
        runner._run_on_capture_stream = first_call
        runner._capture = capture
