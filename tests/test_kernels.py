"""packed_linear: native kernels == pure-torch reference on every ISA level, and the custom op."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsepress import kernels, native
from sparsepress.formats import BBSWeight, BitmaskWeight, CSRWeight, DenseWeight, NMWeight

needs_native = pytest.mark.skipif(not native.native_available(), reason="sparsepress._native not built")
# Trees whose GEMM keeps prepared panels (the others pack nothing, their row kernels serve every batch).
PANEL_ISAS = ("avx2", "avx2vnni", "avx512", "amx")


def random_sparse(out_features: int, in_features: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    return w * (torch.rand(out_features, in_features, generator=gen) < density)


def nm_weight(out_features: int, in_features: int, n: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features // m, m, generator=gen)
    keep = torch.rand(out_features, in_features // m, m, generator=gen).argsort(dim=2)[..., :n]
    return (w * torch.zeros_like(w).scatter_(2, keep, 1.0)).view(out_features, in_features)


def bbs_weight(out_features: int, in_features: int, bank: int, k: int, seed: int) -> torch.Tensor:
    return nm_weight(out_features, in_features, k, bank, seed)


def pack(fmt: str, w: torch.Tensor, dtype: str, group_size: int | None, **params):
    cls = {"bitmask": BitmaskWeight, "nm": NMWeight, "bbs": BBSWeight, "csr": CSRWeight, "dense": DenseWeight}[fmt]
    return cls.pack(w, dtype=dtype, group_size=group_size if dtype in ("int8", "int4") else None, **params)


def assert_matches_reference(packed, x: torch.Tensor, bias: torch.Tensor | None) -> None:
    y = kernels.packed_linear(x, packed, bias)
    ref = kernels.reference_linear(x, packed, bias)
    # float accumulation order differs: allow a few ulps of the sum of |terms|
    xs = x
    if packed.dtype in ("int8", "int4"):
        xq, sx = kernels.quantize_activations(x)
        xs = xq * sx
    magnitude = xs.abs() @ packed.unpack().abs().T
    tol = 8 * torch.finfo(torch.float32).eps * magnitude * max(1.0, x.shape[1] ** 0.5) + 1e-6
    assert y.shape == ref.shape
    assert bool(((y - ref).abs() <= tol).all()), float((y - ref).abs().max())


def assert_random_inputs_match(packed, batch: int, seed: int, zero_row: int) -> None:
    """Seeded inputs (row `zero_row` all zero when batch > 1: the sx = 1 branch) and, for odd seeds, a
    bias: the native result equals the reference."""
    out_features, in_features = packed.shape
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, in_features, generator=gen) * 3
    if batch > 1:
        x[zero_row] = 0
    bias = torch.randn(out_features, generator=gen) if seed % 2 else None
    assert_matches_reference(packed, x, bias)


CASES = [
    ("bitmask", "int8", {}), ("bitmask", "fp32", {}), ("bitmask", "bf16", {}),
    ("nm", "int8", {"n": 2, "m": 4}), ("nm", "int8", {"n": 4, "m": 8}), ("nm", "fp32", {"n": 2, "m": 4}),
    ("bbs", "int8", {"bank": 64}), ("bbs", "fp32", {"bank": 32}),
    ("csr", "fp32", {}), ("csr", "int8", {}), ("dense", "int8", {}),
    # int4 values run on the int8 kernels, widened when the weight is prepared
    ("bitmask", "int4", {}), ("nm", "int4", {"n": 2, "m": 4}), ("bbs", "int4", {"bank": 64}),
    ("csr", "int4", {}), ("dense", "int4", {}),
]


def weight_for(fmt: str, out_features: int, in_features: int, density: float, seed: int, params: dict):
    if fmt == "nm":
        return nm_weight(out_features, in_features, params["n"], params["m"], seed)
    if fmt == "bbs":
        k = max(1, int(params["bank"] * density))
        return bbs_weight(out_features, in_features, params["bank"], k, seed)
    if fmt == "dense":
        return random_sparse(out_features, in_features, 1.0, seed)
    return random_sparse(out_features, in_features, density, seed)


@pytest.mark.native
@pytest.mark.parametrize("fmt,dtype,params", CASES, ids=[f"{f}-{d}-{'-'.join(map(str, p.values()))}" for f, d, p in CASES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_native_matches_reference(isa, fmt, dtype, params, data):
    unit = {"nm": params.get("m", 1), "bbs": params.get("bank", 1)}.get(fmt, 1)
    in_features = unit * data.draw(st.integers(1, max(1, 300 // unit)), label="in_units")
    out_features = data.draw(st.integers(1, 70), label="out")
    batch = data.draw(st.integers(1, 70), label="batch")
    density = data.draw(st.sampled_from([0.05, 0.25, 0.5, 0.9]), label="density")
    group_size = data.draw(st.sampled_from([None, None, 64, 128, 24]), label="group_size")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    packed = pack(fmt, weight_for(fmt, out_features, in_features, density, seed, params), dtype, group_size, **params)
    assert kernels.native_supports(packed)
    assert_random_inputs_match(packed, batch, seed, zero_row=0)


@pytest.mark.native
@pytest.mark.parametrize("fmt,dtype,params", CASES[:6], ids=[f"{f}-{d}" for f, d, _ in CASES[:6]])
def test_native_large_layer(isa, fmt, dtype, params):
    packed = pack(fmt, weight_for(fmt, 517, 1024, 0.3, 7, params), dtype, None, **params)
    for batch in (1, 16, 37):
        x = torch.randn(batch, 1024)
        assert_matches_reference(packed, x, torch.randn(517))


INT8_CASES = [c for c in CASES if c[1] == "int8" and c[0] != "csr"]


@pytest.fixture(params=["row", "gemm", "gemm-per-call-panels"])
def int8_path(request):
    """Forces the row kernels or the tiled GEMM (panels prepared once, or packed per call) for every
    batch size, then restores the defaults."""
    lib = native.module()
    if lib is None:
        pytest.skip("sparsepress._native not built")
    lib.set_gemm_min_batch(10**9 if request.param == "row" else 1)
    kernels.PANELS = "none" if request.param == "gemm-per-call-panels" else "auto"
    yield request.param
    kernels.PANELS = "auto"
    lib.set_gemm_min_batch(0)


@pytest.mark.native
@pytest.mark.parametrize("fmt,dtype,params", INT8_CASES, ids=[f"{f}-{'-'.join(map(str, p.values()))}" for f, _, p in INT8_CASES])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_int8_paths_match_reference(isa, int8_path, fmt, dtype, params, data):
    """Row kernels and GEMM (panel tails in out, in and tokens) == reference on every ISA level."""
    unit = {"nm": params.get("m", 1), "bbs": params.get("bank", 1)}.get(fmt, 1)
    in_features = unit * data.draw(st.integers(1, max(1, 200 // unit)), label="in_units")
    out_features = data.draw(st.sampled_from([1, 15, 16, 17, 31, 32, 33, 47, 64, 70]), label="out")
    batch = data.draw(st.integers(1, 40), label="batch")
    group_size = data.draw(st.sampled_from([None, None, None, 64]), label="group_size")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    packed = pack(fmt, weight_for(fmt, out_features, in_features, 0.5, seed, params), dtype, group_size, **params)
    assert_random_inputs_match(packed, batch, seed, zero_row=batch // 2)


@pytest.mark.native
def test_gemm_across_the_cutover(isa):
    """The default cutover: every token count around it, threads on, against the reference."""
    packed = BitmaskWeight.pack(random_sparse(160, 200, 0.5, 11), dtype="int8")
    bias = torch.randn(160)
    for batch in range(1, 20):
        assert_matches_reference(packed, torch.randn(batch, 200), bias)


MASKED_INT8 = [c for c in INT8_CASES if c[0] != "dense"]


@pytest.mark.native
@pytest.mark.parametrize("fmt,dtype,params", MASKED_INT8, ids=[f"{f}-{'-'.join(map(str, p.values()))}" for f, _, p in MASKED_INT8])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_wide_masked_rows_match_reference(isa, int8_path, fmt, dtype, params, data):
    """Wide inputs (>= 2048: the AVX-512 K-blocked row dots, K-block and chunk tails), any density and
    token count (16 / 8 / 4 / 2 / 1-token tiles), rows whose values end near the buffer end."""
    unit = {"nm": params.get("m", 1), "bbs": params.get("bank", 1)}.get(fmt, 1)
    wanted = data.draw(st.sampled_from([2048, 2049, 2111, 2176, 3001, 4097]), label="in")
    in_features = -(-wanted // unit) * unit
    out_features = data.draw(st.sampled_from([1, 3, 17, 33, 70]), label="out")
    batch = data.draw(st.sampled_from([1, 2, 3, 5, 8, 15, 16, 17, 23, 31, 32, 37]), label="batch")
    density = data.draw(st.sampled_from([0.0, 0.05, 0.5, 0.9, 1.0]), label="density")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    packed = pack(fmt, weight_for(fmt, out_features, in_features, density, seed, params), dtype, None, **params)
    assert_random_inputs_match(packed, batch, seed, zero_row=batch // 2)


@pytest.mark.native
def test_big_masked_layer_across_the_cutover(isa):
    """A >= 4M-weight masked layer at token counts around its cutover (row dots up to 16, then GEMM)."""
    packed = BitmaskWeight.pack(random_sparse(1024, 4096, 0.1, 5), dtype="int8")
    bias = torch.randn(1024)
    for batch in (1, 2, 4, 12, 16, 17, 20):
        assert_matches_reference(packed, torch.randn(batch, 4096), bias)


@pytest.mark.native
@pytest.mark.parametrize("fmt,params", [("bitmask", {}), ("bbs", {"bank": 64}), ("dense", {})])
def test_big_layer_with_prepared_panels(isa, fmt, params, monkeypatch):
    """SPARSEPRESS_PANELS=all: a >= 4M-weight layer gets panels and its GEMM (from 12 tokens) matches."""
    monkeypatch.setattr(kernels, "PANELS", "all")
    packed = pack(fmt, weight_for(fmt, 1024, 4096, 0.5, 8, params), "int8", None, **params)
    bias = torch.randn(1024)
    for batch in (1, 11, 12, 16, 33):
        assert_matches_reference(packed, torch.randn(batch, 4096), bias)
    plan = kernels._plan_of(packed)
    assert plan.handle.has_panels == (isa in PANEL_ISAS)


def lopsided_sparse(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Rows dense in a stretch that moves from row to row and sparse elsewhere: fixed 64-column
    windows pad every row of a tile to the one dense there."""
    w = random_sparse(out_features, in_features, 0.3, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for r in range(out_features):
        c = (r * 37) % max(1, in_features - 48)
        w[r, c:c + 48] = torch.randn(min(48, in_features - c), generator=gen)
    return w


@pytest.mark.native
@pytest.mark.parametrize(
    "make,layout",
    [
        (lambda: BitmaskWeight.pack(random_sparse(96, 700, 0.5, 3), dtype="int8"), 2),
        (lambda: BitmaskWeight.pack(lopsided_sparse(70, 515, 4), dtype="int8"), 2),
        (lambda: BBSWeight.pack(bbs_weight(96, 640, 64, 32, 5), dtype="int8", bank=64, k=32), 1),
        (lambda: DenseWeight.pack(random_sparse(40, 200, 1.0, 6), dtype="int8"), 0),
    ],
    ids=["unstructured", "lopsided", "bbs64", "dense"],
)
def test_prepared_tile_layouts_match_per_call_panels(make, layout, monkeypatch):
    """Unstructured masks get sliding-window quads, BBS(64) fixed windows, dense weights dense tiles;
    every layout gives exactly what the per-call panels (fixed windows) give, and the reference."""
    if native.active_isa() != "avx512":
        pytest.skip("prepared panels are AVX-512 only")
    bias = torch.randn(make().out_features)
    x = torch.randn(16, make().in_features)
    monkeypatch.setattr(kernels, "PANELS", "none")
    per_call = kernels.packed_linear(x, make(), bias)
    monkeypatch.setattr(kernels, "PANELS", "all")
    packed = make()
    prepared = kernels.packed_linear(x, packed, bias)
    tiles = kernels._plan_of(packed).handle.panel_tiles
    assert tiles[layout] == sum(tiles) and sum(tiles) == (packed.out_features + 31) // 32
    assert torch.equal(prepared, per_call)
    assert_matches_reference(packed, x, bias)


@pytest.mark.native
@pytest.mark.parametrize("density,layout", [(0.5, 0), (0.1, 2)], ids=["half-dense-tiles", "sparse-quads"])
def test_amx_prepared_tiles_match_per_call(density, layout, monkeypatch):
    """The AMX level: prepared panels (dense tiles as the tile unit's B operand; quads kept for very
    sparse tiles) and the per-call GEMM (packed rows expanded into the A operand) give the same bits,
    for few tokens (one window at a time) and many (rows expanded once), and equal the reference."""
    if native.active_isa() != "amx":
        pytest.skip("needs the AMX level (AMX-INT8 CPU)")
    for batch in (5, 16, 32, 70):
        bias = torch.randn(100)
        x = torch.randn(batch, 700)
        monkeypatch.setattr(kernels, "PANELS", "none")
        native.module().set_gemm_min_batch(1)
        try:
            per_call = kernels.packed_linear(x, BitmaskWeight.pack(random_sparse(100, 700, density, 3), dtype="int8"), bias)
            monkeypatch.setattr(kernels, "PANELS", "all")
            packed = BitmaskWeight.pack(random_sparse(100, 700, density, 3), dtype="int8")
            prepared = kernels.packed_linear(x, packed, bias)
        finally:
            native.module().set_gemm_min_batch(0)
        tiles = kernels._plan_of(packed).handle.panel_tiles
        assert tiles[layout] == sum(tiles) == 4
        assert torch.equal(prepared, per_call), batch
        assert_matches_reference(packed, x, bias)


@pytest.mark.native
@pytest.mark.parametrize("fmt", ["bitmask", "dense"])
def test_amx_per_call_gemm_over_several_token_blocks(fmt, monkeypatch):
    """A long row (4096 columns) takes the per-call AMX GEMM in token blocks of 128 (their transposed
    activations sized for L2): 150 tokens run one block of rows expanded once (many tokens) and one of
    22 tokens (window by window); both equal the reference, on a masked and a dense weight."""
    if native.active_isa() != "amx":
        pytest.skip("needs the AMX level (AMX-INT8 CPU)")
    monkeypatch.setattr(kernels, "PANELS", "none")
    density = 0.5 if fmt == "bitmask" else 1.0
    packed = pack(fmt, random_sparse(40, 4096, density, 11), "int8", None)
    native.module().set_gemm_min_batch(1)
    try:
        assert_matches_reference(packed, torch.randn(150, 4096), torch.randn(40))
    finally:
        native.module().set_gemm_min_batch(0)


def test_default_panels_come_to_big_layers_only_with_mid_size_calls():
    """auto: small layers at once; a big one on its first 12..63-token call, never from decode or
    long prefill calls; the results are the same before and after."""
    if not native.native_available():
        pytest.skip("sparsepress._native not built")
    assert kernels.PANELS == "auto"
    big = BitmaskWeight.pack(random_sparse(1024, 4096, 0.5, 2), dtype="int8")
    small = BitmaskWeight.pack(random_sparse(256, 256, 0.5, 2), dtype="int8")
    panels = native.active_isa() in PANEL_ISAS
    assert kernels._plan_of(small).handle.has_panels == panels
    handle = kernels._plan_of(big).handle
    bias = torch.randn(1024)
    for batch in (1, 2, 11, 64, 100):
        assert_matches_reference(big, torch.randn(batch, 4096), bias)
        assert not handle.has_panels and handle.panel_bytes == 0
    x16 = torch.randn(16, 4096)
    first = kernels.packed_linear(x16, big, bias)  # builds them (AVX-512), then runs on them
    assert handle.has_panels == panels and (handle.panel_bytes > 0) == panels
    assert_matches_reference(big, x16, bias)
    assert torch.equal(kernels.packed_linear(x16, big, bias), first)


@needs_native
@pytest.mark.native
def test_fast_path_converts_inputs():
    packed = BitmaskWeight.pack(random_sparse(24, 40, 0.5, 12), dtype="int8")
    x = torch.randn(40, 6).T  # not contiguous
    bias = torch.randn(24, dtype=torch.float64)
    y = kernels.packed_linear(x, packed, bias)
    torch.testing.assert_close(y, kernels.packed_linear(x.contiguous(), packed, bias.float()))
    with pytest.raises(ValueError, match="features"):
        kernels.packed_linear(torch.randn(2, 41), packed, None)
    with pytest.raises(ValueError, match="bias"):
        kernels.packed_linear(torch.randn(2, 40), packed, torch.randn(5))
    assert kernels.packed_linear(torch.randn(0, 40), packed, None).shape == (0, 24)


@pytest.mark.native
def test_activation_quantization_is_bit_exact(isa):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 333, generator=gen) * torch.logspace(-3, 3, 40).unsqueeze(1)
    x[3] = 0
    x[5, 7] = 0.5 * x[5].abs().max() / 127 * 2  # a tie for round-half-even
    xq, sx = native.module().quantize_rows(x)
    ref_q, ref_s = kernels.quantize_activations(x)
    assert torch.equal(torch.from_numpy(xq).float(), ref_q)
    assert torch.equal(torch.from_numpy(sx), ref_s.flatten())


