"""Shared fixtures: the repository, the `moedit` CLI built from the same sources, models, and a CLI runner."""
import json
import os
import pathlib
import subprocess

import pytest

import moedit

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "moedit-demo"
FIXTURES = ROOT / "tests" / "fixtures" / "models"
COUNTERFACT = ROOT / "datasets" / "data" / "counterfact" / "counterfact_preknown.json"


def cli_path():
    """The CLI to compare with: $MOEDIT_CLI (tools/test_python.sh sets it to the one built with the wheel)."""
    p = os.environ.get("MOEDIT_CLI") or str(ROOT / "build-py" / "moedit")
    if not pathlib.Path(p).exists():
        pytest.fail(f"no moedit CLI at {p} (set MOEDIT_CLI)")
    return p


class Cli:
    def run(self, *args, check=True):
        r = subprocess.run([cli_path(), *map(str, args)], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise AssertionError(f"moedit {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}")
        return r

    def json(self, *args):
        return json.loads(self.run(*args, "--json").stdout)


@pytest.fixture(scope="session")
def cli():
    return Cli()


@pytest.fixture(scope="session")
def demo():
    return moedit.Model(str(DEMO))
