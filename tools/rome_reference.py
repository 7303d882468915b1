#!/usr/bin/env python3
"""ROME on MoE experts, written independently in PyTorch on Hugging Face transformers: the cross-check and the
benchmark anchor for moedit's editor (editor/rome.h).

Same method as moedit, step by step, but with autograd for the v* gradient and HF's own forward:
  * v*: delta added to the MoE block output (`model.layers[L].mlp`) at the subject's last token of every rewriting
    prompt (template + prompt + target[:-1]) and of the KL prompt; loss = mean NLL of the target tokens +
    kl_factor * KL(p_delta || p_0) at the KL prompt's subject token + weight_decay * |delta| / |target_init|^2;
    torch.optim.Adam(lr 0.5); at most `steps` iterations, stop when loss < 5e-2, the last iteration does not step;
    |delta| clamped to clamp_norm_factor * |target_init| (ROME's compute_v, spec/rome.md 2.6);
  * keys k_e = silu(x W_gate_e^T) * (x W_up_e^T) at the MoE input x (post-attention norm);
    C_e = E[k k^T] over the corpus tokens routed to expert e (all tokens for the shared expert), rounded to fp32
    as moedit stores it;
  * targets at the bare prompt's subject token: dominant r = delta / w_e; routed r_e = w_e delta / sum w^2;
    shared r = delta / sigmoid(x . w_gate);
  * Delta W = r (C^-1 k*)^T / ((C^-1 k*)^T k), k* = template mean, k = bare-prompt key (ROME's key choice);
  * objective "exact" (moedit's --objective exact): u = C^-1 k* / ((C^-1 k*)^T k) and the shares r = share * delta
    first, then v* adds s_t * delta at every position t of every sequence, s_t = sum_j gate_j(t) share_j u_j^T k_j(t)
    (gate: t's routing weight for expert j, 0 outside its top-k; the shared gate for the shared expert).

Modes
  --make-fixture   (default) runs the three target kinds on tests/fixtures/models/qwen2_moe (float64, fixed ids)
                   and writes tests/fixtures/edit/qwen2_moe_rome.safetensors: the inputs (ids, corpus), delta,
                   the loss curve and post-edit logits per target kind. tests/test_edit.cpp compares moedit to it.
  --bench          times the same edit (statistics precomputed, not timed) on a checkpoint in float32 with the
                   request ids written by bench/bench_edit.cpp (--ids FILE); prints JSON {"seconds": [...]}.

Only needs torch, transformers, safetensors, numpy (tools/requirements.txt). Never run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ model access
def moe_block(model, layer):
    return model.model.layers[layer].mlp


def expert_weights(block, e):
    """(gate [I,H], up [I,H], down [H,I]) of routed expert e; e = -1: the shared expert."""
    if e < 0:
        s = block.shared_expert
        return s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight
    ex = block.experts
    if hasattr(ex, "gate_up_proj"):  # transformers v5 fused experts
        gu = ex.gate_up_proj[e]
        i = gu.shape[0] // 2
        return gu[:i], gu[i:], ex.down_proj[e]
    m = ex[e]
    return m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight


def down_param(block, e):
    """A (tensor, index) handle to write expert e's down projection in place."""
    if e < 0:
        return block.shared_expert.down_proj.weight, None
    ex = block.experts
    if hasattr(ex, "down_proj"):
        return ex.down_proj, e
    return ex[e].down_proj.weight, None


def router(block, x, config):
    """Top-k ids and weights for MoE inputs x [N,H] (Qwen2-MoE: softmax -> top-k -> renorm if norm_topk_prob)."""
    w = block.gate.weight
    p = torch.softmax(x @ w.T, dim=-1)
    vals, ids = torch.topk(p, config.num_experts_per_tok, dim=-1)
    if getattr(config, "norm_topk_prob", False):
        vals = vals / vals.sum(-1, keepdim=True)
    return ids, vals


def keys_of(block, e, x):
    g, u, _ = expert_weights(block, e)
    return F.silu(x @ g.T) * (x @ u.T)


