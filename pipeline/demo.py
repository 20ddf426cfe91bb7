"""The embedded end-to-end demo (`make demo`): every stage of the product on synthetic data.

    synthetic COCO data -> train the tiny teacher -> cache its outputs (Ray Data, Zarr)
      -> distill the tiny student (Ray Train, 2 workers) -> the same student without
      distillation -> evaluate all three -> one table, overlays and curves under runs/demo/

Every stage does a fixed amount of work (images, iterations, epochs), so the printed
metrics depend on the seeds only and the machine's load changes only the times.

Each stage is skipped when its output is already there (data, a finished teacher
checkpoint, a complete cache, finished runs), so a rerun is cheap and says what it reused.
The table shows what each stage cost when it was produced (kept in `stage_costs.json`),
not the few seconds a reuse takes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distilpose.coco_metrics import format_table
from distilpose.options import check_options, option
from distilpose.profiles import PROFILES


@dataclass
class DemoConfig:
    out: str = option("runs/demo", help="demo folder (every stage's output; a rerun reuses them)")
    train_images: int = 1200
    val_images: int = 150
    seed: int = 0
    teacher: str = "tokenpose-tiny"
    # 30 epochs x 81 iterations of batch 32 = 2430 iterations.
    teacher_epochs: int = option(30, minimum=1, help="teacher training epochs (a fixed amount of work)")
    # Nothing else runs while the teacher trains (Ray starts after it), so both cores go to
    # its steps: two torch threads with the batches built in the main process (they cost ~10 %
    # of a core) ran 180 samples/s against 144 for one thread plus one loader worker.
    teacher_threads: int = option(2, minimum=1, help="torch threads of the teacher's training")
    teacher_loader_workers: int = option(0, minimum=0, help="DataLoader workers of the teacher's training")
    # Below this val AP the teacher has not learnt the data, and the students' comparison
    # says little about distillation (a measured usable teacher reaches 0.19-0.28).
    teacher_ap_floor: float = option(
        0.15, help="teacher val AP below which the demo warns that the comparison means little"
    )
    views: int = 2
    shard_instances: int = 64
    # The DistilPose-L recipe at demo scale: the student's backbone is the tiny teacher's
    # first three HRNet stages, initialised from the trained teacher (the paper starts
    # DistilPose-L from a trained HRNet). From scratch, a tiny regression student needs a few
    # thousand steps to leave the mean-pose plateau; this one learns within the demo budget.
    student: str = "distilpose-l-tiny"
    init_backbone_from_teacher: bool = True
    student_epochs: int = option(12, minimum=1, help="distillation epochs")
    # The demo's gain was measured with the intended L_SH weighting and flip test (the
    # library default is the official profile; both are one switch apart).
    profile: str = option("intended", choices=tuple(PROFILES), help="distillation profile")
    workers: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    visualize: int = 4
    stage_times: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(self)


# `--quick`: a much smaller run (a smoke test; its AP is not meaningful).
QUICK = dict(
    train_images=40,
    val_images=12,
    teacher_epochs=1,
    student_epochs=1,
    batch_size=8,
    visualize=2,
    shard_instances=8,
)


COSTS_FILE = "stage_costs.json"


class StageCosts:
    """Wall seconds each stage took when it produced its output, kept in `out/stage_costs.json`
    so that a rerun reusing a stage reports what the stage cost, not what reusing it took."""

    def __init__(self, out: str):
        self.path = Path(out) / COSTS_FILE
        self.costs: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.costs[stage] = seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.costs, indent=2))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# Each stage returns (its output, whether it reused an earlier run's output).


def make_data(cfg: DemoConfig) -> tuple[Path, bool]:
    from distilpose.data.synthetic import make_synthetic_coco

    data = Path(cfg.out) / "data"
    if (data / "annotations" / "person_keypoints_val.json").exists():
        _say(f"data: reusing {data}")
        return data, True
    _say(f"data: writing a synthetic COCO-format set ({cfg.train_images} train / {cfg.val_images} val images)")
    make_synthetic_coco(data, num_train=cfg.train_images, num_val=cfg.val_images, seed=cfg.seed)
    return data, False


def train_teacher_stage(cfg: DemoConfig, data: Path) -> tuple[tuple[str, dict], bool]:
    from distilpose.teacher_training import TeacherTrainConfig, train_teacher

    out = Path(cfg.out) / "teacher"
    summary = out / "eval.json"
    checkpoint = out / "teacher.pt"
    if summary.exists() and checkpoint.exists():
        _say(f"teacher: reusing the trained teacher {checkpoint}")
        return (str(checkpoint), json.loads(summary.read_text())["metrics"]), True
    _say(f"teacher: training {cfg.teacher} for {cfg.teacher_epochs} epochs")
    # The "fast-aug" recipe (He init, lr 3e-3, the students' augmentation) learns in minutes on
    # CPU and is accurate on the augmented crops it labels. A fixed number of epochs, never a
    # time budget: the teacher must not depend on the machine's load.
    result = train_teacher(
        TeacherTrainConfig.from_recipe(
            "fast-aug",
            data=str(data),
            teacher=cfg.teacher,
            out=str(out),
            epochs=cfg.teacher_epochs,
            seed=cfg.seed,
            threads=cfg.teacher_threads,
            workers=cfg.teacher_loader_workers,
        ),
        log=lambda line: print(f"[teacher] {line}", flush=True),
    )
    return (result.checkpoint, result.metrics), False


def cache_stage(cfg: DemoConfig, data: Path, checkpoint: str):
    from pipeline.cache import open_reader
    from pipeline.teacher_stage import CacheJobConfig, run_cache_job

    out = str(Path(cfg.out) / "cache")
    summary = run_cache_job(
        CacheJobConfig(
            data=str(data),
            teacher=cfg.teacher,
            checkpoint=checkpoint,
            out=out,
            views=cfg.views,
            shard_instances=cfg.shard_instances,
            workers=1,
            seed=cfg.seed,
        )
    )
    hit = summary.units_reused == summary.units_total
    if hit:
        _say(f"cache: hit (every shard-view already committed): {out}")
    else:
        print(summary.table(), flush=True)
    return (out, open_reader(out)), hit


def distill_stage(cfg: DemoConfig, cache: str, data: Path, teacher_ckpt: str, name: str, no_distill: bool):
    from pipeline.distill import DistillConfig, resolve_paths, run_distill
    from pipeline.distill.state import finished_run

    dcfg = DistillConfig(
        cache=cache,
        student=cfg.student,
        storage=str(Path(cfg.out) / "runs"),
        name=name,
        epochs=cfg.student_epochs,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        lr=cfg.lr,
        warmup_iters=50,
        conv_init="kaiming",  # layers the teacher checkpoint does not cover
        init_backbone=None if cfg.init_backbone_from_teacher else "none",  # None: the cache's teacher
        no_distill=no_distill,
        profile=cfg.profile,
        val=str(data),
        seed=cfg.seed,
    )
    # Reused only when the run had finished already (a resumed, unfinished run trains now).
    finished = finished_run(resolve_paths(dcfg)) is not None
    return run_distill(dcfg), finished


def visualize_stage(cfg: DemoConfig, data: Path, teacher_ckpt: str, results: dict) -> list[str]:
    from distilpose.data.coco import load_instances
    from distilpose.models.checkpoints import load_checkpoint
    from distilpose.visualize import plot_training_curves, visualize_predictions
    from pipeline.dataset_layout import resolve_layout

    viz = Path(cfg.out) / "viz"
    viz.mkdir(parents=True, exist_ok=True)
    written = []
    for name, result in results.items():
        png = viz / f"curves_{name}.png"
        plot_training_curves(result.run_dir, str(png))
        written.append(str(png))
    student_ckpt = results["distilled"].exported.get("best", results["distilled"].exported["latest"])
    student, _ = load_checkpoint(student_ckpt)
    teacher, _ = load_checkpoint(teacher_ckpt)
    layout = resolve_layout(str(data), "val")
    instances, _ = load_instances(layout.ann_file, "val", input_size=tuple(student.config.input_size))
    written += [
        str(p) for p in visualize_predictions(student, instances, layout.image_root, viz, teacher, cfg.visualize)
    ]
    return written


def run_demo(cfg: DemoConfig, start_ray: Callable[[], None] | None = None) -> str:
    """Every stage in order (each reused when its output exists); the table as text.
    `start_ray` starts Ray once the teacher is trained: its background processes would
    otherwise take CPU from the teacher's steps, which need no Ray."""
    from distilpose.models import build_model
    from distilpose.models.summary import count_params

    t_start = time.perf_counter()
    times = cfg.stage_times
    costs = StageCosts(cfg.out)
    reused: list[str] = []
    unrecorded: list[str] = []

    def timed(stage: str, fn, *args):
        """Run a stage; times[stage] is what producing its output cost."""
        t0 = time.perf_counter()
        value, was_reused = fn(*args)
        elapsed = time.perf_counter() - t0
        if not was_reused:
            costs.record(stage, elapsed)
        else:
            reused.append(stage)
            if stage not in costs.costs:
                unrecorded.append(stage)  # made before costs were kept: only the reuse time is known
        times[stage] = costs.costs.get(stage, elapsed)
        return value

    data = timed("data", make_data, cfg)
    teacher_ckpt, teacher_metrics = timed("teacher", train_teacher_stage, cfg, data)
    if start_ray is not None:
        start_ray()
    cache, reader = timed("cache", cache_stage, cfg, data, teacher_ckpt)
    results = {
        "distilled": timed("distill", distill_stage, cfg, cache, data, teacher_ckpt, "distilled", False),
        "no-distill": timed("no-distill", distill_stage, cfg, cache, data, teacher_ckpt, "no-distill", True),
    }
    try:
        written = visualize_stage(cfg, data, teacher_ckpt, results)
    except Exception as exc:  # pictures are a bonus; the table is the result
        written = []
        _say(f"visualization skipped: {type(exc).__name__}: {exc}")

    teacher_row = next(v for k, v in teacher_metrics.items() if k.startswith(cfg.teacher) and "gt" in k)
    weak_teacher = teacher_row["AP"] < cfg.teacher_ap_floor
    bytes_per_view = sum(s.total_bytes for s in reader.manifest.shards) / max(1, reader.manifest.num_rows)
    rows = [
        {
            "model": f"teacher {cfg.teacher}",
            "AP": teacher_row["AP"],
            "AP50": teacher_row["AP50"],
            "params": count_params(build_model(cfg.teacher)),
            "time_s": times["teacher"],
        },
        {
            "model": f"student {cfg.student} distilled",
            **_ap(results["distilled"]),
            "params": count_params(build_model(cfg.student)),
            "time_s": times["distill"],
        },
        {
            "model": f"student {cfg.student} no distillation",
            **_ap(results["no-distill"]),
            "params": count_params(build_model(cfg.student)),
            "time_s": times["no-distill"],
        },
    ]
    table = format_table(rows, columns=["model", "AP", "AP50", "params", "time_s"], float_fmt=".3f")
    lines = [
        "",
        "=" * 78,
        "distilpose demo: synthetic COCO-format data, val split, GT boxes, flip test",
        table,
        f"teacher cache: {reader.manifest.num_rows} views ({cfg.views}/instance), {bytes_per_view:,.0f} bytes/view, "
        f"built in {times['cache']:.1f} s; one distillation run: {times['distill']:.1f} s",
        *(
            [f"both students start from the teacher's backbone (stages 1-3 of {cfg.teacher}), same schedule"]
            if cfg.init_backbone_from_teacher
            else []
        ),
        f"mean-pose baseline AP: {_baseline(teacher_metrics):.3f}; distillation gain: "
        f"{rows[1]['AP'] - rows[2]['AP']:+.3f} AP",
        *(
            [
                f"WARNING: the teacher reached only AP {teacher_row['AP']:.3f} (below {cfg.teacher_ap_floor}): "
                "it has not learnt the data, so the students' comparison means little."
            ]
            if weak_teacher
            else []
        ),
        f"outputs: {Path(cfg.out).resolve()}  ({len(written)} PNGs in viz/)",
        f"wall time of this run: {time.perf_counter() - t_start:.0f} s"
        + (f" (reused: {', '.join(reused)}; time_s shows what they cost when produced)" if reused else ""),
        *(
            [f"no recorded cost for {', '.join(unrecorded)}: time_s there is this run's reuse time"]
            if unrecorded
            else []
        ),
        "=" * 78,
    ]
    report = "\n".join(lines)
    (Path(cfg.out) / "demo_summary.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "stage_times_s": times,
                "reused": reused,
                "weak_teacher": weak_teacher,
                "bytes_per_view": bytes_per_view,
                "config": asdict(cfg),
            },
            indent=2,
            default=str,
        )
    )
    (Path(cfg.out) / "demo_table.txt").write_text(report + "\n")
    return report


def _ap(result) -> dict:
    return {
        "AP": float(result.metrics.get("AP", float("nan"))),
        "AP50": float(result.metrics.get("AP50", float("nan"))),
    }


def _baseline(teacher_metrics: dict) -> float:
    return float(
        next((v["AP"] for k, v in teacher_metrics.items() if k.startswith("mean-pose") and "gt" in k), float("nan"))
    )
