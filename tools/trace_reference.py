#!/usr/bin/env python3
"""Independent HF-transformers implementation of moedit's causal trace (ROME §1 + routed/shared experts).

Used (a) to write the cross-check references under tests/fixtures/trace/ that tests/test_trace.cpp compares
moedit with, and (b) by bench/bench_trace.sh to time the same trace done the ROME way in PyTorch.
Tests never run this script; its outputs are checked in.

HOW TO RUN (from the repository root; CPU, no network):

    # references for the test suite (all three, ~1 minute):
    python3 tools/trace_reference.py reference --all
    # one reference:
    python3 tools/trace_reference.py reference --model tests/fixtures/models/qwen2_moe \
        --ids 5,17,3,88,42,7,7,1,60,11 --subject-range 2:5 --window 3 --out tests/fixtures/trace/qwen2_moe
    # timing (prints one JSON line):
    python3 tools/trace_reference.py time --model DIR --ids ... --subject-range B:E [--dtype float32]
    # random Qwen2-MoE checkpoint for the benchmark:
    python3 tools/trace_reference.py make-model --out /tmp/moedit-bench-model

Last run with: torch 2.15.0 (CPU), transformers 5.23.0, safetensors 0.8.0, numpy 2.4.6, Python 3.11.

THE PROCEDURE (written from ROME's experiments/causal_trace.py semantics, not from moedit's C++):
  * one batch of 1 + samples identical rows; row 0 is clean, rows 1.. are corrupted (ROME's layout);
  * noise: numpy.random.RandomState(seed).randn(samples, e - b, H) * sigma with sigma = F * std of the
    prompt's subject-token embeddings (torch .std(), unbiased; ids mode has no tokenizer) for "s<F>", or a
    fixed sigma; cast to float32 and written to noise.safetensors (tensor "noise"), then added (or, with
    --replace, assigned) to the output of embed_tokens at rows 1.., tokens b..e-1 (before any embedding
    multiplier, as ROME hooks the embedding module);
  * answer = argmax of row 0's last-position logits; high = its softmax probability in row 0;
    low = mean over rows 1.. of p(answer) with nothing restored; scores average probabilities over rows 1..;
  * restorations copy row 0's value into rows 1.. at the site (forward hooks, in place):
      resid   output of decoder layer l at token t
      attn    self_attn output[0] at token t, for layers max(0, l - w//2) .. min(L, l - (-w//2)) - 1
      moe     mlp / block_sparse_moe output, same window
      shared  mlp output += shared(row 0) - shared(row i), shared(x) = sigmoid(shared_expert_gate(x)) *
              shared_expert(x) recomputed from the MoE module's input
      expert  mlp output += c_e(row 0) - c_e(row i), c_e(x) = w_e * down_e(silu(gate_e x) * up_e x) if expert e
              is in the token's top-k (experts module inputs: hidden, top_k_index, top_k_weights), else 0;
              experts traced: those in row 0's top-k at the last subject token and at the last token.
  * the model runs in float64 for references (fp32 for timing unless --dtype says otherwise), eager attention
    and eager experts.

reference.json: {"ids", "subject_range", "samples", "window", "answer", "high_score", "low_score",
  "noise_sigma", "embedding_std", "kinds": {"resid"|"attn"|"moe"|"shared": [[S x L]] (null where absent),
  "expert": [{"token", "layer", "expert", "score"}]}, "versions": {...}}
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
KINDS = ("resid", "attn", "moe", "shared", "expert")

# The references checked in under tests/fixtures/trace/ (reference --all).
REFERENCES = [
    dict(name="qwen2_moe", ids=[5, 17, 3, 88, 42, 7, 7, 1, 60, 11], subject=(2, 5), window=3, samples=10,
         noise="s3"),
    # sliding_window=4, 2 layers: the last token must be within reach of the subject (≤ 6 positions back)
    dict(name="mixtral_fused", ids=[3, 14, 15, 9, 26, 53, 58], subject=(2, 5), window=2, samples=6, noise="s3"),
    dict(name="granitemoe", ids=[9, 2, 6, 53, 5, 89, 79, 3, 23, 84, 62], subject=(3, 6), window=3, samples=5,
         noise="0.05"),
]


def load_model(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                 experts_implementation="eager")
    return model.to(dtype).eval()


def moe_module(layer):
    for name in ("mlp", "block_sparse_moe"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise RuntimeError("no MoE/MLP module in layer")


def is_moe(layer) -> bool:
    return hasattr(moe_module(layer), "experts")


def has_shared(layer) -> bool:
    return is_moe(layer) and hasattr(moe_module(layer), "shared_expert")


def expert_contrib(experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, e: int) -> torch.Tensor:
    """w_e * E_e(x) per row of x [n, H] (zero where e is not among idx [n, k])."""
    gate_up = experts.gate_up_proj[e]  # [2I, H]
    down = experts.down_proj[e]        # [H, I]
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    y = F.linear(experts.act_fn(g) * u, down)
    sel = (idx == e)
    weight = (w * sel.to(w.dtype)).sum(-1, keepdim=True)
    return y * weight


def shared_contrib(moe, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)


class Tracer:
    def __init__(self, model, ids, subject, noise: np.ndarray, replace: bool = False):
        self.model = model
        self.layers = model.model.layers
        self.L = len(self.layers)
        self.ids = torch.tensor([ids] * (noise.shape[0] + 1))
        self.b, self.e = subject
        self.noise = torch.from_numpy(noise)
        self.replace = replace
        self.S = len(ids)
        self.answer = None

    def run(self, patches):
        """patches: list of (kind, token, layer, expert) applied together; returns (row-0 probs, mean p)."""
        model, S = self.model, self.S
        dtype = next(model.parameters()).dtype
        handles = []
        b, e = self.b, self.e

        def embed_hook(mod, inp, out):
            nz = self.noise.to(out.dtype)
            if self.replace:
                out[1:, b:e] = nz
            else:
                out[1:, b:e] += nz
            return out

        handles.append(self.model.model.embed_tokens.register_forward_hook(embed_hook))
        by_layer = {}
        for kind, t, l, ex in patches:
            by_layer.setdefault((kind, l), []).append((t, ex))

        def copy_rows(h, toks):
            for t in toks:
                h[1:, t] = h[0, t]

        for (kind, l), items in by_layer.items():
            layer = self.layers[l]
            toks = [t for t, _ in items]
            if kind == "resid":
                def hook(mod, inp, out, toks=toks):
                    h = out[0] if isinstance(out, tuple) else out
                    copy_rows(h, toks)
                    return out
                handles.append(layer.register_forward_hook(hook))
            elif kind == "attn":
                def hook(mod, inp, out, toks=toks):
                    copy_rows(out[0], toks)
                    return out
                handles.append(layer.self_attn.register_forward_hook(hook))
            elif kind == "moe":
                def hook(mod, inp, out, toks=toks):
                    h = out[0] if isinstance(out, tuple) else out
                    copy_rows(h, toks)
                    return out
                handles.append(moe_module(layer).register_forward_hook(hook))
            elif kind == "shared":
                moe = moe_module(layer)

                def hook(mod, inp, out, toks=toks, moe=moe):
                    x = inp[0]  # [B, S, H]
                    for t in toks:
                        s = shared_contrib(moe, x[:, t])  # [B, H]
                        out[1:, t] += s[0] - s[1:]
                    return out
                handles.append(moe.register_forward_hook(hook))
            elif kind == "expert":
                moe = moe_module(layer)
                store = {}

                def pre(mod, args, store=store):
                    store["x"], store["idx"], store["w"] = args[0], args[1], args[2]

                def hook(mod, inp, out, items=items, moe=moe, store=store):
                    x, idx, w = store["x"], store["idx"], store["w"]
                    B = out.shape[0]
                    for t, ex in items:
                        rows = torch.arange(B) * S + t
                        c = expert_contrib(moe.experts, x[rows], idx[rows], w[rows], ex)  # [B, H]
                        out[1:, t] += c[0] - c[1:]
                    return out
                handles.append(moe.experts.register_forward_pre_hook(pre))
                handles.append(moe.register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits = model(self.ids).logits[:, -1].to(torch.float64)
        finally:
            for h in handles:
                h.remove()
        probs = torch.softmax(logits, dim=-1)
        if self.answer is None:
            self.answer = int(torch.argmax(logits[0]))
        return probs, float(probs[1:, self.answer].mean())


def window_layers(l: int, L: int, w: int):
    return range(max(0, l - w // 2), min(L, l - (-w // 2)))


def trace_all(tr: Tracer, kinds, window: int, expert_tokens=None, progress=False):
    probs, low = tr.run([])
    high = float(probs[0, tr.answer])
    L, S = tr.L, tr.S
    out = {}
    n = 0
    for kind in kinds:
        if kind == "expert":
            toks = expert_tokens if expert_tokens is not None else sorted({tr.e - 1, S - 1})
            # clean routing (row 0) of every MoE layer
            routing = {}
            hs = []
            for l in range(L):
                if is_moe(tr.layers[l]):
                    def pre(mod, args, l=l):
                        routing[l] = args[1].reshape(-1, S, args[1].shape[-1])[0].clone()
                    hs.append(moe_module(tr.layers[l]).experts.register_forward_pre_hook(pre))
            tr.run([])
            for h in hs:
                h.remove()
            res = []
            for t in toks:
                for l in range(L):
                    if l not in routing:
                        continue
                    for ex in routing[l][t].tolist():
                        _, p = tr.run([("expert", t, l, ex)])
                        res.append(dict(token=t, layer=l, expert=int(ex), score=p))
                        n += 1
            out["expert"] = res
            continue
        if kind == "shared" and not any(has_shared(x) for x in tr.layers):
            continue
        grid = []
        for t in range(S):
            row = []
            for l in range(L):
                if kind == "resid":
                    patches = [("resid", t, l, -1)]
                elif kind in ("attn", "moe"):
                    patches = [(kind, t, l2, -1) for l2 in window_layers(l, L, window)]
                else:  # shared
                    if not has_shared(tr.layers[l]):
                        row.append(None)
                        continue
                    patches = [("shared", t, l, -1)]
                row.append(tr.run(patches)[1])
                n += 1
            grid.append(row)
            if progress:
                print(f"\r{kind} token {t + 1}/{S}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        out[kind] = grid
    return high, low, out, n


def make_noise(model, ids, subject, samples: int, rule: str, seed: int):
    b, e = subject
    emb = model.model.embed_tokens.weight.detach().to(torch.float64)
    std = float(emb[torch.tensor(ids[b:e])].std())
    if rule.startswith("s"):
        sigma = (float(rule[1:]) if len(rule) > 1 else 1.0) * std
    else:
        sigma = float(rule)
    H = emb.shape[1]
    noise = (sigma * np.random.RandomState(seed).randn(samples, e - b, H)).astype(np.float32)
    return noise, sigma, std


def cmd_reference(args):
    import safetensors.numpy
    import transformers

    todo = REFERENCES if args.all else [dict(name=os.path.basename(args.model.rstrip("/")), ids=args.ids,
                                             subject=args.subject_range, window=args.window,
                                             samples=args.samples, noise=args.noise, model=args.model,
                                             out=args.out)]
    for ref in todo:
        folder = ref.get("model") or os.path.join(ROOT, "tests", "fixtures", "models", ref["name"])
        out_dir = ref.get("out") or os.path.join(ROOT, "tests", "fixtures", "trace", ref["name"])
        os.makedirs(out_dir, exist_ok=True)
        torch.set_num_threads(1)
        model = load_model(folder, torch.float64)
        noise, sigma, std = make_noise(model, ref["ids"], ref["subject"], ref["samples"], ref["noise"], args.seed)
        tr = Tracer(model, ref["ids"], ref["subject"], noise)
        t0 = time.time()
        high, low, kinds, n = trace_all(tr, KINDS, ref["window"])
        safetensors.numpy.save_file({"noise": noise}, os.path.join(out_dir, "noise.safetensors"),
                                    metadata={"generator": f"numpy.random.RandomState({args.seed}).randn",
                                              "sigma": repr(sigma), "rule": ref["noise"]})
        doc = dict(model=os.path.relpath(folder, ROOT), ids=ref["ids"], subject_range=list(ref["subject"]),
                   samples=ref["samples"], window=ref["window"], seed=args.seed, noise_rule=ref["noise"],
                   noise_sigma=sigma, embedding_std=std, answer=tr.answer, high_score=high, low_score=low,
                   kinds=kinds, dtype="float64",
                   versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                 numpy=np.__version__))
        with open(os.path.join(out_dir, "reference.json"), "w") as f:
            json.dump(doc, f, indent=1)
        print(f"{ref['name']}: {n} restorations in {time.time() - t0:.1f}s; answer {tr.answer} "
              f"high {high:.6f} low {low:.6f} -> {out_dir}")


def cmd_time(args):
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype)
    kinds = KINDS if args.kinds == "all" else tuple(args.kinds.split(","))
    if args.noise_file:
        import safetensors.numpy
        noise = safetensors.numpy.load_file(args.noise_file)["noise"]
    else:
        noise, _, _ = make_noise(model, args.ids, args.subject_range, args.samples, args.noise, args.seed)
    tr = Tracer(model, args.ids, args.subject_range, noise)
    tr.run([])  # warm-up
    t0, c0 = time.time(), time.process_time()
    high, low, out, n = trace_all(tr, kinds, args.window, progress=args.progress)
    dt, dc = time.time() - t0, time.process_time() - c0
    print(json.dumps(dict(seconds=dt, cpu_seconds=dc, restorations=n, high_score=high, low_score=low, answer=tr.answer,
                          dtype=args.dtype, threads=torch.get_num_threads(), samples=int(noise.shape[0]),
                          kinds=out if args.scores else None)))


def cmd_make_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2_moe", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=args.hidden * 2, moe_intermediate_size=args.moe_inter,
                               shared_expert_intermediate_size=args.shared_inter,
                               num_hidden_layers=args.layers, num_attention_heads=args.heads,
                               num_key_value_heads=args.heads, num_experts=args.experts,
                               num_experts_per_tok=args.topk, norm_topk_prob=False, decoder_sparse_step=1,
                               mlp_only_layers=[], max_position_embeddings=512, rms_norm_eps=1e-6,
                               tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 0.5)
            elif p.dim() >= 2:
                p.normal_(0, 1.0 / np.sqrt(p.shape[-1]))
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(args.out)
    print(args.out)


def parse_ids(s: str):
    return [int(x) for x in s.split(",") if x]


def parse_range(s: str):
    a, b = s.split(":")
    return int(a), int(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("reference", "time"):
        p = sub.add_parser(name)
        p.add_argument("--model")
        p.add_argument("--ids", type=parse_ids)
        p.add_argument("--subject-range", type=parse_range)
        p.add_argument("--window", type=int, default=10)
        p.add_argument("--samples", type=int, default=10)
        p.add_argument("--noise", default="s3")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--out")
    sub.choices["reference"].add_argument("--all", action="store_true", help="every reference in REFERENCES")
    t = sub.choices["time"]
    t.add_argument("--dtype", default="float32")
    t.add_argument("--kinds", default="all")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--noise-file")
    t.add_argument("--scores", action="store_true", help="include the scores in the output")
    t.add_argument("--progress", action="store_true")
    m = sub.add_parser("make-model")
    m.add_argument("--out", required=True)
    m.add_argument("--vocab", type=int, default=4096)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--layers", type=int, default=12)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--experts", type=int, default=16)
    m.add_argument("--topk", type=int, default=4)
    m.add_argument("--moe-inter", type=int, default=256)
    m.add_argument("--shared-inter", type=int, default=512)
    m.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "reference":
        if not args.all and not (args.model and args.ids and args.subject_range and args.out):
            ap.error("reference needs --all, or --model --ids --subject-range --out")
        cmd_reference(args)
    elif args.cmd == "time":
        if not (args.model and args.ids and args.subject_range):
            ap.error("time needs --model --ids --subject-range")
        cmd_time(args)
    else:
        cmd_make_model(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