def moe_inputs(model, layer, seqs):
    """MoE-block inputs [sum len, H] for a list of id sequences (run one by one: no padding questions)."""
    out = []
    cap = {}
    h = moe_block(model, layer).register_forward_pre_hook(lambda mod, args: cap.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            for s in seqs:
                model(torch.tensor([s]))
                out.append(cap["x"][0])
    finally:
        h.remove()
    return out


# ------------------------------------------------------------------------------------------------ the method
def key_stats(model, layer, corpus):
    block = moe_block(model, layer)
    cfg = model.config
    xs = torch.cat(moe_inputs(model, layer, corpus), 0)
    ids, _ = router(block, xs, cfg)
    stats = {}
    for e in range(cfg.num_experts):
        sel = (ids == e).any(-1)
        k = keys_of(block, e, xs[sel])
        stats[e] = ((k.T @ k) / max(1, k.shape[0])).float().to(xs.dtype)
    if hasattr(block, "shared_expert"):
        k = keys_of(block, -1, xs)
        stats[-1] = ((k.T @ k) / k.shape[0]).float().to(xs.dtype)
    return stats


def compute_vstar(model, layer, req, steps=20, lr=0.5, weight_decay=0.5, kl_factor=0.0625, clamp=4.0, spread=None):
    """spread: None (ROME: delta at each sequence's subject token) or a function of the sequences giving, per
    sequence, the factor of delta at each of its positions (the exact objective)."""
    prompts, subj, target = req["prompts"], req["subject_last"], req["target"]
    seqs = [p + target[:-1] for p in prompts] + [req["kl_prompt"]]
    lookup = subj + [req["kl_subject_last"]]
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    n_t = len(prompts)
    labels = torch.full((n_t, L), -100, dtype=torch.long)
    for i in range(n_t):
        n = len(seqs[i])
        labels[i, n - len(target) : n] = torch.tensor(target)  # the logit at position j predicts labels[j]
    dtype = next(model.parameters()).dtype
    delta = torch.zeros(model.config.hidden_size, dtype=dtype, requires_grad=True)
    state = {"init": None}
    S = None
    if spread is not None:
        S = torch.zeros(len(seqs), L, dtype=dtype)
        for i, f in enumerate(spread(seqs)):
            S[i, : len(f)] = f

    def hook(mod, args, out):
        if state["init"] is None:
            state["init"] = out[0, lookup[0]].detach().clone()
        if S is not None:
            return out + S.unsqueeze(2) * delta
        out = out.clone()
        for i, idx in enumerate(lookup):
            out[i, idx] = out[i, idx] + delta
        return out

    opt = torch.optim.Adam([delta], lr=lr)
    for p in model.parameters():
        p.requires_grad_(False)
    h = moe_block(model, layer).register_forward_hook(hook)
    losses, kl_init = [], None
    try:
        for it in range(steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            kl_logits = logits[n_t, lookup[n_t]].unsqueeze(0)
            kl_lp = torch.log_softmax(kl_logits, dim=1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            lp = torch.log_softmax(logits[:n_t], dim=2)
            tok = torch.gather(lp, 2, torch.where(labels != -100, labels, 0).unsqueeze(2)).squeeze(2)
            m = (labels != -100).to(dtype)
            nll = (-(tok * m).sum(1) / len(target)).mean()
            kl = kl_factor * F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
            wd = weight_decay * (torch.norm(delta) / torch.norm(state["init"]) ** 2)
            loss = nll + kl + wd
            losses.append(float(loss))
            if loss < 5e-2 or it == steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = clamp * state["init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        h.remove()
    return delta.detach(), state["init"], losses


def apply_edit(model, layer, req, kind, stats, objective="rome"):
    """Keys, u, v*, rank-one update(s) applied in place; returns (delta, losses, [(e, original down)])."""
    cfg = model.config
    block = moe_block(model, layer)
    xs = [x[i] for x, i in zip(moe_inputs(model, layer, req["prompts"]), req["subject_last"])]
    xs = torch.stack(xs)
    ids, ws = router(block, xs[:1], cfg)
    ids, ws = ids[0].tolist(), ws[0]
    if kind == "dominant":
        shares = [(ids[0], 1 / ws[0])]
    elif kind == "routed":
        s2 = (ws * ws).sum()
        shares = [(e, ws[j] / s2) for j, e in enumerate(ids)]
    elif kind == "shared":
        g = torch.sigmoid(xs[0] @ block.shared_expert_gate.weight[0])
        shares = [(-1, 1 / g)]
    else:
        raise ValueError(kind)
    us = []
    with torch.no_grad():
        for e, _ in shares:
            k_all = keys_of(block, e, xs)
            k, kstar = k_all[0], k_all.mean(0)
            ck = torch.linalg.solve(stats[e], kstar)
            us.append(ck / (ck @ k))

    def spread(seqs):
        out = []
        with torch.no_grad():
            for x in moe_inputs(model, layer, seqs):
                rid, rw = router(block, x, cfg)
                f = torch.zeros(x.shape[0], dtype=x.dtype)
                for (e, share), u in zip(shares, us):
                    gate = torch.sigmoid(x @ block.shared_expert_gate.weight[0]) if e < 0 else (rw * (rid == e)).sum(-1)
                    f = f + gate * share * (keys_of(block, e, x) @ u)
                out.append(f)
        return out

    delta, _, losses = compute_vstar(model, layer, req, spread=spread if objective == "exact" else None)
    saved = []
    with torch.no_grad():
        for (e, share), u in zip(shares, us):
            t, idx = down_param(block, e)
            w = t if idx is None else t[idx]
            saved.append((e, w.detach().clone()))
            w += torch.outer(share * delta, u)
    return delta, losses, saved


def restore(model, layer, saved):
    block = moe_block(model, layer)
    with torch.no_grad():
        for e, orig in reversed(saved):
            t, idx = down_param(block, e)
            (t if idx is None else t[idx]).copy_(orig)


def load_model(path, dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                             experts_implementation="eager")
    m.eval()
    return m


# ------------------------------------------------------------------------------------------------ fixture
FIXED_IDS = {
    "prompts": [[11, 12, 13, 14, 15], [3, 4, 5, 6, 11, 12, 13, 14, 15], [7, 8, 11, 12, 13, 14, 15],
                [9, 10, 20, 21, 22, 11, 12, 13, 14, 15]],
    "subject_last": [1, 5, 3, 6],
    "kl_prompt": [11, 12, 30, 31],
    "kl_subject_last": 1,
    "target": [40, 41],
}


def make_fixture(args):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = load_model(os.path.join(ROOT, "tests/fixtures/models/qwen2_moe"), torch.float64)
    layer = 1
    rs = np.random.RandomState(0)
    corpus = rs.randint(0, model.config.vocab_size, size=(40, 32)).tolist()
    stats = key_stats(model, layer, corpus)
    req = FIXED_IDS
    evals = req["prompts"] + [req["kl_prompt"], rs.randint(0, model.config.vocab_size, size=12).tolist()]
    out = {"corpus": torch.tensor(corpus, dtype=torch.int64)}
    for i, p in enumerate(req["prompts"]):
        out[f"prompts.{i}"] = torch.tensor(p, dtype=torch.int64)
    out["subject_last"] = torch.tensor(req["subject_last"], dtype=torch.int64)
    out["kl_prompt"] = torch.tensor(req["kl_prompt"], dtype=torch.int64)
    out["kl_subject_last"] = torch.tensor([req["kl_subject_last"]], dtype=torch.int64)
    out["target"] = torch.tensor(req["target"], dtype=torch.int64)
    for i, s in enumerate(evals):
        out[f"eval.{i}"] = torch.tensor(s, dtype=torch.int64)
    with torch.no_grad():
        for i, s in enumerate(evals):
            out[f"pre.logits.{i}"] = model(torch.tensor([s])).logits[0].float()
    for kind, objective in [(k, o) for o in ("rome", "exact") for k in ("dominant", "routed", "shared")]:
        delta, losses, saved = apply_edit(model, layer, req, kind, stats, objective)
        kind = kind if objective == "rome" else kind + "_exact"
        out[f"{kind}.delta"] = delta.float()
        out[f"{kind}.loss"] = torch.tensor(losses, dtype=torch.float64)
        out[f"{kind}.experts"] = torch.tensor([e for e, _ in saved], dtype=torch.int64)
        with torch.no_grad():
            for i, s in enumerate(evals):
                out[f"{kind}.logits.{i}"] = model(torch.tensor([s])).logits[0].float()
        restore(model, layer, saved)
        print(f"{kind}: experts {[e for e, _ in saved]}, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
              f"({len(losses) - 1} steps), |delta| {float(delta.norm()):.4f}")
    import transformers

    meta = {"layer": str(layer), "n_prompts": str(len(req["prompts"])), "n_eval": str(len(evals)),
            "model": "tests/fixtures/models/qwen2_moe", "dtype": "float64",
            "generator": "tools/rome_reference.py", "transformers": transformers.__version__,
            "torch": torch.__version__}
    path = os.path.join(ROOT, "tests/fixtures/edit/qwen2_moe_rome.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print("wrote", path)


# ------------------------------------------------------------------------------------------------ bench
def bench(args):
    torch.set_num_threads(args.threads)
    with open(args.ids) as f:
        spec = json.load(f)
    model = load_model(args.model, torch.float32)
    layer = spec["layer"]
    t0 = time.perf_counter()
    stats = key_stats(model, layer, spec["corpus"])
    stats_s = time.perf_counter() - t0
    times, losses = [], []
    for req in spec["requests"]:
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            _, ls, saved = apply_edit(model, layer, req, spec["target"], stats)
            times.append(time.perf_counter() - t0)
            losses.append(ls)
            restore(model, layer, saved)
    print(json.dumps({"seconds": times, "stats_seconds": stats_s, "threads": args.threads,
                      "torch": torch.__version__, "final_loss": [l[-1] for l in losses]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--ids")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.bench:
        if not args.model or not args.ids:
            sys.exit("--bench needs --model and --ids")
        bench(args)
    else:
        make_fixture(args)


if __name__ == "__main__":
    main()
