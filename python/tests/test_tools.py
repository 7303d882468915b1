"""trace / edit / evaluate through the binding give the JSON the CLI prints (timings aside)."""
import json

import numpy as np
import pytest

import moedit
from conftest import COUNTERFACT, DEMO

PROMPT = "The mother tongue of Danielle Darrieux is"
SUBJECT = "Danielle Darrieux"


def without(d, *paths):
    """A deep copy of d without the given dotted keys (timings)."""
    d = json.loads(json.dumps(d))
    for p in paths:
        *parents, last = p.split(".")
        node = d
        for k in parents:
            node = node[k]
        node.pop(last, None)
    return d


def test_trace_equals_the_cli(cli, demo):
    ref = cli.json("trace", DEMO, "--prompt", PROMPT, "--subject", SUBJECT, "--kinds", "resid,moe,expert",
                   "--samples", "4")
    got = moedit.trace(demo, PROMPT, SUBJECT, kinds="resid,moe,expert", samples=4)
    timing = ("stats.seconds", "stats.setup_seconds")
    assert without(got, *timing) == without(ref, *timing)
    assert got["kinds"]["resid"]  # a real report: scores per token and layer


def test_trace_many_gives_each_fact_its_own_trace(demo):
    facts = [(PROMPT, SUBJECT), ("The mother tongue of Léon Blum is", "Léon Blum", "French"), ("Rome is in", "Paris")]
    opts = dict(kinds="resid,expert", samples=3)
    got = moedit.trace_many(demo, facts, skip_errors=True, **opts)
    assert len(got) == 3 and set(got[2]) == {"error"} and "Paris" in got[2]["error"]
    stats = ("stats.seconds", "stats.setup_seconds", "stats.batches", "stats.traced_together")
    for fact, report in zip(facts[:2], got[:2]):
        alone = moedit.trace(demo, *fact, **opts)
        assert without(report, *stats) == without(alone, *stats)  # bit for bit
        assert report["stats"]["traced_together"] == 2 and alone["stats"]["traced_together"] == 1
    with pytest.raises(moedit.InputError, match="fact 2: subject 'Paris'"):
        moedit.trace_many(demo, facts, **opts)


def test_trace_bad_subject_has_the_cli_message(cli, demo):
    r = cli.run("trace", DEMO, "--prompt", "Rome is in", "--subject", "Paris", "--json", check=False)
    assert r.returncode == 2
    with pytest.raises(moedit.InputError) as e:
        moedit.trace(demo, "Rome is in", "Paris")
    assert r.stderr.strip() == f"moedit: error: {e.value}"


def test_edit_equals_the_cli_and_reverts(cli):
    model = moedit.Model(str(DEMO))
    args = dict(subject=SUBJECT, prompt="The mother tongue of {} is", target_new="English", target_true="French")
    ref = cli.json("edit", DEMO, "--subject", args["subject"], "--prompt", args["prompt"], "--target-new", "English",
                   "--target-true", "French", "--layer", "1", "--steps", "8", "--paraphrase", "Danielle Darrieux speaks",
                   "--neighbor", "The mother tongue of Léon Blum is", "--drift-tokens", "0", "--quiet")
    before = model.logits(PROMPT)
    got = model.edit(**args, layer=1, steps=8, paraphrases=["Danielle Darrieux speaks"],
                     neighbors=["The mother tongue of Léon Blum is"])
    timing = ("edit.seconds", "edit.vstar_seconds")
    assert without(got, *timing) == without(ref["edits"][0], "routing_drift", *timing)
    assert got["report"]["rewrite"]["p_new"] > got["pre"]["rewrite"]["p_new"]
    assert model.n_edits == 1 and not np.array_equal(model.logits(PROMPT), before)
    model.revert()
    assert model.n_edits == 0
    np.testing.assert_array_equal(model.logits(PROMPT), before)  # bit for bit


def test_edit_bad_input_has_the_cli_message(cli, demo):
    r = cli.run("edit", DEMO, "--subject", "Paris", "--prompt", "Rome is in", "--target-new", "x", "--layer", "1",
                check=False)
    with pytest.raises(moedit.InputError) as e:
        demo.edit("Paris", "Rome is in", "x", layer=1)
    assert r.stderr.strip() == f"moedit: error: {e.value}"
    assert demo.n_edits == 0


def test_evaluate_equals_the_cli(cli, tmp_path):
    # Fast settings (as tests/test_eval.cpp): the last layer, no key statistics, 2 v* steps, short generations.
    cli.run("eval", DEMO, "--dataset", COUNTERFACT, "--limit", "3", "--layer", "3", "--no-mom2", "--steps", "2",
            "--gen-length", "24", "--generation-interval", "2", "--quiet", "--out", tmp_path / "cli")
    ref = json.loads((tmp_path / "cli" / "summary.json").read_text())
    model = moedit.Model(str(DEMO))
    before = model.logits(PROMPT)
    got = moedit.evaluate(model, str(COUNTERFACT), str(tmp_path / "py"), layer=3, limit=3, mom2_adjustment=False,
                          steps=2, gen_length=24, generation_interval=2)
    assert got == json.loads((tmp_path / "py" / "summary.json").read_text())
    assert without(got, "time", "settings") == without(ref, "time", "settings")
    assert got["num_cases"] == 3
    np.testing.assert_array_equal(model.logits(PROMPT), before)  # every case's edit was reverted
    for case in (tmp_path / "cli" / "cases").iterdir():  # the per-case records too
        a, b = json.loads(case.read_text()), json.loads((tmp_path / "py" / "cases" / case.name).read_text())
        assert without(a, "time", "edit.seconds", "edit.vstar_seconds") == \
            without(b, "time", "edit.seconds", "edit.vstar_seconds")
