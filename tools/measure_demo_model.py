#!/usr/bin/env python3
"""Re-measure the bundled demo model (models/moedit-demo) in PyTorch.

Prints and writes ``<model>/accuracy.json``:
  * first-token top-1 accuracy of ``target_true`` on the CounterFact rewrite, paraphrase and
    neighborhood prompts (counts and %), and of ``target_new`` on the attribute prompts
    (those are true facts about other subjects and are training data too);
  * WikiText-2 (raw, test split) token-level perplexity.

Definition (the same one moedit's C++ engine uses): for a prompt P and a target T, the prediction is
correct iff argmax of the next-token logits after ``tokenizer.encode(P)`` (no BOS, no special tokens)
equals the first id of ``tokenizer.encode(" " + T)``.

The checkpoint is loaded exactly as saved (bf16 on disk), upcast to float32 for the computation, with
``attn_implementation="eager"`` and the eager (per-expert loop) MoE implementation.

Usage:  python tools/measure_demo_model.py [--model models/moedit-demo] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "models", "moedit-demo")
COUNTERFACT = os.path.join(ROOT, "datasets", "data", "counterfact", "counterfact_preknown.json")
WIKITEXT_TEST = os.path.join(ROOT, "datasets", "data", "wikitext-2", "wiki.test.raw")
PPL_WINDOW = 128  # tokens per non-overlapping evaluation window (= the training context length)

KINDS = ("rewrite", "paraphrase", "neighborhood", "attribute")


def load_counterfact(path: str = COUNTERFACT) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def prompt_items(records: list[dict]) -> list[tuple[str, int, str, str]]:
    """(kind, case_id, prompt, target) for every prompt of every record.

    rewrite/paraphrase/neighborhood prompts are paired with target_true; attribute prompts with
    target_new (they are true statements about other subjects that have target_new)."""
    items = []
    for r in records:
        rw = r["requested_rewrite"]
        t_true = rw["target_true"]["str"]
        t_new = rw["target_new"]["str"]
        cid = r["case_id"]
        items.append(("rewrite", cid, rw["prompt"].format(rw["subject"]), t_true))
        items += [("paraphrase", cid, p, t_true) for p in r["paraphrase_prompts"]]
        items += [("neighborhood", cid, p, t_true) for p in r["neighborhood_prompts"]]
        items += [("attribute", cid, p, t_new) for p in r["attribute_prompts"]]
    return items


def load_tokenizer(model_dir: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def load_model(model_dir: str, dtype=torch.float32):
    """Load the saved checkpoint (bf16 on disk) and upcast to `dtype` for computation."""
    from transformers import Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    model.eval()
    return model


@torch.no_grad()
def next_token_argmax(model, seqs: list[list[int]], max_batch_tokens: int = 8192) -> list[int]:
    """Argmax next token after each sequence. Sequences are grouped by length, so no padding is used."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        by_len[len(s)].append(i)
    out = [0] * len(seqs)
    for length, idxs in sorted(by_len.items()):
        bs = max(1, max_batch_tokens // length)
        for j in range(0, len(idxs), bs):
            chunk = idxs[j : j + bs]
            x = torch.tensor([seqs[i] for i in chunk], dtype=torch.long, device=model.device)
            logits = model(input_ids=x, logits_to_keep=1).logits[:, -1, :]
            pred = logits.argmax(dim=-1).tolist()
            for i, p in zip(chunk, pred):
                out[i] = p
    return out


def first_token_accuracy(model, tok, items, kinds=KINDS) -> dict:
    """items: (kind, case_id, prompt, target). Returns {kind: {correct, total, percent}}."""
    sel = [it for it in items if it[0] in kinds]
    seqs = [encode(tok, p) for _, _, p, _ in sel]
    gold = [encode(tok, " " + t)[0] for _, _, _, t in sel]
    pred = next_token_argmax(model, seqs)
    res = {k: {"correct": 0, "total": 0, "misses": []} for k in kinds}
    for (kind, cid, prompt, target), g, p in zip(sel, gold, pred):
        res[kind]["total"] += 1
        res[kind]["correct"] += int(g == p)
        if g != p:
            res[kind]["misses"].append({"case_id": cid, "prompt": prompt, "target": target,
                                        "target_token": tok.id_to_token(g), "predicted_token": tok.id_to_token(p)})
    for k in kinds:
        t = res[k]["total"]
        res[k]["percent"] = round(100.0 * res[k]["correct"] / t, 2) if t else None
    return res


@torch.no_grad()
def wikitext_perplexity(model, tok, text: str, window: int = PPL_WINDOW, batch: int = 32) -> dict:
    """Token-level perplexity over non-overlapping `window`-token chunks of the whole test file
    (the first token of each chunk is context only; a trailing partial chunk is scored too)."""
    ids = encode(tok, text)
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) >= 2]
    nll, count = 0.0, 0
    full = [c for c in chunks if len(c) == window]
    rest = [c for c in chunks if len(c) != window]
    groups = [full[i : i + batch] for i in range(0, len(full), batch)] + [[c] for c in rest]
    for g in groups:
        x = torch.tensor(g, dtype=torch.long, device=model.device)
        logits = model(input_ids=x).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = x[:, 1:]
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        count += tgt.numel()
    return {
        "perplexity": round(math.exp(nll / count), 3),
        "nll_per_token": round(nll / count, 5),
        "tokens_scored": count,
        "tokens_total": len(ids),
        "window": window,
        "bytes": len(text.encode("utf-8")),
    }


