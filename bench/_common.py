"""Shared helpers for the benchmarks (not a benchmark itself: `make bench` runs bench_*.py).

Every benchmark measures the things it compares side by side in one run: repetitions are
interleaved (A, B, A, B, ...) and summarized by their median, so the ratios stay
meaningful on a shared machine whose absolute speed drifts. Results go to
runs/bench/<name>.json together with the context they were measured in.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Where benchmarks write their JSON; BENCH_RESULTS_DIR moves it (the tests keep the checkout clean).
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or ROOT / "runs" / "bench")
if str(ROOT) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(1, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Paper sizes (COCO, 256x192 input): K joints, 64x48 heatmaps, D token dim, P visual tokens.
PAPER_SIZES = dict(num_joints=17, heatmap_size=(64, 48), dim=192, num_patches=256)
PAPER_INPUT = (256, 192)


# ----------------------------------------------------------------------------- timing


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def interleaved(
    cases: Mapping[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    label: str = "",
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Run every case once per round, ``warmup + reps`` rounds; wall seconds of the timed rounds.

    With ``cpu_times`` given, it also receives this process's CPU seconds per timed run (all
    its threads). On a shared machine CPU time does not count the time the process waited
    for a core, so for work that stays in this process it is the steadier figure.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + reps):
        timed = round_index >= warmup
        for name, fn in cases.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if timed:
                times[name].append(elapsed)
                if cpu_times is not None:
                    cpu_times.setdefault(name, []).append(cpu)
            tag = f"rep {round_index - warmup + 1}/{reps}" if timed else "warm-up"
            print(f"  [{label or 'bench'}] {tag:>9}  {name:<40} {elapsed:8.3f} s wall {cpu:8.3f} s cpu", flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """min..max of a list of seconds, for the tables."""
    return f"{min(values):.3g}..{max(values):.3g}" if values else "-"


# ----------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    value = float(value)
    if value != value:
        return "nan"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (digits + 2) or abs(value) < 10 ** -(digits + 1):
        return f"{value:.{digits - 1}e}"
    return f"{value:,.{max(0, digits - 1 - int(np.floor(np.log10(abs(value)))))}f}"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Plain-text table (distilpose.coco_metrics.format_table) with `digits` significant digits."""
    from distilpose.coco_metrics import format_table

    return format_table([dict(row) for row in rows], columns, cell=lambda value: fmt(value, digits))


def context(**extra: Any) -> dict[str, Any]:
    """What the numbers were measured on (the box is shared: the load average is recorded)."""
    import torch

    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "host_cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"\nresults written to {shown}", flush=True)
    return path


def write_docs_block(page: Path, writer: str, text: str) -> None:
    """Put ``text`` between ``page``'s markers for ``writer`` (a bench script's stem): the
    figures in the docs are the ones that run computed, never retyped."""
    begin, end = f"<!-- {writer}: begin (written by bench/{writer}.py) -->", f"<!-- {writer}: end -->"
    doc = page.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{page} lacks the markers of bench/{writer}.py ({begin} ... {end})")
    head, rest = doc.split(begin, 1)
    page.write_text(head + begin + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1])


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def verdict(ratio: float, goal: float) -> str:
    return f"{'meets' if ratio >= goal else 'BELOW'} goal >= {goal:g}"


# ----------------------------------------------------------------------------- cache data


def paper_spec(**overrides: Any):
    from pipeline.cache.schema import CacheSpec

    return CacheSpec(**{**PAPER_SIZES, **overrides})


