#!/usr/bin/env python3
"""One router-tuning step and one expert fine-tuning (CEFT) step, written independently in PyTorch on Hugging Face
transformers with torch.optim.AdamW: the cross-check for moedit's training API (train/train.h, train/adamw.h;
issue 19).

Model: tests/fixtures/models/qwen2_moe in float64 (MoE layers 0, 1, 3 with a sigmoid-gated shared expert; layer 2
dense). Batch: BATCH, three prompt ‖ answer examples of different lengths, each run on its own (no padding).
Loss: HF's causal-LM loss with labels = -100 on the prompt tokens, i.e. the sum over answer tokens of
-log softmax(logits at the previous position)[token], divided by the number of answer tokens in the batch; no router
auxiliary loss. Gradients by autograd (top-k selection fixed, as autograd treats torch.topk).

Steps, each from the unchanged model, one torch.optim.AdamW(lr, betas, eps, weight_decay) step (amsgrad off):
  router  every MoE layer's mlp.gate.weight [E, H] trainable;
  ceft    two routed experts' gate [I, H], up [I, H], down [H, I] trainable: at MoE layers 0 and 1, the expert the
          batch's tokens are routed to most often (lowest id on a tie).
Trainable slices of fused parameters (transformers v5 stores experts.gate_up_proj [E, 2I, H]) are stepped as
leaves of their own, holding their slice of the autograd gradient, so nothing outside them changes or decays.

Writes tests/fixtures/train/qwen2_moe_train_step.safetensors (float64):
  batch.{i}.prompt, batch.{i}.answer (int64)
  loss [1]                    the batch loss before the step (the same for both steps)
  {step}.grad.{name}          the gradient of each trainable tensor
  {step}.{name}               the tensor after the step
names as moedit's ParamId::name(): layers.{l}.router, layers.{l}.experts.{e}.{gate,up,down}; metadata: lr, beta1,
beta2, eps, weight_decay (repr: exact doubles), ceft_experts ("l:e,l:e"), model, generator, versions.
tests/test_train.cpp (TrainReference) runs moedit's train_step (float) on the same batch and compares.
Command that wrote the committed fixture (repository root; torch 2.15.0, transformers 5.23.0):
    python3 tools/train_reference.py
--out DIR writes elsewhere. Only needs torch, transformers, safetensors, numpy (tools/requirements.txt); never run
by the tests.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rome_reference as rr  # noqa: E402  (fixture loading, expert views, routing)

ROOT = rr.ROOT
NAME = "qwen2_moe"
BATCH = [
    ([5, 17, 3, 58, 42, 7], [7, 1]),
    ([9, 2, 33], [34]),
    ([11, 12, 13, 14, 15, 16, 20, 21], [40, 41, 44]),
]
ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
CEFT_LAYERS = [0, 1]


def batch_loss(model):
    """HF's causal-LM loss over the batch's answer tokens (labels -100 on the prompts), examples run one by one."""
    total, count = 0.0, 0
    for prompt, answer in BATCH:
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        logits = model(ids).logits[0, :-1]  # position t predicts token t + 1
        total = total + torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
        count += len(answer)
    return total / count


def grad_of(view):
    """The autograd gradient of a parameter, or of a view into one (same shape, strides and offset in .grad)."""
    base = view if view._base is None else view._base
    assert base.grad is not None and base.grad.is_contiguous() and base.is_contiguous()
    return base.grad.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())


def most_routed_expert(model, layer):
    xs = torch.cat(rr.moe_inputs(model, layer, [p + a for p, a in BATCH]), 0)
    ids, _ = rr.router(rr.moe_block(model, layer), xs, model.config)
    counts = torch.bincount(ids.flatten(), minlength=rr.num_experts(model.config))
    return int(torch.argmax(counts))  # first maximum: the lowest id on a tie


def adamw_step(model, tensors):
    """tensors: {name: parameter or view}. Returns {name: (gradient, tensor after one AdamW step)}."""
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model)
    loss.backward()
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in tensors.items()}
    for n, t in tensors.items():
        leaves[n].grad = grad_of(t).detach().clone()
    opt = torch.optim.AdamW(list(leaves.values()), lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    opt.step()
    return float(loss.detach()), {n: (leaves[n].grad, leaves[n].detach()) for n in tensors}


def make_fixture(args):
    from safetensors.torch import save_file
    import transformers

    torch.manual_seed(0)
    model = rr.load_model(os.path.join(ROOT, "tests/fixtures/models", NAME), torch.float64)
    for p in model.parameters():
        p.requires_grad_(True)
    cfg = model.config
    moe_layers = [l for l in range(cfg.num_hidden_layers) if l not in cfg.mlp_only_layers]
    routers = {f"layers.{l}.router": rr.moe_block(model, l).gate.weight for l in moe_layers}
    experts = [(l, most_routed_expert(model, l)) for l in CEFT_LAYERS]
    ceft = {}
    for l, e in experts:
        gate, up, down = rr.expert_weights(rr.moe_block(model, l), e)
        for part, t in (("gate", gate), ("up", up), ("down", down)):
            ceft[f"layers.{l}.experts.{e}.{part}"] = t

    out = {}
    for i, (prompt, answer) in enumerate(BATCH):
        out[f"batch.{i}.prompt"] = torch.tensor(prompt, dtype=torch.int64)
        out[f"batch.{i}.answer"] = torch.tensor(answer, dtype=torch.int64)
    for step, tensors in (("router", routers), ("ceft", ceft)):
        loss, res = adamw_step(model, tensors)
        out["loss"] = torch.tensor([loss], dtype=torch.float64)
        for n, (g, w) in res.items():
            out[f"{step}.grad.{n}"] = g
            out[f"{step}.{n}"] = w
            moved = float((w - tensors[n].detach()).abs().max())
            print(f"{step} {n}: |grad| {float(g.norm()):.3e}, max |change| {moved:.3e}")
    print(f"loss {out['loss'].item()!r}, ceft experts {experts}")
    meta = {k: repr(v) for k, v in ADAMW.items()}
    meta.update({"ceft_experts": ",".join(f"{l}:{e}" for l, e in experts), "n_examples": str(len(BATCH)),
                 "model": f"tests/fixtures/models/{NAME}", "dtype": "float64", "generator": "tools/train_reference.py",
                 "transformers": transformers.__version__, "torch": torch.__version__})
    path = os.path.join(args.out or os.path.join(ROOT, "tests/fixtures/train"), f"{NAME}_train_step.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder to write the reference to (default: tests/fixtures/train)")
    make_fixture(ap.parse_args())


if __name__ == "__main__":
    main()
