"""Native attention == the pure-torch reference on every ISA level; the reference == torch's SDPA; the
transformers hook gives the outputs SDPA gives, for an encoder with padding and a GQA decoder with a cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsepress import attention as attn
from sparsepress import native

needs_native = pytest.mark.skipif(not native.native_available(), reason="sparsepress._native not built")


def make_mask(kind: str, batch: int, heads: int, sq: int, sk: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "bool":  # padding-style keep mask, one per sequence; key 0 always kept
        keep = torch.rand(batch, 1, sq, sk, generator=gen) > 0.4
        keep[..., 0] = True
        return keep
    if kind == "float-keys":
        return torch.randn(batch, 1, 1, sk, generator=gen)
    if kind == "float-full":
        return torch.randn(batch, heads, sq, sk, generator=gen)
    return None


@needs_native
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(1, 3), sq=st.integers(1, 40),
       sk=st.integers(1, 70), d=st.sampled_from([1, 5, 8, 16, 24, 32, 40, 64, 80, 128]), causal=st.booleans(),
       mask=st.sampled_from(["none", "bool", "float-keys", "float-full"]), strided=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_native_matches_reference(isa, batch, kv_heads, groups, sq, sk, d, causal, mask, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    if strided:  # [B, S, H, D] storage seen as [B, H, S, D], as transformers hands them over
        q = torch.randn(batch, sq, heads, d, generator=gen).transpose(1, 2)
        k = torch.randn(batch, sk, kv_heads, d, generator=gen).transpose(1, 2)
        v = torch.randn(batch, sk, kv_heads, d, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, sq, d, generator=gen)
        k = torch.randn(batch, kv_heads, sk, d, generator=gen)
        v = torch.randn(batch, kv_heads, sk, d, generator=gen)
    m = make_mask(mask, batch, heads, sq, sk, gen)
    got = attn.attention(q, k, v, m, None, causal)
    want = attn.reference_attention(q, k, v, m, None, causal)
    assert got.shape == (batch, sq, heads, d)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", ["none", "float-keys", "float-full", "bool"])
def test_reference_matches_torch_sdpa(causal, mask):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=gen) for _ in range(3))
    m = make_mask(mask, 2, 4, 9, 9, gen)
    if m is not None and m.dtype == torch.bool and causal:
        m[..., 0] = True  # every causal row keeps its first key: no row without keys (SDPA gives NaN there)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=0.3)
    torch.testing.assert_close(attn.reference_attention(q, k, v, m, 0.3, causal), want.transpose(1, 2),
                               atol=1e-5, rtol=1e-5)


def test_reference_grouped_heads_read_their_key_head():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, 5, 8, generator=gen)
    k, v = torch.randn(1, 2, 7, 8, generator=gen), torch.randn(1, 2, 7, 8, generator=gen)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)).transpose(1, 2)
    torch.testing.assert_close(attn.reference_attention(q, k, v), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["native", "reference"])
def test_a_row_that_sees_no_key_is_zero(path):
    if path == "native" and not native.native_available():
        pytest.skip("sparsepress._native not built")
    q = k = v = torch.randn(1, 1, 3, 4)
    keep = torch.tensor([[True, True, True], [False, False, False], [True, False, True]]).view(1, 1, 3, 3)
    run = attn.attention if path == "native" else attn.reference_attention
    out = run(q, k, v, keep)
    assert torch.isfinite(out).all()
    assert out[0, 1].abs().max() == 0
    assert out[0, 0].abs().max() > 0


def test_shape_errors_name_the_tensor():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        attn.attention(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match="key .* and value"):
        attn.attention(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 5, 8))
    with pytest.raises(ValueError, match="does not fit query"):
        attn.attention(q, torch.randn(1, 4, 3, 7), torch.randn(1, 4, 3, 7))
    with pytest.raises(ValueError, match="does not broadcast"):
        attn.attention(q, q, q, torch.zeros(2, 1, 3, 3))


@needs_native
def test_empty_sizes():
    q = torch.randn(2, 2, 0, 8)
    assert attn.attention(q, torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)).shape == (2, 0, 2, 8)
    out = attn.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8))
    assert out.shape == (1, 3, 2, 8) and out.abs().max() == 0


def test_autograd_and_other_dtypes_take_the_reference():
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    out = attn.attention(q, q, q)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert not attn.native_attention_supports(q.double().detach(), q.detach(), q.detach())


@needs_native
def test_torch_compile_traces_the_op():
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: attn.attention(a, b, c, None, None, True) * 2,
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attn.reference_attention(q, k, v, causal=True) * 2,
                               atol=1e-5, rtol=1e-5)


class _Counter:
    """Counts native attention calls (and still runs them)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = attn._run_native

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(attn, "_run_native", counted)


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


@needs_native
def test_encoder_with_padding_matches_sdpa(monkeypatch):
    dense = tiny_bert()
    assert dense.config._attn_implementation == "sdpa"
    fast = copy.deepcopy(dense)
    assert attn.use_native_attention(fast)
    counter = _Counter(monkeypatch)
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    with torch.inference_mode():
        want = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert counter.calls == 2  # one per layer: the native kernel ran
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_native
def test_grouped_query_decoder_matches_sdpa_with_a_cache(monkeypatch):
    dense = tiny_llama()
    fast = copy.deepcopy(dense)
    assert attn.use_native_attention(fast)
    counter = _Counter(monkeypatch)
    prompt = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(fast(prompt).logits, dense(prompt).logits, atol=1e-5, rtol=1e-4)
        want = dense.generate(prompt, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
        got = fast.generate(prompt, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert counter.calls > 2
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_native
def test_training_with_dropout_goes_to_sdpa(monkeypatch):
    model = tiny_bert()
    model.config.attention_probs_dropout_prob = 0.5
    for module in model.modules():
        if hasattr(module, "dropout") and isinstance(module.dropout, torch.nn.Dropout):
            module.dropout.p = 0.5
    assert attn.use_native_attention(model)
    counter = _Counter(monkeypatch)
    model.train()
    model(input_ids=torch.randint(0, 100, (2, 5)))
    assert counter.calls == 0
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (2, 5)))
    assert counter.calls == 2


def test_only_sdpa_models_switch():
    eager = tiny_bert()
    eager.set_attn_implementation("eager")
    assert not attn.use_native_attention(eager)
    assert eager.config._attn_implementation == "eager"
    assert not attn.use_native_attention(torch.nn.Linear(2, 2))


@needs_native
def test_switch_is_undone_by_transformers():
    model = tiny_bert()
    assert attn.use_native_attention(model)
    assert model.config._attn_implementation == attn.ATTENTION_NAME
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_default_scale_is_inverse_sqrt_dim():
    q = torch.randn(1, 1, 2, 9)
    torch.testing.assert_close(attn.reference_attention(q, q, q), attn.reference_attention(q, q, q, scale=1 / math.sqrt(9)))