def teacher_like_views(
    n: int, spec, rng: np.random.Generator, input_size: tuple[int, int] = PAPER_INPUT, first_id: int = 0
) -> dict[str, np.ndarray]:
    """fp32 record batch shaped like a real teacher's output, for every cache field.

    Heatmaps: per joint a Gaussian blob (sigma 1.5-3 px, peak 0.3-1.0; ~15% of joints weak
    and broad, like occluded joints) on an additive N(0, 0.003) noise floor - the floor is
    what makes real teacher heatmaps incompressible as fp16 (docs/method.md#heatmap-and-token-encodings).
    Tokens: unnormalized last-layer features, N(0, s_d) with per-channel scales s_d drawn
    log-normally and a few outlier channels (as transformer features have), and per-token
    magnitudes that vary. Geometry fields are plausible values of the right shape.
    """
    k, (hh, wh), d, p = spec.num_joints, spec.heatmap_size, spec.dim, spec.num_patches
    h_in, w_in = input_size
    weak = rng.random((n, k)) < 0.15
    mu = np.stack([rng.uniform(2, wh - 3, (n, k)), rng.uniform(2, hh - 3, (n, k))], axis=-1)
    sigma = rng.uniform(1.5, 3.0, (n, k, 2)) * np.where(weak, 2.0, 1.0)[..., None]
    peak = np.where(weak, rng.uniform(0.02, 0.2, (n, k)), rng.uniform(0.3, 1.0, (n, k)))
    ys = np.arange(hh, dtype=np.float32)[:, None]
    xs = np.arange(wh, dtype=np.float32)[None, :]
    heatmaps = np.empty((n, k, hh, wh), np.float32)
    for i in range(n):
        gx = np.exp(-((xs[None] - mu[i, :, 0, None, None]) ** 2) / (2 * sigma[i, :, 0, None, None] ** 2))
        gy = np.exp(-((ys[None] - mu[i, :, 1, None, None]) ** 2) / (2 * sigma[i, :, 1, None, None] ** 2))
        heatmaps[i] = peak[i, :, None, None] * gx * gy
    heatmaps += rng.normal(0.0, 0.003, heatmaps.shape).astype(np.float32)

    def tokens(count: int) -> np.ndarray:
        channel_scale = rng.lognormal(0.0, 0.5, d).astype(np.float32)
        channel_scale[rng.choice(d, 3, replace=False)] *= 6.0
        token_scale = rng.lognormal(0.0, 0.3, (n, count, 1)).astype(np.float32)
        return (rng.standard_normal((n, count, d), dtype=np.float32) * channel_scale * token_scale).astype(np.float32)

    view_params = np.zeros((n, 7), np.float32)
    view_params[:, 0:2] = rng.uniform(50, 600, (n, 2))
    view_params[:, 2:4] = rng.uniform(50, 400, (n, 2))
    view_params[:, 4] = rng.uniform(-40, 40, n)
    view_params[:, 5] = rng.random(n) < 0.5
    affine = np.tile(np.asarray([[1, 0, 0], [0, 1, 0]], np.float32), (n, 1, 1))
    affine[:, :, 2] = rng.uniform(-300, 0, (n, 2))
    return {
        "instance_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "image_id": (np.arange(first_id, first_id + n, dtype=np.int64) // 2),
        "view": np.zeros(n, np.int16),
        "view_params": view_params,
        "affine": affine,
        "heatmaps": heatmaps,
        "gauss": np.concatenate([mu, sigma], axis=-1).astype(np.float32),
        "confidence": peak.astype(np.float32),
        "kpt_tokens": tokens(k),
        "vis_tokens": tokens(p),
        "joints": (mu * np.asarray([w_in / wh, h_in / hh])).astype(np.float32),
        "joint_weights": (rng.random((n, k)) < 0.85).astype(np.float32),
    }


def synthetic_manifest(views: int, ann_file: str = "", image_root: str = "", num_images: int = 0):
    from pipeline.cache.manifest import DataInfo, Manifest, TeacherInfo

    return Manifest(
        teacher=TeacherInfo(preset="synthetic-teacher-like", checkpoint_sha256="synthetic"),
        data=DataInfo(
            ann_file_sha256="synthetic", num_images=num_images, split="train", ann_file=ann_file, image_root=image_root
        ),
        views=views,
        seed=0,
    )


# ----------------------------------------------------------------------------- models


def calibrated_teacher(preset: str, batch: int = 4, passes: int = 2):
    """The seeded random-init teacher of `build_teacher`, with BatchNorm statistics
    recomputed from a few train-mode passes over noise (as tests/pipeline_fixtures does), so
    its outputs depend on the input like a trained teacher's (nothing is trained). A purely
    random init gives near-identical outputs for every crop, which would make the cache's
    compression, and so its write cost, unrealistically cheap."""
    import torch

    from distilpose.teacher_forward import build_teacher

    with torch.random.fork_rng():
        model = build_teacher(preset, None)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(passes):
                model(torch.randn(batch, 3, *model.config.input_size))
    return model.eval()


def save_teacher_checkpoint(model, path: str | Path) -> str:
    from distilpose.models.checkpoints import save_checkpoint

    save_checkpoint(str(path), model, extra={"note": "BatchNorm-calibrated random init (benchmarks)"})
    return str(path)
