"""Driver-side checks before a fit: the cache is complete and fits the student, the images
are the cached ones, and a resumed run is the same run (its record, `<run>/run.json`)."""

from __future__ import annotations

import dataclasses
import json

from distilpose.errors import UserError
from distilpose.profiles import get_profile
from pipeline import storage
from pipeline.distill.config import DistillConfig, cached_split_files, resolve_paths, run_dir, worker_resources
from pipeline.distill.state import has_checkpoint
from pipeline.mismatch import refuse_differences

RUN_FILE = "run.json"  # what the run is; a resume must match it
# Config fields that change what a run trains; resuming a run with other values would mix two runs.
IDENTITY_FIELDS = (
    "student",
    "profile",
    "no_distill",
    "alpha_kt",
    "alpha_vt",
    "alpha_sh",
    "alpha_cs",
    "sh_weighting",
    "online_teacher",
    "seed",
)


def check_cache_for_run(cfg: DistillConfig):
    """Refuse early (on the driver) a cache that is incomplete, made for another
    teacher/data, or whose teacher does not fit the student. Returns the cache's manifest
    and the steps of one epoch."""
    from pipeline.cache import open_reader
    from pipeline.cache.manifest import check_compatible
    from pipeline.cache_loader import steps_per_epoch

    check_online_views(cfg)
    reader = open_reader(cfg.cache)  # no manifest yet: "not finalized" error naming the commits
    if not reader.manifest.complete:
        raise UserError(f"cache {cfg.cache} is not complete; finish it with jobs/cache_teacher.py (it resumes)")
    if cfg.expect_teacher:
        check_compatible(reader.manifest, cfg.expect_teacher, uri=cfg.cache)
    check_teacher_fields(cfg, reader.manifest)
    check_student_fits(cfg, reader.manifest)
    check_cache_views(cfg, reader.manifest)
    check_token_views(cfg, reader.manifest)
    if cfg.data or cfg.ann_file or cfg.images:
        check_data_matches(cfg, reader.manifest)
    steps = steps_per_epoch(reader, cfg.workers, cfg.batch_size)  # raises when a worker would get no batch
    return reader.manifest, steps


def check_online_views(cfg: DistillConfig) -> None:
    if cfg.online_views and not (cfg.online_teacher or cfg.no_distill):
        raise UserError(
            f"--online-views {cfg.online_views} chooses what the online teacher sees; add --online-teacher PRESET "
            "(or --no-distill for the matched baseline; without either the student reads the cache's views and "
            "outputs)"
        )
    if cfg.exclude_view0 and cfg.view_source() == "fresh":
        raise UserError("--exclude-view0 chooses among the cached views; fresh views are always augmented")
    if cfg.label_flip and cfg.view_source() == "fresh":
        raise UserError("--label-flip mirrors cached views; fresh views already draw their own flip")
    if cfg.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every {cfg.checkpoint_every}: give a number of epochs >= 1")


def check_cache_views(cfg: DistillConfig, manifest) -> None:
    first = 1 if cfg.exclude_view0 else 0
    usable = manifest.views - first
    if usable < 1:
        raise UserError(f"--exclude-view0: the cache {cfg.cache} holds view 0 only; grow it with --views 2 or more")
    if cfg.cache_views is not None and not 1 <= cfg.cache_views <= usable:
        which = "augmented views (1..V-1)" if first else "views"
        raise UserError(
            f"--cache-views {cfg.cache_views}: the cache {cfg.cache} holds {usable} {which} per instance; "
            f"choose 1..{usable} (or grow the cache with jobs/cache_teacher.py --views {cfg.cache_views + first})"
        )


def masked_token_views(cfg: DistillConfig, manifest) -> tuple[list[int], int]:
    """(the drawn views whose token losses are masked, how many views are drawn): a cache built
    with --token-views stores no tokens from view token_views on; nothing is masked when the
    run reads no tokens from the cache (token terms off, online teacher, fresh views)."""
    from pipeline.cache_loader import resolve_cache_views  # the loader's own K

    spec = manifest.spec
    reads_tokens = {"kpt_tokens", "vis_tokens"} & set(cfg.teacher_fields())
    if spec is None or spec.token_views is None or cfg.online_teacher or not reads_tokens:
        return [], 0
    first = 1 if cfg.exclude_view0 else 0
    k = resolve_cache_views(manifest.views, cfg.cache_views, first)
    return [v for v in range(first, first + k) if not spec.has_tokens(v)], k


def check_token_views(cfg: DistillConfig, manifest) -> None:
    """Refuse token terms that would never see a target: every drawn view lacks tokens."""
    masked, k = masked_token_views(cfg, manifest)
    if masked and len(masked) == k:
        vt = manifest.spec.token_views
        raise UserError(
            f"the cache {cfg.cache} stores tokens for views 0..{vt - 1} only and this run draws views "
            f"{masked[0]}..{masked[-1]}: L_KT/L_VT would never see a target; pass --alpha-kt 0 --alpha-vt 0, "
            "or draw views with tokens (--cache-views, without --exclude-view0)"
        )


