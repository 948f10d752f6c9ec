"""The CUDA building blocks against the PyTorch references (gpu-marked: skipped without a GPU)."""

import pytest
import torch
from conftest import rel_err

from latentrt import cuda_ext

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_extension():
    ok, why = cuda_ext.available()
    if not ok:
        pytest.skip(why)


def test_device_info():
    info = cuda_ext.device_info(0)
    assert info["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.parametrize("m,n,k", [(1, 5280, 5280), (8, 3 * 5280, 5280), (16, 768, 3072), (3, 100, 64)])
def test_gemv_bf16(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, 2 * k, device="cuda", generator=g) * 0.02).bfloat16()[:, :k]  # strided, like W[:, :d]
    add = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    active = torch.ones(m, dtype=torch.bool, device="cuda")
    active[0] = m == 1
    out = cuda_ext.gemv_bf16(x, w, add, active)
    want = x.float() @ w.float().T + add.float()
    assert rel_err(out[active].float(), want[active]) < 1e-2
    assert (out[~active] == 0).all()
    frozen = cuda_ext.gemv_bf16(x, w, None, torch.zeros(m, dtype=torch.bool, device="cuda"))
    assert (frozen == 0).all()


@pytest.mark.parametrize("slots,use_written", [(1, False), (8, True)])
def test_decode_attention_bf16(slots, use_written):
    from kernels import decode_attention as da

    q, ks, vs, written, valid, slot = da.make_inputs("huginn", "cuda", torch.bfloat16, slots=slots)
    T = ks.shape[3]
    valid[:, -1] = True
    out = cuda_ext.decode_attention_bf16(q, ks, vs, written if use_written else None, valid, slot, T)
    w = written if use_written else torch.full_like(written, 10**6)
    want = da.reference(q.float(), ks.float(), vs.float(), w, valid, slot)
    assert rel_err(out.float(), want) < 1e-2
