"""Train a heatmap teacher (TokenPose) on a COCO-format data set (docs/method.md#teacher-training).

Recipe: JointsMSE with target weights on unit-peak Gaussian heatmaps, Adam, linear warm-up
then step decay x0.1 at 2/3 and 13/15 of training (the official 200 / 260 of 300 epochs,
scaled to the run), teacher augmentation (flip 0.5, half-body 0.3, scale 0.5, rotation 40).

Run directory (`out`):
    teacher.pt       our checkpoint format (`save_checkpoint`); `extra` holds epoch,
                     iteration, elapsed time, the train config and the loss history (no
                     optimizer state, so the file stays a clean teacher for caching)
    train_state.pt   optimizer and RNG state of the same epoch (`TeacherTrainState`), only
                     used to resume: a resumed run continues as if never stopped
    train_log.csv    one row per epoch
    eval.json        final metrics on val (GT boxes, detections if present) + baseline

Re-running with the same `out` resumes from `teacher.pt` (at an epoch boundary; an epoch
cut short by the time budget is redone). The run's length is `epochs`. The optional
`time_budget_s` also stops it when the training time (summed over resumed runs) reaches
the budget, and the learning-rate schedule then follows whichever is further along, the
epochs or the budget, so a budgeted run still warms up and decays; its result depends on
the machine's load, so reproducible runs leave it unset.

Bad images are skipped (zero-weight samples) and counted; the summary names the count.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from distilpose import fileio
from distilpose.coco_metrics import format_table
from distilpose.data.coco import data_fingerprint, load_instances
from distilpose.data.dataset import TopDownDataset
from distilpose.data.layout import DataOptions, ValDataOptions, split_files
from distilpose.data.transforms import AugmentConfig
from distilpose.evaluate import METRIC_COLUMNS, detections_file, evaluate_model, mean_pose_baseline
from distilpose.models import build_model, get_config
from distilpose.models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from distilpose.models.conv_init import CONV_INITS, apply_conv_init
from distilpose.options import check_options, option
from distilpose.rng import rng_state, set_rng_state
from distilpose.schedule import warmup_step_factor

CHECKPOINT_FILE = "teacher.pt"
TRAIN_STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.csv"
EVAL_FILE = "eval.json"
# Teacher augmentation of the official recipe (docs/method.md#teacher-training); students use scale 0.35 /
# rotation 45.
TEACHER_AUG = AugmentConfig(flip_prob=0.5, half_body_prob=0.3, scale_factor=0.5, rot_factor=40.0, rot_prob=0.6)
AUG_PRESETS = {
    "spec": TEACHER_AUG,
    # Milder crops for minutes-long runs: strong rotation/scale jitter slows early learning
    # more than it helps generalisation at that length.
    "light": AugmentConfig(flip_prob=0.5, half_body_prob=0.0, scale_factor=0.25, rot_factor=15.0, rot_prob=0.6),
    "none": AugmentConfig(flip_prob=0.0, half_body_prob=0.0, scale_factor=0.0, rot_factor=0.0, rot_prob=0.0),
    # The students' augmentation (flip, half-body, scale 0.35, rotation 45): a teacher trained
    # on the crops it will label in the cache and for the online students.
    "student": AugmentConfig(),
}
# Named training recipes (fields of TeacherTrainConfig). "spec" is the official recipe
# (docs/method.md#teacher-training; the config defaults). "fast" is for minutes-long CPU runs such as the demo;
# measured on the synthetic set it reaches a usable teacher in ~1200 iterations where "spec"
# is still at the mean-pose plateau: He init, a 3x higher lr and no augmentation (strong
# jitter mostly slows early learning; the val crops are un-augmented). "fast-aug" is "fast"
# with the students' augmentation: a teacher that is accurate on the augmented crops it labels
# (a "fast" teacher is not: docs/premise-replay.md), which the demo and the studies use.
RECIPES: dict[str, dict[str, Any]] = {
    "spec": dict(lr=1e-3, aug="spec", conv_init="official", sigma=2.0),
    "fast": dict(lr=3e-3, aug="none", conv_init="kaiming", sigma=2.0),
    "fast-aug": dict(lr=3e-3, aug="student", conv_init="kaiming", sigma=2.0),
}


# --------------------------------------------------------------------------- config


@dataclass
class TeacherTrainConfig(DataOptions, ValDataOptions):
    """A teacher training run. Data: the train split from DataOptions (--data, or
    --ann-file/--images); the val split it is evaluated on from --val (or --val-ann-file/
    --val-images), by default the val split under --data."""

    teacher: str = option("tokenpose-tiny", help="teacher preset")
    model_overrides: dict[str, Any] = option(
        default_factory=dict,
        flag="--model-override",
        metavar="FIELD=VALUE",
        help="change a ModelConfig field of the preset, e.g. dim=96 or hrnet_modules=[1,1] (repeatable)",
    )
    out: str = option("runs/teacher", help="run directory (checkpoint, logs, eval.json)")
    epochs: int = option(20, minimum=1, help="epochs (an upper bound when --time-budget-s is set)")
    batch_size: int = option(32, minimum=1, help="batch size")
    lr: float = option(1e-3, help="learning rate (default: from the recipe)")
    # Warm-up: the official 500 of ~176k iterations (300 epochs x 585), but never more than
    # warmup_frac of the run (by iterations or by the time budget).
    warmup_iters: int = 500
    warmup_frac: float = 0.05
    # Fractions of training at which lr x0.1 (official 200 / 260 of 300 epochs).
    lr_decay_at: tuple[float, ...] = (2 / 3, 13 / 15)
    sigma: float = option(2.0, help="heatmap Gaussian sigma in heatmap px (default: from the recipe)")
    aug: AugmentConfig = option(  # or the name of an AUG_PRESETS entry
        TEACHER_AUG, choices=tuple(AUG_PRESETS), help="augmentation preset (default: from the recipe)"
    )
    # "official": mmpose's N(0, 0.001) convs (what build_model does); "kaiming": He-normal
    # (fan_out) convs, see distilpose.models.conv_init.
    conv_init: str = option(
        "official",
        choices=CONV_INITS,
        help="backbone conv init: official = mmpose N(0, 0.001), kaiming = He (default: from the recipe)",
    )
    # An optional cap on training time for interactive runs. The result then depends on the
    # machine's speed and load; a reproducible run (the demo) fixes `epochs` instead.
    time_budget_s: float | None = option(None, help="stop training after this many seconds of training")
    # "wall": the budget counts wall-clock training time. "cpu": it counts this process's CPU
    # time (training threads, not the loader workers), which is ~wall time on an idle machine
    # with one thread and shrinks less when other jobs share the cores (but still does:
    # contention slows each CPU second too).
    budget_clock: str = option(
        "wall",
        choices=("wall", "cpu"),
        help="what --time-budget-s counts: wall-clock time or the training process's CPU time",
    )
    # One DataLoader worker + one torch thread keeps 2 cores busy without oversubscribing
    # them: with 2 threads plus a worker (or any other load) OpenMP's spinning threads
    # stalled training to ~5 samples/s on a shared 2-core machine, vs ~110 with this setting.
    workers: int = option(1, minimum=0, flag="--workers-dataloader", help="DataLoader worker processes")
    threads: int = option(1, minimum=1, help="torch threads (1 + one worker suits 2 cores)")
    seed: int = option(0, help="random seed")
    device: str = option("cpu", help="torch device")
    resume: bool = option(True, flag="--no-resume", help="start over even if OUT/teacher.pt exists")
    log_every_s: float = 10.0
    evaluate: bool = option(True, flag="--no-eval", help="skip the final evaluation")
    eval_flip_test: bool = option(True, flag="--no-flip-test", help="evaluate without the flip test")
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        check_options(self)
        self.check_data_source()
        if self.evaluate and not (self.has_val_source() or self.data):
            raise ValueError("no val split to evaluate on: give --val (or --val-ann-file, --val-images) or --no-eval")
        if isinstance(self.aug, str):
            self.aug = AUG_PRESETS[self.aug]
        if isinstance(self.aug, dict):
            self.aug = AugmentConfig(**self.aug)
        self.lr_decay_at = tuple(self.lr_decay_at)
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError("time_budget_s must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_recipe(cls, recipe: str, **fields: Any) -> TeacherTrainConfig:
        """A config with a named recipe's values; `fields` (not None) override them."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        given = {key: value for key, value in fields.items() if value is not None}
        return cls(**{**RECIPES[recipe], **given})


