"""What the device has free (latentrt/memory.py): the host's MemAvailable, CUDA's free figure, the fallbacks, and
the error that names both figures."""

import io
import os

import pytest
import torch

import latentrt
import latentrt.memory as memory
from latentrt.errors import InputError
from latentrt.memory import GB, available_bytes, check_fits

MEMINFO = "MemTotal:       2000 kB\nMemFree:         100 kB\nMemAvailable:   1500 kB\nCached:  7 kB\n"


def test_the_host_figure_is_meminfos_available_memory_in_kib(monkeypatch):
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO(MEMINFO), raising=False)
    assert available_bytes(torch.device("cpu")) == 1500 * 1024


def test_without_meminfo_the_host_figure_is_sysconfs_and_unknown_refuses_nothing(monkeypatch):
    pages = {"SC_AVPHYS_PAGES": 10, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])

    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(memory, "open", missing, raising=False)
    assert available_bytes(torch.device("cpu")) == 40960
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO("MemTotal: 2000 kB\n"), raising=False)
    assert available_bytes(torch.device("cpu")) == 40960  # (a kernel before 3.14 has no MemAvailable line)

    def unsupported(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", unsupported)
    assert available_bytes(torch.device("cpu")) == 1 << 62


def test_the_real_host_figure_is_plausible():
    free = available_bytes(torch.device("cpu"))
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_a_cuda_device_reports_cudas_free_memory(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (123, 456))
    assert available_bytes(torch.device("cuda", 1)) == 123 and asked == [torch.device("cuda", 1)]


def test_sizes_are_said_in_gigabytes_even_past_a_floats_range():
    """A config's absurd width (n_embd=1e300: an int of 600 digits of bytes) raised OverflowError while its error
    was written (found by tools.fuzz); it is said by its power of ten."""
    from latentrt.memory import gigabytes

    assert gigabytes(3 * GB) == "3.00 GB" and gigabytes(GB * 10**9) == "1e+09 GB"
    assert gigabytes(10**400) == "about 10**400 bytes"
    with pytest.raises(
        latentrt.ConfigError, match=r"^the weights of builtin:coconut .* need about 10\*\*\d+ bytes, more"
    ):
        latentrt.load("builtin:coconut", n_embd=1e300)


def test_check_fits_names_both_figures(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: GB)
    check_fits(GB, torch.device("cpu"), "the weights", InputError)  # exactly what is free fits
    with pytest.raises(InputError, match=r"^the weights need 3.00 GB, more than the 1.00 GB available on cpu$"):
        check_fits(3 * GB, torch.device("cpu"), "the weights", InputError)
    with pytest.raises(
        InputError, match=r"^the weights need 3.00 GB, more than the 1.00 GB available on cpu; do less$"
    ):
        check_fits(3 * GB, torch.device("cpu"), "the weights", InputError, hint="do less")
