"""latentrt/cuda_sources.py's digest of csrc/ and cuda_ext's refusal of an extension built from other sources
(no extension needed: a stand-in module carries the digest)."""

import shutil
import types
from pathlib import Path

from latentrt import cuda_ext
from latentrt.cuda_sources import source_digest

CSRC = Path(__file__).parent.parent / "csrc"


def test_the_digest_follows_every_source_and_nothing_else(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc)
    first = source_digest(csrc)
    assert len(first) == 16 and first == source_digest(CSRC)
    (csrc / "notes.txt").write_text("not a source")
    assert source_digest(csrc) == first
    header = next(csrc.glob("*.cuh"))
    header.write_bytes(header.read_bytes() + b" ")  # one byte more in a header a kernel includes
    assert source_digest(csrc) != first
    header.write_bytes(header.read_bytes()[:-1])
    assert source_digest(csrc) == first
    (csrc / "extra.h").write_text("")  # an added header counts, even empty
    assert source_digest(csrc) != first


def test_an_extension_built_from_other_sources_is_refused_naming_both_digests(monkeypatch):
    want = source_digest(CSRC)
    monkeypatch.setattr(cuda_ext, "_ext", lambda: types.SimpleNamespace(source_digest="0123456789abcdef"))
    ok, why = cuda_ext.built()
    assert not ok and "stale" in why and "0123456789abcdef" in why and want in why and cuda_ext.REBUILD in why
    assert cuda_ext.available() == (False, why)
    monkeypatch.setattr(cuda_ext, "_ext", lambda: types.SimpleNamespace())  # built before digests existed
    assert not cuda_ext.built()[0] and "digest none" in cuda_ext.built()[1]
    monkeypatch.setattr(cuda_ext, "_ext", lambda: types.SimpleNamespace(source_digest=want))
    assert cuda_ext.built() == (True, "built")


def test_a_missing_extension_says_how_to_build_it(monkeypatch):
    def missing():
        raise ImportError("No module named 'latentrt._cuda'")

    monkeypatch.setattr(cuda_ext, "_ext", missing)
    ok, why = cuda_ext.built()
    assert not ok and "not built" in why and "nvcc" in why