def token_views_line(cfg: DistillConfig, manifest) -> str | None:
    """The driver's line when token losses are masked on some of the drawn views, else None."""
    masked, k = masked_token_views(cfg, manifest)
    if not masked:
        return None
    vt = manifest.spec.token_views
    views = f"view {masked[0]}" if len(masked) == 1 else f"views {masked[0]}..{masked[-1]}"
    return (
        f"tokens cached for views 0..{vt - 1} of {manifest.views}: L_KT/L_VT masked on {views} "
        f"({len(masked)} of the {k} views drawn)"
    )


TOKEN_TERMS = ("kt", "vt")  # the loss terms that compare tokens: both models need them


def check_teacher_fields(cfg: DistillConfig, manifest) -> None:
    """Refuse a loss term whose teacher field the cache (or online teacher) does not hold, or
    a token term for a student without tokens (DeepPose): one line naming the field and the
    losses that can run, instead of a KeyError inside every worker."""
    from distilpose.losses import TEACHER_FIELD_OF_TERM, DistillLoss
    from distilpose.models import get_config
    from pipeline.cache.schema import teacher_fields

    student = get_config(cfg.student)
    if cfg.online_teacher:
        teacher = get_config(cfg.online_teacher)
        source = f"the online teacher {cfg.online_teacher!r}"
        held = ("heatmaps", "kpt_tokens", "vis_tokens") if teacher.has_tokens else ("heatmaps",)
    else:
        source = f"the teacher cache {cfg.cache} (teacher {manifest.teacher.preset!r})"
        held = teacher_fields(manifest.spec)
    enabled = DistillLoss(**cfg.alphas()).enabled_terms
    lacking = [t for t in enabled if TEACHER_FIELD_OF_TERM[t] not in held]
    tokenless_student = [] if student.has_tokens else [t for t in enabled if t in TOKEN_TERMS]
    if not (lacking or tokenless_student):
        return
    runnable = ["L_reg"] + [
        f"L_{t.upper()}"
        for t in TEACHER_FIELD_OF_TERM
        if TEACHER_FIELD_OF_TERM[t] in held and (student.has_tokens or t not in TOKEN_TERMS)
    ]
    off = " ".join(f"--alpha-{t} 0" for t in dict.fromkeys(lacking + tokenless_student))
    if lacking:
        needs = ", ".join(
            f"L_{t.upper()} (--alpha-{t} {cfg.alphas()['alpha_' + t]:g}) needs '{TEACHER_FIELD_OF_TERM[t]}'"
            for t in lacking
        )
        what = f"{needs}, which {source} does not hold (it holds {', '.join(held)})"
    else:
        terms = ", ".join(f"L_{t.upper()} (--alpha-{t} {cfg.alphas()['alpha_' + t]:g})" for t in tokenless_student)
        what = f"student {cfg.student!r} has no tokens ('kpt_tokens'/'vis_tokens'), which {terms} compare"
    raise UserError(f"{what}. The losses that can run: {', '.join(runnable)}; pass {off}")


def check_student_fits(cfg: DistillConfig, manifest) -> None:
    """The student's crops, joints and tokens must line up with the teacher's, or the loss
    would compare unrelated tensors (or fail deep inside a worker)."""
    from distilpose.models import get_config
    from pipeline.cache.schema import CacheMismatchError

    student = get_config(cfg.student)
    if student.kind != "student":
        raise UserError(f"--student {cfg.student!r} is a {student.kind} preset, not a student")
    fields = cfg.teacher_fields()
    if cfg.online_teacher:
        source, teacher = f"online teacher {cfg.online_teacher!r}", get_config(cfg.online_teacher)
        have = {
            "input size": tuple(teacher.input_size),
            "joints": teacher.num_joints,
            "heatmap size": tuple(teacher.heatmap_size),
            "token dim": teacher.dim,
            "visual tokens": teacher.num_patches,
        }
    else:
        spec = manifest.spec
        source = f"teacher cache {cfg.cache} (teacher {manifest.teacher.preset!r})"
        have = {
            "input size": tuple(manifest.teacher.config.get("input_size", student.input_size)),
            "joints": spec.num_joints,
            "heatmap size": tuple(spec.heatmap_size),
            "token dim": spec.dim,
            "visual tokens": spec.num_patches,
        }
    want = {
        "input size": tuple(student.input_size),  # cached joints / crops are in this crop's pixels
        "joints": student.num_joints,
        "heatmap size": tuple(student.heatmap_size) if "heatmaps" in fields else have["heatmap size"],
        "token dim": student.dim if {"kpt_tokens", "vis_tokens"} & set(fields) else have["token dim"],
        "visual tokens": student.num_patches if "vis_tokens" in fields else have["visual tokens"],
    }
    refuse_differences(
        have,
        want,
        what=f"student {cfg.student!r} does not fit the {source}",
        advice="Use a cache made by a matching teacher, or pick a student preset of the same size.",
        recorded_as="teacher",
        current_as="student",
        error=CacheMismatchError,
    )