# --------------------------------------------------------------------------- loss, schedule


def joints_mse_loss(pred: Tensor, target: Tensor, target_weight: Tensor) -> Tensor:
    """mmpose v0.22 JointsMSELoss(use_target_weight=True): per joint
    MSE(pred_k * w_k, target_k * w_k) averaged over batch and pixels, then summed over joints
    and divided by K (no 0.5 factor) - i.e. the mean over everything of ((pred - target) * w)^2."""
    weight = target_weight[:, :, None, None]
    return ((pred - target) * weight).pow(2).mean()


def lr_factor(
    iteration: int, progress: float, warmup_iters: int, warmup_frac: float, decay_at: Sequence[float]
) -> float:
    """Multiplier of the base lr at `iteration` / `progress` (fraction of the run, 0..1).

    The warm-up ends after `warmup_iters` iterations or `warmup_frac` of the run, whichever
    comes first (the official 500 iterations are a rounding error of 300 epochs but most of
    a short run; either at 0 turns warm-up off); then x0.1 per milestone passed.
    """
    ramps = [iteration / warmup_iters if warmup_iters else 1.0, progress / warmup_frac if warmup_frac else 1.0]
    return warmup_step_factor(max(ramps), sum(progress >= m for m in decay_at))


# --------------------------------------------------------------------------- state


