"""The native extension: loading, ISA dispatch and the environment switches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparsepress import native

pytestmark = pytest.mark.native
needs_native = pytest.mark.skipif(not native.native_available(), reason="sparsepress._native not built")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


@needs_native
def test_detected_level_is_supported_and_active_by_default():
    lib = native.module()
    assert lib.detect_isa() in native.supported_isas()
    assert native.supported_isas()[0] == "scalar"
    assert native.active_isa() in native.supported_isas()


@needs_native
def test_set_isa_round_trip_and_errors():
    before = native.active_isa()
    try:
        for isa in native.supported_isas():
            native.set_isa(isa)
            assert native.active_isa() == isa
        with pytest.raises(ValueError, match="unknown"):
            native.set_isa("sse9")
    finally:
        native.set_isa(before)


def cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@needs_native
def test_amx_level_follows_the_cpu():
    """A build with the AMX GEMM offers level "amx" exactly where the CPU has AMX-INT8 and AVX-512 (and
    Linux grants the tile state); it is then the detected level."""
    lib = native.module()
    if "amx" not in lib.known_isas():
        pytest.skip("this build has no AMX GEMM (compiler without -mamx-int8)")
    flags = cpu_flags()
    if not {"amx_tile", "amx_int8"} <= flags:
        assert "amx" not in native.supported_isas()
        return
    if "avx512" in native.supported_isas():
        assert "amx" in native.supported_isas()
        assert lib.detect_isa() == "amx"


@needs_native
def test_unsupported_level_is_an_error():
    missing = [isa for isa in ("avx2", "avx512", "amx") if isa not in native.supported_isas()]
    if not missing:
        pytest.skip("this CPU supports every level")
    with pytest.raises(ValueError, match="does not support"):
        native.set_isa(missing[0])


@needs_native
@pytest.mark.parametrize("isa", native.supported_isas())
def test_env_forces_level(isa):
    done = run_python("from sparsepress import native; print(native.active_isa())", SPARSEPRESS_ISA=isa)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == isa


@needs_native
def test_env_level_the_cpu_lacks_fails_clearly():
    done = run_python("import sparsepress.native", SPARSEPRESS_ISA="sse9")
    assert done.returncode != 0
    assert "SPARSEPRESS_ISA" in done.stderr


@needs_native
def test_env_selects_our_own_pool():
    done = run_python("from sparsepress import native; print(native.parallel_backend())", SPARSEPRESS_THREADS="own")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "own"


@needs_native
def test_env_backend_typo_fails_clearly():
    done = run_python("import sparsepress.native", SPARSEPRESS_THREADS="gomp")
    assert done.returncode != 0
    assert "SPARSEPRESS_THREADS='gomp'" in done.stderr


def test_env_panel_policy_typo_fails_clearly():
    done = run_python("import sparsepress.kernels", SPARSEPRESS_PANELS="most")
    assert done.returncode != 0
    assert "SPARSEPRESS_PANELS='most'" in done.stderr


def test_disable_native_uses_reference_path():
    code = (
        "import torch\n"
        "from sparsepress import native, kernels\n"
        "from sparsepress.formats import BitmaskWeight\n"
        "assert not native.native_available() and native.active_isa() == 'none'\n"
        "p = BitmaskWeight.pack(torch.tensor([[0.0, 2.0], [1.0, 0.0]]), dtype='int8')\n"
        "assert not kernels.native_supports(p)\n"
        "print(kernels.packed_linear(torch.tensor([[1.0, 1.0]]), p, None).tolist())\n"
    )
    done = run_python(code, SPARSEPRESS_DISABLE_NATIVE="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[2.0, 1.0]]"


@needs_native
def test_arrays_are_validated():
    import numpy as np

    lib = native.module()
    mask = np.zeros((4, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="row_offsets"):
        lib.masked_linear(mask, np.zeros(0, np.float32), np.zeros(3, np.int64), 16)
    with pytest.raises(ValueError, match="ceil"):
        lib.masked_linear(mask, np.zeros(0, np.float32), np.zeros(5, np.int64), 40)
    with pytest.raises(ValueError, match="scales"):
        lib.masked_linear(mask, np.zeros(0, np.int8), np.zeros(5, np.int64), 16)
    layer = lib.masked_linear(mask, np.zeros(0, np.float32), np.zeros(5, np.int64), 16)
    y = np.full((2, 4), 7, np.float32)
    layer(np.ones((2, 16), np.float32), y, np.arange(4, dtype=np.float32), 2)
    assert (y == np.arange(4)).all()
    with pytest.raises(ValueError, match="features"):
        layer(np.ones((2, 15), np.float32), y, None, 1)