def test_reference_path_for_unsupported_dtype():
    w = random_sparse(9, 16, 0.5, 1)
    packed = DenseWeight.pack(w, dtype="bf16")
    assert not kernels.native_supports(packed)
    x = torch.randn(3, 16)
    torch.testing.assert_close(kernels.packed_linear(x, packed, None), kernels.reference_linear(x, packed, None))


def test_packed_linear_keeps_leading_dims():
    packed = BitmaskWeight.pack(random_sparse(5, 12, 0.5, 2), dtype="int8")
    x = torch.randn(2, 3, 12)
    y = kernels.packed_linear(x, packed, torch.zeros(5))
    assert y.shape == (2, 3, 5)
    torch.testing.assert_close(y, kernels.reference_linear(x.reshape(6, 12), packed, None).reshape(2, 3, 5),
                               atol=1e-4, rtol=1e-4)


def test_dense_fp32_matches_linear():
    w = torch.randn(7, 10)
    x = torch.randn(4, 10)
    torch.testing.assert_close(kernels.packed_linear(x, DenseWeight.pack(w), None), x @ w.T)


def test_grad_flows_through_reference_path():
    packed = BitmaskWeight.pack(random_sparse(4, 8, 0.5, 3), dtype="fp32")
    x = torch.randn(2, 8, requires_grad=True)
    kernels.packed_linear(x, packed, None).sum().backward()
    torch.testing.assert_close(x.grad, packed.unpack().sum(0).expand(2, 8))


