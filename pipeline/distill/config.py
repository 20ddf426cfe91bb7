"""What a distillation run is: its config (every field is also a jobs/distill.py option) and
where the run keeps its files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from distilpose.data.layout import DataOptions, SplitFiles, ValDataOptions
from distilpose.models.conv_init import CONV_INITS
from distilpose.options import check_options, option
from distilpose.profiles import DEFAULT_PROFILE, PROFILES, get_profile
from pipeline import storage
from pipeline.backbone_start import FROM_SCRATCH

ONLINE_VIEWS = ("fresh", "cache")
LOCAL_PATH_FIELDS = (
    *("storage", "cache", "data", "ann_file", "images", "val", "val_ann_file", "val_images"),
    *("teacher_checkpoint", "init_backbone"),
)


@dataclass
class DistillConfig(DataOptions, ValDataOptions):
    """A distillation run. The data source (--data or --ann-file/--images) is where the cached
    split's images are read to rebuild views (default: the files the cache recorded); the
    val source (--val or --val-ann-file/--val-images) is what the run is evaluated on."""

    OPTION_HELP: ClassVar[dict[str, str]] = {
        "data": "data set root holding the cached split's images (default: the files the cache recorded)",
        "ann_file": "the cached split's annotation json (default: the one the cache recorded, or under --data)",
        "images": "the cached split's image folder (default: the one the cache recorded, or under --data)",
    }

    cache: str = option(help="teacher cache URI (from jobs/cache_teacher.py)")
    cache_views: int | None = option(
        None, help="read only the cache's first K views per instance (default: all); one V=16 cache serves K=1..16"
    )
    exclude_view0: bool = option(
        False,
        help="draw only the cache's augmented views 1..K (view 0 is the un-augmented crop, which the official "
        "pipeline never draws; K = --cache-views, default all but view 0)",
    )
    label_flip: bool = option(
        False,
        help="mirror half of the cached views at load time, the teacher's heatmaps with them (joints swapped) "
        "and the token losses masked for those: twice the distinct crops per cached view",
    )
    student: str = option("distilpose-s", help="student preset")
    storage: str = option("runs", help="checkpoint/log root (local or s3://)")
    name: str = option("distill", help="run name; the same name resumes")
    epochs: int = option(300, minimum=1, help="training epochs")
    batch_size: int = option(32, minimum=1, help="per worker")
    workers: int = option(1, minimum=1, help="Ray Train workers (one per GPU with --gpu)")
    gpu: bool = option(False, help="one GPU per worker, NCCL")
    cpus_per_worker: float = option(1.0, help="CPUs each worker asks Ray for")
    lr: float = option(1e-3, help="base learning rate (Adam)")
    warmup_iters: int = option(500, help="iterations of linear lr warm-up")
    lr_steps: tuple[int, ...] | None = option(
        None, help="epochs at which lr x0.1 (default 2/3, 13/15 of epochs)"
    )  # 200, 260 of 300
    alpha_kt: float = option(5e-4, help="weight of the keypoint-token loss L_KT")
    alpha_vt: float = option(5e-4, help="weight of the visual-token loss L_VT")
    alpha_sh: float = option(1.0, help="weight of the simulated-heatmap loss L_SH")
    alpha_cs: float = option(0.01, help="weight of the confidence loss L_CS")
    profile: str = option(
        DEFAULT_PROFILE,
        choices=tuple(sorted(PROFILES)),
        help="'official': the official code's quirks (L_SH weighting, flip test); 'intended': what they meant",
    )
    sh_weighting: str | None = option(
        None, choices=("per-sample", "official"), help="L_SH weighting (default: the profile's)"
    )
    no_distill: bool = option(False, help="L_reg only (the paper's no-teacher row)")
    online_teacher: str | None = option(
        None, metavar="PRESET", help="run this teacher in the loop instead of the cache"
    )
    teacher_checkpoint: str | None = option(
        None, help="checkpoint for --online-teacher (default: the cache's teacher checkpoint, same preset)"
    )
    # None: "fresh" with --online-teacher, "cache" otherwise (see view_source).
    online_views: str | None = option(
        None,
        choices=ONLINE_VIEWS,
        help="what the student (and the online teacher) sees: 'fresh' augmentation per instance per epoch "
        "(default with --online-teacher, the official way) or the cache's stored views ('cache': isolates the "
        "storage error); with --no-distill, 'fresh' is the baseline matched to an online-fresh run",
    )
    init_backbone: str | None = option(
        None,
        metavar="CKPT",
        help="teacher checkpoint the student backbone starts from (default for DistilPose-L: the cache's "
        f"teacher; '{FROM_SCRATCH}': from scratch)",
    )
    # "official" keeps the N(0, 0.001) convs of the official code; "kaiming" (He init) learns
    # much faster in short runs (see distilpose.models.conv_init). Not where the backbone
    # starts (init_backbone): a teacher checkpoint loaded after it overwrites what it covers.
    conv_init: str = option(
        "official",
        choices=CONV_INITS,
        help="student conv init: official N(0, 0.001) or He (kaiming) init, much faster in short runs; "
        "layers loaded from --init-backbone's checkpoint overwrite it",
    )
    val_boxes: str = option("gt", help="'gt' or a detector results json")
    eval_every: int = option(0, help="also evaluate every N epochs")
    # A checkpoint costs a state save and a copy into storage: per epoch, that is most of an
    # epoch of a few steps (long schedules on small subsets, as in the replay study).
    checkpoint_every: int = option(1, help="epochs between checkpoints (the last epoch always gets one)")
    flip_test: bool = option(True, flag="--no-flip-test", help="evaluate without the flip test")
    amp: bool = option(False, help="mixed precision (GPU only)")
    seed: int = option(0, help="random seed")
    max_failures: int = option(2, help="worker-group restarts before giving up")
    log_every: int = option(10, help="steps between step-metric rows")
    # None: 2 on GPU workers or with >= 2 CPUs per worker, else 0 (on one CPU the loader
    # thread competes with the training step).
    prefetch: int | None = option(
        None, help="batches a loader thread builds ahead (default: 2 with --gpu or >= 2 CPUs per worker, else 0)"
    )
    # Opt-in: measured only on a 2-core machine (bench/bench_loader_cost.py, "samples/s vs
    # loader processes"), where one process is slower than building the batches in the
    # training process with stored crops; they are for workers with cores to spare
    # (cpus-per-worker >= 3), and the embedded default (1-CPU workers) must not change.
    loader_processes: int = option(
        0,
        minimum=0,
        help="processes per training worker that read and build its batches (the same batches, in order); 0: in the "
        "training process. For GPU workers with cores to spare: give each worker --cpus-per-worker N+1",
    )
    placement_strategy: str = option(
        "PACK",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        help="how Ray places the workers on nodes (SPREAD: one per node where possible)",
    )
    expect_teacher: dict = option(
        default_factory=dict,
        flag="--expect",
        help="refuse a cache whose manifest differs, e.g. teacher.checkpoint_sha256=<sha> (repeatable)",
    )

    def __post_init__(self) -> None:
        check_options(self)

    def alphas(self) -> dict[str, float]:
        if self.no_distill:
            return {"alpha_kt": 0.0, "alpha_vt": 0.0, "alpha_sh": 0.0, "alpha_cs": 0.0}
        return {k: getattr(self, k) for k in ("alpha_kt", "alpha_vt", "alpha_sh", "alpha_cs")}

    def loss_sh_weighting(self) -> str:
        """The L_SH weighting used: --sh-weighting when given, else the profile's."""
        return self.sh_weighting or get_profile(self.profile).sh_weighting

    def flip_mode(self) -> str:
        """The in-loop evaluation's student flip test (the profile's)."""
        return get_profile(self.profile).flip_mode

    def view_source(self) -> str:
        """Where the student's crops come from: "cache" (the cached views, also with
        --online-views cache) or "fresh" (a new augmentation every epoch; with the online
        teacher, the default, or without distillation)."""
        default = "fresh" if self.online_teacher else "cache"
        return self.online_views or default

    def milestones(self) -> tuple[int, ...]:
        if self.lr_steps is not None:
            return tuple(self.lr_steps)
        return (round(self.epochs * 2 / 3), round(self.epochs * 13 / 15))

    def teacher_fields(self) -> tuple[str, ...]:
        """Teacher fields the enabled loss terms read (from the cache or the online teacher)."""
        from distilpose.losses import DistillLoss

        return tuple(DistillLoss(**self.alphas(), sh_weighting=self.loss_sh_weighting()).needed_teacher_fields)


