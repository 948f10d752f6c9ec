"""tools.compile_check's host side: the kernels it must find launched (the compiling itself runs in CI)."""

import pytest

from tools.compile_check import _never_launched

pytestmark = pytest.mark.triton  # (the kernels are found among the Triton functions)

KERNEL = ("latentrt.kernels.linear", "_linear_kernel")


def _launch(module: str, name: str) -> tuple:
    return (module, name, (), ())  # (module, kernel, argument specs, keyword specs)


def test_a_kernel_no_workload_launched_is_reported_and_helpers_are_not_kernels():
    missing = _never_launched([])
    assert KERNEL in missing and ("latentrt.kernels.decode_attention", "_decode_attention_kernel") in missing
    assert all(name.endswith("_kernel") for _, name in missing)  # helpers (_dot_rows, ...) are never launched
    assert ("latentrt.kernels.linear", "_dot_rows") not in missing
    launched = [_launch(*k) for k in missing]
    assert _never_launched(launched) == []
    assert _never_launched([k for k in launched if k[:2] != KERNEL]) == [KERNEL]
