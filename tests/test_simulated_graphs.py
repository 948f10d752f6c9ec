"""benchmarks/simulated_graphs.py: a captured runner on the CPU behaves as on CUDA: its capture leaves the graph's
outputs unwritten (poisoned) until a replay writes them, and a replay of another set's graph is refused."""

from __future__ import annotations

import pytest
import torch

from benchmarks.simulated_graphs import SimulatedGraphs
from latentrt.backends.graph import GraphedRunner


class Model:
    device = torch.device("cpu")


class Runner(GraphedRunner):
    """Three outputs, one of each kind the poison tells apart: float, bool, integer."""

    def __init__(self) -> None:
        self.model = Model()
        self.x = torch.tensor([1.0, 2.0])

    def run(self):
        return self.x * 2, self.x > 1, self.x.long()


def test_a_capture_leaves_outputs_poisoned_until_a_replay_writes_them():
    runner = Runner()
    with SimulatedGraphs([runner]) as sim:
        first = runner()  # eagerly, then captured: a capture on CUDA executes nothing
        assert torch.equal(first[0], torch.tensor([2.0, 4.0])) and sim.captured == [("Runner", None)]
        f, b, i = runner._outputs
        assert torch.isnan(f).all() and b.all() and (i == torch.iinfo(torch.long).min).all()
        runner.x.copy_(torch.tensor([0.5, 3.0]))  # inputs refreshed in place, as prepare() does
        out = runner()
        assert out is runner._outputs and sim.replays == 1 and sim.replay_seconds > 0
        assert torch.equal(out[0], torch.tensor([1.0, 6.0])) and out[1].tolist() == [False, True]
        assert out[2].tolist() == [0, 3]
    assert runner._graph is None and "_outputs" not in vars(runner)  # (the graph forgotten: eager again)
    assert torch.equal(runner()[0], torch.tensor([1.0, 6.0])) and runner.captures == 1


def test_a_replay_of_another_sets_graph_is_refused():
    runner = Runner()
    runner._key = "a"
    with SimulatedGraphs([runner]):
        runner()
        runner._key = "b"  # the runner now holds another set's inputs, but its graph is still a's
        with pytest.raises(AssertionError, match="a replay of another set's graph"):
            runner()


def test_a_makers_runners_made_within_the_block_are_simulated_and_the_maker_restored():
    """A maker of runners (``new_runner`` and ``runners``, as Distributions): the runners it holds and those it
    makes within the block capture and replay as on CUDA; after it, its own ``new_runner`` is back."""

    class Maker:
        def __init__(self) -> None:
            self.runners = {"held": Runner()}

        def new_runner(self, key):
            self.runners[key] = Runner()
            return self.runners[key]

    maker = Maker()
    with SimulatedGraphs([maker]) as sim:
        made = maker.new_runner("new")
        for runner in (maker.runners["held"], made):
            runner(), runner()
    assert sim.captured == [("Runner", None)] * 2 and sim.replays == 2
    assert "new_runner" not in vars(maker) and maker.new_runner.__func__ is Maker.new_runner
