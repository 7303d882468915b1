"""Overhead of the Python binding: Model.run_with_cache against the same forward with the same captures in C++.

Rounds of `repeats` calls alternate between the two sides and their medians are compared. The anchor runs in the
same process (Model._time_forward: the C++ loop of forward + Hooks::capture of the same hooks, no Python), so load
changes hit both sides. The issue's bar: ratio <= 1.05 on the demo model.
Usage: python bench/bench_python.py [--tokens 64] [--repeats 5] [--rounds 60]   (OMP_NUM_THREADS=1 on a busy machine)
"""
import argparse
import pathlib
import statistics
import time

import moedit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def per_call(fn, repeats):
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "moedit-demo"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=60)
    a = ap.parse_args()
    model = moedit.Model(a.model)
    text = (ROOT / "datasets" / "data" / "wikitext-2" / "wiki.test.raw").read_text()[:20000]
    ids = model.tokenize(text)[: a.tokens]
    filters = {
        "every hook": None,
        "residual stream": lambda n: "resid" in n,
        "routing": lambda n: "hook_expert_ids" in n or "hook_expert_weights" in n,
    }
    print(f"{a.model}: {len(ids)} tokens, {a.repeats} calls x {a.rounds} rounds (median of rounds)")
    for label, f in filters.items():
        py, cpp = [], []
        model.run_with_cache(ids, names_filter=f)  # warm-up
        for _ in range(a.rounds):  # interleaved, so load changes hit both sides
            cpp.append(model._time_forward(ids, names_filter=f, repeats=a.repeats))
            py.append(per_call(lambda: model.run_with_cache(ids, names_filter=f), a.repeats))
        p, c = statistics.median(py), statistics.median(cpp)
        n = len(model.run_with_cache(ids, names_filter=f)[1])
        print(f"  {label:16s} {n:4d} hooks   Python {p * 1e3:8.3f} ms   C++ {c * 1e3:8.3f} ms   ratio {p / c:.3f}")


if __name__ == "__main__":
    main()