def check_data_matches(cfg: DistillConfig, manifest) -> None:
    """Views are rebuilt from the data source's images: its annotation file must be the cached one."""
    from distilpose.data.coco import data_fingerprint
    from pipeline.cache.schema import CacheMismatchError

    layout = cached_split_files(cfg, manifest.data)
    found = data_fingerprint(layout.ann_file).sha256
    if found != manifest.data.ann_file_sha256:
        given = f"--data {cfg.data}" if cfg.data else "--ann-file"
        raise CacheMismatchError(
            f"{given}: {layout.ann_file} (sha256 {found[:12]}...) is not the annotation file the "
            f"cache {cfg.cache} was built from (sha256 {manifest.data.ann_file_sha256[:12]}..., "
            f"{manifest.data.ann_file}); the cached views would be cut from the wrong images"
        )


def run_identity(cfg: DistillConfig, manifest, backbone) -> dict:
    identity = {k: getattr(cfg, k) for k in IDENTITY_FIELDS}
    identity["sh_weighting"] = cfg.loss_sh_weighting()  # the profile's unless given
    identity["backbone"] = {"source": backbone.source, "checkpoint": backbone.checkpoint or ""}
    identity["cache_teacher"] = f"{manifest.teacher.preset}:{manifest.teacher.checkpoint_sha256}"
    identity["cache_data"] = manifest.data.ann_file_sha256
    if cfg.online_teacher or cfg.view_source() == "fresh":  # the cache's views or fresh ones
        identity["online_views"] = cfg.view_source()
    identity["cache_views"] = cfg.cache_views or manifest.views  # views the loader draws from
    for option_name in ("exclude_view0", "label_flip"):  # recorded when on: older runs stay comparable
        if getattr(cfg, option_name):
            identity[option_name] = True
    if manifest.spec is not None and manifest.spec.token_views is not None:  # token losses masked on later views
        identity["cache_token_views"] = manifest.spec.token_views
    return json.loads(json.dumps(identity))


def check_run_record(cfg: DistillConfig, manifest, resumed: bool, backbone) -> None:
    """Write `<run>/run.json` on a fresh start; on resume refuse a different student, loss,
    backbone start or teacher cache (the checkpoint would be continued with another objective)."""
    uri = storage.join(run_dir(cfg), RUN_FILE)
    identity = run_identity(cfg, manifest, backbone)
    if resumed and storage.exists(uri):
        refuse_differences(
            json.loads(storage.read_bytes(uri)),
            identity,
            what=f"run '{cfg.name}' at {run_dir(cfg)} was started with another configuration",
            advice="Use a new --name to start a separate run (or the original settings to resume it).",
            recorded_as="run has",
            current_as="this command",
            error=UserError,
        )
        return
    storage.atomic_write_bytes(uri, (json.dumps(identity, indent=2) + "\n").encode())


def prepare_run(cfg: DistillConfig) -> tuple[DistillConfig, bool]:
    """Driver-side checks before a fit: absolute paths, cache, resume or fresh start.
    Returns the resolved config and whether the run resumes."""
    from pipeline.backbone_start import resolve_backbone_start

    cfg = resolve_paths(cfg)
    manifest, steps = check_cache_for_run(cfg)
    cfg = with_online_teacher_checkpoint(cfg, manifest.teacher)
    resumed = has_checkpoint(cfg)
    # Resolved here for the run record and the warning; the workers resolve the same choice.
    backbone = resolve_backbone_start(cfg.student, cfg.init_backbone, manifest.teacher)
    check_run_record(cfg, manifest, resumed, backbone)
    if resumed:
        print(
            f"[distill] run '{cfg.name}' exists at {run_dir(cfg)}: resuming from its last checkpoint "
            "(use a new --name to start fresh)",
            flush=True,
        )
    else:
        print(f"[distill] starting new run '{cfg.name}' at {run_dir(cfg)}", flush=True)
        override = f"; --sh-weighting {cfg.sh_weighting} overrides its L_SH weighting" if cfg.sh_weighting else ""
        print(f"[distill] {get_profile(cfg.profile).describe()}{override}", flush=True)
        if backbone.warning:
            print(f"[distill] {backbone.warning}", flush=True)
        # The workers make the same choice, but their output reaches the user only with
        # --verbose (and then once per rank): the driver says it, once.
        print(f"[distill] {backbone_line(cfg, backbone)}", flush=True)
    print(f"[distill] {views_line(cfg, manifest)}", flush=True)
    print(f"[distill] {loader_line(cfg)}", flush=True)
    tokens = token_views_line(cfg, manifest)
    if tokens:
        print(f"[distill] {tokens}", flush=True)
    print(warmup_line(cfg, steps * cfg.epochs), flush=True)
    warn_if_cluster_too_small(cfg)
    return cfg, resumed


