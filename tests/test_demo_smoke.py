"""The embedded demo as a smoke test: `pipeline.demo.run_demo` end to end on the `--quick`
config (synthetic data -> teacher -> cache -> two distillation runs -> table and PNGs), in
the session's local Ray. Its AP values are not meaningful at this size; that every stage
runs and hands the next one what it needs is."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.demo import QUICK, DemoConfig, run_demo

STAGES = ("data", "teacher", "cache", "distill", "no-distill")  # visualization is checked by its PNGs


@pytest.mark.heavy  # every stage of the demo, ~1.5-3 min
@pytest.mark.timeout(600)
def test_quick_demo_runs_every_stage(local_ray, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cfg = DemoConfig(**{**QUICK, "out": str(out)})
    report = run_demo(cfg)

    assert "distilpose demo" in report and "distillation gain" in report
    assert (out / "demo_table.txt").read_text().strip() == report.strip()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(STAGES) <= set(summary["stage_times_s"])
    models = [row["model"] for row in summary["rows"]]
    assert models == [
        f"teacher {cfg.teacher}",
        f"student {cfg.student} distilled",
        f"student {cfg.student} no distillation",
    ]
    for row in summary["rows"]:  # every model was scored on the val split
        assert math.isfinite(row["AP"]) and 0.0 <= row["AP"] <= 1.0, row
        assert row["params"] > 0
    # The cache holds `views` views of every train instance, and both runs exported a student.
    assert summary["bytes_per_view"] > 0
    for name in ("distilled", "no-distill"):
        run = out / "runs" / name
        assert (run / "export" / "student_latest.pt").is_file(), name
        assert (out / "viz" / f"curves_{name}.png").is_file(), name
    assert len(list((out / "viz").glob("*.png"))) > 2  # the curves plus prediction overlays