def test_plan_is_cached_and_rebuilt_when_values_change():
    packed = BitmaskWeight.pack(random_sparse(4, 8, 0.5, 4), dtype="int8")
    x = torch.randn(2, 8)
    y1 = kernels.packed_linear(x, packed, None)
    if native.native_available():
        plan = kernels._plan_of(packed)
        assert kernels._plan_of(packed) is plan
    packed.values = packed.values.neg()
    torch.testing.assert_close(kernels.packed_linear(x, packed, None), -y1)


@needs_native
@pytest.mark.native
def test_fake_impl_and_opcheck():
    packed = BitmaskWeight.pack(random_sparse(6, 20, 0.5, 5), dtype="int8")
    plan = kernels._plan_of(packed)
    args = (torch.randn(3, 20), list(plan.tensors), plan.kind, 20, 6, 0, torch.randn(6))
    torch.library.opcheck(torch.ops.sparsepress.packed_linear.default, args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = (mode.from_tensor(args[0]), [mode.from_tensor(t) for t in args[1]], *args[2:6],
                     mode.from_tensor(args[6]))
        y = torch.ops.sparsepress.packed_linear(*fake_args)
    assert y.shape == (3, 6) and y.dtype == torch.float32


@needs_native
@pytest.mark.native
def test_torch_compile_traces_the_op():
    packed = NMWeight.pack(nm_weight(8, 32, 2, 4, 6), dtype="int8")
    bias = torch.randn(8)

    def f(x):
        return torch.relu(kernels.packed_linear(x, packed, bias))

    x = torch.randn(5, 32)
    expected = f(x)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)


