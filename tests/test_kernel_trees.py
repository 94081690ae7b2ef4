"""Every kernel tree against plain reference loops, torch-free (tests/native/kernel_check.cpp).

The driver is compiled from the same sources as the extension, one object set per tree with that
tree's flags (as CMakeLists.txt builds them), and run:
  - natively: the x86-64 trees this CPU has (scalar, avx2, avx2vnni, avx512), GEMMs and prepared panels
    included; the AVX-VNNI tree, where the CPU lacks AVX-VNNI but has AVX-512 VNNI, built with the EVEX
    form of vpdpbusd (same operation) so that its code is checked here too;
  - for aarch64 with Debian's cross compiler (g++-aarch64-linux-gnu) under qemu-user: the scalar,
    neon and neondot trees (qemu's default CPU has the dot product), and the run-time choice on a
    CPU without it (cortex-a53: neon).
Each is skipped cleanly when its compiler or qemu is missing; `.ci/run` installs both. Builds are kept
under build/kernel_check/ by a hash of their sources and flags, so a rerun only runs them.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_FILES = ("int8", "float", "table", "attention")
AVX2 = ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mpopcnt", "-mf16c", "--param=sra-max-scalarization-size-Ospeed=4096"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512vbmi",
                 "-mavx512vbmi2"]
# tree -> (source folder, flags): the same as CMakeLists.txt gives each object library
TREES = {
    "x86_64": {"scalar": ("scalar", []), "avx2": ("avx2", AVX2), "avx512": ("avx512", AVX512)},
    "aarch64": {"scalar": ("scalar", []), "neon": ("neon", []),
                "neondot": ("neon", ["-march=armv8.2-a+dotprod", "-DSP_ISA_NS=neondot"])},
}


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _trees(arch: str) -> dict[str, tuple[str, list[str]]]:
    """The trees to build for `arch`: on x86-64 also the AVX-VNNI one, with its real flags where this
    CPU has AVX-VNNI, else (on an AVX-512 VNNI CPU) with the EVEX vpdpbusd that computes the same."""
    trees = dict(TREES[arch])
    if arch == "x86_64":
        flags = _cpu_flags()
        if "avx_vnni" in flags:
            trees["avx2vnni"] = ("avx2", AVX2 + ["-mavxvnni", "-DSP_ISA_NS=avx2vnni"])
        elif {"avx512_vnni", "avx512vl"} <= flags:
            trees["avx2vnni"] = ("avx2", AVX2 + ["-mavx512vnni", "-mavx512vl", "-DSP_ISA_NS=avx2vnni"])
    return trees


def _sources(arch: str) -> list[tuple[Path, list[str], str]]:
    """(source, flags, object name) of every translation unit of the driver for `arch`."""
    trees = _trees(arch)
    defines = []
    if "avx2vnni" in trees:
        defines = ["-DSP_HAVE_AVX2VNNI=1"]
        if "-mavxvnni" not in trees["avx2vnni"][1]:
            defines.append("-DSP_CHECK_AVX2VNNI_EVEX=1")
    units = [(CSRC / "dispatch.cpp", defines, "dispatch.o"),
             (ROOT / "tests/native/kernel_check.cpp", defines, "check.o"),
             (CSRC / "gather_rows.cpp", [], "gather_rows.o")]
    for tree, (folder, flags) in trees.items():
        units += [(CSRC / "kernels" / folder / f"{name}.cpp", flags, f"{tree}-{name}.o") for name in KERNEL_FILES]
    return units


def build_driver(compiler: str, arch: str, link_flags: list[str]) -> Path:
    """The kernel_check binary for `arch`, compiled with `compiler` (cached by a hash of its inputs)."""
    units = _sources(arch)
    digest = hashlib.sha256(compiler.encode())
    headers = sorted(CSRC.rglob("*.h"))
    for path in [u[0] for u in units] + headers:
        digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    for _, flags, _ in units:
        digest.update(" ".join(flags).encode())
    out = ROOT / "build" / "kernel_check" / f"{arch}-{digest.hexdigest()[:16]}"
    binary = out / "kernel_check"
    if binary.exists():
        return binary
    out.mkdir(parents=True, exist_ok=True)

    def compile_unit(unit: tuple[Path, list[str], str]) -> subprocess.CompletedProcess:
        source, flags, obj = unit
        command = ["nice", "-n", "19", compiler, "-std=c++17", "-O2", f"-I{CSRC}", *flags, "-c", str(source),
                   "-o", str(out / obj)]
        return subprocess.run(command, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in pool.map(compile_unit, units):
            assert done.returncode == 0, done.stderr[-4000:]
    link = subprocess.run([compiler, *[str(out / u[2]) for u in units], *link_flags, "-o", str(binary)],
                          capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-4000:]
    return binary


def run_driver(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " 0 failed" in done.stdout.splitlines()[-1]
    return done.stdout


@pytest.mark.native
def test_host_trees_match_reference():
    """Every x86-64 tree this CPU runs (row kernels, GEMMs, prepared panels) == the reference loops; the
    AVX-VNNI tree too, natively or, on an AVX-512 CPU, built with the EVEX form of its instruction."""
    compiler = shutil.which("g++")
    if platform.machine() != "x86_64" or compiler is None:
        pytest.skip("needs an x86-64 host with g++")
    output = run_driver([str(build_driver(compiler, "x86_64", []))])
    assert "tree scalar: ok" in output
    if "avx2vnni" in _trees("x86_64"):
        assert "tree avx2vnni" in output


@pytest.mark.native
def test_neon_trees_under_qemu():
    """The NEON trees (plain and sdot) == the reference loops on aarch64 under qemu-user, and the
    dispatcher picks neondot where the CPU has the dot product and neon where it does not."""
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler is None or qemu is None:
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu qemu-user)")
    binary = str(build_driver(compiler, "aarch64", ["-static"]))
    output = run_driver([qemu, binary])
    assert output.splitlines()[0] == "detected: neondot"
    for tree in ("scalar", "neon", "neondot"):
        assert f"tree {tree}: ok" in output
    without_dot = run_driver([qemu, "-cpu", "cortex-a53", binary])
    assert without_dot.splitlines()[0] == "detected: neon" and "tree neondot" not in without_dot
