#!/usr/bin/env python3
"""Generate the tiny MoE reference fixtures in tests/fixtures/models/ with HF transformers.

HOW TO RUN (from the repository root; ~1-2 minutes on one CPU, no GPU, no network):

    pip install -r tools/requirements.txt
    python3 tools/make_fixtures.py                      # all fixtures -> tests/fixtures/models/
    python3 tools/make_fixtures.py --only olmoe granitemoe
    python3 tools/make_fixtures.py --out /tmp/fx        # somewhere else

Last run with: torch 2.15.0 (CPU), transformers 5.23.0, safetensors 0.8.0, numpy 2.4.6, Python 3.11.
The generated files are checked in; tests never run Python.

WHAT IT WRITES, for every fixture <name> (table FIXTURES below):

  tests/fixtures/models/<name>/config.json
  tests/fixtures/models/<name>/model.safetensors                (or model-0000k-of-00002.safetensors
                                                                  + model.safetensors.index.json)
  tests/fixtures/models/<name>/reference.safetensors
  tests/fixtures/models/README.md                              (one line per fixture)

The checkpoint is a real HF checkpoint: a random-weight model is built with transformers, cast to the
fixture's storage dtype, written with `save_pretrained` (which in 5.23 writes the *Hub* layout: per-expert
tensors for Mixtral/Qwen/OLMoE, packed input_linear/output_linear for GraniteMoE) and, for the "fused"
fixtures, rewritten here into the transformers-v5 in-memory layout (experts.gate_up_proj [E,2I,H] =
concat(gate, up) per expert, experts.down_proj [E,H,I]).  config.json is what save_pretrained wrote, with the
edits listed per fixture (old `rope_theta` key vs v5 `rope_parameters`, dropped keys, ...).
The folder is then re-loaded with `AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
experts_implementation="eager")`; the loaded weights must equal the in-memory ones bit for bit, and all
references are computed from that loaded model after `.double()`.

reference.safetensors (written with safetensors.numpy, little-endian), for b = 0..n_seqs-1:
  input_ids.{b}       I32 [S_b]        random ids in [0, vocab) (lengths 9, 5, 13)
  logits.{b}          F32 [S_b, V]     HF float64 logits of sequence b run alone (batch 1), rounded to f32
  router_logits.{b}   F32 [L, S_b, E]  raw router logits x.W_gate^T per layer (zeros for dense layers)
  expert_ids.{b}      I32 [L, S_b, k]  selected experts, sorted ascending (-1 for dense layers)
  expert_weights.{b}  F32 [L, S_b, k]  routing weights HF multiplies the expert outputs with (after renorm /
                                       top-k softmax), in the same ascending-id order (0 for dense layers)
  greedy.{b}          I32 [16]         HF greedy continuation: generate(max_new_tokens=16, do_sample=False,
                                       use_cache=True, no EOS stop), in float64
  metadata: n_seqs, transformers, torch, k, n_layers, n_experts, vocab, model_type, moe_layers, layout,
            weights_dtype, seed

Note on "float64": HF's float64 path still rounds a few intermediates to fp32 internally (RMSNorm
normalises in fp32 before casting back, router softmax `.float()`, attention softmax dtype=float32, RoPE
cos/sin from fp32 frequencies, Granite router logits `.float()`), so references carry ~1e-7 relative noise
vs. a pure-f64 computation.  An independent pure-float64 re-implementation (indep_forward below, reading the
fixture files directly, written from shared/spec/architectures.md) is compared against HF for every
fixture; the max differences are printed.

Determinism: fixed seeds (torch.Generator per fixture, see FIXTURES[*]["seed"]); single-threaded torch.
A fixture whose routing or greedy argmax is too close to a tie (router probability gap between the k-th and
(k+1)-th expert <= ROUTER_MARGIN, or top-1/top-2 logit gap at a greedy step <= ARGMAX_MARGIN, checked on the
prompt and on the generated continuation) is re-drawn with the next seed (seed + 1009*attempt); the seed
actually used is stored in the metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

SEQ_LENS = (9, 5, 13)
N_NEW = 16
ROUTER_MARGIN = 2e-5   # min gap between k-th and (k+1)-th router probability (Granite: logit) per token
ARGMAX_MARGIN = 2e-4   # min gap between top-1 and top-2 logits at every greedy step
MAX_ATTEMPTS = 25

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# --------------------------------------------------------------------------------------------------------
# Fixture table.  `config` goes to AutoConfig.for_model; `cfg_edit` post-processes the config.json that
# save_pretrained wrote; `layout`: "hub" = as save_pretrained writes it, "fused" = v5 fused experts.
# Init: embeddings N(0, emb_std); lm_head N(0, lm_gain/sqrt(H)); routers N(0, router_gain/sqrt(H));
# other matrices N(0, gain/sqrt(fan_in)) (gain = qk_gain for q/k, out_gain for o_proj/down projections);
# biases N(0, 0.2); every RMSNorm weight U(0.7, 1.3) (final norm x final_norm_scale where given).
# --------------------------------------------------------------------------------------------------------
FIXTURES = [
    dict(
        name="mixtral_gqa",
        about="Mixtral, GQA 4q/2kv, top-2 of 6, per-expert Hub layout (block_sparse_moe.experts.E.w1/w2/w3), "
        "bf16 weights, config with old top-level `rope_theta` (1e6) and no head_dim key",
        model_type="mixtral", dtype="bfloat16", layout="hub", shards=1, seed=1001,
        config=dict(vocab_size=160, hidden_size=48, intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                    rope_theta=1e6, max_position_embeddings=256, rms_norm_eps=1e-5),
        cfg_edit=dict(rope_style="rope_theta", drop=["head_dim"]),
        init=dict(emb_std=0.5),
    ),
    dict(
        name="mixtral_fused",
        about="Mixtral, MHA 4/4, top-2 of 4, v5 fused layout (mlp.gate.weight, mlp.experts.gate_up_proj/down_proj), "
        "f32, sliding_window=4 (honoured by eager attention), v5 `rope_parameters` (theta 5e5), head_dim: null",
        model_type="mixtral", dtype="float32", layout="fused", shards=1, seed=2002,
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                    rope_theta=5e5, sliding_window=4, max_position_embeddings=128, rms_norm_eps=1e-5),
        cfg_edit=dict(rope_style="rope_parameters"),
        init=dict(emb_std=0.5),
        checks=["sliding_window"],
    ),
    dict(
        name="qwen2_moe",
        about="Qwen2-MoE, MHA with q/k/v bias, shared expert (width 40) with sigmoid gate, top-3 of 8, "
        "norm_topk_prob=false, mlp_only_layers=[2] (layer 2 dense, width 48), per-expert layout, f16, "
        "old `rope_theta` (1e6)",
        model_type="qwen2_moe", dtype="float16", layout="hub", shards=1, seed=3003,
        config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                    shared_expert_intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
                    decoder_sparse_step=1, mlp_only_layers=[2], rope_theta=1e6, max_position_embeddings=256,
                    rms_norm_eps=1e-6),
        cfg_edit=dict(rope_style="rope_theta"),
        init=dict(emb_std=0.5),
    ),
    dict(
        name="qwen2_moe_fused_norm",
        about="Qwen2-MoE, GQA 4q/2kv with bias, shared expert, top-2 of 6, norm_topk_prob=true, "
        "decoder_sparse_step=2 (layers 1,3 MoE; 0,2 dense), fused layout, bf16, sharded into 2 files + "
        "model.safetensors.index.json, `rope_parameters` (theta 1e6)",
        model_type="qwen2_moe", dtype="bfloat16", layout="fused", shards=2, seed=4004,
        config=dict(vocab_size=112, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                    shared_expert_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                    decoder_sparse_step=2, rope_theta=1e6, max_position_embeddings=256, rms_norm_eps=1e-6),
        cfg_edit=dict(rope_style="rope_parameters"),
        init=dict(emb_std=0.5),
    ),
    dict(
        name="qwen3_moe",
        about="Qwen3-MoE, per-head q/k RMSNorm, head_dim=16 != hidden/heads=8, GQA 4q/2kv, top-4 of 8, "
        "norm_topk_prob=true, mlp_only_layers=[0] (dense width 48), per-expert layout, bf16, Hub-style "
        "config (`num_experts`, old `rope_theta` 1e6)",
        model_type="qwen3_moe", dtype="bfloat16", layout="hub", shards=1, seed=5005,
        config=dict(vocab_size=144, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    num_experts=8, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
                    mlp_only_layers=[0], rope_theta=1e6, max_position_embeddings=256, rms_norm_eps=1e-6),
        cfg_edit=dict(rope_style="rope_theta", rename={"num_local_experts": "num_experts"}),
        init=dict(emb_std=0.5),
    ),
    dict(
        name="qwen3_moe_nonorm",
        about="Qwen3-MoE, per-head q/k norm, head_dim=12 != 48/6, GQA 6q/2kv, top-2 of 6, norm_topk_prob=false, "
        "all layers MoE, fused layout, f16, config exactly as v5 writes it (`num_local_experts`, "
        "`rope_parameters` theta 2e4)",
        model_type="qwen3_moe", dtype="float16", layout="fused", shards=1, seed=6006,
        config=dict(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                    num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, rope_theta=2e4,
                    max_position_embeddings=256, rms_norm_eps=1e-6),
        cfg_edit=dict(rope_style="rope_parameters"),
        init=dict(emb_std=0.5),
    ),
    dict(
        name="olmoe",
        about="OLMoE, q/k RMSNorm over the whole projection, MHA, top-2 of 8, norm_topk_prob=false, f32, "
        "per-expert layout, config WITHOUT rms_norm_eps (HF default 1e-5; small embeddings make eps "
        "matter), old integer `rope_theta` 10000",
        model_type="olmoe", dtype="float32", layout="hub", shards=1, seed=7007,
        config=dict(vocab_size=100, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                    norm_topk_prob=False, rope_theta=10000.0, max_position_embeddings=256,
                    eos_token_id=None, pad_token_id=1),
        cfg_edit=dict(rope_style="rope_theta_int", drop=["rms_norm_eps"]),
        init=dict(emb_std=0.01),
        checks=["eps"],
    ),
    dict(
        name="olmoe_clip",
        about="OLMoE with clip_qkv=1.25 (clips a fraction of q, k and v entries), top-2 of 4, fused layout, bf16, "
        "`rope_parameters` (theta 1e4)",
        model_type="olmoe", dtype="bfloat16", layout="fused", shards=1, seed=8008,
        config=dict(vocab_size=96, hidden_size=48, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                    norm_topk_prob=False, clip_qkv=1.25, rope_theta=10000.0, max_position_embeddings=256,
                    rms_norm_eps=1e-5, eos_token_id=None, pad_token_id=1),
        cfg_edit=dict(rope_style="rope_parameters"),
        init=dict(emb_std=0.5, v_gain=1.5),
        checks=["clip"],
    ),
    dict(
        name="granitemoe",
        about="GraniteMoE, tied embeddings (no lm_head.weight), embedding_multiplier 6, residual_multiplier 0.3, "
        "attention_multiplier 0.1, logits_scaling 4, router = top-k on fp32 logits then softmax over k, "
        "packed input_linear/output_linear + router.layer, GQA 6q/2kv, top-2 of 6, bf16, "
        "`rope_parameters` (theta 1e7)",
        model_type="granitemoe", dtype="bfloat16", layout="hub", shards=1, seed=9009,
        config=dict(vocab_size=128, hidden_size=48, intermediate_size=24, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                    tie_word_embeddings=True, embedding_multiplier=6.0, residual_multiplier=0.3,
                    attention_multiplier=0.1, logits_scaling=4.0, rope_theta=1e7, max_position_embeddings=256,
                    rms_norm_eps=1e-6),
        cfg_edit=dict(rope_style="rope_parameters"),
        # tied embeddings: a large embedding makes every continuation repeat its last token (self-similarity),
        # so the embedding is small, layer outputs large, and the final norm scales the logits back up
        init=dict(emb_std=0.03, out_gain=6.0, final_norm_scale=40.0),
        checks=["multipliers"],
    ),
    # ---- DeepSeek (MLA attention, yarn RoPE, ungated shared experts, first_k_dense_replace) ----
    dict(
        name="deepseek_v2",
        about="DeepSeek-V2(-Lite) style: MLA with plain q_proj (q_lora_rank null), kv_lora 16, nope/rope/v head dims "
        "8/8/12, interleaved-pair RoPE with yarn (factor 4, mscale = mscale_all_dim = 0.707: softmax scale "
        "correction), softmax `greedy` router top-3 of 8, 2 ungated shared experts, first_k_dense_replace=1 "
        "(layer 0 dense), per-expert layout, bf16, Hub-style `rope_scaling`",
        model_type="deepseek_v2", dtype="bfloat16", layout="hub", shards=1, seed=10010,
        config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                    n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1, topk_method="greedy",
                    n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                    max_position_embeddings=256, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                         original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                                         mscale=0.707, mscale_all_dim=0.707)),
        cfg_edit=dict(rope_style="rope_scaling"),
        init=dict(emb_std=0.5),
    ),
    dict(
        name="deepseek_v2_group",
        about="DeepSeek-V2 style: MLA with q_lora_rank 12 (q_a_proj, q_a_layernorm, q_b_proj), "
        "`group_limited_greedy` (4 groups of 3, keep 2; group score = max), top-3 of 12, "
        "routed_scaling_factor 1.75, 1 shared expert, yarn factor 8 with mscale 1 / mscale_all_dim 0.8, "
        "first_k_dense_replace=1, f32, v5 `rope_parameters`",
        model_type="deepseek_v2", dtype="float32", layout="hub", shards=1, seed=11011,
        config=dict(vocab_size=112, hidden_size=32, intermediate_size=40, moe_intermediate_size=10,
                    num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=12,
                    kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=8, n_routed_experts=12,
                    n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1,
                    topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.75,
                    norm_topk_prob=False, max_position_embeddings=256, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                         original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0,
                                         mscale=1.0, mscale_all_dim=0.8)),
        cfg_edit=dict(rope_style="keep"),
        init=dict(emb_std=0.5),
    ),
    dict(
        name="deepseek_v3",
        about="DeepSeek-V3 style: MLA with q_lora_rank 12, sigmoid router with e_score_correction_bias (F32, used "
        "for selection only), `noaux_tc` (4 groups of 4, keep 2, group score = top-2 sum), top-4 of 16, "
        "norm_topk_prob=true, routed_scaling_factor 2.5, 1 shared expert, first_k_dense_replace=1, yarn factor 4 "
        "(mscale = mscale_all_dim = 1), rope_interleave=true, bf16",
        model_type="deepseek_v3", dtype="bfloat16", layout="hub", shards=1, seed=12012,
        config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=8,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=12,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=16,
                    n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2,
                    routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
                    max_position_embeddings=256, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                         original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                                         mscale=1.0, mscale_all_dim=1.0)),
        cfg_edit=dict(rope_style="rope_scaling", extra={"topk_method": "noaux_tc", "scoring_func": "sigmoid"}),
        init=dict(emb_std=0.5, router_bias_std=0.05),
    ),
    dict(
        name="deepseek_v3_fp8",
        about="DeepSeek-V3 style with FP8 weights: every Linear weight of attention, experts, shared and dense MLPs "
        "stored F8_E4M3 with an F32 `weight_scale_inv` per 8x8 block (quantization_config.weight_block_size "
        "[8, 8]; reference = HF on the dequantised weights), plain q_proj, rope_interleave=false (rotate-half), "
        "2 shared experts, noaux_tc 2 groups of 4 keep 1, top-2 of 8, norm_topk_prob=false, "
        "first_k_dense_replace=2, f32 otherwise",
        model_type="deepseek_v3", dtype="float32", layout="hub", shards=1, seed=13013,
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                    num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
                    kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                    n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=2, n_group=2, topk_group=1,
                    routed_scaling_factor=1.5, norm_topk_prob=False, rope_interleave=False,
                    max_position_embeddings=256, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=2.0,
                                         original_max_position_embeddings=128, beta_fast=32.0, beta_slow=1.0,
                                         mscale=1.0, mscale_all_dim=1.0)),
        cfg_edit=dict(rope_style="rope_scaling", extra={"topk_method": "noaux_tc", "scoring_func": "sigmoid"}),
        init=dict(emb_std=0.5, router_bias_std=0.05),
        fp8=dict(block=[8, 8]),
    ),
]

DEEPSEEK = ("deepseek_v2", "deepseek_v3", "deepseek")


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def family_router(model_type: str) -> str:
    return {"mixtral": "softmax_renorm", "qwen2_moe": "softmax", "qwen3_moe": "softmax", "olmoe": "softmax",
            "granitemoe": "topk_softmax", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek",
            "deepseek": "deepseek"}[model_type]


def init_weights(model, cfg, gen: torch.Generator, init: dict) -> None:
    """Overwrite every parameter with deterministic, deliberately large random values (float64 draw)."""
    H = cfg.hidden_size
    emb_std = init.get("emb_std", 0.5)
    lm_gain = init.get("lm_gain", 4.0)
    router_gain = init.get("router_gain", 3.0)
    qk_gain = init.get("qk_gain", 1.5)
    v_gain = init.get("v_gain", 1.0)
    out_gain = init.get("out_gain", 1.0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is not listed separately
            shape = tuple(p.shape)
            if name.endswith("embed_tokens.weight"):
                t = torch.randn(shape, generator=gen, dtype=torch.float64) * emb_std
            elif name == "lm_head.weight":
                t = torch.randn(shape, generator=gen, dtype=torch.float64) * (lm_gain / math.sqrt(H))
            elif "norm" in name:  # input/post_attention_layernorm, model.norm, q_norm, k_norm
                t = 0.7 + 0.6 * torch.rand(shape, generator=gen, dtype=torch.float64)
                if name == "model.norm.weight":
                    t = t * init.get("final_norm_scale", 1.0)
            elif name.endswith(".bias") and "correction" not in name:
                t = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.2
            elif name.endswith("mlp.gate.weight") or name.endswith("router.weight"):
                t = torch.randn(shape, generator=gen, dtype=torch.float64) * (router_gain / math.sqrt(H))
            elif name.endswith("shared_expert_gate.weight"):
                t = torch.randn(shape, generator=gen, dtype=torch.float64) * (1.5 / math.sqrt(H))
            else:
                gain = 1.0
                if any(n in name for n in ("q_proj", "k_proj", "q_b_proj", "kv_b_proj")):
                    gain = qk_gain
                elif "v_proj" in name:
                    gain = v_gain
                elif "o_proj" in name or "down_proj" in name:
                    gain = out_gain
                t = torch.randn(shape, generator=gen, dtype=torch.float64) * (gain / math.sqrt(shape[-1]))
            p.copy_(t.to(p.dtype))
        for name, b in model.named_buffers():  # DeepSeek-V3's selection bias: small, so selection != ranking
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * init.get("router_bias_std", 0.0))


_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def hub_to_fused(sd: dict) -> dict:
    """Per-expert Hub tensors -> transformers-v5 fused layout (Mixtral: block_sparse_moe -> mlp)."""
    out, experts = {}, {}
    for k, v in sd.items():
        m = _EXPERT_RE.match(k)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[m.group(4)] = v
            continue
        out[k.replace(".block_sparse_moe.", ".mlp.")] = v
    for prefix, per in experts.items():
        n = len(per)
        assert sorted(per) == list(range(n))
        g = [per[e].get("gate_proj", per[e].get("w1")) for e in range(n)]
        u = [per[e].get("up_proj", per[e].get("w3")) for e in range(n)]
        d = [per[e].get("down_proj", per[e].get("w2")) for e in range(n)]
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([g[e], u[e]], 0) for e in range(n)])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack(d)
    return out


def canonical_header(path: str) -> None:
    """safetensors serialises `__metadata__` from a hash map (random key order per run); rewrite the header
    with sorted keys, same byte length, so regenerated files are byte-identical.  Data is untouched."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        hdr = json.loads(raw)
        if "__metadata__" in hdr:
            hdr["__metadata__"] = dict(sorted(hdr["__metadata__"].items()))
        new = json.dumps(hdr, separators=(",", ":")).encode()
        assert len(new) <= n
        f.seek(8)
        f.write(new + b" " * (n - len(new)))
    with safetensors.safe_open(path, "np") as fh:  # still a valid file
        assert fh.metadata() == hdr.get("__metadata__")


