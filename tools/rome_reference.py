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
    as moedit stores it; DeepSeek's n shared experts (one MLP of width n*I in the checkpoint) are n experts:
    shared expert j (id -1 - j) = rows [j*I, (j+1)*I) of the shared gate/up projections, the same columns of its
    down projection, its own C over that slice of every token's key;
  * routing (own code, float64; the forward is HF's): Qwen2-MoE softmax -> top-k (-> renorm if norm_topk_prob);
    DeepSeek-V2 softmax -> greedy / group-limited top-k, norm_topk_prob renormalises instead of scaling (DeepSeek's
    remote code), else x routed_scaling_factor; DeepSeek-V3 sigmoid, selection on score + e_score_correction_bias
    (noaux_tc groups), weights = the unbiased scores (renormalised if norm_topk_prob) x routed_scaling_factor;
    checked against HF's router (same top-k sets, weights to 1e-5) before a DeepSeek fixture is written;
  * targets at the bare prompt's subject token: dominant = the routed expert with the largest weight w_e (on
    DeepSeek-V3 not always the top selection score), r = delta / w_e; routed r_e = w_e delta / sum w^2 (top-k in
    descending selection score); shared r = delta / sigmoid(x . w_gate) (Qwen2-MoE), n ungated shared experts
    (DeepSeek) r_j = delta / n each (the minimum-norm split: sum_j r_j = delta);
  * Delta W = r (C^-1 k*)^T / ((C^-1 k*)^T k), k* = template mean, k = bare-prompt key (ROME's key choice);
  * objective "exact" (moedit's --objective exact): u = C^-1 k* / ((C^-1 k*)^T k) and the shares r = share * delta
    first, then v* adds s_t * delta at every position t of every sequence, s_t = sum_j gate_j(t) share_j u_j^T k_j(t)
    (gate: t's routing weight for expert j, 0 outside its top-k; the shared gate for the shared expert).

Modes
  (default)        runs the three target kinds, with both objectives, at layer 1 (an MoE layer) of the fixture
                   model(s) tests/fixtures/models/NAME (float64, fixed ids) and writes
                   tests/fixtures/edit/NAME_rome.safetensors: the inputs (ids, corpus), delta, the loss curve and
                   post-edit logits per target kind. tests/test_edit.cpp (EditCrossCheck) compares moedit to them.
                   --fixture NAME... picks the fixtures (qwen2_moe, deepseek_v2, deepseek_v3; default qwen2_moe),
                   --out DIR writes elsewhere. Commands that wrote the committed references (repository root):
                     python3 tools/rome_reference.py                                    (qwen2_moe)
                     python3 tools/rome_reference.py --fixture deepseek_v2 deepseek_v3
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
# Families: Qwen2-MoE (softmax router, one shared expert with a sigmoid gate) and DeepSeek-V2/V3 (MLA attention in
# HF's forward; routers re-implemented below; n ungated shared experts fused into one MLP `shared_experts` of width
# n * moe_intermediate_size, shared expert j owning intermediate rows [j*I, (j+1)*I) of its gate/up projections and
# the same columns of its down projection). Expert ids: routed 0..E-1, shared expert j = -1 - j.
DEEPSEEK = ("deepseek_v2", "deepseek_v3")


def is_deepseek(config):
    return config.model_type in DEEPSEEK


def moe_block(model, layer):
    return model.model.layers[layer].mlp


def num_experts(config):
    return config.n_routed_experts if is_deepseek(config) else config.num_experts


def num_shared(block):
    """Shared experts of an MoE block (DeepSeek: n_shared_experts slices of one MLP; Qwen2-MoE: 0 or 1)."""
    if hasattr(block, "shared_experts"):
        return block.config.n_shared_experts
    return 1 if hasattr(block, "shared_expert") else 0


def shared_slice(block, j):
    """[begin, end) of shared expert j in the shared MLP's intermediate dimension."""
    n = num_shared(block)
    w = block.shared_experts.gate_proj.weight.shape[0] // n
    return j * w, (j + 1) * w


def expert_weights(block, e):
    """(gate [I,H], up [I,H], down [H,I]) of routed expert e; e = -1 - j: shared expert j (views)."""
    if e < 0:
        if hasattr(block, "shared_experts"):
            s = block.shared_experts
            b, end = shared_slice(block, -1 - e)
            return s.gate_proj.weight[b:end], s.up_proj.weight[b:end], s.down_proj.weight[:, b:end]
        s = block.shared_expert
        return s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight
    ex = block.experts
    if hasattr(ex, "gate_up_proj"):  # transformers v5 fused experts
        gu = ex.gate_up_proj[e]
        i = gu.shape[0] // 2
        return gu[:i], gu[i:], ex.down_proj[e]
    m = ex[e]
    return m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight


def down_view(block, e):
    """A view of expert e's down projection (shared expert j: its columns of the shared one) to write in place."""
    return expert_weights(block, e)[2]


def shared_gate(block, x):
    """The factor of the shared experts' output for MoE inputs x [N,H]: Qwen2-MoE sigmoid(x . w_gate); DeepSeek 1."""
    if hasattr(block, "shared_expert_gate"):
        return torch.sigmoid(x @ block.shared_expert_gate.weight[0])
    return torch.ones(x.shape[0], dtype=x.dtype)


def deepseek_router(block, x, config):
    """DeepSeek routers in x's dtype (independent of HF's fp32 one), experts in descending selection score.
    V2 (remote code): softmax scores; greedy top-k, or group_limited_greedy (group score = max, other groups' scores
    -> 0); norm_topk_prob (with k > 1) renormalises the k weights INSTEAD of scaling, else x routed_scaling_factor.
    V3: sigmoid scores s, selection on s + e_score_correction_bias, noaux_tc (group score = sum of its top-2
    selection scores, other groups -> -inf); weights s of the selected experts, renormalised if norm_topk_prob, then
    x routed_scaling_factor."""
    z = x @ block.gate.weight.to(x.dtype).T
    E, k = num_experts(config), config.num_experts_per_tok
    v3 = config.model_type == "deepseek_v3"
    s = torch.sigmoid(z) if v3 else torch.softmax(z, dim=-1)
    sel = s + block.gate.e_score_correction_bias.to(x.dtype) if v3 else s.clone()
    method = "noaux_tc" if v3 else config.topk_method
    if method != "greedy":
        G = config.n_group
        grp = sel.view(-1, G, E // G)
        gs = grp.topk(2, dim=-1).values.sum(-1) if v3 else grp.max(-1).values
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(config.topk_group, dim=-1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // G, 1), float("-inf") if v3 else 0.0)
    ids = torch.topk(sel, k, dim=-1).indices
    w = s.gather(1, ids)
    if v3:
        if config.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * config.routed_scaling_factor
    elif k > 1 and config.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    else:
        w = w * config.routed_scaling_factor
    return ids, w


def router(block, x, config):
    """Top-k ids and weights for MoE inputs x [N,H] (Qwen2-MoE: softmax -> top-k -> renorm if norm_topk_prob)."""
    if is_deepseek(config):
        return deepseek_router(block, x, config)
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
    for e in range(num_experts(cfg)):
        sel = (ids == e).any(-1)
        k = keys_of(block, e, xs[sel])
        stats[e] = ((k.T @ k) / max(1, k.shape[0])).float().to(xs.dtype)
    for j in range(num_shared(block)):  # every token's key (shared expert j: its slice of the shared key)
        k = keys_of(block, -1 - j, xs)
        stats[-1 - j] = ((k.T @ k) / k.shape[0]).float().to(xs.dtype)
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


def subject_inputs(model, layer, req):
    """MoE inputs [T, H] of `layer` at the subject's last token of each rewriting prompt (the bare prompt first)."""
    return torch.stack([x[i] for x, i in zip(moe_inputs(model, layer, req["prompts"]), req["subject_last"])])


def target_shares(block, config, x, kind):
    """The target experts of an edit and their shares of delta (r_e = share * delta) from one MoE input x [1, H]
    (the bare prompt's subject token): [(expert id, share)], routed experts in descending selection score."""
    ids, ws = router(block, x, config)
    ids, ws = ids[0].tolist(), ws[0]
    if kind == "dominant":  # the largest routing weight (DeepSeek-V3: not always the top selection score)
        j = int(torch.argmax(ws))
        return [(ids[j], 1 / ws[j])]
    if kind == "routed":
        s2 = (ws * ws).sum()
        return [(e, ws[j] / s2) for j, e in enumerate(ids)]
    if kind == "shared":  # n shared experts: minimum-norm split r_j = delta / (n g), sum_j g r_j = delta
        n = num_shared(block)
        g = shared_gate(block, x)[0]
        return [(-1 - j, 1 / (n * g)) for j in range(n)]
    raise ValueError(kind)


def apply_edit(model, layer, req, kind, stats, objective="rome"):
    """Keys, u, v*, rank-one update(s) applied in place; returns (delta, losses, [(e, original down)])."""
    cfg = model.config
    block = moe_block(model, layer)
    xs = subject_inputs(model, layer, req)
    shares = target_shares(block, cfg, xs[:1], kind)
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
                    gate = shared_gate(block, x) if e < 0 else (rw * (rid == e)).sum(-1)
                    f = f + gate * share * (keys_of(block, e, x) @ u)
                out.append(f)
        return out

    delta, _, losses = compute_vstar(model, layer, req, spread=spread if objective == "exact" else None)
    saved = []
    with torch.no_grad():
        for (e, share), u in zip(shares, us):
            w = down_view(block, e)
            saved.append((e, w.detach().clone()))
            w += torch.outer(share * delta, u)
    return delta, losses, saved


def restore(model, layer, saved):
    block = moe_block(model, layer)
    with torch.no_grad():
        for e, orig in reversed(saved):
            down_view(block, e).copy_(orig)


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


def request_tensors(req, prefix=""):
    """An id-level request as fixture tensors (int64): {prefix}prompts.{i}, subject_last, kl_prompt,
    kl_subject_last [1], target (what tests/reference_util.h's edit_ids reads back)."""
    out = {f"{prefix}prompts.{i}": torch.tensor(p, dtype=torch.int64) for i, p in enumerate(req["prompts"])}
    out[f"{prefix}subject_last"] = torch.tensor(req["subject_last"], dtype=torch.int64)
    out[f"{prefix}kl_prompt"] = torch.tensor(req["kl_prompt"], dtype=torch.int64)
    out[f"{prefix}kl_subject_last"] = torch.tensor([req["kl_subject_last"]], dtype=torch.int64)
    out[f"{prefix}target"] = torch.tensor(req["target"], dtype=torch.int64)
    return out


FIXTURES = ("qwen2_moe", "deepseek_v2", "deepseek_v3")  # layer 1 of each is an MoE layer (DeepSeek: 0 is dense)


def check_router(model, layer, seqs):
    """DeepSeek: the own router (float64) selects the same experts with the same weights as HF's (fp32) on seqs."""
    block = moe_block(model, layer)
    xs = torch.cat(moe_inputs(model, layer, seqs), 0)
    with torch.no_grad():
        ids, ws = router(block, xs, model.config)
        _, hw, hi = block.gate(xs)
    o, ho = ids.argsort(-1), hi.argsort(-1)
    assert torch.equal(ids.gather(1, o), hi.gather(1, ho)), "own top-k set != HF's"
    err = float(((ws.gather(1, o) - hw.double().gather(1, ho)).abs() / hw.double().gather(1, ho)).max())
    assert err < 1e-5, f"own routing weights != HF's ({err:.1e})"
    print(f"router: own top-{ids.shape[1]} = HF's on {xs.shape[0]} tokens, weights max rel diff {err:.1e}")


def make_fixture(args, name):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = load_model(os.path.join(ROOT, "tests/fixtures/models", name), torch.float64)
    layer = 1
    rs = np.random.RandomState(0)
    corpus = rs.randint(0, model.config.vocab_size, size=(40, 32)).tolist()
    if is_deepseek(model.config):
        check_router(model, layer, corpus + FIXED_IDS["prompts"] + [FIXED_IDS["kl_prompt"]])
    stats = key_stats(model, layer, corpus)
    req = FIXED_IDS
    evals = req["prompts"] + [req["kl_prompt"], rs.randint(0, model.config.vocab_size, size=12).tolist()]
    out = {"corpus": torch.tensor(corpus, dtype=torch.int64), **request_tensors(req)}
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
            "model": f"tests/fixtures/models/{name}", "dtype": "float64",
            "generator": "tools/rome_reference.py", "transformers": transformers.__version__,
            "torch": torch.__version__}
    path = os.path.join(args.out or os.path.join(ROOT, "tests/fixtures/edit"), f"{name}_rome.safetensors")
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
    ap.add_argument("--fixture", nargs="+", choices=FIXTURES, default=["qwen2_moe"],
                    help="fixture model(s) to write a reference for (default: qwen2_moe)")
    ap.add_argument("--out", help="folder to write the reference(s) to (default: tests/fixtures/edit)")
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
        for name in args.fixture:
            make_fixture(args, name)


if __name__ == "__main__":
    main()