@needs_native
@pytest.mark.native
@pytest.mark.slow
def test_torch_compile_inductor():
    packed = BitmaskWeight.pack(random_sparse(8, 32, 0.5, 8), dtype="int8")
    f = torch.compile(lambda x: kernels.packed_linear(x, packed, None) * 2)
    x = torch.randn(3, 32)
    torch.testing.assert_close(f(x), kernels.packed_linear(x, packed, None) * 2)


@pytest.fixture(params=["openmp", "own"])
def parallel_backend(request):
    """Runs a test on torch's OpenMP team and on sparsepress's own pool (then restores the default)."""
    if not native.native_available():
        pytest.skip("sparsepress._native not built")
    before = native.parallel_backend()
    if native.set_parallel_backend(request.param) != request.param:
        native.set_parallel_backend(before)
        pytest.skip(f"no {request.param} backend here (torch without OpenMP)")
    yield request.param
    native.set_parallel_backend(before)


@needs_native
@pytest.mark.native
def test_torch_openmp_team_is_the_default_backend():
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is not built with OpenMP here")
    assert native.parallel_backend() == "openmp"
    assert "omp" in native.host_openmp_library()


@needs_native
@pytest.mark.native
def test_backends_give_identical_results():
    """Each output row is computed whole by one task, so the thread split cannot change a bit."""
    torch.manual_seed(3)
    layers = [BitmaskWeight.pack(random_sparse(300, 384, 0.5, 1), dtype="int8"),
              BBSWeight.pack(bbs_weight(200, 512, 64, 32, 2), dtype="int8", bank=64),
              DenseWeight.pack(torch.randn(96, 200), dtype="int8"),
              BitmaskWeight.pack(random_sparse(64, 96, 0.3, 4), dtype="fp32")]
    before = native.parallel_backend()
    try:
        for packed in layers:
            for batch in (1, 7, 64, 300):
                x = torch.randn(batch, packed.shape[1])
                results = []
                for backend in ("own", "openmp"):
                    native.set_parallel_backend(backend)
                    results.append(kernels.packed_linear(x, packed, None))
                assert torch.equal(results[0], results[1])
                assert_matches_reference(packed, x, None)
    finally:
        native.set_parallel_backend(before)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="parallel backend 'gpu'"):
        native.set_parallel_backend("gpu")


