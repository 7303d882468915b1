#!/usr/bin/env python3
"""Write datasets/data/counterfact/counterfact_unseen.json: CounterFact records about facts the demo model was never
trained on, for measuring edits "as a new user would try them" (issue 18).

The demo model (tools/train_demo_model.py) is trained on every bundled record's rewrite, paraphrase, neighbourhood
and attribute sentences, so each bundled subject is known under its own relation only. An unseen record pairs the
subject of one bundled record with the relation of another:

  * record j (relation R_j) gives the rewrite prompt, target_new, target_true, neighbourhood and attribute prompts
    (true facts about other subjects, as in CounterFact);
  * record i, with a relation other than R_j whose subjects are of the same kind (people, works and products,
    places, organisations: KIND below), gives the subject s_i; j's subject is replaced by s_i in j's paraphrase and
    generation prompts;
  * pairs whose s_i occurs in any training sentence of relation R_j (a neighbourhood or attribute prompt) are skipped,
    so the model has never seen s_i with that relation.

Records are drawn with a fixed seed; case_id = 100000 + running index, and `source_case_ids` = [i, j].
Usage (repository root; the committed file was written by this command):
    python3 tools/make_unseen_counterfact.py --n 200 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "datasets/data/counterfact/counterfact_preknown.json")
OUT = os.path.join(ROOT, "datasets/data/counterfact/counterfact_unseen.json")

# The kind of subject each bundled relation takes (Wikidata property → kind); relations not listed are not used.
KIND = {**{p: "person" for p in ("P103", "P27", "P937", "P20", "P19", "P101", "P413", "P108", "P39", "P1412")},
        **{p: "work" for p in ("P176", "P178", "P449", "P495", "P364")},
        **{p: "place" for p in ("P17", "P30", "P36", "P37", "P131", "P190")},
        **{p: "organisation" for p in ("P159", "P127")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    with open(SRC, encoding="utf-8") as f:
        recs = json.load(f)
    rel = lambda r: r["requested_rewrite"]["relation_id"]
    # Every training sentence of a relation (prompts only; subjects are matched as substrings).
    seen: dict[str, list[str]] = {}
    for r in recs:
        rr = r["requested_rewrite"]
        seen.setdefault(rel(r), []).extend(
            [rr["prompt"].replace("{}", rr["subject"])] + r["paraphrase_prompts"] + r["neighborhood_prompts"] +
            r["attribute_prompts"])
    rng = random.Random(args.seed)
    out, used = [], set()
    while len(out) < args.n:
        i, j = rng.randrange(len(recs)), rng.randrange(len(recs))
        ri, rj = recs[i], recs[j]
        if rel(ri) == rel(rj) or KIND.get(rel(ri)) is None or KIND.get(rel(ri)) != KIND.get(rel(rj)) or (i, j) in used:
            continue
        s_i, s_j = ri["requested_rewrite"]["subject"], rj["requested_rewrite"]["subject"]
        if any(s_i in p for p in seen[rel(rj)]):
            continue
        used.add((i, j))
        rw = dict(rj["requested_rewrite"], subject=s_i)
        out.append({
            "case_id": 100000 + len(out),
            "source_case_ids": [ri["case_id"], rj["case_id"]],
            "requested_rewrite": rw,
            "paraphrase_prompts": [p.replace(s_j, s_i) for p in rj["paraphrase_prompts"]],
            "neighborhood_prompts": rj["neighborhood_prompts"],
            "attribute_prompts": rj["attribute_prompts"],
            "generation_prompts": [p.replace(s_j, s_i) for p in rj["generation_prompts"]],
        })
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(out)} records to {args.out}")


if __name__ == "__main__":
    main()