@dataclass
class TeacherProgress:
    """How far a teacher run got; recorded in teacher.pt's `extra` and in eval.json."""

    epoch: int = 0  # completed epochs
    iteration: int = 0
    elapsed_s: float = 0.0  # wall-clock training time so far, over all resumed runs
    cpu_s: float = 0.0  # CPU time of the training process over the same span
    stopped_by_budget: bool = False
    bad_images: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TeacherTrainState:
    """Everything a resumed teacher run restores besides the weights (teacher.pt holds those,
    so that file stays a clean teacher for caching): progress, optimizer and the global RNG
    streams, the same kind of state the students' runs save (pipeline.distill.state.TrainState).
    Written to train_state.pt beside the teacher, always after it: the pair agrees when
    `progress.epoch` equals the teacher's recorded epoch."""

    progress: TeacherProgress
    optimizer: dict
    rng: dict

    def save(self, path: str) -> None:
        # Plain tensors, numbers and JSON strings: loadable with weights_only=True.
        payload = {
            "epoch": self.progress.epoch,
            "progress": json.dumps(asdict(self.progress)),
            "optimizer": self.optimizer,
            "rng": self.rng,
        }
        fileio.atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str) -> TeacherTrainState:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        progress = (
            TeacherProgress(**json.loads(raw["progress"])) if "progress" in raw else TeacherProgress(raw["epoch"])
        )
        return cls(progress=progress, optimizer=raw["optimizer"], rng=raw.get("rng", {}))


@dataclass
class TrainResult:
    checkpoint: str
    state: TeacherProgress
    metrics: dict[str, dict[str, Any]]  # row name -> evaluate_model / baseline dict
    wall_s: float

    def table(self) -> str:
        return metrics_table(self.metrics)


def metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    rows = [{"model": name, **{k: row.get(k) for k in METRIC_COLUMNS}} for name, row in metrics.items()]
    return format_table(rows)


def _model_config_dict(cfg: TeacherTrainConfig) -> dict[str, Any]:
    return asdict(get_config(cfg.teacher, **cfg.model_overrides))


def _save(
    cfg: TeacherTrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, progress: TeacherProgress
) -> Path:
    out = Path(cfg.out)
    path = out / CHECKPOINT_FILE
    extra = {"train_config": cfg.to_dict(), **asdict(progress)}
    save_checkpoint(path, model, extra=json.loads(json.dumps(extra)))  # plain JSON types only
    # Then the training state: a resume restores it only if its epoch matches the teacher's.
    TeacherTrainState(progress, optimizer.state_dict(), rng_state()).save(str(out / TRAIN_STATE_FILE))
    return path


def _resume(
    cfg: TeacherTrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, log: Callable[[str], None]
) -> TeacherProgress:
    """Load `out/teacher.pt` (+ optimizer and RNG from train_state.pt) when resuming; else a
    fresh start."""
    path = Path(cfg.out) / CHECKPOINT_FILE
    if not cfg.resume or not path.exists():
        return TeacherProgress()
    saved, extra = load_checkpoint(path)
    if asdict(saved.config) != _model_config_dict(cfg):
        raise CheckpointError(
            f"{path}: holds a different model ({saved.config.name}, other sizes) than requested; "
            "use another --out or --no-resume"
        )
    model.load_state_dict(saved.state_dict())
    known = set(TeacherProgress.__dataclass_fields__)
    progress = TeacherProgress(**{k: v for k, v in (extra or {}).items() if k in known})
    state_path = Path(cfg.out) / TRAIN_STATE_FILE
    state = TeacherTrainState.load(str(state_path)) if state_path.exists() else None
    if state is None or state.progress.epoch != progress.epoch:
        log(
            f"resuming from {path} ({progress.epoch} epochs done) with a fresh optimizer and RNG: "
            f"no matching {TRAIN_STATE_FILE}"
        )
        return progress
    optimizer.load_state_dict(state.optimizer)
    if state.rng:
        set_rng_state(state.rng)
    log(f"resuming from {path}: {progress.epoch}/{cfg.epochs} epochs done, {progress.elapsed_s:.0f} s trained")
    return progress