@needs_native
@pytest.mark.native
def test_concurrent_callers_get_their_own_results(parallel_backend):
    from sparsepress.nn.sparse_linear import SparseLinear

    torch.manual_seed(0)
    layers = []
    for fmt, extra in (("bitmask", {}), ("nm", {"n": 2, "m": 4}), ("bbs", {"bank": 64}), ("csr", {})):
        lin = torch.nn.Linear(256, 256)
        w = nm_weight(256, 256, 2, 4, 0) if fmt in ("nm", "bbs") else random_sparse(256, 256, 0.3, 0)
        lin.weight.data = w
        layers += [SparseLinear.from_linear(lin, format=fmt, dtype="int8", **extra), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).eval()
    inputs = [torch.randn(1 + 5 * i, 256) for i in range(4)]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]
    failures = []

    def hammer(i):
        with torch.inference_mode():
            for _ in range(100):
                if not torch.equal(model(inputs[i]), expected[i]):
                    failures.append(i)
                    return

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_auto_candidates_are_timed_side_by_side_and_released():
    """`format: auto` times every native candidate (positive medians) and keeps no handle of them."""
    from sparsepress.packing import measured_ms

    w = random_sparse(16, 32, 0.5, 9)
    packs = [BitmaskWeight.pack(w, dtype="int8"), DenseWeight.pack(w, dtype="int8")]
    timings = measured_ms(packs, None)
    if not native.native_available():
        assert timings == {}
        return
    assert set(timings) == {"bitmask", "dense"} and all(ms > 0 for ms in timings.values())
    assert not any(hasattr(p, kernels._PLAN_ATTR) for p in packs)


