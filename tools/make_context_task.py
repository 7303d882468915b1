#!/usr/bin/env python3
"""Build the context-dependent QA task (issue 19: Router Lens / CEFT) from the bundled CounterFact records.

Every record of datasets/data/counterfact/counterfact_preknown.json becomes one counter-memory example:

  context   a sentence that states the record's counterfactual target_new about its subject, written with one
            of the relation's prompt templates:  template_c.format(subject) + " " + target_new + "."
  question  the record's own rewrite prompt (template_q.format(subject)), a cloze the answer continues
  answer    target_new: the answer has to come from the context, since the model's memory says target_true

The context template is drawn (seeded) from the rewrite-prompt templates the bundled records use for the same
relation_id, other than the question's own template when the relation has more than one; a relation with a single
template states the context in the question's own words. Example (case 0, relation P103):

  context  "Danielle Darrieux is a native speaker of English."
  question "The mother tongue of Danielle Darrieux is"
  answer   "English"              (memory_answer "French")

Records are split by record (not by relation): a seeded shuffle of the records, the first --test-share of them
(rounded) form test.json, the rest train.json, each kept in case_id order. Output: a JSON list of objects
{case_id, relation_id, subject, context, question, answer, memory_answer, context_template, question_template}
(documented in datasets/data/context_task/README.md). Standard library only; the output depends only on the input
file and the flags.

    python3 tools/make_context_task.py            # writes datasets/data/context_task/{train,test}.json
"""
from __future__ import annotations

import argparse
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(records: list[dict], seed: int) -> list[dict]:
    templates: dict[str, list[str]] = {}
    for r in records:
        rw = r["requested_rewrite"]
        ts = templates.setdefault(rw["relation_id"], [])
        if rw["prompt"] not in ts:
            ts.append(rw["prompt"])
    rng = random.Random(seed)
    out = []
    for r in records:
        rw = r["requested_rewrite"]
        own = rw["prompt"]
        others = [t for t in templates[rw["relation_id"]] if t != own] or [own]
        ctx_t = rng.choice(others)
        subject, answer = rw["subject"], rw["target_new"]["str"]
        out.append({
            "case_id": r["case_id"],
            "relation_id": rw["relation_id"],
            "subject": subject,
            "context": ctx_t.format(subject) + " " + answer + ".",
            "question": own.format(subject),
            "answer": answer,
            "memory_answer": rw["target_true"]["str"],
            "context_template": ctx_t,
            "question_template": own,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=os.path.join(ROOT, "datasets/data/counterfact/counterfact_preknown.json"))
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "datasets/data/context_task"))
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--test-share", type=float, default=0.2)
    a = ap.parse_args()
    with open(a.input, encoding="utf-8") as f:
        records = json.load(f)
    examples = build(records, a.seed)
    order = list(range(len(examples)))
    random.Random(a.seed + 1).shuffle(order)
    n_test = round(a.test_share * len(examples))
    test_idx = set(order[:n_test])
    splits = {
        "test": [e for i, e in enumerate(examples) if i in test_idx],
        "train": [e for i, e in enumerate(examples) if i not in test_idx],
    }
    os.makedirs(a.out_dir, exist_ok=True)
    for name, rows in splits.items():
        path = os.path.join(a.out_dir, name + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=0)
            f.write("\n")
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
