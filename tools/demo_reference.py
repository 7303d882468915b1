#!/usr/bin/env python3
"""Writes HF transformers reference logits for the bundled demo model (models/moedit-demo).

Run from the repository root (deps: pip install -r tools/requirements.txt):

    python3 tools/demo_reference.py

It loads the checkpoint with AutoModelForCausalLM (eager attention, eager experts), converts it to float64 after
loading (so the stored bf16/f16 weights are used exactly), encodes a fixed set of prompts with the checkpoint's own
tokenizer.json through the `tokenizers` package, and writes tests/fixtures/demo/reference.safetensors:
  input_ids.{b}  I32 [S_b]     token ids of prompt b
  logits.{b}     F32 [S_b, V]  HF logits (float64 compute, rounded to f32)
  expert_ids.{b} I32 [L, S_b, k]  selected experts per MoE layer, sorted ascending
metadata: n_seqs, transformers version, and the prompts as JSON. The C++ test (tests/test_demo_model.cpp) checks
moedit's logits against these to 1e-5 of the largest |logit| and the expert sets exactly.
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "moedit-demo")
OUT = os.path.join(ROOT, "tests", "fixtures", "demo", "reference.safetensors")

PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "Toko Yasuda, the",
    "The Eiffel Tower is located in the city of",
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .",
]


def main():
    torch.manual_seed(0)
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="eager", experts_implementation="eager")
    model = model.double().eval()
    cfg = model.config
    k = cfg.num_experts_per_tok
    tensors = {}
    for b, p in enumerate(PROMPTS):
        ids = tok.encode(p).ids
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_router_logits=True)
        logits = out.logits[0].float().numpy()
        moe_logits = list(out.router_logits)  # one [S, E] per MoE layer, in layer order
        sel = []
        for layer in range(cfg.num_hidden_layers):
            sparse = layer not in cfg.mlp_only_layers and (layer + 1) % cfg.decoder_sparse_step == 0
            if not sparse:
                sel.append(np.full((len(ids), k), -1, dtype=np.int32))
                continue
            z = moe_logits.pop(0).reshape(len(ids), -1).double()
            top = torch.topk(torch.softmax(z, dim=-1), k, dim=-1).indices.sort(dim=-1).values
            sel.append(top.numpy().astype(np.int32))
        tensors[f"input_ids.{b}"] = np.array(ids, dtype=np.int32)
        tensors[f"logits.{b}"] = np.ascontiguousarray(logits.astype(np.float32))
        tensors[f"expert_ids.{b}"] = np.stack(sel).astype(np.int32)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"n_seqs": str(len(PROMPTS)), "transformers": transformers.__version__,
                                      "prompts": json.dumps(PROMPTS)})
    print(f"wrote {OUT} ({len(PROMPTS)} prompts)")


if __name__ == "__main__":
    sys.exit(main())
