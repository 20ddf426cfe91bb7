"""`BENCH_SMOKE=1 make bench-gpu`: the GPU benchmark's own code path, on the CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IN_CHECKOUT = ROOT / "runs" / "bench" / "gpu_smoke.json"


def _stamp(path: Path) -> float | None:
    return path.stat().st_mtime_ns if path.exists() else None


def test_bench_gpu_smoke_runs_every_part_and_writes_figures(tmp_path) -> None:
    env = {**os.environ, "BENCH_SMOKE": "1", "BENCH_RESULTS_DIR": str(tmp_path)}
    before = _stamp(IN_CHECKOUT)
    result = subprocess.run(
        [sys.executable, "bench/bench_gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=170
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for part in ("(a) teacher caching", "(b) training step", "(c) student training", "(e) the loader alone"):
        assert part in result.stdout
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert _stamp(IN_CHECKOUT) == before  # nothing written into the checkout
    assert report["device"] == "cpu"
    cases = {row["case"] for row in report["caching"]}
    assert {"bare fp32/TF32", "bare bf16", "actor as coded"} <= cases
    assert all(row["views/s"] > 0 for row in report["caching"])
    steps = {row["case"]: row for row in report["steps"]}
    modes = ("cached", "online", "cached, channels_last")
    assert all(steps[f"distilpose-tiny {mode}"]["ms/step"] > 0 for mode in modes)
    loader = report["loader"]
    assert len(loader) == 2 and all(row["samples/s"] > 0 for row in loader)
    crops = {row["loader"]: row for row in report["loader_cpu"]}
    assert set(crops) == {"rebuilt crops", "stored JPEG crops"}
    assert all(row["cpu ms/sample"] > 0 and row["samples"] > 0 for row in crops.values())