def loader_line(cfg: DistillConfig) -> str:
    """Where each worker's batches are built (--loader-processes, --prefetch)."""
    from pipeline.distill.config import loader_prefetch

    processes, ahead = cfg.loader_processes, loader_prefetch(cfg)
    if cfg.view_source() == "fresh" or processes == 0:
        ahead_text = f", {ahead} ahead in a thread" if ahead else ""
        return f"loader: batches built in each worker's training process{ahead_text}"
    return f"loader: batches built in {processes} process(es) per worker (--loader-processes), in order"


def backbone_line(cfg: DistillConfig, backbone) -> str:
    """What a fresh start's backbone starts from, as the workers will load it ("backbone: N
    tensors from teacher ..."): the same load on a student built here, so a checkpoint that
    does not fit or changed since the cache was built fails now, not in every worker."""
    from distilpose.models import build_model
    from pipeline.backbone_start import apply_backbone_start

    student = build_model(cfg.student) if backbone.checkpoint else None
    return apply_backbone_start(student, backbone)


def with_online_teacher_checkpoint(cfg: DistillConfig, cache_teacher) -> DistillConfig:
    """`--online-teacher` without `--teacher-checkpoint` runs the teacher that built the cache
    when it is the same preset: comparing online with cached distillation wants that very
    teacher, and a checkpoint-less teacher would be a seeded random init."""
    if not cfg.online_teacher or cfg.teacher_checkpoint:
        return cfg
    if cache_teacher.preset == cfg.online_teacher and cache_teacher.checkpoint:
        print(f"[distill] online teacher checkpoint: the cache's teacher, {cache_teacher.checkpoint}", flush=True)
        return dataclasses.replace(cfg, teacher_checkpoint=cache_teacher.checkpoint)
    print(
        f"[distill] WARNING: the online teacher {cfg.online_teacher} has no checkpoint (the cache's teacher is "
        f"{cache_teacher.preset!r} without a recorded checkpoint): it runs a seeded random init; pass "
        "--teacher-checkpoint",
        flush=True,
    )
    return cfg


def warmup_line(cfg: DistillConfig, total_steps: int) -> str:
    """Says which lr warm-up the run uses: the asked one, or one scaled to a short run."""
    from distilpose.schedule import MAX_WARMUP_FRACTION, scaled_warmup

    used = scaled_warmup(cfg.warmup_iters, total_steps)
    if used == cfg.warmup_iters:
        return f"[distill] lr warm-up: {used} of {total_steps} iterations"
    return (
        f"[distill] lr warm-up scaled to {used} of {total_steps} iterations (--warmup-iters {cfg.warmup_iters} "
        f"is more than {MAX_WARMUP_FRACTION:.0%} of this run)"
    )


def warn_if_cluster_too_small(cfg: DistillConfig) -> None:
    """Ray Train waits, silently and forever, for resources that never come."""
    import ray

    if not ray.is_initialized():
        return
    have = ray.cluster_resources()
    need = {k: cfg.workers * v for k, v in worker_resources(cfg).items()}
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v and have.get(k, 0.0) < v}
    if short:
        text = ", ".join(f"{k} {v:g} needed, {h:g} in the cluster" for k, (v, h) in short.items())
        print(f"[distill] WARNING: {text}; training waits until the cluster grows (autoscaler)", flush=True)


def views_line(cfg: DistillConfig, manifest) -> str:
    """Which crops the student (and an online teacher) trains on."""
    if cfg.view_source() == "fresh":
        views = "fresh views (a new augmentation per instance per epoch)"
    else:
        from pipeline.cache_loader import resolve_cache_views  # the loader's own K

        first = 1 if cfg.exclude_view0 else 0
        k = resolve_cache_views(manifest.views, cfg.cache_views, first)
        views = f"cached views {first}..{first + k - 1} of {manifest.views}"
        views += " (augmented only)" if first else (" (view 0 is the un-augmented crop)" if k > 1 else "")
        if cfg.label_flip:
            views += ", half of them mirrored at load time (label-side flip; token losses masked there)"
    teacher = f"online teacher {cfg.online_teacher}" if cfg.online_teacher else None
    if cfg.no_distill:
        return f"no distillation (L_reg only) on {views}"
    return f"{teacher or 'cached teacher outputs'} on {views}"