@pytest.mark.native
@pytest.mark.parametrize("activation", list(kernels.ACTIVATIONS))
def test_fused_activation_functions_match_torch(isa, activation):
    """An identity weight exposes the kernels' activation itself over a wide input range."""
    values = torch.linspace(-30, 30, 4001)
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 1e4, -1e4])])
    width = 64
    x = torch.nn.functional.pad(values, (0, (-values.numel()) % width)).view(-1, width)
    packed = BitmaskWeight.pack(torch.eye(width), dtype="fp32")
    y = kernels.packed_linear(x, packed, None, activation)
    expected = kernels.ACTIVATIONS[activation][1](x)
    # erf to 1.5e-7 absolute: gelu within 0.5 |x| 1.5e-7 where it is ~0 (x << 0)
    torch.testing.assert_close(y, expected, rtol=2e-6, atol=3e-6)


@pytest.mark.native
@pytest.mark.parametrize("activation", list(kernels.ACTIVATIONS))
@pytest.mark.parametrize("fmt,dtype,params", CASES, ids=[f"{f}-{d}-{'-'.join(map(str, p.values()))}" for f, d, p in CASES])
def test_fused_activation_on_every_kernel(isa, activation, fmt, dtype, params):
    """act(linear) == the reference linear followed by torch's activation, rows and GEMM token counts."""
    packed = pack(fmt, weight_for(fmt, 70, 256, 0.5, 3, params), dtype, None, **params)
    bias = torch.randn(70)
    for batch in (1, 5, 16, 40):
        x = torch.randn(batch, 256) * 2
        y = kernels.packed_linear(x, packed, bias, activation)
        ref = kernels.ACTIVATIONS[activation][1](kernels.reference_linear(x, packed, bias))
        plain = kernels.packed_linear(x, packed, bias)
        torch.testing.assert_close(y, kernels.ACTIVATIONS[activation][1](plain), rtol=1e-5, atol=1e-5)
        assert float((y - ref).abs().max()) <= 1e-3 * float(ref.abs().max()) + 1e-4


