#!/usr/bin/env python3
"""Parity of moedit's forward against Hugging Face transformers on a 2-layer slice of the REAL OLMoE-1B-7B config.

The slice is a random-weight bf16 checkpoint written by tools/make_random_checkpoint.py (hidden 2048, 16 heads,
64 experts, top-8, vocab 50304; only num_hidden_layers is cut to --layers). Both sides see the same bf16 weights
and compute in fp32:

  HF      AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16 (torch_dtype before v5), attn_implementation="eager")
          then .float(): the parameters are the exact bf16 values widened to fp32, the forward runs in fp32.
  moedit  `moedit logits DIR --ids ... --json` (bf16 read from disk, widened in registers, fp32 compute).

For each token-id sequence it prints
  rel      max |logit_moedit - logit_hf| / max |logit_hf|   (over all positions and the whole vocabulary)
  top1     positions whose arg-max token agrees
  experts  (token, layer) pairs whose top-k expert SET agrees, and the largest gate-weight difference
  skipL    max |logit_hf - logit_hf(last layer skipped)| / max |logit_hf|: the size of a whole layer's effect,
           to set the error against
and, with --fp64 (default on), the same HF model run in float64 as a referee: how far each fp32 forward is
from the exact one. Exit status 1 if any sequence misses --bar (default 1e-4), 2 on a setup error.

HOW TO RUN (needs torch, transformers, safetensors, numpy; no network; ~9.4 GB peak RSS with --fp64, ~6 GB without):

    pip install --break-system-packages torch transformers safetensors numpy
    python3 tools/make_random_checkpoint.py tests/fixtures/configs/olmoe-1b-7b-0924 /work/big/slice/olmoe-2l \\
        --layers 2 --dtype bf16            # or pass --make below and let this script do it
    python3 tools/olmoe_slice_parity.py --model /work/big/slice/olmoe-2l --bin build/moedit

Options: --seqs N --len L --seed S choose the random id sequences; --ids 1,2,3 (repeatable) gives them explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CONFIG = REPO / "tests/fixtures/configs/olmoe-1b-7b-0924"


def log(msg: str) -> None:
    print(msg, flush=True)


def default_bin() -> str:
    for cand in ("/work/bigbin/moedit-run", str(REPO / "build/moedit")):
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("moedit") or "moedit"


def run_moedit(binary: str, model: Path, ids: list[int]) -> tuple[np.ndarray, list[dict], float]:
    cmd = [binary, "logits", str(model), "--ids", ",".join(map(str, ids)), "--json"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"moedit failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    d = json.loads(res.stdout)
    if d.get("ids") not in (None, ids):
        raise SystemExit(f"moedit echoed ids {d.get('ids')} != {ids}")
    return np.asarray(d["logits"], dtype=np.float64), d["routing"], dt


def hf_forward(model, ids: list[int], top_k: int, norm_topk: bool):
    import torch

    x = torch.tensor([ids], dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=x, output_router_logits=True, output_hidden_states=True, use_cache=False)
        dt = time.perf_counter() - t0
        # Sensitivity: logits if the last decoder layer were skipped (final norm + lm_head on the hidden state
        # entering it). A forward that got that layer wrong would differ by about this much.
        hs = out.hidden_states[-2]
        skip = model.lm_head(model.model.norm(hs))[0].double().numpy()
    logits = out.logits[0].double().numpy()
    sens = float(np.abs(skip - logits).max() / np.abs(logits).max())
    routing = []
    for layer, rl in enumerate(out.router_logits):  # [T, E] per layer (batch 1)
        rl = rl.reshape(len(ids), -1)
        probs = torch.softmax(rl.double(), dim=-1)  # same order as HF (fp32 softmax there; ties aside)
        srt, idx = torch.sort(probs, dim=-1, descending=True)
        w = srt[:, :top_k]
        if norm_topk:
            w = w / w.sum(-1, keepdim=True)
        routing.append({
            "layer": layer,
            "expert_ids": idx[:, :top_k].tolist(),
            "expert_weights": w.tolist(),
            # gap between the k-th and (k+1)-th probability: how close a choice is to a tie
            "margin": (srt[:, top_k - 1] - srt[:, top_k]).tolist(),
        })
    return logits, routing, dt, sens


def compare_routing(mo: list[dict], hf: list[dict]):
    pairs = agree = 0
    max_dw = 0.0
    flips = []
    for lm, lh in zip(sorted(mo, key=lambda r: r["layer"]), hf):
        assert lm["layer"] == lh["layer"], (lm["layer"], lh["layer"])
        for t, (em, eh) in enumerate(zip(lm["expert_ids"], lh["expert_ids"])):
            pairs += 1
            if set(em) == set(eh):
                agree += 1
                wm = dict(zip(em, lm["expert_weights"][t]))
                wh = dict(zip(eh, lh["expert_weights"][t]))
                max_dw = max(max_dw, max(abs(wm[e] - wh[e]) for e in eh))
            else:
                flips.append((lh["layer"], t, sorted(set(em) ^ set(eh)), lh["margin"][t]))
    if len(mo) != len(hf):
        raise SystemExit(f"routing layers: moedit {len(mo)} vs HF {len(hf)}")
    return pairs, agree, max_dw, flips


def load_hf(model_dir: Path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers >= 4.56 names the argument `dtype` (`torch_dtype` still works there, with a warning)
    dkey = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kw = {dkey: torch.bfloat16}
    kw.update(attn_implementation="eager", output_loading_info=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), experts_implementation="eager", **kw)
    except (TypeError, ValueError):  # older transformers without experts_implementation
        model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"HF loading reported {bad}: the comparison would run on random-initialised weights")
    p = next(model.parameters())
    if p.dtype != torch.bfloat16:
        raise SystemExit(f"HF loaded {p.dtype}, expected bfloat16")
    model = model.float().eval()
    return model


def check_weights_exact(model, model_dir: Path) -> str:
    """The fp32 HF parameters must be the checkpoint's bf16 values exactly (spot check incl. fused experts)."""
    import torch
    from safetensors import safe_open

    idx = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    sd = model.state_dict()
    checked = 0

    def get(name):
        with safe_open(str(model_dir / idx[name]), framework="pt") as f:
            return f.get_tensor(name)

    def same(a, b, what):
        nonlocal checked
        if a.shape != b.shape or not torch.equal(a.float(), b.float()):
            raise SystemExit(f"weight {what}: HF parameter differs from the checkpoint's bf16 values")
        checked += 1

    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.self_attn.q_norm.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.1.mlp.gate.weight"):
        same(sd[name], get(name), name)
    n_layers = model.config.num_hidden_layers
    I = model.config.intermediate_size
    for layer in range(n_layers):
        for e in (0, 37, model.config.num_experts - 1):
            pre = f"model.layers.{layer}.mlp.experts"
            g, u, d = (get(f"{pre}.{e}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj"))
            if f"{pre}.gate_up_proj" in sd:  # transformers >= 5: fused [E, 2I, H] and [E, H, I]
                gu = sd[f"{pre}.gate_up_proj"][e]
                same(gu[:I], g, f"{pre}.{e}.gate"); same(gu[I:], u, f"{pre}.{e}.up")
                same(sd[f"{pre}.down_proj"][e], d, f"{pre}.{e}.down")
            else:
                same(sd[f"{pre}.{e}.gate_proj.weight"], g, f"{pre}.{e}.gate")
                same(sd[f"{pre}.{e}.up_proj.weight"], u, f"{pre}.{e}.up")
                same(sd[f"{pre}.{e}.down_proj.weight"], d, f"{pre}.{e}.down")
    return f"{checked} tensors bit-equal to the checkpoint"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", type=Path, default=Path("/work/big/slice/olmoe-2l"), help="slice checkpoint folder")
    ap.add_argument("--bin", default=default_bin(), help="moedit binary (default: %(default)s)")
    ap.add_argument("--make", action="store_true", help="write the slice with make_random_checkpoint.py if absent")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config for --make (default: OLMoE-1B-7B)")
    ap.add_argument("--layers", type=int, default=2, help="layers for --make")
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--len", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ids", action="append", help="explicit comma-separated ids (repeatable; replaces --seqs)")
    ap.add_argument("--bar", type=float, default=1e-4, help="max allowed relative error")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-fp64", dest="fp64", action="store_false", help="skip the float64 referee run")
    ap.add_argument("--json-out", type=Path, help="write the per-sequence numbers here")
    a = ap.parse_args()

    if not (a.model / "config.json").exists():
        if not a.make:
            log(f"no checkpoint at {a.model}; pass --make to write it")
            return 2
        cmd = [sys.executable, str(HERE / "make_random_checkpoint.py"), str(a.config), str(a.model),
               "--layers", str(a.layers), "--dtype", "bf16"]
        log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = json.loads((a.model / "config.json").read_text())
    vocab = cfg["vocab_size"]
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}, "
        f"threads {torch.get_num_threads()}")
    log(f"model {a.model}: {cfg['model_type']} layers={cfg['num_hidden_layers']} hidden={cfg['hidden_size']} "
        f"experts={cfg['num_experts']} top_k={cfg['num_experts_per_tok']} vocab={vocab} dtype={cfg.get('torch_dtype')}")
    log(f"moedit {a.bin}")

    if a.ids:
        seqs = [[int(t) for t in s.split(",")] for s in a.ids]
    else:
        rng = np.random.default_rng(a.seed)
        seqs = [rng.integers(0, vocab, size=a.len).tolist() for _ in range(a.seqs)]

    t0 = time.perf_counter()
    model = load_hf(a.model)
    t_load = time.perf_counter() - t0
    log(f"HF load (bf16 -> fp32, eager): {t_load:.1f} s; {check_weights_exact(model, a.model)}")
    top_k, norm_topk = model.config.num_experts_per_tok, bool(model.config.norm_topk_prob)

    rows = []
    hf_logits = {}
    for i, ids in enumerate(seqs):
        lm, rm, t_mo = run_moedit(a.bin, a.model, ids)
        lh, rh, t_hf, sens = hf_forward(model, ids, top_k, norm_topk)
        hf_logits[i] = lh
        if lm.shape != lh.shape:
            raise SystemExit(f"seq {i}: moedit logits {lm.shape} vs HF {lh.shape}")
        scale = float(np.abs(lh).max())
        dmax = float(np.abs(lm - lh).max())
        top1 = int((lm.argmax(-1) == lh.argmax(-1)).sum())
        pairs, agree, max_dw, flips = compare_routing(rm, rh)
        rows.append(dict(seq=i, ids=ids, max_abs_logit=scale, max_abs_diff=dmax, rel=dmax / scale,
                         top1=top1, positions=len(ids), expert_pairs=pairs, expert_agree=agree,
                         max_gate_weight_diff=max_dw, flips=flips, min_hf_margin=min(min(r["margin"]) for r in rh),
                         rel_if_last_layer_skipped=sens, t_moedit_s=t_mo, t_hf_s=t_hf, lm=lm))
        log(f"seq {i}: ids={ids}")
        for f in flips:
            log(f"  expert-set mismatch layer {f[0]} token {f[1]}: experts {f[2]}, HF k/k+1 prob margin {f[3]:.3g}")

    if a.fp64:
        t0 = time.perf_counter()
        model = model.double()
        for r in rows:
            l64, _, _, _ = hf_forward(model, r["ids"], top_k, norm_topk)
            s64 = float(np.abs(l64).max())
            r["rel_moedit_vs_fp64"] = float(np.abs(r["lm"] - l64).max()) / s64
            r["rel_hf32_vs_fp64"] = float(np.abs(hf_logits[r["seq"]] - l64).max()) / s64
        log(f"fp64 referee: {time.perf_counter() - t0:.1f} s")

    log("")
    hdr = f"{'seq':>3} {'T':>3} {'max|logit|':>10} {'max|Δ|':>10} {'rel':>9} {'top1':>6} {'experts':>8} {'max Δw':>9}"
    if a.fp64:
        hdr += f" {'mo↔fp64':>9} {'hf32↔fp64':>9}"
    hdr += f" {'skipL':>8} {'moedit s':>8} {'HF s':>6}"
    log(hdr)
    ok = True
    for r in rows:
        line = (f"{r['seq']:>3} {r['positions']:>3} {r['max_abs_logit']:>10.4g} {r['max_abs_diff']:>10.3g} "
                f"{r['rel']:>9.2e} {r['top1']:>3}/{r['positions']:<2} {r['expert_agree']:>3}/{r['expert_pairs']:<4}"
                f" {r['max_gate_weight_diff']:>9.2e}")
        if a.fp64:
            line += f" {r['rel_moedit_vs_fp64']:>9.2e} {r['rel_hf32_vs_fp64']:>9.2e}"
        line += f" {r['rel_if_last_layer_skipped']:>8.2e} {r['t_moedit_s']:>8.2f} {r['t_hf_s']:>6.2f}"
        log(line)
        ok &= r["rel"] <= a.bar
    worst = max(r["rel"] for r in rows)
    log(f"\nworst rel = {worst:.3e}  (bar {a.bar:g}): {'PASS' if ok else 'FAIL'}")
    if a.json_out:
        a.json_out.write_text(json.dumps([{k: v for k, v in r.items() if k != "lm"} for r in rows], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
