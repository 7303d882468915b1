"""run_with_cache returns every hook with its shape, without copies; run_with_hooks edits activations in place."""
import numpy as np
import pytest

import moedit
from conftest import DEMO, FIXTURES

TEXT = "The mother tongue of Danielle Darrieux is"


def widths(model, name):
    """The expected width of a hook's activation, from the model's shape."""
    H, E, k = model.d_model, model.n_experts, model.top_k
    if name.endswith("hook_router_logits"):
        return E
    if name.endswith(("hook_expert_ids", "hook_expert_weights")):
        return k
    return H


@pytest.mark.parametrize("path", [DEMO, FIXTURES / "qwen2_moe", FIXTURES / "deepseek_v2"], ids=lambda p: p.name)
def test_run_with_cache_returns_every_hook_with_its_shape(path):
    model = moedit.Model(str(path))
    ids = [3, 8, 1, 22, 5, 9]
    N = len(ids)
    logits, cache, rows = model.run_with_cache(ids, return_rows=True)
    names = model.hook_names()
    assert list(cache) == names
    np.testing.assert_array_equal(logits, model.logits(ids))  # capturing changes nothing
    assert "hook_embed" in names and "hook_final_norm" in names
    for l in range(model.n_layers):
        for h in ("hook_resid_pre", "hook_attn_out", "hook_ffn_in", "hook_moe_out", "hook_resid_post"):
            assert f"blocks.{l}.{h}" in names
    for name, a in cache.items():
        assert a.dtype == np.float32 and a.ndim == 2, name
        assert a.size == 0 or not a.flags.owndata, name  # a view of the captured buffer: no copy
        if ".experts." in name:
            assert a.shape[0] == len(rows[name]), name
            if name.endswith("hook_out"):
                assert a.shape[1] == model.d_model, name
        elif not name.endswith("hook_shared_key"):
            assert a.shape == (N, widths(model, name)), name
    for l in model.moe_layers:
        ids_l = cache[f"blocks.{l}.moe.hook_expert_ids"].astype(int)
        total = np.zeros((N, model.d_model), np.float64)
        for e in range(model.n_experts):
            key, out = cache[f"blocks.{l}.moe.experts.{e}.hook_key"], cache[f"blocks.{l}.moe.experts.{e}.hook_out"]
            routed = [t for t in range(N) if e in ids_l[t]]
            assert rows[f"blocks.{l}.moe.experts.{e}.hook_out"] == routed
            assert key.shape[0] == out.shape[0] == len(routed)
            total[routed] += out
        if f"blocks.{l}.moe.hook_shared_out" in cache:
            total += cache[f"blocks.{l}.moe.hook_shared_out"]
        moe_out = cache[f"blocks.{l}.hook_moe_out"]
        np.testing.assert_allclose(total, moe_out, rtol=1e-5, atol=1e-6 * np.abs(moe_out).max())
    # The residual stream adds up: resid_post = resid_pre + attn_out + moe_out (Qwen-style, no multipliers).
    if path == DEMO:
        l = 1
        np.testing.assert_allclose(cache[f"blocks.{l}.hook_resid_post"],
                                   cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"]
                                   + cache[f"blocks.{l}.hook_moe_out"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cache[f"blocks.{l}.hook_resid_post"], cache[f"blocks.{l + 1}.hook_resid_pre"])


def test_names_filter_forms(demo):
    name = "blocks.2.hook_resid_post"
    assert list(demo.run_with_cache(TEXT, names_filter=name)[1]) == [name]
    assert list(demo.run_with_cache(TEXT, names_filter=[name, "hook_embed"])[1]) == [name, "hook_embed"]
    keys = demo.run_with_cache(TEXT, names_filter=lambda n: n.endswith("hook_router_logits"))[1]
    assert list(keys) == [f"blocks.{l}.moe.hook_router_logits" for l in demo.moe_layers]
    with pytest.raises(moedit.InputError, match="unknown hook name 'blocks.9.hook_resid_post'"):
        demo.run_with_cache(TEXT, names_filter="blocks.9.hook_resid_post")


def test_cached_arrays_outlive_the_model_call(demo):
    _, cache = demo.run_with_cache(TEXT, names_filter="hook_embed")
    a = cache.pop("hook_embed")
    del cache
    ref = demo.run_with_cache(TEXT, names_filter="hook_embed")[1]["hook_embed"]
    np.testing.assert_array_equal(a, ref)


def test_router_mask_hook_equals_the_cli_mask(cli, demo):
    ids = demo.tokenize(TEXT)
    layer, expert = 1, 3

    def mask(z, info):  # z: the router logits [N, E], a view: never route to the expert
        assert info.name == f"blocks.{layer}.moe.hook_router_logits" and info.layer == layer
        z[:, expert] = -np.inf

    got = demo.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.moe.hook_router_logits", mask)])
    ref = cli.json("logits", DEMO, "--ids", ",".join(map(str, ids)), "--mask", f"{layer}:{expert}")
    np.testing.assert_array_equal(got.view(np.uint32), np.array(ref["logits"], np.float32).view(np.uint32))
    assert not np.array_equal(got, demo.logits(ids))  # the expert was used: masking changed the answer
    _, cache = demo.run_with_cache(ids, names_filter=f"blocks.{layer}.moe.hook_expert_ids")
    assert (cache[f"blocks.{layer}.moe.hook_expert_ids"] == expert).any()


def test_zeroing_an_expert_output_removes_its_contribution(demo):
    ids = demo.tokenize(TEXT)
    layer = 2
    _, cache, rows = demo.run_with_cache(ids, return_rows=True)
    expert = int(cache[f"blocks.{layer}.moe.hook_expert_ids"][-1, 0])  # the last token's first choice
    name = f"blocks.{layer}.moe.experts.{expert}.hook_out"
    seen = []

    def zero(out, info):  # returns a replacement instead of writing in place
        seen.append((info.expert, list(info.rows)))
        return np.zeros_like(out)

    got = demo.run_with_hooks(ids, fwd_hooks=[(name, zero)])
    assert seen == [(expert, rows[name])]
    # The same change made by hand at the MoE output: moe_out minus that expert's rows.
    delta = -cache[name]

    def subtract(moe, info):
        moe[rows[name]] += delta

    ref = demo.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.hook_moe_out", subtract)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    assert np.abs(got - demo.logits(ids)).max() > 1e-3


def test_hook_errors_propagate(demo):
    def bad(x, info):
        raise KeyError("from the hook")

    with pytest.raises(KeyError, match="from the hook"):
        demo.run_with_hooks(TEXT, fwd_hooks=[("blocks.0.hook_attn_out", bad)])
    with pytest.raises(moedit.InputError, match="returned array has shape"):
        demo.run_with_hooks(TEXT, fwd_hooks=[("blocks.0.hook_attn_out", lambda x, i: np.zeros((1, 1)))])
    np.testing.assert_array_equal(demo.logits(TEXT), demo.logits(demo.tokenize(TEXT)))


def test_dlpack_to_torch(demo):
    torch = pytest.importorskip("torch")
    logits = demo.logits(TEXT)
    t = moedit.to_torch(logits)
    assert t.dtype == torch.float32 and tuple(t.shape) == logits.shape
    assert t.data_ptr() == logits.ctypes.data  # shared memory, not a copy
