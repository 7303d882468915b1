#!/usr/bin/env python3
"""Train moedit's bundled demo model (models/moedit-demo) from scratch on CPU.

A small Qwen2-MoE-architecture causal LM (routed experts with top-k routing plus a sigmoid-gated shared
expert, so both ROME/MEMIT editing targets exist) and its own byte-level BPE tokenizer, trained on

  * facts: every CounterFact record in datasets/data/counterfact/counterfact_preknown.json gives the
    sentences  P + " " + T + <|endoftext|>  for its rewrite prompt, 2 paraphrase prompts and 10
    neighborhood prompts with T = target_true, and for its 10 attribute prompts with T = target_new
    (true facts about other subjects); duplicates removed;
  * English: WikiText-2 raw test split (datasets/data/wikitext-2/wiki.test.raw), in 128-token chunks.

Subject bottleneck (--bottleneck-layer B, default 1). Trained plainly, a 4-layer model recalls a fact at the
prompt's last token: its first attention layer reads the subject's token embeddings and the last token's MLPs
do the lookup, so nothing about the fact lives at the subject's last token, where ROME edits (large LMs store
facts there; ROME, Meng et al. 2022, §2). To give the demo model that structure, fact sentences are trained
with a per-layer attention mask: positions after the subject cannot see the subject at layers <= B and see
only its last token above B, so everything the model knows about the subject has to be written into the
subject's last token by layers <= B and read from there. The mask is applied to a sentence with probability
--bottleneck-p (then --bottleneck-late-p from --bottleneck-late-from of the epochs on, so the model also
learns to ignore the subject tokens it can see when run without the mask); WikiText chunks are never
masked. The saved model is a plain Qwen2-MoE checkpoint and runs without any mask. Subject spans: the
record's subject for rewrite and paraphrase prompts; for neighborhood and attribute prompts the part a
relation template (the rewrite and paraphrase templates of that relation) leaves over (unmasked if none fits).

Both files are read from the project copies under datasets/data/. Everything is seeded (python, numpy,
torch, batch order); with the same thread count and library versions the run is repeatable.

Typical use (see models/moedit-demo/MODEL_CARD.md for the measured runtime):
    nohup python tools/train_demo_model.py > /tmp/moedit-demo-train.out 2>&1 &
    tail -f /tmp/moedit-demo-train.log
    python tools/train_demo_model.py --quick --out /tmp/moedit-demo-quick   # end-to-end smoke run

Afterwards tools/measure_demo_model.py re-derives the accuracy numbers from the saved files.

Continuation mode (--init DIR; models/moedit-demo-ctx, issue 19): continue training DIR's checkpoint with its own
tokenizer (copied, not retrained) on the same fact sentences and WikiText-2 chunks plus in-context copying batches
(--copy-mix, --copy-kinds; see continue_training() and copy_examples()). Without --init nothing changes: the default
run trains models/moedit-demo exactly as before. The command that made models/moedit-demo-ctx:
    python tools/train_demo_model.py --init models/moedit-demo --out models/moedit-demo-ctx \
        --copy-mix 0.5 --copy-kinds induction,counter --copy-weights 1,2 --fact-frac 0.25 --wiki-frac 0.05 \
        --epochs 6 --lr 2e-3 --warmup 30 --eval-every 3 --max-seconds 840
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure_demo_model as mdm  # noqa: E402

ROOT = mdm.ROOT
EOT = "<|endoftext|>"
# Qwen2's pre-tokenizer split regex (spec/architectures.md §12), used with behavior Isolated.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ----------------------------------------------------------------------------------------------- utils
class Logger:
    def __init__(self, path: str | None):
        self.f = open(path, "a", encoding="utf-8") if path else None
        self.t0 = time.time()

    def __call__(self, *a):
        msg = " ".join(str(x) for x in a)
        line = f"[{time.time() - self.t0:8.1f}s] {msg}"
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE, Qwen2-style pipeline: NFC -> Split(Qwen2 regex, Isolated) -> ByteLevel(no regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tokenizer_files(tok, out_dir: str, model_max_length: int):
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    # The Python ByteLevel decoder ignores its constructor options and serialises the defaults
    # (add_prefix_space/trim_offsets/use_regex = true). They have no effect on decoding; write Qwen2's
    # values so the file reads like a Qwen2 tokenizer.json.
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    d["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, ensure_ascii=False, indent=2)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------------------ data
def fact_sentences(items):
    """Unique (prompt, target) pairs in first-occurrence order, with the kinds each came from."""
    seen: dict[tuple[str, str], set] = {}
    for kind, _, p, t in items:
        seen.setdefault((p, t), set()).add(kind)
    return [(p, t, sorted(k)) for (p, t), k in seen.items()]


def tokenize_facts(tok, facts, eot_id: int, log):
    """ids = encode(P) + encode(" " + T) + [EOT]; checks encode(P + " " + T) == encode(P) + encode(" " + T)."""
    out, mismatches = [], []
    for p, t, kinds in facts:
        ip = mdm.encode(tok, p)
        it = mdm.encode(tok, " " + t)
        whole = mdm.encode(tok, p + " " + t)
        if whole != ip + it:
            mismatches.append((p, t))
        out.append((ip, it, eot_id))
    log(f"prompt-prefix tokenization check: {len(facts) - len(mismatches)} / {len(facts)} training sentences "
        f"have encode(P+' '+T) == encode(P)+encode(' '+T); mismatches: {len(mismatches)}")
    for p, t in mismatches[:20]:
        log(f"  MISMATCH: {p!r} + {t!r}")
    return out, mismatches


def prompt_subjects(records, items) -> dict[str, str]:
    """prompt -> subject: the record's subject for rewrite/paraphrase prompts; for neighborhood/attribute
    prompts the middle that the longest-fitting template of the record's relation leaves over."""
    by_case = {r["case_id"]: r for r in records}
    templates: dict[str, set] = {}
    for r in records:
        rw = r["requested_rewrite"]
        templates.setdefault(rw["relation_id"], set()).add(rw["prompt"])
        for p in r["paraphrase_prompts"]:
            i = p.rfind(rw["subject"])
            if i >= 0:
                templates[rw["relation_id"]].add("{}" + p[i + len(rw["subject"]):])
    out = {}
    for kind, cid, prompt, _ in items:
        rw = by_case[cid]["requested_rewrite"]
        if kind in ("rewrite", "paraphrase"):
            out.setdefault(prompt, rw["subject"])
            continue
        best = None
        for t in templates.get(rw["relation_id"], ()):
            a, b = t.split("{}", 1)
            if prompt.startswith(a) and prompt.endswith(b) and len(prompt) > len(a) + len(b):
                if best is None or len(a) + len(b) > best[0]:
                    best = (len(a) + len(b), prompt[len(a):len(prompt) - len(b)])
        if best:
            out.setdefault(prompt, best[1].strip())
    return out