def _append_log(cfg: TeacherTrainConfig, row: dict[str, float]) -> None:
    path = Path(cfg.out) / LOG_FILE
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


# --------------------------------------------------------------------------- training


class Trainer:
    """One training run; `run()` trains (or resumes), evaluates and returns a TrainResult."""

    def __init__(self, cfg: TeacherTrainConfig, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda msg: print(f"[teacher] {msg}", flush=True))
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.model = build_model(cfg.teacher, **cfg.model_overrides)
        apply_conv_init(self.model, cfg.conv_init)  # a resumed run then loads its weights
        # channels_last: ~25 % faster conv backward in oneDNN on CPU (and the layout AMP wants on GPU).
        self.model.to(self.device, memory_format=torch.channels_last)
        self.config = self.model.config
        self.train_files = cfg.split_files("train")
        instances, report = load_instances(self.train_files.ann_file, "train", input_size=self.config.input_size)
        self.log(report.summary())
        if not instances:
            raise ValueError(f"{self.train_files.ann_file}: no usable training instances")
        self.instances = instances
        self.dataset = TopDownDataset(
            instances,
            self.train_files.image_root,
            self.config.input_size,
            train=True,
            aug=cfg.aug,
            seed=cfg.seed,
            heatmap_size=self.config.heatmap_size,
            sigma=cfg.sigma,
            skip_bad_images=True,
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.iters_per_epoch = max(1, len(self.dataset) // cfg.batch_size)
        total = self.iters_per_epoch * cfg.epochs
        self.total_iters = total

    def aug_name(self) -> str:
        return next((name for name, aug in AUG_PRESETS.items() if aug == self.cfg.aug), str(self.cfg.aug))

    def progress(self, state: TeacherProgress) -> float:
        by_iters = state.iteration / self.total_iters
        if self.cfg.time_budget_s is None:
            return by_iters
        return max(by_iters, self._budget_used(state) / self.cfg.time_budget_s)

    def _budget_used(self, state: TeacherProgress) -> float:
        return state.cpu_s if self.cfg.budget_clock == "cpu" else state.elapsed_s

    def _loader(self, epoch: int) -> DataLoader:
        self.dataset.set_epoch(epoch)  # before the loader forks its workers
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=RandomSampler(self.dataset, generator=generator),
            num_workers=self.cfg.workers,
            drop_last=len(self.dataset) >= self.cfg.batch_size,  # no size-1 BatchNorm batches
        )

    def _step(self, batch: dict, state: TeacherProgress) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(
                state.iteration, self.progress(state), self.cfg.warmup_iters, self.cfg.warmup_frac, self.cfg.lr_decay_at
            )
        images = batch["image"].to(self.device, non_blocking=True, memory_format=torch.channels_last)
        heatmaps = batch["heatmap"].to(self.device, non_blocking=True)
        weights = batch["target_weight"].to(self.device, non_blocking=True)
        loss = joints_mse_loss(self.model(images).heatmaps, heatmaps, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def _out_of_time(self, state: TeacherProgress) -> bool:
        return self.cfg.time_budget_s is not None and self._budget_used(state) >= self.cfg.time_budget_s

    def _train_epoch(self, state: TeacherProgress) -> dict[str, float] | None:
        """One epoch (or until the budget runs out); None if the budget cut it short."""
        self.model.train()
        losses: list[float] = []
        seen = 0
        epoch_start = tick = report_time = time.perf_counter()
        cpu_tick = time.process_time()
        report_seen = 0
        for batch in self._loader(state.epoch):
            losses.append(self._step(batch, state))
            state.iteration += 1
            seen += len(batch["image"])
            state.bad_images += int((~batch["valid"]).sum())
            now = time.perf_counter()
            state.elapsed_s += now - tick  # the step plus the wait for its batch
            cpu_now = time.process_time()
            state.cpu_s += cpu_now - cpu_tick
            tick, cpu_tick = now, cpu_now
            if now - report_time >= self.cfg.log_every_s:
                self._report(state, losses, (seen - report_seen) / (now - report_time))
                report_time, report_seen = now, seen
            if self._out_of_time(state):
                state.stopped_by_budget = True
                self.log(
                    f"time budget {self.cfg.time_budget_s:.0f} s ({self.cfg.budget_clock}) reached in epoch "
                    f"{state.epoch + 1}"
                )
                return None
        state.epoch += 1
        return {
            "epoch": state.epoch,
            "iteration": state.iteration,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": seen / max(time.perf_counter() - epoch_start, 1e-9),
            "elapsed_s": state.elapsed_s,
            "cpu_s": state.cpu_s,
        }

    def _report(self, state: TeacherProgress, losses: list[float], rate: float) -> None:
        self.log(
            f"epoch {state.epoch + 1}/{self.cfg.epochs} iter {state.iteration}/{self.total_iters} "
            f"loss {np.mean(losses[-20:]):.3e} lr {self.optimizer.param_groups[0]['lr']:.2e} "
            f"{rate:.0f} samples/s, {state.elapsed_s:.0f} s trained ({state.cpu_s:.0f} CPU s)"
        )

    def train(self) -> TeacherProgress:
        cfg = self.cfg
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        state = _resume(cfg, self.model, self.optimizer, self.log)
        if state.iteration == 0:
            (Path(cfg.out) / LOG_FILE).unlink(missing_ok=True)  # a fresh run starts a fresh log
        self.log(
            f"{self.config.name}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M params, "
            f"{len(self.dataset)} instances, {self.iters_per_epoch} iters/epoch x {cfg.epochs} epochs, "
            f"batch {cfg.batch_size}, lr {cfg.lr:g}, aug {self.aug_name()}, conv init {cfg.conv_init}"
            + (f", time budget {cfg.time_budget_s:.0f} s ({cfg.budget_clock})" if cfg.time_budget_s else "")
        )
        state.stopped_by_budget = self._out_of_time(state)  # a resumed run may have budget left now
        while state.epoch < cfg.epochs and not self._out_of_time(state):
            row = self._train_epoch(state)
            if row is None:
                break
            state.history.append(row)
            _append_log(cfg, row)
            self.log(
                f"epoch {row['epoch']}/{cfg.epochs} done: loss {row['loss']:.3e}, "
                f"{row['samples_per_s']:.0f} samples/s, {row['elapsed_s']:.0f} s trained ({row['cpu_s']:.0f} CPU s)"
            )
            _save(cfg, self.model, self.optimizer, state)
        if state.stopped_by_budget or not state.history:
            _save(cfg, self.model, self.optimizer, state)  # keep the partial epoch's progress
        if state.bad_images:
            self.log(f"skipped {state.bad_images} samples whose image could not be read")
        return state

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """Val metrics with GT boxes (and detections if the data set has them), beside the
        mean-pose baseline with the same boxes."""
        cfg = self.cfg
        val = cfg.val_files() if cfg.has_val_source() else split_files(cfg.data, "val")
        box_sets = {"gt": "gt"}
        root = cfg.val or (None if cfg.has_val_source() else cfg.data)
        dets = detections_file(root) if root else None
        if dets:
            box_sets["det"] = dets
        metrics: dict[str, dict[str, Any]] = {}
        for name, boxes in box_sets.items():
            metrics[f"{self.config.name} ({name} boxes)"] = evaluate_model(
                self.model,
                val.ann_file,
                val.image_root,
                boxes=boxes,
                flip_test=cfg.eval_flip_test,
                batch_size=cfg.eval_batch_size,
                device=self.device,
            )
            metrics[f"mean-pose baseline ({name} boxes)"] = mean_pose_baseline(
                self.instances, val.ann_file, boxes=boxes, input_size=self.config.input_size
            )
        return metrics

    def run(self) -> TrainResult:
        start = time.perf_counter()
        state = self.train()
        metrics = self.evaluate() if self.cfg.evaluate else {}
        if metrics:
            self.log("evaluation on val:\n" + metrics_table(metrics))
            summary = {
                "metrics": metrics,
                "train": asdict(state),
                "config": self.cfg.to_dict(),
                "model_config": asdict(self.config),
                "data": data_fingerprint(self.train_files.ann_file).to_dict(),
            }
            (Path(self.cfg.out) / EVAL_FILE).write_text(json.dumps(summary, indent=2))
        checkpoint = str(Path(self.cfg.out) / CHECKPOINT_FILE)
        return TrainResult(checkpoint, state, metrics, time.perf_counter() - start)


def train_teacher(cfg: TeacherTrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) a teacher per `cfg`, evaluate it, and return the result."""
    return Trainer(cfg, log).run()
