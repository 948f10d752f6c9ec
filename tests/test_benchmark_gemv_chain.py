"""benchmarks/probes/gemv_chain.py at a tiny shape on the CPU (the interpreter): every variant runs, the
programmatically dependent chain gives the plain chain's output bit for bit, the table prints (timings
mean nothing here: the probe is for a lent GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.probes import gemv_chain
from latentrt.kernels import linear

pytestmark = pytest.mark.triton


def test_the_probe_runs_every_variant_at_a_tiny_shape(capsys):
    assert gemv_chain.main(["--shape", "tiny", "--batch", "1", "--repeats", "1", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    names = {r["name"] for r in records}
    assert {"copy_bandwidth", "chain", "chain+pdl", "cublas", "one", "pdl_bit_equal"} <= names
    assert all(r["value"] for r in records if r["name"] == "pdl_bit_equal")
    assert "| 1 | chain+pdl |" in out


def test_the_chain_is_the_products_in_order():
    """Each product reads the previous one's output (its first columns): the probe times the loop's order."""
    products = gemv_chain.core_products("tiny", torch.device("cpu"), torch.float32)
    assert [n for n, _, _ in products][:5] == ["adapter", "qkv0", "o0", "fc0", "proj0"] and len(products) == 17
    thought = gemv_chain.core_products("gpt2", torch.device("cpu"), torch.bfloat16)
    assert len(thought) == 48 and not any(gate for _, _, gate in thought)
    assert gemv_chain.weight_bytes(thought) == 12 * 2 * (3 * 768 * 768 + 768 * 768 + 2 * 3072 * 768)
    x0 = torch.randn(2, products[0][1].shape[1])
    got = gemv_chain.chain(products, x0, 2, gemv_chain.cublas_product)
    x = x0
    for _ in range(2):
        for _, w, gate in products:
            x = linear.reference(x[:, : w.shape[1]], w, gate=gate)
    torch.testing.assert_close(got, x)