def read_wikitext(path: str = WIKITEXT_TEST) -> str:
    """The file has CRLF line ends; it is read in Python text mode (universal newlines), i.e. every
    "\r\n" becomes "\n" -- for training, for the tokenizer corpus and for the perplexity alike."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def measure(model_dir: str, write: bool = True, log=print, max_records: int | None = None,
            wiki_chars: int | None = None) -> dict:
    """max_records / wiki_chars limit the work (smoke runs only; the reported numbers use neither)."""
    t0 = time.time()
    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    items = prompt_items(load_counterfact()[:max_records])
    acc = first_token_accuracy(model, tok, items)
    targets_of: dict[str, set] = defaultdict(set)
    for _, _, p, t in items:
        targets_of[p].add(t)
    for k in KINDS:  # a prompt that the corpus completes with several targets cannot be right for all
        for m in acc[k]["misses"]:
            m["corpus_targets_for_prompt"] = sorted(targets_of[m["prompt"]])
        acc[k]["misses_on_conflicting_prompts"] = sum(len(m["corpus_targets_for_prompt"]) > 1 for m in acc[k]["misses"])
    for k in KINDS:
        r = acc[k]
        log(f"{k:>13}: {r['correct']:6d} / {r['total']:6d} = {r['percent']:6.2f}%  (target_"
            f"{'new' if k == 'attribute' else 'true'}, first token; {len(r['misses'])} misses, "
            f"{r['misses_on_conflicting_prompts']} of them on prompts the corpus completes with >1 target)")
    wiki = read_wikitext()[:wiki_chars]
    ppl = wikitext_perplexity(model, tok, wiki)
    log(f"WikiText-2 test perplexity: {ppl['perplexity']:.3f} per token "
        f"({ppl['tokens_scored']} tokens scored, {ppl['window']}-token windows)")
    result = {
        "model": os.path.relpath(model_dir, ROOT),
        "definition": "first-token top-1: argmax next token after tokenizer.encode(prompt) == "
        "tokenizer.encode(' ' + target)[0]; no BOS",
        "weights": "as saved (bf16), computed in float32, attn_implementation=eager, experts eager",
        "counterfact_file": os.path.relpath(COUNTERFACT, ROOT),
        "wikitext_file": os.path.relpath(WIKITEXT_TEST, ROOT) + " (read with universal newlines: CRLF -> LF)",
        "partial": bool(max_records or wiki_chars),
        "first_token_accuracy": acc,
        "wikitext2_test": ppl,
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
    }
    if write:
        with open(os.path.join(model_dir, "accuracy.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not write <model>/accuracy.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    measure(os.path.abspath(args.model), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
