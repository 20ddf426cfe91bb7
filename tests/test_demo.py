"""The embedded demo (pipeline/demo.py, jobs/demo.py): fixed work, recorded stage costs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import COSTS_FILE, QUICK, DemoConfig, StageCosts

ROOT = Path(__file__).resolve().parents[1]


def test_stage_costs_survive_a_new_process(tmp_path):
    costs = StageCosts(str(tmp_path / "demo"))
    assert costs.costs == {}
    costs.record("teacher", 301.5)
    costs.record("cache", 20.0)
    assert json.loads((tmp_path / "demo" / COSTS_FILE).read_text()) == {"teacher": 301.5, "cache": 20.0}
    assert StageCosts(str(tmp_path / "demo")).costs == {"teacher": 301.5, "cache": 20.0}


def test_demo_config_is_a_fixed_amount_of_work():
    fields = DemoConfig.__dataclass_fields__
    assert not any("budget" in name for name in fields)
    assert DemoConfig().teacher_epochs > 0 and DemoConfig().student_epochs > 0


STAGES = ("data", "teacher", "cache", "distill", "no-distill")  # visualization is checked by its PNGs


def _quick_demo(out: Path) -> tuple[str, list[dict]]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    job = [sys.executable, str(ROOT / "jobs" / "demo.py"), "--quick", "--out", str(out)]
    result = subprocess.run(job, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads((out / "demo_summary.json").read_text())["rows"]


def _assert_every_stage_ran(out: Path, report: str) -> None:
    """Every stage ran and handed the next one what it needs (AP values are not meaningful
    at the quick size): the table, the summary's stages and rows, both exported students,
    the curves and prediction overlays."""
    assert "distilpose demo" in report and "distillation gain" in report
    assert (out / "demo_table.txt").read_text().strip() in report
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(STAGES) <= set(summary["stage_times_s"])
    cfg = DemoConfig(**QUICK)
    models = [row["model"] for row in summary["rows"]]
    student = f"student {cfg.student}"
    assert models == [f"teacher {cfg.teacher}", f"{student} distilled", f"{student} no distillation"]
    for row in summary["rows"]:  # every model was scored on the val split
        assert math.isfinite(row["AP"]) and 0.0 <= row["AP"] <= 1.0, row
        assert row["params"] > 0
    assert summary["bytes_per_view"] > 0
    for name in ("distilled", "no-distill"):
        assert (out / "runs" / name / "export" / "student_latest.pt").is_file(), name
        assert (out / "viz" / f"curves_{name}.png").is_file(), name
    assert len(list((out / "viz").glob("*.png"))) > 2  # the curves plus prediction overlays


@pytest.mark.heavy
@pytest.mark.timeout(1800)  # two quick demos: minutes each on a busy 2-core machine
def test_quick_demo_runs_every_stage_and_a_rerun_reuses_them_with_the_original_costs(tmp_path):
    """`jobs/demo.py --quick` end to end (synthetic data -> teacher -> cache -> two
    distillation runs -> table and PNGs), then the same command again."""
    first_out, first = _quick_demo(tmp_path / "a")
    _assert_every_stage_ran(tmp_path / "a", first_out)
    assert "estimate before starting" in first_out
    # A one-epoch teacher has not learnt the data: the demo says the comparison means little.
    assert "means little" in first_out

    again_out, again = _quick_demo(tmp_path / "a")
    assert "reused: data, teacher, cache, distill, no-distill" in again_out
    assert "estimate before starting" not in again_out
    assert again == first  # same metrics and the costs recorded when the stages ran
