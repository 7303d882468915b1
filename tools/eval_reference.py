#!/usr/bin/env python3
"""The CounterFact evaluation loop of ROME's experiments/evaluate.py, in PyTorch on Hugging Face transformers: the
benchmark anchor of bench/bench_eval.cpp (cases per minute against moedit's eval/run.h).

Per case, on token ids handed over by bench_eval (so both sides score and edit the same sequences):
  pre:  teacher-forced mean NLL of " target_new" and " target_true" after every rewrite / paraphrase /
        neighborhood / attribute prompt, in one right-padded batch (ROME's test_batch_prediction), and the
        all-tokens-argmax check (MEMIT's *_prompts_correct); with generation, top-k 5 sampling of every
        generation prompt to 100 tokens in one left-padded batch (ROME's generate_fast, via HF generate + KV cache);
  edit: tools/rome_reference.py apply_edit (v*, keys, rank-one update; key statistics computed once, not timed);
  post: the same scores and generations;
  restore: the original down-projections copied back.
Prints JSON {"seconds": total wall time of the loop, "post_rewrite_success": [...], "torch": version}.
The n-gram entropy of the texts is not computed here (pure-Python string work, a negligible share of the time).

Only needs torch, transformers, numpy (tools/requirements.txt). Never run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rome_reference as rr  # noqa: E402


def score(model, prompts, t_new, t_true):
    """[(nll_new, nll_true, new_all_argmax, true_all_argmax)] per prompt, one right-padded batch."""
    seqs = [torch.tensor(p + t) for p in prompts for t in (t_new, t_true)]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True, padding_value=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = []
    for i, p in enumerate(prompts):
        row = []
        for v, t in enumerate((t_new, t_true)):
            lp = logp[2 * i + v]
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t))
            tt = torch.tensor(t)
            row.append((float(-lp[pos, tt].mean()), bool((lp[pos].argmax(-1) == tt).all())))
        out.append((row[0][0], row[1][0], row[0][1], row[1][1]))
    return out


def generate(model, prompts, new_tokens, seed):
    if new_tokens <= 0 or not prompts:
        return []
    rows = [torch.tensor(p) for p in prompts]  # left padding, as generate_fast: pad the reversed rows on the right
    ids = torch.nn.utils.rnn.pad_sequence([r.flip(0) for r in rows], batch_first=True, padding_value=0).flip(1)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).flip(1)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=5, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out.tolist()


def evaluate(model, case, generation, seed):
    s = score(model, case["score_prompts"], case["target_new"], case["target_true"])
    texts = generate(model, case["generation_prompts"], case["new_tokens"], seed) if generation else []
    return s, texts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.spec) as f:
        spec = json.load(f)
    model = rr.load_model(args.model, torch.float32)
    layer = spec["layer"]
    stats = rr.key_stats(model, layer, spec["corpus"])
    rewrite_success = []
    t0 = time.perf_counter()
    for i, case in enumerate(spec["cases"]):
        evaluate(model, case, spec["generation"], i)
        _, _, saved = rr.apply_edit(model, layer, case["edit"], spec["target"], stats)
        post, _ = evaluate(model, case, spec["generation"], i)
        rr.restore(model, layer, saved)
        rewrite_success.append(float(post[0][1] > post[0][0]))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "post_rewrite_success": rewrite_success, "torch": torch.__version__,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
