"""Host values to the device without a synchronisation (latentrt/transfer.py)."""

import pytest
import torch

from latentrt.transfer import copy_from_host, fill_rows, to_device


def test_host_values_arrive_in_the_destinations_dtype():
    dst = torch.full((4,), 7, dtype=torch.long)
    copy_from_host(dst, [3, 0, 5, 1])
    assert dst.tolist() == [3, 0, 5, 1]
    mask = torch.zeros(3, dtype=torch.bool)
    copy_from_host(mask, [True, False, True])
    assert mask.tolist() == [True, False, True] and mask.dtype == torch.bool
    with pytest.raises(RuntimeError):  # a list of another length is refused, not broadcast
        copy_from_host(dst, [1, 2])
    assert to_device([2, 4], "cpu").tolist() == [2, 4]
    fill_rows(dst, to_device([0, 2], "cpu"), 9)
    assert dst.tolist() == [9, 0, 9, 1]


def test_values_are_staged_on_the_host_whatever_the_default_device():
    """Under ``torch.set_default_device`` (gpt-fast's style) a tensor made without a device lands there: the
    staging copy is made on the host all the same (meta here, which cannot be copied out of, stands in for
    the CUDA default, whose tensor could not be pinned)."""
    dst = torch.zeros(2, dtype=torch.long, device="cpu")
    with torch.device("meta"):
        assert to_device([2, 4], "cpu").tolist() == [2, 4]
        copy_from_host(dst, [5, 6])
    assert dst.tolist() == [5, 6]


@pytest.mark.gpu
def test_on_cuda_no_transfer_synchronises():
    """CUDA's sync check in error mode: staging through pinned memory and writing numbers by index_fill_ / fill_
    never waits for the stream (each would, written the obvious way)."""
    dst = torch.zeros(5, dtype=torch.long, device="cuda")
    mask = torch.zeros(5, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        copy_from_host(dst, [1, 2, 3, 4, 5])
        copy_from_host(mask, [True, False, True, False, True])
        rows = to_device([0, 3], "cuda")
        fill_rows(dst, rows, 0)
        fill_rows(mask, slice(1, 2), True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert dst.tolist() == [0, 2, 3, 0, 5] and mask.tolist() == [True, True, True, False, True]