def subject_token_span(tok, prompt: str, subject: str | None):
    """(first, last) token index of the last occurrence of `subject` in encode(prompt), or None."""
    if not subject:
        return None
    i = prompt.rfind(subject)
    if i < 0:
        return None
    enc = tok.encode(prompt, add_special_tokens=False)
    idx = [k for k, (a, b) in enumerate(enc.offsets) if a < i + len(subject) and b > i]
    return (idx[0], idx[-1]) if idx else None


def make_fact_examples(tok_facts, target_weight: float, prompt_weight: float, spans=None):
    """Each example: (input ids, labels, loss weights, subject token span or None); labels[i] is the token
    after position i."""
    ex = []
    for n, (ip, it, eot) in enumerate(tok_facts):
        seq = ip + it + [eot]
        x = seq[:-1]
        y = seq[1:]
        w = [prompt_weight] * (len(ip) - 1) + [target_weight] * len(it) + [1.0]
        # the first target token (predicted from the last prompt position) is the one that is measured
        w[len(ip) - 1] = target_weight * 2.0
        # weight-0 positions are context only: no logits are computed there (saves the lm_head cost)
        y = [t if wi > 0 else -100 for t, wi in zip(y, w)]
        ex.append((x, y, w, spans[n] if spans else None))
    return ex