def test_unknown_activation_is_refused():
    packed = BitmaskWeight.pack(torch.eye(4), dtype="fp32")
    with pytest.raises(ValueError, match="activation 'tanh' is not one of gelu"):
        kernels.packed_linear(torch.ones(1, 4), packed, None, "tanh")


def test_reference_path_applies_the_activation():
    packed = DenseWeight.pack(torch.eye(3), dtype="bf16")  # dense bf16: no native kernel
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    y = kernels.packed_linear(x, packed, None, "relu")
    assert y.min() >= 0 and y[0, 2] > 1.5


def test_deepcopy_of_a_layer_that_ran_natively():
    """The native handle cached on a packed weight is not copied; the copy builds its own."""
    import copy

    from sparsepress.nn.sparse_linear import SparseLinear

    layer = SparseLinear.from_linear(torch.nn.Linear(64, 32), format="bitmask", dtype="int8")
    x = torch.randn(5, 64)
    y = layer(x)
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(x), y)
    assert twin.packed.values is not layer.packed.values


@needs_native
def test_format_auto_keeps_no_measuring_handles():
    """Timing candidates for `format: auto` must not leave handles (or 16-token GEMM panels of big
    layers) on the chosen weight: the model builds its own on first use."""
    from sparsepress.packing import choose_packing
    from sparsepress.prune.solve import compress_weight
    from sparsepress.recipe import PruneStage, QuantizeStage

    linear = torch.nn.Linear(4096, 1024)
    result = compress_weight(linear.weight, None, PruneStage(method="magnitude", sparsity=0.5),
                             quant=QuantizeStage(method="rtn", bits=8))
    layer, meta = choose_packing(linear, result, PruneStage(method="magnitude", sparsity=0.5), "auto")
    assert len(meta["measured_ms"]) >= 2  # candidates were timed natively
    assert not hasattr(layer.packed, kernels._PLAN_ATTR)
