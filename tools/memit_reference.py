#!/usr/bin/env python3
"""MEMIT and AlphaEdit over a range of MoE layers, written independently in PyTorch on Hugging Face transformers: the
cross-check for moedit's batch editor (editor/memit.h, editor/batch_update.h; issue 18).

N requests are edited together, one step, in the experts of the MoE layers L_1 < ... < L_m (moedit's defaults:
key_columns mean, passes 1, bare_key_weight mean). v*, keys, routing, target shares and key statistics are
tools/rome_reference.py's (imported, not copied); what is new here is the batch step:
  * z*: for each request i, delta_i = ROME's v* at the last layer L_m (rome_reference.compute_vstar: delta added to
    L_m's MoE output at the subject's last token of every rewriting prompt and the KL prompt, ROME's loss, Adam
    lr 0.5, 20 steps) and h_i = the residual stream after block L_m at the bare prompt's subject last token, both
    on the model before the batch; z*_i = h_i + rho * delta_i (rho = residual_multiplier, 1 but for Granite);
  * per layer l = L_j (j = 1..m) ascending, on the current (partly edited) model, one forward per request:
      r_i = (z*_i - h_i(cur)) / (rho * (m - j + 1))            the residual spread over the layers left, incl. l
    split over request i's targets at l as ROME splits delta, read at its bare prompt's subject token
    (rome_reference.target_shares: routed r_e = w_e r / sum w^2; shared r / g), each target e with the key
    k*_ie = the mean over the rewriting prompts (context templates, bare prompt included) of e's key at the
    subject's last token; one column (r_e, k*_ie) per (request, target), requests in order;
  * per expert e with n_e columns, R_e [H, n_e], K_e [I, n_e], C_e [I, I] = E[k k^T] of e's keys on the unedited
    model (rome_reference.key_stats, fp32-rounded, the corpus of the ROME reference), all experts of l solved from
    the same forward before any of them changes:
      memit      Delta W_e = R_e K_e^T (lambda C_e + K_e K_e^T)^-1                    (MEMIT, Meng et al. 2023, eq. 14)
      alphaedit  Delta W_e = R_e K_e^T P_e (K_e K_e^T P_e + l2 I)^-1,  P_e = U U^T over the eigenvectors of C_e
                 with eigenvalue < threshold                                          (AlphaEdit, Fang et al. 2025)
    added to e's down projection; the ||z*_i - h_i(cur)|| before each layer and after the last are recorded.

Fixture (the default mode): qwen2_moe (tests/fixtures/models/qwen2_moe, float64), layers 0-1 (both MoE; z* at 1,
so delta still reaches the prediction through layers 2 and 3), three requests with fixed ids (REQUESTS: ROME's
FIXED_IDS, the same with subject tokens 17 18 as tests/test_memit.cpp's other_ids(), and with subject 23 24),
targets routed and shared, methods memit (lambda = MOM2_WEIGHT) and alphaedit (l2 = L2, threshold = the median of
the eigenvalues of every expert's C at layers 0 and 1 pooled: the geometric mean of the two middle ones, so
6-10 of a routed expert's 16 eigenvectors and 18-22 of the shared expert's 40 span the null space; the script
checks that no edited expert has an eigenvalue within 1e-3 of it relative, so the null-space dimensions cannot
depend on rounding). Writes
tests/fixtures/edit/qwen2_moe_memit.safetensors:
  inputs        corpus [40, 32] (the key-statistics corpus), req{i}.prompts.{t}, req{i}.subject_last,
                req{i}.kl_prompt, req{i}.kl_subject_last, req{i}.target; eval.{p} the probe sequences
  before        pre.logits.{p}; delta [N, H] (v* of each request, the same in every case)
  per case      {case}.residual_norms [m + 1, N] (float64; ||z*_i - h_i|| before each layer, after the last),
  ({method}_    {case}.updates [U, 3] (layer, expert, null-space dim or -1) in application order (layer ascending,
   {target})    expert id ascending: shared = -1 first), {case}.delta_norms [U] ||Delta W_e||_F (float64),
                {case}.logits.{p} post-edit logits of eval.{p}
  metadata      layers, n_requests, n_eval, cases, mom2_weight, l2, nullspace_threshold (repr: exact doubles),
                model, dtype, generator, torch and transformers versions.
tests/test_memit_reference.cpp (MemitReference) runs moedit's apply_batch_edit_ids with the same options on the
same ids and compares. Command that wrote the committed fixture (repository root; torch 2.15.0, transformers
5.23.0):
    python3 tools/memit_reference.py
--out DIR writes elsewhere. Only needs torch, transformers, safetensors, numpy (tools/requirements.txt); never run
by the tests.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rome_reference as rr  # noqa: E402  (v*, keys, routing, target shares, statistics, request tensors)

ROOT = rr.ROOT


def renamed_subject(req, a, b, kl_prompt, target):
    """req with subject tokens 11, 12 replaced by a, b (tests/test_memit.cpp's other_ids() for a, b = 17, 18)."""
    swap = {11: a, 12: b}
    return {**req, "prompts": [[swap.get(t, t) for t in p] for p in req["prompts"]], "kl_prompt": kl_prompt,
            "target": target}


REQUESTS = [
    rr.FIXED_IDS,
    renamed_subject(rr.FIXED_IDS, 17, 18, [17, 18, 30, 31], [50]),
    renamed_subject(rr.FIXED_IDS, 23, 24, [23, 24, 30, 31], [60, 61]),
]
LAYERS = [0, 1]            # qwen2_moe: MoE layers 0, 1 (2 is dense, 3 the last)
MOM2_WEIGHT = 1.0          # lambda: the edited keys have k*^T C^-1 k* between 2 and 67, so MEMIT's factor is 0.7-1
L2 = 1e-2                  # AlphaEdit's l2, small beside the edited keys' k*^T P k* (0.2-8)
CASES = [(m, t) for m in ("memit", "alphaedit") for t in ("routed", "shared")]


# ------------------------------------------------------------------------------------------------ the method
def residual_after(model, layer, seq, pos):
    """The residual stream after decoder block `layer` at position pos of one id sequence [H]."""
    cap = {}

    def hook(mod, args, out):
        cap["h"] = (out[0] if isinstance(out, tuple) else out).detach()

    h = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(torch.tensor([seq]))
    finally:
        h.remove()
    return cap["h"][0, pos]


def memit_delta(R, K, C, lam):
    """MEMIT's per-expert update R K^T (lam C + K K^T)^-1 [H, I] for R [H, n], K [I, n], C [I, I]."""
    A = lam * C + K @ K.T  # symmetric: Delta W^T = A^-1 K R^T
    return torch.linalg.solve(A, K @ R.T).T


def null_space_projector(C, threshold):
    """P = U U^T over the eigenvectors of C with eigenvalue < threshold, and their number."""
    ev, U = torch.linalg.eigh(C)
    U = U[:, ev < threshold]
    return U @ U.T, U.shape[1]


def alphaedit_delta(R, K, P, l2):
    """AlphaEdit's update R K^T P (K K^T P + l2 I)^-1 [H, I] (no earlier batches: its K_p K_p^T term is 0)."""
    M = K @ K.T @ P + l2 * torch.eye(K.shape[0], dtype=K.dtype)
    return torch.linalg.solve(M.T, (R @ K.T @ P).T).T  # X M = B  <=>  M^T X^T = B^T


def batch_edit(model, requests, layers, kind, method, stats, lam=MOM2_WEIGHT, l2=L2, threshold=None):
    """The whole batch, applied in place. stats[l][e]: C of expert e at layer l. Returns a dict: deltas [N, H],
    residual_norms [m + 1][N], updates [(layer, expert, null_dim, ||Delta W||)], saved [(layer, expert, original)]."""
    rho = float(getattr(model.config, "residual_multiplier", 1.0) or 1.0)
    last, m = layers[-1], len(layers)
    h0 = [residual_after(model, last, q["prompts"][0], q["subject_last"][0]) for q in requests]
    deltas = [rr.compute_vstar(model, last, q)[0] for q in requests]
    z = [h + rho * d for h, d in zip(h0, deltas)]
    out = {"deltas": torch.stack(deltas), "residual_norms": [], "updates": [], "saved": []}
    with torch.no_grad():
        for j, l in enumerate(layers):
            block = rr.moe_block(model, l)
            h = [residual_after(model, last, q["prompts"][0], q["subject_last"][0]) for q in requests]
            out["residual_norms"].append([float((zi - hi).norm()) for zi, hi in zip(z, h)])
            cols = {}  # expert id -> [(r column [H], k* [I])], requests in order
            for q, zi, hi in zip(requests, z, h):
                r = (zi - hi) / (rho * (m - j))
                xs = rr.subject_inputs(model, l, q)  # [T, H], the current model's
                for e, share in rr.target_shares(block, model.config, xs[:1], kind):
                    cols.setdefault(e, []).append((share * r, rr.keys_of(block, e, xs).mean(0)))
            deltas_l = []
            for e in sorted(cols):  # solved from the same forward, applied after
                R = torch.stack([c[0] for c in cols[e]], 1)  # [H, n]
                K = torch.stack([c[1] for c in cols[e]], 1)  # [I, n]
                C = stats[l][e]
                if method == "memit":
                    dW, dim = memit_delta(R, K, C, lam), -1
                else:
                    P, dim = null_space_projector(C, threshold)
                    dW = alphaedit_delta(R, K, P, l2)
                deltas_l.append((e, dW))
                out["updates"].append((l, e, dim, float(dW.norm())))
            for e, dW in deltas_l:
                w = rr.down_view(block, e)
                out["saved"].append((l, e, w.detach().clone()))
                w += dW
        h = [residual_after(model, last, q["prompts"][0], q["subject_last"][0]) for q in requests]
        out["residual_norms"].append([float((zi - hi).norm()) for zi, hi in zip(z, h)])
    return out


def restore(model, saved):
    with torch.no_grad():
        for l, e, orig in reversed(saved):
            rr.down_view(rr.moe_block(model, l), e).copy_(orig)


def median_threshold(stats, layers):
    """The geometric mean of the two middle eigenvalues of every C at `layers`, pooled (the median eigenvalue)."""
    ev = torch.sort(torch.cat([torch.linalg.eigvalsh(C) for l in layers for C in stats[l].values()])).values
    n = ev.numel()
    return float(torch.sqrt(ev[(n - 1) // 2] * ev[n // 2]))


# ------------------------------------------------------------------------------------------------ fixture
def make_fixture(args):
    from safetensors.torch import save_file
    import transformers

    name = "qwen2_moe"
    torch.manual_seed(0)
    model = rr.load_model(os.path.join(ROOT, "tests/fixtures/models", name), torch.float64)
    rs = np.random.RandomState(0)
    V = model.config.vocab_size
    corpus = rs.randint(0, V, size=(40, 32)).tolist()  # the ROME reference's corpus
    stats = {l: rr.key_stats(model, l, corpus) for l in LAYERS}
    threshold = median_threshold(stats, LAYERS)
    evals = [q["prompts"][0] + q["target"][:-1] for q in REQUESTS] + [rs.randint(0, V, size=12).tolist()]

    out = {"corpus": torch.tensor(corpus, dtype=torch.int64)}
    for i, q in enumerate(REQUESTS):
        out.update(rr.request_tensors(q, f"req{i}."))
    with torch.no_grad():
        for p, s in enumerate(evals):
            out[f"eval.{p}"] = torch.tensor(s, dtype=torch.int64)
            out[f"pre.logits.{p}"] = model(torch.tensor([s])).logits[0].float()

    def p_target(q):  # P(target) on the bare prompt, teacher-forced (a sanity print: the edit does something)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([q["prompts"][0] + q["target"]])).logits[0], -1)
        n = len(q["prompts"][0])
        return float(torch.exp(sum(lp[n - 1 + t, tok] for t, tok in enumerate(q["target"]))))

    p0 = [p_target(q) for q in REQUESTS]
    min_gap = float("inf")
    for method, kind in CASES:
        case = f"{method}_{kind}"
        res = batch_edit(model, REQUESTS, LAYERS, kind, method, stats, threshold=threshold)
        if "delta" in out:
            assert torch.equal(out["delta"], res["deltas"].float()), "v* differs between cases"
        out["delta"] = res["deltas"].float()
        out[f"{case}.residual_norms"] = torch.tensor(res["residual_norms"], dtype=torch.float64)
        out[f"{case}.updates"] = torch.tensor([u[:3] for u in res["updates"]], dtype=torch.int64)
        out[f"{case}.delta_norms"] = torch.tensor([u[3] for u in res["updates"]], dtype=torch.float64)
        if method == "alphaedit":  # the null-space dimensions must not hinge on rounding (C's: ~1e-7 relative)
            for l, e, dim, _ in res["updates"]:
                ev = torch.linalg.eigvalsh(stats[l][e])
                gap = float(((ev - threshold).abs() / threshold).min())
                assert gap > 1e-3, f"layer {l} expert {e}: an eigenvalue within {gap:.1e} of the threshold"
                min_gap = min(min_gap, gap)
        with torch.no_grad():
            moved = 0.0
            for p, s in enumerate(evals):
                lg = model(torch.tensor([s])).logits[0]
                out[f"{case}.logits.{p}"] = lg.float()
                pre = out[f"pre.logits.{p}"].double()
                moved = max(moved, float((lg - pre).abs().max() / pre.abs().max()))
        p1 = [p_target(q) for q in REQUESTS]
        restore(model, res["saved"])
        rn = res["residual_norms"]
        print(f"{case}: {len(res['updates'])} updates "
              f"{[(l, e, d) for l, e, d, _ in res['updates']]} (layer, expert, null dim); "
              f"|z*-h| {[f'{a:.3f}' for a in rn[0]]} -> {[f'{a:.3f}' for a in rn[-1]]}; "
              f"P(target) {[f'{a:.3f}' for a in p0]} -> {[f'{a:.3f}' for a in p1]}; "
              f"logits moved by {moved:.3f} of max |logit|")
    meta = {"layers": ",".join(map(str, LAYERS)), "n_requests": str(len(REQUESTS)), "n_eval": str(len(evals)),
            "cases": ",".join(f"{m}_{t}" for m, t in CASES), "mom2_weight": repr(MOM2_WEIGHT), "l2": repr(L2),
            "nullspace_threshold": repr(threshold), "model": f"tests/fixtures/models/{name}", "dtype": "float64",
            "generator": "tools/memit_reference.py", "transformers": transformers.__version__,
            "torch": torch.__version__}
    print(f"threshold {threshold!r} (median eigenvalue of C at layers {LAYERS}; the edited experts' eigenvalues "
          f"are at least {min_gap:.1e} of it away), |delta| "
          f"{[f'{float(d.norm()):.3f}' for d in out['delta']]}")
    path = os.path.join(args.out or os.path.join(ROOT, "tests/fixtures/edit"), f"{name}_memit.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder to write the reference to (default: tests/fixtures/edit)")
    make_fixture(ap.parse_args())


if __name__ == "__main__":
    main()