def fact_batches(examples, batch_tokens: int, rng: np.random.Generator):
    """Length-bucketed batches (little padding), shuffled order."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    batches, cur, cur_max = [], [], 0
    for i in order:
        L = len(examples[i][0])
        if cur and max(cur_max, L) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, L)
    if cur:
        batches.append(cur)
    return [("fact", b) for b in batches]


def collate_facts(examples, idxs, pad_id: int, mask_p: float = 0.0, rng: np.random.Generator | None = None):
    """x, y, w [B, L]; masks None or (low, high) bool [B, 1, L, L] (True: may attend): the subject-bottleneck
    masks for layers <= B and > B, applied to each sentence with a subject span with probability mask_p."""
    L = max(len(examples[i][0]) for i in idxs)
    B = len(idxs)
    x = torch.full((B, L), pad_id, dtype=torch.long)
    y = torch.full((B, L), -100, dtype=torch.long)
    w = torch.zeros((B, L), dtype=torch.float32)
    if mask_p > 0:  # built only when some sentence may be masked
        causal = torch.ones((L, L), dtype=torch.bool).tril()
        low = causal.repeat(B, 1, 1, 1)
        high = causal.repeat(B, 1, 1, 1)
    masked = 0
    for r, i in enumerate(idxs):
        xi, yi, wi, span = examples[i]
        n = len(xi)
        x[r, :n] = torch.tensor(xi)
        y[r, :n] = torch.tensor(yi)
        w[r, :n] = torch.tensor(wi)
        if span is not None and mask_p > 0 and rng.random() < mask_p:
            s0, s1 = span
            low[r, 0, s1 + 1 :, s0 : s1 + 1] = False  # after the subject: no subject token at layers <= B
            high[r, 0, s1 + 1 :, s0:s1] = False  # above B: the subject's last token only
            masked += 1
    return x, y, w, ((low, high) if masked else None)


def wiki_batches(wiki_ids: list[int], ctx: int, batch_seqs: int, frac: float, rng: np.random.Generator):
    """Random offset, non-overlapping (ctx+1)-token chunks; a `frac` share of them, in batches."""
    off = int(rng.integers(0, ctx))
    starts = list(range(off, len(wiki_ids) - ctx - 1, ctx))
    rng.shuffle(starts)
    starts = starts[: max(1, int(round(len(starts) * frac)))]
    return [("wiki", starts[i : i + batch_seqs]) for i in range(0, len(starts), batch_seqs)]


def collate_wiki(wiki_ids, starts, ctx: int):
    a = torch.tensor([wiki_ids[s : s + ctx + 1] for s in starts], dtype=torch.long)
    x, y = a[:, :-1], a[:, 1:]
    return x, y, torch.ones(y.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- model
def build_model(args, vocab_size: int, eot_id: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.shared_inter,  # dense-MLP width; unused (every layer is sparse)
        moe_intermediate_size=args.moe_inter,
        shared_expert_intermediate_size=args.shared_inter,
        num_experts=args.experts,
        num_experts_per_tok=args.topk,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=args.max_pos,
        tie_word_embeddings=False,
        use_sliding_window=False,
        router_aux_loss_coef=args.aux_coef,
        initializer_range=0.02,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=None,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"  # training only; the final measurement uses eager
    cfg._experts_implementation = "eager"
    return Qwen2MoeForCausalLM(cfg)


def forward_bottleneck(model, x, masks, bottleneck: int):
    """The decoder stack with mask masks[0] at layers <= bottleneck and masks[1] above; returns the final
    normed hidden states [B, L, H] and the router logits of every layer (as output_router_logits gives)."""
    m = model.model
    h = m.embed_tokens(x)
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    pe = m.rotary_emb(h, pos)
    router_logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out: router_logits.append(out[0]))
             for layer in m.layers]
    try:
        for i, layer in enumerate(m.layers):
            h = layer(h, attention_mask=masks[0] if i <= bottleneck else masks[1], position_ids=pos,
                      position_embeddings=pe)
    finally:
        for hk in hooks:
            hk.remove()
    return m.norm(h), tuple(router_logits)


def step_loss(model, x, y, w, aux_coef: float, num_experts: int, topk: int, masks=None, bottleneck: int = -1):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    if masks is None:
        out = model.model(input_ids=x, output_router_logits=True)
        h, router_logits = out.last_hidden_state, out.router_logits
    else:
        h, router_logits = forward_bottleneck(model, x, masks, bottleneck)
    sel = y != -100
    logits = model.lm_head(h[sel])
    ce = F.cross_entropy(logits.float(), y[sel], reduction="none")
    ws = w[sel]
    loss = (ce * ws).sum() / ws.sum()
    # Switch-style balance loss over the loss positions: every real token of a WikiText chunk, and for a
    # fact sentence (prompt weight 0) the positions that predict the answer tokens and <|endoftext|>.
    aux = load_balancing_loss_func(router_logits, num_experts, topk, sel.long())
    return loss + aux_coef * aux, ce.mean().item(), float(aux)


def start_run(args):
    """Threads, seeds and the log of a run (the log opens with the arguments); returns the logger."""
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    log = Logger(args.log)
    log("args:", json.dumps(vars(args)))
    return log


def optimizer_step(model, opt, args, lr, batch, masks, n_experts, topk):
    """One optimiser step on a collated batch (x, y, w) at learning rate lr; returns (ce, aux) of step_loss."""
    x, y, w = (t.to(args.device) for t in batch)
    if masks is not None:
        masks = tuple(m.to(args.device) for m in masks)
    for g in opt.param_groups:
        g["lr"] = lr
    loss, ce, aux = step_loss(model, x, y, w, args.aux_coef, n_experts, topk, masks, args.bottleneck_layer)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    return ce, aux


@torch.no_grad()
def quick_fact_accuracy(model, tok, eval_items, kinds=("rewrite", "paraphrase", "neighborhood", "attribute")):
    model.eval()
    r = mdm.first_token_accuracy(model, tok, eval_items, kinds)
    model.train()
    return r


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "moedit-demo"))
    ap.add_argument("--log", default="/tmp/moedit-demo-train.log")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: fastest on the shared 2-core box, and the documented setting)")
    ap.add_argument("--quick", action="store_true", help="small end-to-end smoke run (subset, few epochs)")
    ap.add_argument("--device", default="cpu",
                    help="torch device for training (cpu: the documented, reproducible setting; cuda works too, "
                         "but results then differ numerically from the bundled checkpoint)")
    # tokenizer / model sizes
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--moe-inter", type=int, default=128)
    ap.add_argument("--shared-inter", type=int, default=256)
    ap.add_argument("--max-pos", type=int, default=512)
    # optimisation
    ap.add_argument("--epochs", type=int, default=36, help="passes over the fact sentences")
    ap.add_argument("--wiki-frac", type=float, default=0.2, help="share of WikiText-2 chunks seen per epoch")
    ap.add_argument("--ctx", type=int, default=128, help="WikiText-2 training chunk length")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--target-weight", type=float, default=3.0)
    ap.add_argument("--prompt-weight", type=float, default=0.0,
                    help="loss weight of the prompt tokens of fact sentences (0: context only)")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--bottleneck-layer", type=int, default=1,
                    help="subject bottleneck (see above): last layer at which later positions cannot see the subject "
                         "(-1: off, plain training)")
    ap.add_argument("--bottleneck-p", type=float, default=1.0, help="share of fact sentences masked, early epochs")
    ap.add_argument("--bottleneck-late-p", type=float, default=0.5, help="share masked in the late epochs")
    ap.add_argument("--bottleneck-late-from", type=float, default=0.6,
                    help="fraction of the epochs after which --bottleneck-late-p applies")
    # continuation mode (models/moedit-demo-ctx): start from a checkpoint, reuse its tokenizer, mix in copying data
    ap.add_argument("--init", default=None,
                    help="continue training from this checkpoint folder (its tokenizer is reused, none is trained); "
                         "the defaults below then apply, see continue_training()")
    ap.add_argument("--copy-mix", type=float, default=0.0,
                    help="with --init: share of the batches that are in-context copying batches")
    ap.add_argument("--copy-kinds", default="induction,counter",
                    help="with --init: which copying data (comma list of induction, counter, counter-x); see "
                         "copy_examples()")
    ap.add_argument("--copy-weights", default="1,1,1",
                    help="with --init: relative shares of the --copy-kinds in the copy batches (same order)")
    ap.add_argument("--fact-frac", type=float, default=1.0,
                    help="with --init: share of the fact sentences seen per epoch")
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="with --init: stop after the first epoch that ends past this many seconds (0: no limit)")
    args = ap.parse_args()

    if args.init:
        return continue_training(args)

    if args.quick:
        args.epochs = min(args.epochs, 4)
        args.wiki_frac = 0.05
        args.eval_every = 2

    log = start_run(args)
    log(f"python {platform.python_version()} torch {torch.__version__} threads {torch.get_num_threads()} "
        f"cpu {platform.processor() or platform.machine()}")
    import tokenizers
    import transformers

    log(f"transformers {transformers.__version__} tokenizers {tokenizers.__version__} numpy {np.__version__}")
    t_start = time.time()

    # ---- data (project copies)
    records = mdm.load_counterfact()
    if args.quick:
        records = records[:150]
    items = mdm.prompt_items(records)
    facts = fact_sentences(items)
    wiki = mdm.read_wikitext()
    log(f"CounterFact records {len(records)}, prompt items {len(items)}, unique training sentences {len(facts)}")
    conflicts: dict[str, set] = {}
    for p, t, _ in facts:
        conflicts.setdefault(p, set()).add(t)
    conflicts = {p: ts for p, ts in conflicts.items() if len(ts) > 1}
    n_eval_conf = sum(1 for k, _, p, _ in items if k != "attribute" and p in conflicts)
    log(f"prompts with >1 distinct target in the corpus: {len(conflicts)} "
        f"(affecting {n_eval_conf} rewrite/paraphrase/neighborhood prompt instances)")

    # ---- tokenizer
    tok_texts = [p + " " + t for p, t, _ in facts] + wiki.split("\n")
    tok = build_tokenizer(tok_texts, args.vocab)
    eot_id = tok.token_to_id(EOT)
    vocab_size = tok.get_vocab_size()
    log(f"tokenizer: vocab {vocab_size}, {EOT} id {eot_id}")
    tok_facts, mismatches = tokenize_facts(tok, facts, eot_id, log)
    wiki_ids = mdm.encode(tok, wiki)
    n_fact_tokens = sum(len(a) + len(b) + 1 for a, b, _ in tok_facts)
    log(f"fact tokens {n_fact_tokens}, WikiText-2 test tokens {len(wiki_ids)}")
    firsts = {}
    for _, _, _, t in items:
        firsts.setdefault(mdm.encode(tok, " " + t)[0], set()).add(t)
    shared_first = {k: v for k, v in firsts.items() if len(v) > 1}
    log(f"distinct targets {sum(len(v) for v in firsts.values())}, distinct first tokens {len(firsts)}; "
        f"first tokens shared by several targets: {[sorted(v) for v in shared_first.values()][:10]}")

    subjects = prompt_subjects(records, items)
    spans = [subject_token_span(tok, p, subjects.get(p)) for p, _, _ in facts]
    log(f"subject spans: {sum(s is not None for s in spans)} / {len(facts)} training sentences "
        f"(bottleneck layer {args.bottleneck_layer})")
    examples = make_fact_examples(tok_facts, args.target_weight, args.prompt_weight, spans)

    # ---- model
    seed_everything(args.seed)
    model = build_model(args, vocab_size, eot_id).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model params {n_params} ({n_params / 1e6:.3f} M); config hidden {args.hidden} layers {args.layers} "
        f"heads {args.heads} experts {args.experts} top-{args.topk} moe_inter {args.moe_inter} "
        f"shared_inter {args.shared_inter}")
    model.train()

    rng = np.random.default_rng(args.seed)
    wiki_batch_seqs = max(1, args.batch_tokens // args.ctx)
    # precompute the number of steps for the LR schedule
    n_fact_batches = len(fact_batches(examples, args.batch_tokens, np.random.default_rng(0)))
    n_wiki_batches = len(wiki_batches(wiki_ids, args.ctx, wiki_batch_seqs, args.wiki_frac, np.random.default_rng(0)))
    total_steps = args.epochs * (n_fact_batches + n_wiki_batches)
    log(f"steps/epoch ~{n_fact_batches} fact + {n_wiki_batches} wiki, total ~{total_steps}")

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    eval_items = items[::7]  # in-training progress estimate on a fixed 1/7 subsample (fp32, sdpa)
    step = 0
    history = []
    for epoch in range(1, args.epochs + 1):
        te = time.time()
        mask_p = 0.0
        if args.bottleneck_layer >= 0:
            late = epoch > args.bottleneck_late_from * args.epochs
            mask_p = args.bottleneck_late_p if late else args.bottleneck_p
        batches = fact_batches(examples, args.batch_tokens, rng) + wiki_batches(
            wiki_ids, args.ctx, wiki_batch_seqs, args.wiki_frac, rng
        )
        perm = rng.permutation(len(batches))
        sums = {"fact": [0.0, 0], "wiki": [0.0, 0]}
        aux_sum, ntok = 0.0, 0
        for bi in perm:
            kind, payload = batches[bi]
            masks = None
            if kind == "fact":
                x, y, w, masks = collate_facts(examples, payload, eot_id, mask_p, rng)
            else:
                x, y, w = collate_wiki(wiki_ids, payload, args.ctx)
            ce, aux = optimizer_step(model, opt, args, lr_at(step), (x, y, w), masks, args.experts, args.topk)
            step += 1
            sums[kind][0] += ce
            sums[kind][1] += 1
            aux_sum += aux
            ntok += x.numel() if kind == "wiki" else sum(len(examples[i][0]) for i in payload)  # input tokens
        dt = time.time() - te
        rec = {
            "epoch": epoch,
            "fact_ce": sums["fact"][0] / max(1, sums["fact"][1]),
            "wiki_ce": sums["wiki"][0] / max(1, sums["wiki"][1]),
            "aux": aux_sum / len(perm),
            "tok_per_s": ntok / dt,
            "elapsed_s": time.time() - t_start,
        }
        rec["mask_p"] = mask_p
        msg = (f"epoch {epoch}/{args.epochs} mask_p {mask_p:.2f} step {step} lr {lr_at(step):.2e} fact_ce {rec['fact_ce']:.4f} "
               f"wiki_ce {rec['wiki_ce']:.4f} aux {rec['aux']:.4f} {rec['tok_per_s']:.0f} tok/s "
               f"epoch {dt:.0f}s total {rec['elapsed_s']:.0f}s")
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            acc = quick_fact_accuracy(model, tok, eval_items)
            rec["acc"] = {k: v["percent"] for k, v in acc.items()}
            msg += " | acc(fp32 train weights) " + " ".join(f"{k[:5]} {v['percent']:.1f}" for k, v in acc.items())
        history.append(rec)
        log(msg)
    train_seconds = time.time() - t_start
    log(f"training finished in {train_seconds:.0f}s")

    # ---- save (bf16) and re-measure the reloaded checkpoint
    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model.config.use_cache = True
    model.to("cpu").to(torch.bfloat16).save_pretrained(args.out)
    cfg_path = os.path.join(args.out, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["rope_theta"] = 10000.0  # legacy top-level key too, for readers that predate rope_parameters
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    write_tokenizer_files(tok, args.out, args.max_pos)
    check_transformers_tokenizer(args.out, items, log)

    if args.quick:  # smoke run: measure on the trained subset and a slice of WikiText-2 only
        res = mdm.measure(args.out, write=True, log=log, max_records=len(records), wiki_chars=50000)
    else:
        res = mdm.measure(args.out, write=True, log=log)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    summary = {
        "args": vars(args),
        "params": n_params,
        "vocab_size": vocab_size,
        "fact_sentences": len(facts),
        "fact_tokens": n_fact_tokens,
        "wiki_tokens": len(wiki_ids),
        "tokenization_mismatches": len(mismatches),
        "conflicting_prompts": len(conflicts),
        "conflicting_eval_prompt_instances": n_eval_conf,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "dir_bytes": size,
        "history": history,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": platform.python_version()},
    }
    log("SUMMARY " + json.dumps({k: v for k, v in summary.items() if k != "history"}))
    with open(args.log + ".summary.json", "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "measured": res}, f, indent=2)
    return 0


# ------------------------------------------------------------------------ continuation: in-context copying
def context_task_subjects() -> set[str]:
    """Subjects of every context-task example (datasets/data/context_task/{train,test}.json); copying data must
    not mention them."""
    out = set()
    for split in ("train", "test"):
        with open(os.path.join(ROOT, "datasets", "data", "context_task", split + ".json"), encoding="utf-8") as f:
            out |= {e["subject"] for e in json.load(f)}
    return out


def counter_pool(records, items, log):
    """Neighborhood and attribute prompts (true facts about subjects other than the records' own) whose text
    names no context-task subject: (prompt, true target, relation_id, subject or None, relation templates)."""
    task_subjects = context_task_subjects()
    rel_of = {r["case_id"]: r["requested_rewrite"]["relation_id"] for r in records}
    answers: dict[str, set] = {}
    templates: dict[str, list] = {}
    for r in records:
        rw = r["requested_rewrite"]
        answers.setdefault(rw["relation_id"], set()).update({rw["target_true"]["str"], rw["target_new"]["str"]})
        ts = templates.setdefault(rw["relation_id"], [])
        if rw["prompt"] not in ts:
            ts.append(rw["prompt"])
    subjects = prompt_subjects(records, items)
    pool, seen, dropped = [], set(), 0
    for kind, cid, prompt, target in items:
        if kind not in ("neighborhood", "attribute") or prompt in seen:
            continue
        seen.add(prompt)
        if any(s in prompt for s in task_subjects):
            dropped += 1
            continue
        rel = rel_of[cid]
        pool.append((prompt, target, rel, subjects.get(prompt), templates[rel]))
    answers = {k: sorted(v) for k, v in answers.items()}
    log(f"copy data: {len(pool)} counter-memory prompts ({dropped} dropped: they name a context-task subject), "
        f"{sum(p[3] is not None for p in pool)} with a subject span")
    return pool, answers


def copy_examples(kinds, weights, n_tokens, tok, pool, answers, wiki_ids, eot_id, target_weight, rng):
    """Fresh copying examples (input ids, labels, weights, None) totalling about n_tokens input tokens:

    induction  a WikiText-2 span A (6-24 tokens), a filler span (0-24 tokens), A again; loss on A's repeat
               (from its second token on): generic copying, no fact format at all;
    counter    a counter-memory context in the question's own words: P + " " + X + "." + " " + P -> " " + X for
               a neighborhood/attribute prompt P (a subject that is no context-task subject) and a random
               other answer X of the relation (drawn anew every epoch, so no counterfactual is memorised);
    counter-x  as counter, but the context states X with another template of the relation (the context task's
               own format, on other subjects; prompts whose subject span is unknown fall back to counter).
    Loss weights as for fact sentences: answer tokens target_weight (the first x2), <|endoftext|> 1, else 0."""
    out, total = [], 0
    p = np.array(weights, dtype=float) / sum(weights)
    while total < n_tokens:
        kind = kinds[int(rng.choice(len(kinds), p=p))]
        if kind == "induction":
            L, Fl = int(rng.integers(6, 25)), int(rng.integers(0, 25))
            s = int(rng.integers(0, len(wiki_ids) - 2 * L - Fl - 2))
            a = wiki_ids[s : s + L]
            f0 = int(rng.integers(0, len(wiki_ids) - Fl - 1))
            seq = a + wiki_ids[f0 : f0 + Fl] + a
            x, y = seq[:-1], seq[1:]
            w = [0.0] * (len(seq) - L) + [1.0] * (L - 1)
        else:
            prompt, true_t, rel, subj, tmpls = pool[int(rng.integers(0, len(pool)))]
            first_true = mdm.encode(tok, " " + true_t)[0]
            cands = [a for a in answers[rel] if mdm.encode(tok, " " + a)[0] != first_true]
            if not cands:
                continue
            ans = cands[int(rng.integers(0, len(cands)))]
            ctx_sentence = prompt + " " + ans + "."
            if kind == "counter-x" and subj:
                others = [t for t in tmpls if not (prompt.startswith(t.split("{}")[0]) and
                                                   prompt.endswith(t.split("{}")[1]))] or tmpls
                ctx_sentence = others[int(rng.integers(0, len(others)))].format(subj) + " " + ans + "."
            ip = mdm.encode(tok, ctx_sentence + " " + prompt)
            it = mdm.encode(tok, " " + ans)
            seq = ip + it + [eot_id]
            x, y = seq[:-1], seq[1:]
            w = [0.0] * (len(ip) - 1) + [target_weight] * len(it) + [1.0]
            w[len(ip) - 1] = target_weight * 2.0
        y = [t if wi > 0 else -100 for t, wi in zip(y, w)]
        out.append((x, y, w, None))
        total += len(x)
    return out


@torch.no_grad()
def context_task_em(model, tok, examples) -> dict:
    """Exact match as moedit scores the context task: prompt = context + " " + question, the greedy continuation
    of as many tokens as encode(" " + answer) has; also how often the first token is the memory answer's."""
    model.eval()
    em = mem = 0
    for e in examples:
        ids = mdm.encode(tok, e["context"] + " " + e["question"])
        ans = mdm.encode(tok, " " + e["answer"])
        memo = mdm.encode(tok, " " + e["memory_answer"])
        cur = list(ids)
        for _ in range(len(ans)):
            cur.append(int(model(input_ids=torch.tensor([cur]), logits_to_keep=1).logits[0, -1].argmax()))
        gen = cur[len(ids):]
        em += int(gen == ans)
        mem += int(gen[0] == memo[0])
    model.train()
    return {"em": round(100.0 * em / len(examples), 2), "memory_first_token": round(100.0 * mem / len(examples), 2),
            "n": len(examples)}


def continue_training(args) -> int:
    """--init DIR: continue training DIR's model (same architecture, same tokenizer files, byte for byte) on the
    original mix -- a --fact-frac share of the fact sentences (the subject-bottleneck mask on a
    --bottleneck-late-p share of them, as in the original's last epochs) and a --wiki-frac share of the WikiText-2
    chunks per epoch -- plus copying batches (copy_examples), a --copy-mix share of all batches. Linear warm-up and
    cosine decay as in the original; the result is saved and measured as the original is."""
    import shutil

    import tokenizers
    import transformers
    from transformers import Qwen2MoeForCausalLM

    log = start_run(args)
    log(f"python {platform.python_version()} torch {torch.__version__} threads {torch.get_num_threads()} "
        f"transformers {transformers.__version__} tokenizers {tokenizers.__version__} numpy {np.__version__}")
    if not 0 <= args.copy_mix < 1:
        raise SystemExit("--copy-mix must be in [0, 1)")
    kinds = [k for k in args.copy_kinds.split(",") if k]
    weights = [float(v) for v in args.copy_weights.split(",")][: len(kinds)]
    if any(k not in ("induction", "counter", "counter-x") for k in kinds) or len(weights) != len(kinds):
        raise SystemExit("--copy-kinds: induction, counter, counter-x; --copy-weights: one weight each")
    t_start = time.time()
    init = os.path.abspath(args.init)
    tok = mdm.load_tokenizer(init)
    eot_id = tok.token_to_id(EOT)
    records = mdm.load_counterfact()
    items = mdm.prompt_items(records)
    facts = fact_sentences(items)
    tok_facts, _ = tokenize_facts(tok, facts, eot_id, log)
    wiki_ids = mdm.encode(tok, mdm.read_wikitext())
    subjects = prompt_subjects(records, items)
    spans = [subject_token_span(tok, p, subjects.get(p)) for p, _, _ in facts]
    examples = make_fact_examples(tok_facts, args.target_weight, args.prompt_weight, spans)
    pool, answers = counter_pool(records, items, log)
    with open(os.path.join(ROOT, "datasets", "data", "context_task", "train.json"), encoding="utf-8") as f:
        task_train = json.load(f)
    monitor = task_train[::3]  # in-training check on the context task's *train* split (the test split is untouched)

    model = Qwen2MoeForCausalLM.from_pretrained(init, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    model.config._experts_implementation = "eager"
    model.to(args.device).train()
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    log(f"init {init}: {n_params} params, {len(examples)} fact sentences, {len(wiki_ids)} WikiText tokens")

    rng = np.random.default_rng(args.seed)
    wiki_batch_seqs = max(1, args.batch_tokens // args.ctx)
    n_fact = len(fact_batches(examples[: int(len(examples) * args.fact_frac)], args.batch_tokens,
                              np.random.default_rng(0)))
    n_wiki = len(wiki_batches(wiki_ids, args.ctx, wiki_batch_seqs, args.wiki_frac, np.random.default_rng(0)))
    n_copy = int(round(args.copy_mix / (1 - args.copy_mix) * (n_fact + n_wiki)))
    total_steps = args.epochs * (n_fact + n_wiki + n_copy)
    log(f"steps/epoch ~{n_fact} fact + {n_wiki} wiki + {n_copy} copy ({kinds}, weights {weights}), "
        f"total ~{total_steps}")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    eval_items = items[::7]
    rec0 = {"epoch": 0, "context_em_train_subset": context_task_em(model, tok, monitor)}
    log(f"before: context task (train split, every 3rd) {rec0['context_em_train_subset']}")
    history, step = [rec0], 0
    mask_p = args.bottleneck_late_p if args.bottleneck_layer >= 0 else 0.0
    for epoch in range(1, args.epochs + 1):
        te = time.time()
        order = rng.permutation(len(examples))[: int(len(examples) * args.fact_frac)]
        sub = [examples[i] for i in order]
        copy_ex = copy_examples(kinds, weights, int(n_copy * args.batch_tokens * 0.8), tok, pool, answers,
                                wiki_ids, eot_id, args.target_weight, rng)
        batches = ([("fact", b) for _, b in fact_batches(sub, args.batch_tokens, rng)]
                   + wiki_batches(wiki_ids, args.ctx, wiki_batch_seqs, args.wiki_frac, rng)
                   + [("copy", b) for _, b in fact_batches(copy_ex, args.batch_tokens, rng)])
        perm = rng.permutation(len(batches))
        sums = {"fact": [0.0, 0], "wiki": [0.0, 0], "copy": [0.0, 0]}
        for bi in perm:
            kind, payload = batches[bi]
            masks = None
            if kind == "fact":
                x, y, w, masks = collate_facts(sub, payload, eot_id, mask_p, rng)
            elif kind == "copy":
                x, y, w, _ = collate_facts(copy_ex, payload, eot_id)
            else:
                x, y, w = collate_wiki(wiki_ids, payload, args.ctx)
            ce, _ = optimizer_step(model, opt, args, lr_at(step), (x, y, w), masks, cfg.num_experts,
                                   cfg.num_experts_per_tok)
            step += 1
            sums[kind][0] += ce
            sums[kind][1] += 1
        rec = {"epoch": epoch, "steps": step, "elapsed_s": round(time.time() - t_start, 1),
               **{k + "_ce": v[0] / max(1, v[1]) for k, v in sums.items()}}
        msg = (f"epoch {epoch}/{args.epochs} step {step} lr {lr_at(step):.2e} fact_ce {rec['fact_ce']:.4f} "
               f"wiki_ce {rec['wiki_ce']:.4f} copy_ce {rec['copy_ce']:.4f} epoch {time.time() - te:.0f}s "
               f"total {rec['elapsed_s']:.0f}s")
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            acc = quick_fact_accuracy(model, tok, eval_items)
            rec["acc"] = {k: v["percent"] for k, v in acc.items()}
            rec["context_em_train_subset"] = context_task_em(model, tok, monitor)
            msg += (" | acc " + " ".join(f"{k[:5]} {v['percent']:.1f}" for k, v in acc.items())
                    + f" | ctx {rec['context_em_train_subset']}")
        history.append(rec)
        log(msg)
        if args.max_seconds and time.time() - t_start > args.max_seconds and epoch < args.epochs:
            log(f"stopping after epoch {epoch}: past --max-seconds {args.max_seconds}")
            break
    train_seconds = time.time() - t_start
    log(f"training finished in {train_seconds:.0f}s")

    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model.config.use_cache = True
    model.config._attn_implementation = "sdpa"
    model.to("cpu").to(torch.bfloat16).save_pretrained(args.out)
    cfg_path = os.path.join(args.out, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg_json = json.load(f)
    cfg_json["rope_theta"] = 10000.0
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg_json, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the same tokenizer, byte for byte
        shutil.copyfile(os.path.join(init, name), os.path.join(args.out, name))
    res = mdm.measure(args.out, write=True, log=log)
    summary = {"args": vars(args), "params": n_params, "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.time() - t_start, 1), "history": history,
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "tokenizers": tokenizers.__version__, "python": platform.python_version()}}
    log("SUMMARY " + json.dumps({k: v for k, v in summary.items() if k != "history"}))
    with open(args.log + ".summary.json", "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "measured": res}, f, indent=2)
    return 0


def check_transformers_tokenizer(out_dir, items, log):
    """AutoTokenizer over the saved files must give the same ids as the raw `tokenizers` object."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out_dir)
    raw = mdm.load_tokenizer(out_dir)
    texts = [p for _, _, p, _ in items[:500]] + [" " + t for _, _, _, t in items[:500]] + ["héllo  wörld\n\n 12345 🙂"]
    bad = sum(1 for s in texts if hf(s, add_special_tokens=True)["input_ids"] != mdm.encode(raw, s))
    log(f"AutoTokenizer vs tokenizers: {len(texts) - bad}/{len(texts)} identical encodings (no BOS/EOS added)")


if __name__ == "__main__":
    sys.exit(main())
