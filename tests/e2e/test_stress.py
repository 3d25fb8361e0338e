"""Many processes against one store at once (tests/stress.py): at least 200 random
operations, then every backing chain intact, no layer orphaned, no leftovers, and the
data written before each clone still there. ROCKPOOL_STRESS_OPS raises the count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.stress import run

pytestmark = pytest.mark.vm


def test_concurrent_operations_lose_nothing(tmp_path: Path) -> None:
    ops = int(os.environ.get("ROCKPOOL_STRESS_OPS", "200"))
    report = run(tmp_path / "store", workers=4, ops=ops, seed=int(os.environ.get("SEED", "1")))
    print(json.dumps(report, indent=2))  # the counts, for RELIABILITY.md
    assert report["operations"] == ops
    assert report["failures"] == []
    # The run exercised what it claims to: clones that carried data, races refused.
    outcomes = report["outcomes"]
    assert outcomes.get("clone:0", 0) > 0 and report["data_checks"] > 0
    assert outcomes.get("gc:0", 0) > 0 and outcomes.get("land:0", 0) > 0
    assert any(key.endswith(":6") for key in outcomes)  # some operations met a conflict