def run_dir(cfg: DistillConfig) -> str:
    return storage.join(cfg.storage, cfg.name)


def export_uri(cfg: DistillConfig, which: str) -> str:
    """Where the run's exported student is: which = "latest" or "best"."""
    return storage.join(run_dir(cfg), "export", f"student_{which}.pt")


def resolve_paths(cfg: DistillConfig) -> DistillConfig:
    """A copy with local paths made absolute. Ray workers do not share the driver's working
    directory (and Tune trials chdir into their trial folder), so a relative path would
    point somewhere else there."""
    changes = {}
    for name in LOCAL_PATH_FIELDS:
        value = getattr(cfg, name)
        if value and value != FROM_SCRATCH and storage.is_local(value):
            changes[name] = storage.local_path(value)
    if cfg.val_boxes != "gt" and storage.is_local(cfg.val_boxes):
        changes["val_boxes"] = storage.local_path(cfg.val_boxes)
    return dataclasses.replace(cfg, **changes)


def cached_split_files(cfg: DistillConfig, data) -> SplitFiles:
    """Annotation file and image root of the cached split (`data`: the manifest's DataInfo):
    as the cache recorded them, or the data source's (--data, --ann-file, --images) where given."""
    from pipeline.dataset_layout import resolve_layout

    if cfg.data:
        return resolve_layout(cfg.data, data.split, cfg.ann_file, cfg.images)
    return SplitFiles(
        storage.absolute(cfg.ann_file) if cfg.ann_file else data.ann_file,
        storage.absolute(cfg.images) if cfg.images else data.image_root,
    )


def val_split_files(cfg: DistillConfig) -> SplitFiles:
    """The val split the run is evaluated on (--val, or --val-ann-file/--val-images)."""
    from pipeline.dataset_layout import resolve_layout

    return resolve_layout(cfg.val, "val", cfg.val_ann_file, cfg.val_images)


def loader_prefetch(cfg: DistillConfig) -> int:
    if cfg.prefetch is not None:
        return cfg.prefetch
    return 2 if cfg.gpu or cfg.cpus_per_worker >= 2 else 0


def worker_resources(cfg: DistillConfig) -> dict[str, float]:
    """What each training worker asks Ray for (a run needs `workers` times this)."""
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpu:
        resources["GPU"] = 1
    return resources
