"""The streamed-weight kernel's host planner (csrc/stream_plan.h) without a GPU: every matrix is covered
exactly once by tiles and split-K column ranges, each CTA streams a contiguous run of about equal bytes,
the ring and the reduction fit the shared memory, for batch 1-32 at Huginn-0125's and GPT-2's shapes."""

from __future__ import annotations

import pytest

_cuda = pytest.importorskip("latentrt._cuda", reason="the CUDA extension is not built here")

H200_SMEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100 / H200
BARRIERS = 2 * 8 * 8 + 128


def huginn_iteration(d: int = 5280, ffn: int = 17920, layers: int = 4) -> list[tuple[int, int]]:
    """The matrices one core iteration reads, in order: the adapter's state half, then per core layer the
    fused QKV, Wo, the gate-and-up fc and proj (benchmarks/floors.py counts the same bytes)."""
    return [(d, d)] + [(3 * d, d), (d, d), (2 * ffn, d), (d, ffn)] * layers


def gpt2_thought(d: int = 768, layers: int = 12) -> list[tuple[int, int]]:
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def split_edge(cols: int, split: int, i: int) -> int:
    """Split i's first column: `split` ranges cut at multiples of 16 columns."""
    return cols if i >= split else cols * i // split // 16 * 16


def reference_op(rows: int, cols: int, tile_rows: int, ctas: int) -> tuple[int, list[int]]:
    """The planner's split-K choice and its CTAs' runs of tiles, written out (csrc/stream_plan.h): tile t is row
    tile t % row_tiles of range t // row_tiles; a tile goes to the CTA whose share of the bytes holds its
    midpoint; the smallest split (at most 16 ranges of 256 columns or more) within 5% of balance, else the
    best balance, the fewer ranges on a tie."""
    row_tiles = -(-rows // tile_rows)
    best = None
    for split in range(1, max(1, min(16, cols // 256)) + 1):
        sizes = [
            min(tile_rows, rows - t % row_tiles * tile_rows)
            * (split_edge(cols, split, t // row_tiles + 1) - split_edge(cols, split, t // row_tiles))
            * 2
            for t in range(row_tiles * split)
        ]
        prefix = [0]
        for b in sizes:
            prefix.append(prefix[-1] + b)
        first, t = [0], 0
        for c in range(1, ctas):
            while t < len(sizes) and prefix[t] + 0.5 * sizes[t] < prefix[-1] * c / ctas:
                t += 1
            first.append(t)
        first.append(len(sizes))
        balance = max(prefix[first[c + 1]] - prefix[first[c]] for c in range(ctas)) / (prefix[-1] / ctas)
        if best is None or balance < best[0] - 1e-9:
            best = (balance, split, first)
        if balance <= 1.05:
            break
    return best[1], best[2]


def check_plan(mats, batch, ctas, smem=H200_SMEM, **kw):
    p = _cuda.stream_plan(mats, batch, ctas, smem, **kw)
    assert p["ok"], p["reason"]
    rows, k = p["tile_rows"], p["k_chunk"]
    if "tile_rows" not in kw:  # 16 rows a tile up to batch 4, 32 up to 16, 64 up to 32
        assert rows == (16 if batch <= 4 else 32 if batch <= 16 else 64)
    assert rows % 16 == 0 and k % 16 == 0 and 2 <= p["stages"] <= 8
    assert p["stage_bytes"] == rows * (2 * k + 16)  # row segments padded by 16 bytes
    assert p["reduce_bytes"] == 8 * 16 * -(-batch // 8) * 8 * 4  # 8 warps' 16-row block x the batch in 8s
    # the staged input: two buffers of batch rows of a k-chunk + 8 elements (bf16), after the ring
    assert p["input_bytes"] == (2 * batch * (k + 8) * 2 if p["stage_input"] else 0)
    assert p["smem_bytes"] == BARRIERS + p["reduce_bytes"] + p["stages"] * p["stage_bytes"] + p["input_bytes"] <= smem
    # as many ring stages as the shared memory left by the reduction, the input and the barriers holds, up to 8
    assert p["stages"] == min(8, (smem - BARRIERS - p["reduce_bytes"] - p["input_bytes"]) // p["stage_bytes"])
    assert p["tensor_cores"] == (batch >= kw.get("mma_from", 5))
    assert len(p["ops"]) == len(mats)
    for op, (m, n) in zip(p["ops"], mats):
        assert (op["rows"], op["cols"]) == (m, n)
        assert op["row_tiles"] == -(-m // rows) and op["tiles"] == op["row_tiles"] * op["split_k"]
        # split-K column ranges partition [0, cols) at multiples of 16 columns
        edges = op["split_cols"]
        assert edges[0][0] == 0 and edges[-1][1] == n and len(edges) == op["split_k"]
        assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
        assert all(c0 % 16 == 0 and c1 > c0 for c0, c1 in edges)
        assert op["split_k"] <= 16 and (op["split_k"] == 1 or all(c1 - c0 >= 256 for c0, c1 in edges))
        # every weight byte in exactly one tile
        assert sum(op["tile_bytes"]) == m * n * 2
        # each CTA a contiguous run; together all tiles once
        first = op["cta_first"]
        assert len(first) == ctas + 1 and first[0] == 0 and first[-1] == op["tiles"]
        assert all(a <= b for a, b in zip(first, first[1:]))
        runs = [sum(op["tile_bytes"][first[c] : first[c + 1]]) for c in range(ctas)]
        assert max(runs) / (m * n * 2 / ctas) == pytest.approx(op["balance"])
        assert (op["split_k"], first) == reference_op(m, n, rows, ctas)
    return p


@pytest.mark.parametrize("ctas", [132, 114, 78])
@pytest.mark.parametrize("batch", [1, 2, 4, 5, 8, 12, 16, 24, 32])
def test_huginn_iteration_is_byte_balanced_at_every_batch(batch, ctas):
    p = check_plan(huginn_iteration(), batch, ctas)
    # Huginn-0125's matrices are large enough to split evenly: no CTA streams more than 5% over the mean
    assert max(op["balance"] for op in p["ops"]) <= 1.05
    # the batch's input chunk read per stage stays at most half the stage's weight bytes
    assert batch / p["tile_rows"] <= 0.5


@pytest.mark.parametrize("batch", [1, 4, 8, 32])
def test_the_staged_input_costs_no_ring_stage_at_huginn_shapes(batch):
    """Staging each stage's input chunk in shared memory (the default) takes at most 35 KB (batch 32) and
    leaves the ring its 8 stages; the plan without it (the `l2` input) differs only in those bytes."""
    staged = check_plan(huginn_iteration(), batch, 132)
    l2 = check_plan(huginn_iteration(), batch, 132, stage_input=False)
    assert staged["stage_input"] and not l2["stage_input"] and l2["input_bytes"] == 0
    assert staged["stages"] == l2["stages"] == 8 and staged["input_bytes"] <= 35 * 1024
    assert staged["smem_bytes"] - l2["smem_bytes"] == staged["input_bytes"]
    assert [op["cta_first"] for op in staged["ops"]] == [op["cta_first"] for op in l2["ops"]]


def test_split_k_only_where_rows_are_too_few():
    p = check_plan(huginn_iteration(), 1, 132)
    adapter, qkv, wo, fc, proj = p["ops"][:5]
    # 5280 rows = 330 tiles of 16 over 132 CTAs (2.5 each): split in two -> 5 each, exactly
    assert adapter["split_k"] == wo["split_k"] == proj["split_k"] == 2
    assert adapter["balance"] == pytest.approx(1.0)
    assert fc["split_k"] == 1  # 35840 rows = 2240 tiles: 17 per CTA, balanced unsplit


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_gpt2_thought_is_covered(batch):
    check_plan(gpt2_thought(), batch, 132)  # small matrices: covered exactly, balance as good as they allow


@pytest.mark.parametrize("batch", [1, 3, 16, 32])
def test_tiny_shapes_and_one_cta(batch):
    mats = [(40, 64), (96, 64), (64, 136), (8, 8)]
    p = check_plan(mats, batch, 1)
    assert all(op["cta_first"] == [0, op["tiles"]] for op in p["ops"])
    check_plan(mats, batch, 7)


@pytest.mark.parametrize(
    ("rows", "cols", "ctas", "split"),
    [
        (16, 8192, 24, 16),  # one row tile: 32 ranges would balance, at most 16 are taken
        (80, 4096, 24, 14),  # no split within 5%: the best one, not the last tried
        (112, 4096, 40, 11),
        (176, 5280, 40, 7),
        (768, 768, 132, 2),  # GPT-2's width: 11 ranges would balance, but ranges keep 256 columns or more
    ],
)
def test_split_k_bounds_and_the_best_balance_when_none_is_close(rows, cols, ctas, split):
    p = check_plan([(rows, cols)], 1, ctas)
    assert p["ops"][0]["split_k"] == split


def test_fewer_ring_stages_when_the_input_and_the_reduction_take_the_room():
    """At batch 32 the staged input (2 x 32 x (128 + 8) bf16, 17 KB) and the reduction (16 KB) decide how
    many 17 KB stages fit in 120 KB: 4, and 5 without the staged input; the count follows the bytes left."""
    staged = check_plan(huginn_iteration(), 32, 132, smem=120_000)
    l2 = check_plan(huginn_iteration(), 32, 132, smem=120_000, stage_input=False)
    assert (staged["stages"], l2["stages"]) == (4, 5)


def test_explicit_tiles_and_refusals():
    p = check_plan(huginn_iteration(), 8, 132, tile_rows=64, k_chunk=128)
    assert (p["tile_rows"], p["k_chunk"]) == (64, 128)
    mats = huginn_iteration()
    for kw, why in [
        (dict(batch=0), "outside 1..32"),
        (dict(batch=33), "outside 1..32"),
        (dict(smem_optin=30000), "do not fit"),
        (dict(tile_rows=24), "tile_rows must be a multiple of 16 up to 128"),
        (dict(tile_rows=144), "tile_rows must be a multiple of 16 up to 128"),
        (dict(k_chunk=100), "k_chunk must be a multiple of 16"),
        (dict(k_chunk=40), "k_chunk must be a multiple of 16"),
        (dict(ctas=0), "no CTAs"),
        (dict(mats=[]), "no matrices"),
        (dict(mats=[(0, 64)]), "a matrix of 0 x 64"),
    ]:
        args = dict(mats=mats, batch=8, ctas=132, smem_optin=H200_SMEM) | kw
        p = _cuda.stream_plan(**args)
        assert not p["ok"] and why in p["reason"], (kw, p["reason"])
    p = _cuda.stream_plan([(16, 12)], 1, 4, H200_SMEM)
    assert not p["ok"] and "multiple of 8" in p["reason"]
    p = _cuda.stream_plan(mats, 4, 132, H200_SMEM, tile_rows=32)  # the CUDA-core path covers 16 rows a tile
    assert not p["ok"] and "takes tile_rows 16" in p["reason"]


@pytest.mark.parametrize("batch", [1, 4])
def test_tensor_cores_below_batch_5_on_request(batch):
    """The probe's mma.sync consumers at batch 1 and 4 (mma_from=1): the same ring as the CUDA-core plan
    (tiles of 16 rows, the reduction buffer the tensor-core path needs is always there), and wider tiles are
    then allowed; the kernels' default keeps CUDA cores below batch 5."""
    mats = huginn_iteration()
    default = check_plan(mats, batch, 132)
    mma = check_plan(mats, batch, 132, mma_from=1)
    assert not default["tensor_cores"] and mma["tensor_cores"]
    same = ("tile_rows", "k_chunk", "stages", "stage_bytes", "reduce_bytes", "input_bytes", "smem_bytes")
    assert {k: mma[k] for k in same} == {k: default[k] for k in same}
    assert [op["cta_first"] for op in mma["ops"]] == [op["cta_first"] for op in default["ops"]]
    assert check_plan(mats, batch, 132, mma_from=1, tile_rows=32)["tile_rows"] == 32


def split_cost(heads: int, positions: int, warps: int, splits: int) -> int:
    """The split attention's cost model: rounds of (row, head, split) items over the warps, times an item's
    positions plus its fixed cost of 8 positions (csrc/stream_plan.h)."""
    return -(-heads * splits // warps) * (-(-positions // splits) + 8)


@pytest.mark.parametrize("positions", [1, 15, 17, 100, 305, 512, 2048, 8192])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("sms", [132, 148, 78])
def test_attention_splits_spread_every_row_head_over_the_grid(batch, positions, sms):
    heads, warps = batch * 55, sms * 8  # Huginn-0125: 55 heads; 8 consumer warps per SM
    most = _cuda.attention_split_max(heads)
    assert most == min(32, -(-2 * 2048 // heads))
    assert most * heads >= min(32 * heads, 2 * warps)  # the workspace holds two items per warp of any grid
    s = _cuda.attention_splits(heads, positions, warps, most)
    assert 1 <= s <= min(most, -(-positions // 16))  # at most 32 splits, of about 16 positions or more
    costs = [split_cost(heads, positions, warps, k) for k in range(1, min(most, -(-positions // 16)) + 1)]
    assert s == 1 + costs.index(min(costs))  # the cheapest; on a tie the fewest splits (fewer partials to merge)
    if positions >= 512:  # a long context keeps every SM busy: items at least the SMs, most warps busy
        assert heads * s >= sms
        assert heads * s >= 0.75 * min(warps, heads * most) or -(-heads * s // warps) > 1


def test_attention_splits_at_huginn_decode():
    """Batch 1 at context 512 on an H200: 19 splits of 27 positions, 1045 items for 1056 warps; batch 32:
    3 splits, 5 full rounds; a one-position context or a one-split workspace never splits."""
    assert _cuda.attention_splits(55, 512, 1056, _cuda.attention_split_max(55)) == 19
    assert _cuda.attention_splits(32 * 55, 512, 1056, _cuda.attention_split_max(32 * 55)) == 3
    assert _cuda.attention_splits(55, 1, 1056, 32) == 1
    assert _cuda.attention_splits(55, 512, 1056, 1) == 1
    assert _cuda.attention_splits(55, 512, 1056, 0) == 1
    assert _cuda.attention_splits(55, 305, 1056, 32) == 18  # 18 and 19 splits cost the same: the fewer
    assert _cuda.attention_split_max(0) == _cuda.attention_splits(0, 512, 1056, 32) == 1  # no (row, head) pairs
