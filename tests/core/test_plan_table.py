"""The planner's answers for a table of devices, models, tiers and job sizes, compared with the table
committed in tests/core/data/plans.json (written by `python -m tests.core.plan_table OUT`): a change
of structure must not change a plan; a change of the models must rewrite the table on purpose."""

import json
from pathlib import Path

import pytest

from tests.core.plan_table import table

TABLE = Path(__file__).parent / "data" / "plans.json"


@pytest.fixture(scope="module")
def now():
    return table()


def test_every_plan_matches_the_table(now):
    want = json.loads(TABLE.read_text())
    assert set(now) == set(want)
    diffs = [(k, f) for k, plan in want.items() for f, v in plan.items() if now[k].get(f) != v]
    assert not diffs, diffs[:10]


def test_the_table_covers_refusals_and_every_placement_kind(now):
    assert sum("error" in p for p in now.values()) > 0  # small tiers refuse the largest jobs
    codes = "".join(p["placement_codes"] for p in now.values() if "error" not in p)
    assert set(codes) == set("BFSQRN")  # 4-bit (R, N) where exact weights do not fit
