#!/usr/bin/env python3
"""Generate the DeepSeek-MoE v1 fixture (tests/fixtures/models/deepseek_v1) -- model_type "deepseek", the remote-code
family of deepseek-ai/deepseek-moe-16b-base and ai-sage/GigaChat-20B-A3B, which transformers does not ship.

HOW TO RUN (repository root, ~20 s on one CPU; same requirements as tools/make_fixtures.py):

    python3 tools/make_deepseek_v1_fixture.py [--out tests/fixtures/models]

Reference model. The v1 forward (shared/spec/architectures.md section 8) is Llama-2 attention + the DeepSeekMoE
block. The block, for norm_topk_prob=false and no routed_scaling_factor, is exactly transformers' DeepseekV2Moe with
topk_method "greedy" and routed_scaling_factor 1 (softmax router, top-k, ungated shared experts of width
n_shared_experts x moe_intermediate_size). So the reference is a transformers LlamaForCausalLM whose MLP modules at
the MoE layers (l >= first_k_dense_replace and l % moe_layer_freq == 0) are replaced by DeepseekV2Moe modules: every
number comes from transformers modules, run in float64, with generate() for the greedy continuations.
Cross-check: make_fixtures.indep_forward -- the pure-float64 re-implementation written from the spec, which also
serves the deepseek_v2/v3 fixtures -- is run on the written checkpoint (model_type "deepseek": Llama attention,
section-8 router) and must agree with the composite (logits to 1e-4, routing ids exactly, weights to 1e-5).

The checkpoint is written in the Hub (remote-code) layout: model.layers.N.mlp.gate.weight,
mlp.experts.E.{gate,up,down}_proj.weight, mlp.shared_experts.{gate,up,down}_proj.weight, dense layers
mlp.{gate,up,down}_proj.weight, config.json with architectures ["DeepseekForCausalLM"] and model_type "deepseek".
reference.safetensors has the format of tools/make_fixtures.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

NAME = "deepseek_v1"
ABOUT = ("DeepSeek-MoE v1 (remote code, model_type `deepseek`): Llama attention GQA 4q/2kv, softmax router top-3 "
         "of 8, norm_topk_prob=false, 2 ungated shared experts, first_k_dense_replace=1 and moe_layer_freq=2 "
         "(layers 2, 4 MoE; 0, 1, 3 dense), per-expert Hub layout, bf16; reference = transformers Llama with "
         "DeepseekV2Moe blocks (tools/make_deepseek_v1_fixture.py)")
CONFIG = dict(vocab_size=112, hidden_size=32, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=5,
              num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=2,
              num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=2, norm_topk_prob=False,
              scoring_func="softmax", rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
              attention_bias=False, tie_word_embeddings=False, hidden_act="silu", bos_token_id=100, eos_token_id=101)
SEED = 14014


def moe_layers(c: dict) -> list[int]:
    return [l for l in range(c["num_hidden_layers"])
            if l >= c["first_k_dense_replace"] and l % c["moe_layer_freq"] == 0]


def build(seed: int):
    c = CONFIG
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lcfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                       intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                       num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                       rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
                       max_position_embeddings=c["max_position_embeddings"], attention_bias=False,
                       tie_word_embeddings=False)
    lcfg._attn_implementation = "eager"
    model = LlamaForCausalLM(lcfg)
    mcfg = DeepseekV2Config(hidden_size=c["hidden_size"], n_routed_experts=c["n_routed_experts"],
                            num_experts_per_tok=c["num_experts_per_tok"],
                            moe_intermediate_size=c["moe_intermediate_size"], n_shared_experts=c["n_shared_experts"],
                            routed_scaling_factor=1.0, topk_method="greedy", norm_topk_prob=False,
                            num_attention_heads=c["num_attention_heads"])
    mcfg._experts_implementation = "eager"
    for l in moe_layers(c):
        model.model.layers[l].mlp = DeepseekV2Moe(mcfg)
    mf.init_weights(model, lcfg, gen, dict(emb_std=0.5))
    # keep the RoPE inv_freq buffer fp32 (as from_pretrained does); only parameters are stored in bf16
    buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
    model = model.to(torch.bfloat16)
    for n, b in buffers.items():
        setattr(model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1], b)
    ids = [torch.randint(0, c["vocab_size"], (n,), generator=gen) for n in mf.SEQ_LENS]
    return model, ids


def hub_state(model) -> dict:
    """Composite state dict -> remote-code Hub names (per-expert 2-D tensors)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("experts.gate_up_proj"):
            p, I = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :I].clone()
                out[f"{p}{e}.up_proj.weight"] = v[e, I:].clone()
        elif k.endswith("experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def attempt(seed: int, stage: str):
    model, ids = build(seed)
    os.makedirs(stage, exist_ok=True)
    sd = hub_state(model)
    safetensors.torch.save_file(dict(sorted(sd.items())), os.path.join(stage, "model.safetensors"),
                                metadata={"format": "pt"})
    cfg = dict(CONFIG, architectures=["DeepseekForCausalLM"], model_type="deepseek", torch_dtype="bfloat16")
    with open(os.path.join(stage, "config.json"), "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")
    model = model.double().eval()
    # what make_fixtures.run_reference reads from a DeepSeek config (its routers are the DeepseekV2Moe gates)
    model.config.update(dict(num_experts_per_tok=CONFIG["num_experts_per_tok"], topk_method="greedy",
                             n_routed_experts=CONFIG["n_routed_experts"], routed_scaling_factor=1.0,
                             norm_topk_prob=False))
    tensors, min_rgap, min_lgap = {}, float("inf"), float("inf")
    for b, x in enumerate(ids):
        logits, rl, eid, ew, gap, layers = mf.run_reference(model, x, "deepseek")
        assert layers == moe_layers(CONFIG)
        new = mf.greedy(model, x)
        flog, _, _, _, gap2, _ = mf.run_reference(model, torch.cat([x, new[:-1]]), "deepseek")
        top2 = flog[x.shape[0] - 1:].topk(2, -1).values
        min_lgap = min(min_lgap, (top2[:, 0] - top2[:, 1]).min().item())
        min_rgap = min(min_rgap, gap, gap2)
        tensors.update({f"input_ids.{b}": x.numpy().astype("<i4"), f"logits.{b}": logits.numpy().astype("<f4"),
                        f"router_logits.{b}": rl.numpy().astype("<f4"), f"expert_ids.{b}": eid.numpy().astype("<i4"),
                        f"expert_weights.{b}": ew.numpy().astype("<f4"), f"greedy.{b}": new.numpy().astype("<i4")})
    if min_rgap <= mf.ROUTER_MARGIN or min_lgap <= mf.ARGMAX_MARGIN:
        return None, f"too close to a tie (router gap {min_rgap:.2e}, logit gap {min_lgap:.2e})"
    conts = [tensors[f"greedy.{b}"].tolist() for b in range(len(ids))]
    if min(len(set(c)) for c in conts) < 2 or len(set(sum(conts, []))) < 8:
        return None, f"degenerate greedy continuation {conts}"
    # the spec-based float64 forward (make_fixtures.indep_forward, model_type "deepseek") agrees
    max_dl, max_dw = 0.0, 0.0
    for b, x in enumerate(ids):
        lg, routing = mf.indep_forward(stage, x)
        max_dl = max(max_dl, (lg - torch.from_numpy(tensors[f"logits.{b}"]).double()).abs().max().item())
        assert sorted(routing) == moe_layers(CONFIG)
        for l, (ii, ww) in routing.items():
            assert np.array_equal(ii.numpy(), tensors[f"expert_ids.{b}"][l]), (b, l)
            max_dw = max(max_dw, np.abs(ww.numpy() - tensors[f"expert_weights.{b}"][l]).max())
    assert max_dl < 1e-4 and max_dw < 1e-5, (max_dl, max_dw)
    meta = {"n_seqs": str(len(ids)), "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
            "k": str(CONFIG["num_experts_per_tok"]), "n_layers": str(CONFIG["num_hidden_layers"]),
            "n_experts": str(CONFIG["n_routed_experts"]), "vocab": str(CONFIG["vocab_size"]), "model_type": "deepseek",
            "moe_layers": ",".join(map(str, moe_layers(CONFIG))), "layout": "hub", "weights_dtype": "bfloat16",
            "seed": str(seed), "reference": "transformers LlamaForCausalLM + DeepseekV2Moe (float64)"}
    path = os.path.join(stage, "reference.safetensors")
    safetensors.numpy.save_file(dict(sorted(tensors.items())), path, metadata=meta)
    mf.canonical_header(path)
    return (max_dl, max_dw, min_rgap, min_lgap), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                  "fixtures", "models"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    for a in range(mf.MAX_ATTEMPTS):
        seed = SEED + 1009 * a
        stage = tempfile.mkdtemp(prefix="fx_deepseek_v1_")
        try:
            res, why = attempt(seed, stage)
            if res is None:
                print(f"  seed {seed}: {why}; re-drawing")
                continue
            final = os.path.join(os.path.normpath(args.out), NAME)
            if os.path.exists(final):
                shutil.rmtree(final)
            shutil.copytree(stage, final)
            print(f"[{NAME}] seed {seed}; spec f64 forward vs transformers composite: max |dlogit| {res[0]:.2e}, "
                  f"max |dweight| {res[1]:.2e}; min router gap {res[2]:.3g}, min greedy logit gap {res[3]:.3g}")
            print(f"| `{NAME}` | {ABOUT} |")
            return
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    raise SystemExit("no tie-free seed")


if __name__ == "__main__":
    main()
