"""The binding's forward equals the CLI's, bit for bit: logits, routing, tokens, generation; errors carry its messages."""
import numpy as np
import pytest

import moedit
from conftest import DEMO, FIXTURES

IDS = [5, 17, 3, 9, 1, 42, 7]
MODELS = [FIXTURES / n for n in ("qwen2_moe", "olmoe", "mixtral_gqa", "deepseek_v3", "granitemoe")] + [DEMO]


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_logits_equal_the_cli_bit_for_bit(cli, path):
    ref = cli.json("logits", path, "--ids", ",".join(map(str, IDS)))
    model = moedit.Model(str(path))
    got = model.logits(IDS)
    assert got.dtype == np.float32 and got.shape == (len(IDS), model.vocab_size)
    np.testing.assert_array_equal(bits(got), bits(np.array(ref["logits"])))
    # Routing: the expert choices of every MoE layer, as the CLI prints them.
    _, cache = model.run_with_cache(IDS, names_filter=lambda n: "hook_expert_" in n)
    assert [r["layer"] for r in ref["routing"]] == model.moe_layers
    for r in ref["routing"]:
        l = r["layer"]
        np.testing.assert_array_equal(cache[f"blocks.{l}.moe.hook_expert_ids"], np.array(r["expert_ids"]))
        np.testing.assert_array_equal(bits(cache[f"blocks.{l}.moe.hook_expert_weights"]),
                                      bits(np.array(r["expert_weights"])))


def test_tokenize_decode_generate_equal_the_cli(cli, demo):
    text = "The mother tongue of Danielle Darrieux is"
    ids = demo.tokenize(text)
    assert ids == cli.json("tokenize", DEMO, "--text", text)["ids"]
    assert demo.decode(ids) == text
    ref = cli.json("generate", DEMO, "--prompt", text, "-n", "6")
    assert ref["prompt_ids"] == ids
    assert demo.generate(ids, max_new_tokens=6) == ref["ids"]
    assert demo.generate(text, max_new_tokens=6) == ref["text"]
    sampled = cli.json("generate", DEMO, "--prompt", text, "-n", "6", "--top-k", "5", "--seed", "3")
    assert demo.generate(ids, max_new_tokens=6, top_k=5, seed=3) == sampled["ids"]


def cli_error(r):
    assert r.returncode == 2, r.stderr
    prefix = "moedit: error: "
    assert r.stderr.startswith(prefix), r.stderr
    return r.stderr[len(prefix):].strip()


def test_bad_path_raises_with_the_cli_message(cli, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(moedit.InputError) as e:
        moedit.Model(str(missing))
    assert str(e.value) == cli_error(cli.run("logits", missing, "--ids", "1", check=False))
    assert isinstance(e.value, ValueError)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(moedit.InputError) as e:
        moedit.Model(str(tmp_path / "broken"))
    assert str(e.value) == cli_error(cli.run("logits", tmp_path / "broken", "--ids", "1", check=False))


def test_bad_token_id_raises_with_the_cli_message(cli, demo):
    with pytest.raises(moedit.InputError) as e:
        demo.logits([1, 100000])
    assert str(e.value) == cli_error(cli.run("logits", DEMO, "--ids", "1,100000", check=False))


def test_unknown_device_is_an_input_error():
    with pytest.raises(moedit.InputError, match="unknown device 'tpu'"):
        moedit.Model(str(DEMO), device="tpu")


def test_bf16_on_the_cpu_is_an_input_error():
    with pytest.raises(moedit.InputError, match="precision bf16: .*computes in fp32"):
        moedit.Model(str(DEMO), device="cpu", precision="bf16")
    with pytest.raises(moedit.InputError, match="unknown precision 'fp8'"):
        moedit.Model(str(DEMO), precision="fp8")


def test_the_package_ships_type_stubs():
    import pathlib

    pkg = pathlib.Path(moedit.__file__).parent
    stub = (pkg / "_moedit.pyi").read_text()
    assert (pkg / "py.typed").exists()
    for name in ("class Model", "def run_with_cache", "def run_with_hooks", "def trace", "def evaluate", "def edit"):
        assert name in stub, name