def write_weights(sd: dict, folder: str, shards: int) -> list[str]:
    meta = {"format": "pt"}
    sd = {k: v.contiguous() for k, v in sorted(sd.items())}
    if shards == 1:
        safetensors.torch.save_file(sd, os.path.join(folder, "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    # split by cumulative byte size into `shards` files, keeping tensor order stable
    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    total = sum(sizes.values())
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    groups, acc = [dict() for _ in range(shards)], 0
    for k, v in sd.items():
        idx = min(shards - 1, int(acc * shards // total))
        groups[idx][k] = v
        acc += sizes[k]
    weight_map = {}
    for name, grp in zip(names, groups):
        assert grp, "empty shard"
        safetensors.torch.save_file(grp, os.path.join(folder, name), metadata=meta)
        for k in grp:
            weight_map[k] = name
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")
    return names + ["model.safetensors.index.json"]


def edit_config(c: dict, edit: dict) -> dict:
    c = dict(c)
    style = edit.get("rope_style", "rope_parameters")
    theta = c["rope_parameters"]["rope_theta"]
    assert style in ("rope_scaling", "keep") or c["rope_parameters"].get("rope_type", "default") == "default"
    if style == "rope_scaling":  # Hub (remote-code) style: top-level rope_theta, rope_scaling {"type": ...}
        rp = dict(c.pop("rope_parameters"))
        rp.pop("rope_theta")
        rp["type"] = rp.pop("rope_type")
        c["rope_theta"] = float(theta)
        c["rope_scaling"] = dict(sorted(rp.items()))
    c.update(edit.get("extra", {}))
    if style in ("rope_theta", "rope_theta_int"):
        c.pop("rope_parameters")
        c["rope_theta"] = int(theta) if style == "rope_theta_int" else float(theta)
    for k in edit.get("drop", []):
        c.pop(k, None)
    for a, b in edit.get("rename", {}).items():
        if a in c:
            c[b] = c.pop(a)
    return dict(sorted(c.items()))


def load_folder(folder: str):
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", experts_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not bad and not info.get("error_msgs"), f"{folder}: loading info {info}"
    return model.eval()


def routers_of(model):
    """(layer index, router module) for every MoE router; the router returns (logits, weights, indices)."""
    out = []
    for name, mod in model.named_modules():
        if type(mod).__name__.lower().endswith("topkrouter"):
            out.append((int(re.search(r"layers\.(\d+)\.", name).group(1)), mod))
    return out


def own_topk_deepseek(model_type: str, logits: torch.Tensor, k: int, cfg, bias):
    """DeepSeek routers from shared/spec/architectures.md §6 (fp32): V2 softmax, greedy or group-limited (group
    score = max, other groups -> 0); V3 sigmoid + selection bias, noaux_tc (group score = top-2 sum, other groups
    -> -inf), weights from the unbiased scores, renormalised if norm_topk_prob, x routed_scaling_factor.
    The gap is the smaller of the k-th/(k+1)-th selection-score gap and the group-selection gap."""
    z = logits.float()
    E = z.shape[-1]
    v3 = model_type == "deepseek_v3"
    s = z.sigmoid() if v3 else torch.softmax(z, -1, dtype=torch.float)
    sel = s + bias.float() if v3 else s.clone()
    method = "noaux_tc" if v3 else cfg.topk_method
    ggap = torch.full_like(sel[:, 0], float("inf")).double()
    if method != "greedy":
        G = cfg.n_group
        grp = sel.view(-1, G, E // G)
        gs = grp.topk(2, -1).values.sum(-1) if v3 else grp.max(-1).values
        keep = gs.topk(cfg.topk_group, -1).indices
        mask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, keep, True)
        sel = sel.masked_fill(~mask.repeat_interleave(E // G, 1), float("-inf") if v3 else 0.0)
        if G > cfg.topk_group:
            g = gs.double().sort(-1, descending=True).values
            ggap = g[:, cfg.topk_group - 1] - g[:, cfg.topk_group]
    idx = sel.topk(k, -1).indices
    w = s.gather(1, idx)
    if v3 and cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor
    srt = sel.double().sort(-1, descending=True).values
    gap = torch.minimum(srt[:, k - 1] - srt[:, k], ggap)
    return idx, w, gap


def own_topk(model_type: str, logits: torch.Tensor, k: int, norm_topk_prob: bool):
    """Top-k exactly as the family's router in transformers 5.23 (fp32 softmax / Granite fp32 logits)."""
    if family_router(model_type) == "topk_softmax":
        z = logits.float()
        vals, idx = z.topk(k, dim=-1)
        w = torch.softmax(vals, dim=-1)
        ranked = z
    else:
        p = torch.softmax(logits, dim=-1, dtype=torch.float)
        vals, idx = torch.topk(p, k, dim=-1)
        if family_router(model_type) == "softmax_renorm" or norm_topk_prob:
            vals = vals / vals.sum(dim=-1, keepdim=True)
        w = vals
        ranked = torch.softmax(logits.double(), dim=-1)
    srt = ranked.double().sort(dim=-1, descending=True).values
    gap = (srt[:, k - 1] - srt[:, k]) if srt.shape[-1] > k else torch.full_like(srt[:, 0], float("inf"))
    return idx, w, gap


@torch.no_grad()
def run_reference(model, ids: torch.Tensor, model_type: str):
    """One sequence through HF (float64 model).  Returns logits [S,V] and per-layer routing."""
    cfg = model.config
    L, k = cfg.num_hidden_layers, cfg.num_experts_per_tok
    E = cfg_num_experts(cfg)
    rec, mods = {}, dict(routers_of(model))
    hooks = [mod.register_forward_hook(lambda m, i, o, l=l: rec.__setitem__(l, o)) for l, mod in mods.items()]
    try:
        out = model(ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    S = ids.shape[0]
    rl = torch.zeros(L, S, E, dtype=torch.float64)
    eid = torch.full((L, S, k), -1, dtype=torch.int64)
    ew = torch.zeros(L, S, k, dtype=torch.float64)
    min_gap = float("inf")
    for l, (logits_l, w_l, idx_l) in rec.items():
        if family_router(model_type) == "deepseek":
            bias = getattr(mods[l], "e_score_correction_bias", torch.zeros(E))
            own_idx, own_w, gap = own_topk_deepseek(model_type, logits_l, k, cfg, bias)
            order_own, order_hf = own_idx.argsort(-1), idx_l.argsort(-1)
            assert torch.equal(own_idx.gather(-1, order_own), idx_l.gather(-1, order_hf)), "own top-k set != HF"
            assert torch.allclose(own_w.double().gather(-1, order_own), w_l.double().gather(-1, order_hf),
                                  rtol=1e-6, atol=0), "own routing weights != HF"
        else:
            own_idx, own_w, gap = own_topk(model_type, logits_l, k, bool(getattr(cfg, "norm_topk_prob", False)))
            assert torch.equal(own_idx.sort(-1).values, idx_l.sort(-1).values), "own top-k set != HF"
            assert torch.equal(own_w.double(), w_l.double()), "own routing weights != HF"
        min_gap = min(min_gap, gap.min().item())
        order = idx_l.argsort(dim=-1)
        rl[l] = logits_l.double()
        eid[l] = idx_l.gather(-1, order)
        ew[l] = w_l.double().gather(-1, order)
    return out.logits[0].double(), rl, eid, ew, min_gap, sorted(rec)


@torch.no_grad()
def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    model.generation_config.eos_token_id = None  # never stop early: always N_NEW tokens
    out = model.generate(ids[None], max_new_tokens=N_NEW, do_sample=False, use_cache=True, pad_token_id=0,
                         attention_mask=torch.ones_like(ids[None]))
    new = out[0, ids.shape[0]:]
    assert new.shape[0] == N_NEW
    # cross-check: naive argmax loop without cache
    seq = ids.clone()
    for _ in range(N_NEW):
        nxt = model(seq[None], use_cache=False).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt[None]])
    assert torch.equal(seq[ids.shape[0]:], new), "generate() != naive argmax loop"
    return new


# --------------------------------------------------------------------------------------------------------
# independent float64 forward from the fixture files (spec: shared/spec/architectures.md)
# --------------------------------------------------------------------------------------------------------
def read_tensors(folder: str) -> dict:
    idx = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    sd = {}
    for f in files:
        with safetensors.safe_open(os.path.join(folder, f), "pt") as fh:
            for k in fh.keys():
                sd[k] = fh.get_tensor(k).double()
    # FP8 checkpoints: W = fp8(W) * weight_scale_inv[i // br, j // bc]
    q = json.load(open(os.path.join(folder, "config.json"))).get("quantization_config") or {}
    br, bc = q.get("weight_block_size", (128, 128))
    for k in [k for k in sd if k.endswith("_scale_inv")]:
        s = sd.pop(k)
        w = sd[k[: -len("_scale_inv")]]
        sd[k[: -len("_scale_inv")]] = w * s.repeat_interleave(br, 0)[: w.shape[0]].repeat_interleave(bc, 1)[:, : w.shape[1]]
    return sd


def indep_forward(folder: str, ids: torch.Tensor):
    c = json.load(open(os.path.join(folder, "config.json")))
    mt = c["model_type"]
    sd = read_tensors(folder)
    H, nh = c["hidden_size"], c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or H // nh
    L, k = c["num_hidden_layers"], c["num_experts_per_tok"]
    eps = c.get("rms_norm_eps", 1e-5 if mt in ("mixtral", "olmoe") else 1e-6)
    theta = float(c["rope_theta"] if "rope_theta" in c else c["rope_parameters"]["rope_theta"])
    window = c.get("sliding_window") if mt == "mixtral" else None
    emb_mult = c.get("embedding_multiplier", 1.0) if mt == "granitemoe" else 1.0
    res_mult = c.get("residual_multiplier", 1.0) if mt == "granitemoe" else 1.0
    scale = c.get("attention_multiplier", 1.0) if mt == "granitemoe" else hd ** -0.5
    logit_div = c.get("logits_scaling", 1.0) if mt == "granitemoe" else 1.0
    clip = c.get("clip_qkv") if mt == "olmoe" else None
    norm_topk = True if mt == "mixtral" else bool(c.get("norm_topk_prob", False))

    def rms(x, w, e=None):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + (eps if e is None else e)))

    mla = mt in ("deepseek_v2", "deepseek_v3")
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rtype = rp.get("rope_type", rp.get("type", "default"))

    def mscale(f, m):
        return 0.1 * m * math.log(f) + 1.0 if f > 1 else 1.0

    rot_att, mla_scale = 1.0, None
    if mla:  # MLA: rotary dim = qk_rope_head_dim; softmax scale dq^-0.5 x mscale(F, mscale_all_dim)^2
        dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        hd = dr
        mla_scale = (dn + dr) ** -0.5
        if rtype != "default" and rp.get("mscale_all_dim"):
            mla_scale *= mscale(rp["factor"], rp["mscale_all_dim"]) ** 2

    def swiglu(x, g, u, d):
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T

    S = ids.shape[0]
    pos = torch.arange(S, dtype=torch.float64)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    if rtype == "yarn":  # shared/spec/architectures.md section 6, in float64
        F, L0 = rp["factor"], rp["original_max_position_embeddings"]
        bf, bs = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

        def corr(r):
            return hd * math.log(L0 / (r * 2 * math.pi)) / (2 * math.log(theta))

        low, high = max(math.floor(corr(bf)), 0), min(math.ceil(corr(bs)), hd - 1)
        high = high + 0.001 if low == high else high
        extra = 1 - ((torch.arange(hd // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        inv = inv / F * (1 - extra) + inv * extra
        ms, ms_all = rp.get("mscale"), rp.get("mscale_all_dim")
        rot_att = mscale(F, ms) / mscale(F, ms_all) if ms and ms_all else mscale(F, 1)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)  # [S, hd]
    cos, sin = ang.cos() * rot_att, ang.sin() * rot_att
    interleave = mt == "deepseek_v2" or c.get("rope_interleave", True)

    def rope_pairs(x):  # interleaved pairs (2i, 2i+1) rotated by angle i
        a, b = x[..., 0::2], x[..., 1::2]
        cs, sn = cos[:, : hd // 2], sin[:, : hd // 2]
        return torch.stack([a * cs - b * sn, a * sn + b * cs], -1).flatten(-2)

    def rope(x):  # [heads, S, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    i_idx, j_idx = torch.arange(S)[:, None], torch.arange(S)[None, :]
    visible = j_idx <= i_idx
    if window is not None:
        visible = visible & (j_idx > i_idx - window)

    def llama_attention(x, a):  # Mixtral/Qwen/OLMoE/Granite/DeepSeek-v1 attention -> o_proj output
        q, kk, v = (x @ sd[a + f"{n}_proj.weight"].T + sd.get(a + f"{n}_proj.bias", 0.0) for n in "qkv")
        if mt == "olmoe":  # whole-projection q/k norm, then optional clip
            q, kk = rms(q, sd[a + "q_norm.weight"]), rms(kk, sd[a + "k_norm.weight"])
            if clip is not None:
                q, kk, v = (t.clamp(-clip, clip) for t in (q, kk, v))
        q = q.view(S, nh, hd).transpose(0, 1)
        kk = kk.view(S, nkv, hd).transpose(0, 1)
        v = v.view(S, nkv, hd).transpose(0, 1)
        if mt == "qwen3_moe":  # per-head q/k norm
            q, kk = rms(q, sd[a + "q_norm.weight"]), rms(kk, sd[a + "k_norm.weight"])
        q, kk = rope(q), rope(kk)
        rep = nh // nkv
        kk, v = kk.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        sc = (q @ kk.transpose(1, 2)) * scale
        sc = sc.masked_fill(~visible, float("-inf"))
        att = torch.softmax(sc, -1) @ v  # [nh, S, hd]
        return att.transpose(0, 1).reshape(S, nh * hd) @ sd[a + "o_proj.weight"].T

    def mla_attention(x, a):  # DeepSeek-V2/V3 multi-head latent attention -> o_proj output
        if a + "q_a_proj.weight" in sd:
            q = rms(x @ sd[a + "q_a_proj.weight"].T, sd[a + "q_a_layernorm.weight"], 1e-6) @ sd[a + "q_b_proj.weight"].T
        else:
            q = x @ sd[a + "q_proj.weight"].T
        q = q.view(S, nh, dn + dr).transpose(0, 1)  # [nh, S, dq]
        ckv = x @ sd[a + "kv_a_proj_with_mqa.weight"].T
        r = ckv.shape[-1] - dr
        lat = rms(ckv[:, :r], sd[a + "kv_a_layernorm.weight"], 1e-6)
        kv = (lat @ sd[a + "kv_b_proj.weight"].T).view(S, nh, dn + dv).transpose(0, 1)
        rot = rope_pairs if interleave else rope
        qf = torch.cat([q[..., :dn], rot(q[..., dn:])], -1)
        kf = torch.cat([kv[..., :dn], rot(ckv[:, r:]).expand(nh, S, dr)], -1)
        sc = (qf @ kf.transpose(1, 2)) * mla_scale
        sc = sc.masked_fill(~visible, float("-inf"))
        att = torch.softmax(sc, -1) @ kv[..., dn:]  # [nh, S, dv]
        return att.transpose(0, 1).reshape(S, nh * dv) @ sd[a + "o_proj.weight"].T

    def route_ds(z, m):  # DeepSeek routers (spec section 6 / section 8)
        E = z.shape[-1]
        v3 = mt == "deepseek_v3"
        sc = torch.sigmoid(z) if v3 else torch.softmax(z, -1)
        sel = sc + sd[m + "gate.e_score_correction_bias"] if v3 else sc.clone()
        method = "noaux_tc" if v3 else c.get("topk_method", "greedy")
        if method != "greedy":
            G, kg = c["n_group"], c["topk_group"]
            grp = sel.view(S, G, E // G)
            gs = grp.topk(2, -1).values.sum(-1) if v3 else grp.max(-1).values
            mask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(kg, -1).indices, True)
            sel = sel.masked_fill(~mask.repeat_interleave(E // G, 1), float("-inf") if v3 else 0.0)
        idx = sel.topk(k, -1).indices
        w = sc.gather(1, idx)
        rsf = c.get("routed_scaling_factor", 1.0)
        if v3:
            w = w / (w.sum(-1, keepdim=True) + 1e-20) if norm_topk else w
            return idx, w * rsf
        if norm_topk and k > 1:  # remote v1/V2 code: renormalise instead of scaling
            return idx, w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * rsf

    def ffn(x, m):  # -> (output, routing or None)
        wr = sd.get(m + "gate.weight", sd.get(m + "router.layer.weight"))
        if wr is None:  # dense layer
            return swiglu(x, sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"], sd[m + "down_proj.weight"]), None
        E = wr.shape[0]
        if m + "experts.gate_up_proj" in sd:
            gu, dn_ = sd[m + "experts.gate_up_proj"], sd[m + "experts.down_proj"]
        elif m + "input_linear.weight" in sd:
            gu, dn_ = sd[m + "input_linear.weight"], sd[m + "output_linear.weight"]
        else:
            names = ("w1", "w3", "w2") if mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            gu = torch.stack([torch.cat([sd[m + f"experts.{e}.{names[0]}.weight"],
                                         sd[m + f"experts.{e}.{names[1]}.weight"]]) for e in range(E)])
            dn_ = torch.stack([sd[m + f"experts.{e}.{names[2]}.weight"] for e in range(E)])
        I = dn_.shape[-1]
        z = x @ wr.T
        if mt == "granitemoe":
            vals, idx = z.topk(k, -1)
            w = torch.softmax(vals, -1)
        elif mt in DEEPSEEK:
            idx, w = route_ds(z, m)
        else:
            vals, idx = torch.softmax(z, -1).topk(k, -1)
            w = vals / vals.sum(-1, keepdim=True) if norm_topk else vals
        y = torch.zeros_like(x)
        for t in range(S):
            for j in range(k):
                e = idx[t, j].item()
                y[t] += w[t, j] * swiglu(x[t], gu[e, :I], gu[e, I:], dn_[e])
        if m + "shared_expert.gate_proj.weight" in sd:
            s = swiglu(x, sd[m + "shared_expert.gate_proj.weight"], sd[m + "shared_expert.up_proj.weight"],
                       sd[m + "shared_expert.down_proj.weight"])
            y = y + torch.sigmoid(x @ sd[m + "shared_expert_gate.weight"].T) * s
        if m + "shared_experts.gate_proj.weight" in sd:  # DeepSeek: ungated
            y = y + swiglu(x, sd[m + "shared_experts.gate_proj.weight"], sd[m + "shared_experts.up_proj.weight"],
                           sd[m + "shared_experts.down_proj.weight"])
        order = idx.argsort(-1)
        return y, (idx.gather(-1, order), w.gather(-1, order))

    h = sd["model.embed_tokens.weight"][ids] * emb_mult
    routing = {}
    for l in range(L):
        p = f"model.layers.{l}."
        a = p + "self_attn."
        x = rms(h, sd[p + "input_layernorm.weight"])
        if mla:
            h = h + mla_attention(x, a)
        else:
            h = h + res_mult * llama_attention(x, a)
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        m = p + ("block_sparse_moe." if any(kx.startswith(p + "block_sparse_moe.") for kx in sd) else "mlp.")
        y, r = ffn(x, m)
        if r is not None:
            routing[l] = r
        h = h + res_mult * y
    h = rms(h, sd["model.norm.weight"])
    wl = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return (h @ wl.T) / logit_div, routing


# --------------------------------------------------------------------------------------------------------
# one fixture
# --------------------------------------------------------------------------------------------------------
def build_attempt(fx: dict, seed: int, stage: str):
    """Build random model, write the checkpoint folder `stage`, return (in-memory model, files)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(fx["model_type"], **fx["config"])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    init_weights(model, cfg, gen, fx.get("init", {}))
    # model.to(bf16/f16) would also round the non-persistent RoPE `inv_freq` buffers, which from_pretrained
    # keeps in fp32 -- keep them fp32 so this in-memory model equals the re-loaded one.
    buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
    model = model.to(DTYPES[fx["dtype"]]).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                mod = model.get_submodule(n.rsplit(".", 1)[0])
                setattr(mod, n.rsplit(".", 1)[1], buffers[n])
    ids = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in SEQ_LENS]

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved_files = sorted(os.listdir(tmp))
        sd = {}
        for f in saved_files:
            if f.endswith(".safetensors"):
                sd.update(safetensors.torch.load_file(os.path.join(tmp, f)))
        saved_cfg = json.load(open(os.path.join(tmp, "config.json")))
    hub_names = sorted(sd)
    if fx["layout"] == "fused":
        sd = hub_to_fused(sd)
        mem = {k: v for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            mem.pop("lm_head.weight", None)
        assert sorted(mem) == sorted(sd), f"fused names differ: {set(mem) ^ set(sd)}"
        for kname in sd:
            assert torch.equal(sd[kname], mem[kname]), kname
    for kname, v in sd.items():  # DeepSeek-V3's selection bias is an fp32 buffer, as on the Hub
        assert v.dtype == (torch.float32 if kname.endswith("e_score_correction_bias") else DTYPES[fx["dtype"]]), kname
    if "fp8" in fx:
        sd, FP8_PARTS[stage] = quantize_fp8(sd, fx["fp8"]["block"])
    os.makedirs(stage, exist_ok=True)
    files = write_weights(sd, stage, fx["shards"])
    cfg_json = edit_config(saved_cfg, fx.get("cfg_edit", {}))
    with open(os.path.join(stage, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2)
        f.write("\n")
    if "fp8" in fx:  # the model is now the dequantised checkpoint (stage holds it in f32 until write_fp8)
        model = load_folder(stage)
    return model, ids, ["config.json"] + files, hub_names, saved_cfg


FP8_PARTS: dict = {}
_FP8_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")


def quantize_fp8(sd: dict, block) -> tuple[dict, dict]:
    """DeepSeek-V3 block FP8: every 2-D Linear weight W [R, C] (not embeddings, lm_head, norms, routers) becomes
    q = fp8_e4m3(W / s) with s = max|W_block| / 448 per (br x bc) block, stored with weight_scale_inv = s.
    Returns (sd with W replaced by the exact dequantisation q * s in f32, {name: (q, s)})."""
    br, bc = block
    out, parts = {}, {}
    for name, w in sd.items():
        if w.dim() != 2 or not name.endswith(".weight") or any(x in name for x in _FP8_SKIP):
            out[name] = w
            continue
        R, C = w.shape
        w32 = w.float()
        s = torch.zeros((R + br - 1) // br, (C + bc - 1) // bc, dtype=torch.float32)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                s[i, j] = w32[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max() / 448.0
        full = s.repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
        q = (w32 / full).to(torch.float8_e4m3fn)
        deq = q.float() * full
        assert torch.equal((deq / full).to(torch.float8_e4m3fn).float(), q.float())
        out[name] = deq.to(w.dtype)
        assert torch.equal(out[name].float(), deq), f"{name}: dequantised values not exact in the model dtype"
        parts[name] = (q, s)
    return out, parts


def write_fp8(stage: str, parts: dict, block) -> None:
    """Rewrites the (single-file) checkpoint in `stage` with the FP8 tensors + weight_scale_inv and adds
    quantization_config to config.json, as DeepSeek-V3 ships."""
    path = os.path.join(stage, "model.safetensors")
    sd = safetensors.torch.load_file(path)
    for name, (q, s) in parts.items():
        sd[name] = q
        sd[name + "_scale_inv"] = s
    safetensors.torch.save_file(dict(sorted(sd.items())), path, metadata={"format": "pt"})
    cp = os.path.join(stage, "config.json")
    c = json.load(open(cp))
    c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": list(block)}
    with open(cp, "w") as f:
        json.dump(dict(sorted(c.items())), f, indent=2)
        f.write("\n")


def special_checks(fx, folder, loaded, ids, log):
    with torch.no_grad():
        ref_logits = [loaded(x[None], use_cache=False).logits[0].double() for x in ids]
    for chk in fx.get("checks", []):  # each variant is re-loaded from the folder with one config override
        if chk == "sliding_window":
            w = loaded.config.sliding_window
            nowin = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                         experts_implementation="eager", sliding_window=None)
            nowin = nowin.double().eval()
            for b, x in enumerate(ids):
                lg = nowin(x[None], use_cache=False).logits[0].double()
                d = (lg - ref_logits[b]).abs().max(-1).values
                assert d[:w].max() < 1e-12, "window changed positions < window"
                if x.shape[0] > w:
                    assert d[w:].min() > 1e-4, f"sliding window has no effect at some position: {d}"
            log.append(f"sliding_window={w}: positions < {w} identical to full attention, all later positions "
                       f"differ (eager honours the window)")
        elif chk == "multipliers":
            parts = []
            for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
                other = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                             experts_implementation="eager", **{key: 1.0})
                other = other.double().eval()
                d = max((other(x[None], use_cache=False).logits[0].double() - ref_logits[b]).abs().max().item()
                        for b, x in enumerate(ids))
                assert d > 1e-2, f"{key} barely matters ({d})"
                parts.append(f"{key}={getattr(loaded.config, key)} (->1: {d:.3g})")
            log.append("multipliers matter, max |dlogit| when set to 1: " + ", ".join(parts))
        elif chk == "eps":
            other = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                         experts_implementation="eager", rms_norm_eps=1e-6)
            other = other.double().eval()
            assert loaded.config.rms_norm_eps == 1e-5
            d = max((other(x[None], use_cache=False).logits[0].double() - ref_logits[b]).abs().max().item()
                    for b, x in enumerate(ids))
            assert d > 1e-3, f"rms_norm_eps 1e-5 vs 1e-6 barely matters ({d})"
            log.append(f"rms_norm_eps absent -> HF uses 1e-5; using 1e-6 instead moves logits by up to {d:.3g}")
        elif chk == "clip":
            c = loaded.config.clip_qkv
            stats = {"q": [0, 0], "k": [0, 0], "v": [0, 0]}
            hooks = []
            for name, mod in loaded.named_modules():
                key = {"self_attn.q_norm": "q", "self_attn.k_norm": "k", "self_attn.v_proj": "v"}.get(
                    name.split("layers.")[-1].split(".", 1)[-1])
                if key:
                    def hk(m, i, o, key=key):  # runs before the in-place clamp_
                        stats[key][0] += int((o.abs() > c).sum())
                        stats[key][1] += o.numel()
                    hooks.append(mod.register_forward_hook(hk))
            for x in ids:
                loaded(x[None], use_cache=False)
            for h in hooks:
                h.remove()
            frac = {kk: v[0] / v[1] for kk, v in stats.items()}
            assert all(f > 0.01 for f in frac.values()), f"clip_qkv does not clip enough: {frac}"
            other = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                         experts_implementation="eager", clip_qkv=None)
            other = other.double().eval()
            d = max((other(x[None], use_cache=False).logits[0].double() - ref_logits[b]).abs().max().item()
                    for b, x in enumerate(ids))
            assert d > 1e-2
            log.append("clip_qkv=%g clips q %.1f%%, k %.1f%%, v %.1f%% of entries; without clipping logits move "
                       "by up to %.3g" % (c, 100 * frac["q"], 100 * frac["k"], 100 * frac["v"], d))
    return log


def make_fixture(fx: dict, out_root: str) -> dict:
    name = fx["name"]
    final = os.path.join(out_root, name)
    for attempt in range(MAX_ATTEMPTS):
        seed = fx["seed"] + 1009 * attempt
        stage = tempfile.mkdtemp(prefix=f"fx_{name}_")
        try:
            model, ids, files, hub_names, saved_cfg = build_attempt(fx, seed, stage)
            loaded = load_folder(stage)
            # loaded weights must be bit-identical to what we built (checks name mapping / fusion order)
            mem_sd, ld_sd = model.state_dict(), loaded.state_dict()
            assert sorted(mem_sd) == sorted(ld_sd)
            for kname in mem_sd:
                assert ld_sd[kname].dtype == mem_sd[kname].dtype and torch.equal(ld_sd[kname], mem_sd[kname]), kname
            loaded = loaded.double().eval()
            model = model.double().eval()
            cfg = loaded.config
            k, L = cfg.num_experts_per_tok, cfg.num_hidden_layers
            tensors, ok, min_rgap, min_lgap = {}, True, float("inf"), float("inf")
            moe_layers = None
            for b, x in enumerate(ids):
                logits, rl, eid, ew, gap, moe_layers = run_reference(loaded, x, fx["model_type"])
                # the in-memory model (never saved) gives the very same numbers
                assert torch.equal(model(x[None], use_cache=False).logits[0], logits)
                new = greedy(loaded, x)
                # margins on prompt + continuation
                full = torch.cat([x, new[:-1]])
                flog, _, _, _, gap2, _ = run_reference(loaded, full, fx["model_type"])
                top2 = flog[x.shape[0] - 1:].topk(2, -1).values
                lgap = (top2[:, 0] - top2[:, 1]).min().item()
                min_rgap, min_lgap = min(min_rgap, gap, gap2), min(min_lgap, lgap)
                if min(gap, gap2) <= ROUTER_MARGIN or lgap <= ARGMAX_MARGIN:
                    ok = False
                    break
                tensors[f"input_ids.{b}"] = x.numpy().astype("<i4")
                tensors[f"logits.{b}"] = logits.numpy().astype("<f4")
                tensors[f"router_logits.{b}"] = rl.numpy().astype("<f4")
                tensors[f"expert_ids.{b}"] = eid.numpy().astype("<i4")
                tensors[f"expert_weights.{b}"] = ew.numpy().astype("<f4")
                tensors[f"greedy.{b}"] = new.numpy().astype("<i4")
            if not ok:
                print(f"  {name}: seed {seed} too close to a tie (router gap {min_rgap:.2e}, "
                      f"logit gap {min_lgap:.2e}); re-drawing", flush=True)
                continue
            # non-degenerate greedy text: no constant continuation, >= 8 distinct tokens overall
            conts = [tensors[f"greedy.{b}"].tolist() for b in range(len(ids))]
            if min(len(set(c)) for c in conts) < 2 or len(set(sum(conts, []))) < 8:
                print(f"  {name}: seed {seed} greedy continuation degenerate {conts}; re-drawing", flush=True)
                continue
            # every layer's routing uses more than one expert combination
            for l in moe_layers:
                combos = {tuple(r) for b in range(len(ids)) for r in tensors[f"expert_ids.{b}"][l].tolist()}
                used = {e for cmb in combos for e in cmb}
                assert len(combos) >= 3 and len(used) >= min(cfg_num_experts(cfg), 4), (l, combos)
            if "fp8" in fx:  # the final checkpoint: FP8 + scales (the independent forward dequantises it)
                write_fp8(stage, FP8_PARTS.pop(stage), fx["fp8"]["block"])
            # independent float64 re-implementation from the written files
            max_dl, max_dw = 0.0, 0.0
            for b, x in enumerate(ids):
                lg, routing = indep_forward(stage, x)
                max_dl = max(max_dl, (lg - torch.from_numpy(tensors[f"logits.{b}"]).double()).abs().max().item())
                for l, (ii, ww) in routing.items():
                    assert np.array_equal(ii.numpy(), tensors[f"expert_ids.{b}"][l]), (b, l)
                    max_dw = max(max_dw, np.abs(ww.numpy() - tensors[f"expert_weights.{b}"][l]).max())
                assert sorted(routing) == moe_layers
            assert max_dl < 1e-4 and max_dw < 1e-5, (max_dl, max_dw)
            log = [f"independent f64 forward vs HF: max |dlogit| {max_dl:.2e}, max |dweight| {max_dw:.2e}"]
            log = special_checks(fx, stage, loaded, ids, log)
            meta = {"n_seqs": str(len(ids)), "transformers": transformers.__version__,
                    "torch": torch.__version__.split("+")[0], "k": str(k), "n_layers": str(L),
                    "n_experts": str(cfg_num_experts(cfg)), "vocab": str(cfg.vocab_size),
                    "model_type": fx["model_type"], "moe_layers": ",".join(map(str, moe_layers)),
                    "layout": fx["layout"], "weights_dtype": fx["dtype"], "seed": str(seed)}
            ref_path = os.path.join(stage, "reference.safetensors")
            safetensors.numpy.save_file(dict(sorted(tensors.items())), ref_path, metadata=meta)
            canonical_header(ref_path)
            files.append("reference.safetensors")
            if os.path.exists(final):
                shutil.rmtree(final)
            shutil.copytree(stage, final)
            os.chmod(final, 0o755)
            for f in files:
                os.chmod(os.path.join(final, f), 0o644)
            all_logits = np.concatenate([tensors[f"logits.{b}"] for b in range(len(ids))])
            return dict(name=name, fx=fx, files=files, seed=seed, moe_layers=moe_layers, cfg=cfg,
                        hub_names=hub_names, saved_cfg=saved_cfg, log=log, min_rgap=min_rgap, min_lgap=min_lgap,
                        logit_std=float(all_logits.std()),
                        size=sum(os.path.getsize(os.path.join(final, f)) for f in files))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    raise RuntimeError(f"{name}: no tie-free seed in {MAX_ATTEMPTS} attempts")


def cfg_num_experts(cfg) -> int:
    return (getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_local_experts", None)
            or getattr(cfg, "num_experts"))


def write_readme(out_root: str, results: list[dict]) -> None:
    lines = [
        "# Tiny MoE reference fixtures",
        "",
        "Random-weight checkpoints (real HF checkpoints: `AutoModelForCausalLM.from_pretrained` loads each folder)",
        "plus the outputs HF transformers computes for them in float64 (`reference.safetensors`: `input_ids.{b}`,",
        "`logits.{b}`, `router_logits.{b}` [L,S,E], `expert_ids.{b}` / `expert_weights.{b}` [L,S,k] sorted by",
        "expert id (-1 / 0 on dense layers), `greedy.{b}` (16 greedy tokens); b = 0..2, lengths 9, 5, 13).",
        f"Generated by `tools/make_fixtures.py` with transformers {transformers.__version__}, "
        f"torch {torch.__version__.split('+')[0]}; see that file's docstring for details.",
        "",
        "Regenerate (from the repository root): `python3 tools/make_fixtures.py` "
        "(deps: `pip install -r tools/requirements.txt`).",
        "",
        "| fixture | covers |",
        "|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r['name']}` | {r['fx']['about']} |")
    lines.append("")
    with open(os.path.join(out_root, "README.md"), "w") as f:
        f.write("\n".join(lines))


def sizes_str(cfg, fx) -> str:
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return (f"V{cfg.vocab_size} H{cfg.hidden_size} L{cfg.num_hidden_layers} "
            f"h{cfg.num_attention_heads}/{cfg.num_key_value_heads} d{hd} E{cfg_num_experts(cfg)} "
            f"k{cfg.num_experts_per_tok} I{inter}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                  "fixtures", "models"))
    ap.add_argument("--only", nargs="*", help="fixture names (default: all)")
    ap.add_argument("--verbose", action="store_true", help="print the tensor names save_pretrained wrote")
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out_root = os.path.normpath(args.out)
    os.makedirs(out_root, exist_ok=True)
    todo = [f for f in FIXTURES if not args.only or f["name"] in args.only]
    unknown = set(args.only or []) - {f["name"] for f in FIXTURES}
    if unknown:
        sys.exit(f"unknown fixture(s): {sorted(unknown)}")
    results = []
    for fx in todo:
        print(f"[{fx['name']}]", flush=True)
        r = make_fixture(fx, out_root)
        for line in r["log"]:
            print("  " + line)
        print(f"  seed {r['seed']}, moe layers {r['moe_layers']}, min router gap {r['min_rgap']:.3g}, "
              f"min greedy logit gap {r['min_lgap']:.3g}, logits std {r['logit_std']:.2f}")
        if args.verbose:
            print("  save_pretrained wrote:", [n for n in r["hub_names"] if ".layers." not in n or ".layers.0." in n])
        results.append(r)
    if not args.only:
        write_readme(out_root, results)
    print()
    hdr = f"{'fixture':22} {'model_type':11} {'layout':18} {'dtype':9} {'sizes':44} {'files':70} {'bytes':>8}"
    print(hdr)
    print("-" * len(hdr))
    total = 0
    for r in results:
        fx = r["fx"]
        layout = {"hub": "per-expert (hub)", "fused": "fused (v5)"}[fx["layout"]]
        if fx["model_type"] == "granitemoe":
            layout = "packed (hub)"
        files = ", ".join(r["files"])
        print(f"{r['name']:22} {fx['model_type']:11} {layout:18} {fx['dtype']:9} {sizes_str(r['cfg'], fx):44} "
              f"{files:70} {r['size']:>8}")
        total += r["size"]
    print(f"total bytes: {total}")
    for r in results:
        h = hashlib.sha256()
        for f in r["files"]:
            h.update(open(os.path.join(out_root, r["name"], f), "rb").read())
        print(f"sha256 {r['name']}: {h.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
