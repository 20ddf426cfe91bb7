"""The teacher stage: run the teacher once over a split and shard its outputs into the cache.

Ray Data end to end:

    shard specs (one row per shard: its instances and the views still to compute)
      -> crop task:    decode each image, draw the seeded views per instance, warp the crops
      -> teacher actors (map_batches, callable class): batched forward under inference_mode,
                       one view at a time, Gaussian fit + confidence, encode to the cache schema
      -> CacheSink:    one unit per (shard, view), committed atomically by the store

A shard's instances are fixed by the plan (id order, ``shard_instances`` per shard, never
depending on V); each of its views is a unit of storage and of resume. A rerun computes
only the units not committed yet: after a crash, or after raising ``--views`` (the cache
grows in place). The teacher runs on one view's rows at a time, in the same batches
whichever other views are computed with it, so a unit's bytes are the same in a grown
cache as in a fresh build. Each shard is one Ray Data block from start to end (one input
row per shard, whole-block batches), which is what lets the sink check it arrived complete.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distilpose.data.coco import Instance, load_instances
from distilpose.data.layout import DataOptions, SplitFiles
from distilpose.errors import UserError
from distilpose.options import check_options, option
from pipeline import storage
from pipeline.cache import open_writer
from pipeline.cache.encodings import decode_crop_jpeg, encode_crop_jpeg, encode_views
from pipeline.cache.manifest import DataInfo, Manifest, TeacherInfo
from pipeline.cache.schema import FORMATS, HEATMAP_ENCODINGS, TEACHER_PRECISIONS, TOKEN_ENCODINGS, CacheSpec
from pipeline.cache_claim import claim_output, job_identity, resolve_store_crops
from pipeline.cache_summary import CacheSummary
from pipeline.dataset_layout import resolve_layout
from pipeline.progress import ShardProgress

ENGINES = ("ray", "in-process")


@dataclass
class CacheJobConfig(DataOptions):
    """The cache job's options; the data source (--data or --ann-file/--images) is DataOptions'."""

    teacher: str = option(help="teacher preset, e.g. tokenpose-w48, tokenpose-tiny or simplebaseline-r50 (no tokens)")
    out: str = option(help="cache root URI (local path or s3://bucket/prefix)")
    checkpoint: str | None = option(None, help="teacher checkpoint: ours or the official .pth (local or s3://)")
    format: str = option("zarr", choices=FORMATS, help="cache store")
    views: int = option(
        1, minimum=1, help="cached views per instance (view 0 = un-augmented); a larger value grows a cache"
    )
    split: str = option("train", help="data split")
    batch_size: int = option(32, minimum=1, help="teacher forward batch size")
    workers: int = option(1, minimum=1, help="teacher actors")
    gpus_per_worker: float = option(0.0, help="GPUs per teacher actor")
    cpus_per_worker: float = option(1.0, help="CPUs per teacher actor")
    store_crops: str = option(
        "auto",
        choices=("auto", "none", "jpeg"),
        help="also store each view's crop as JPEG; auto: jpeg when the cache or the images are on S3 (students "
        "then read no source image per epoch), none for local ones, or what an existing cache at --out has",
    )
    shard_instances: int = option(256, minimum=1, help="instances per shard (stored as one object per view)")
    seed: int = option(0, help="seed of the views' augmentation")
    heatmap_encoding: str = option("i8-thresh", choices=tuple(HEATMAP_ENCODINGS), help="heatmap encoding")
    teacher_precision: str = option(
        "fp32", choices=tuple(TEACHER_PRECISIONS), help="teacher forward: fp32 (TF32 on a GPU) or bf16/fp16 autocast"
    )
    token_encoding: str = option("int8-token-scale", choices=tuple(TOKEN_ENCODINGS), help="token encoding")
    token_views: int | None = option(
        None,
        help="store the teacher's tokens (L_KT/L_VT targets) for views 0..N-1 only; later views keep heatmaps, "
        "Gaussians and confidences, and distillation masks the token losses on them (default: all views)",
    )
    limit: int | None = option(None, minimum=1, help="cache only the first N instances (smoke runs)")
    engine: str = option(
        "ray",
        choices=ENGINES,
        help="ray: Ray Data over the cluster; in-process: the shards one after another in this process, without Ray "
        "(a small cache, a machine without Ray, a debugger): the same crops, teacher and bytes",
    )
    strict: bool = option(
        False, help="stop at the first malformed annotation or missing/undecodable image instead of skipping it"
    )

    def __post_init__(self) -> None:
        check_options(self)
        self.check_data_source()
        if self.engine == "in-process" and (self.workers != 1 or self.gpus_per_worker):
            raise ValueError(
                "--engine in-process runs one teacher in this process: --workers and --gpus-per-worker are for "
                "--engine ray (a GPU, when there is one, is used without them)"
            )
        if self.token_views is not None and not 1 <= self.token_views <= self.views:
            raise ValueError(
                f"--token-views {self.token_views}: choose 1..{self.views} (tokens for views 0..N-1 of the "
                f"{self.views} cached views), or leave it out to store tokens for every view"
            )


@dataclass
class ShardSpec:
    index: int
    instances: list[Instance]
    views: tuple[int, ...] = ()  # the views to compute (those not committed yet)


# ----------------------------------------------------------------------------- planning


def plan_shards(instances: list[Instance], shard_instances: int, views: int = 1) -> list[ShardSpec]:
    """Fixed shard membership: instances in id order, ``shard_instances`` per shard (never
    depending on V, so raising V keeps every shard), each shard with views 0..views-1."""
    per_shard = max(1, shard_instances)
    ordered = sorted(instances, key=lambda inst: inst.instance_id)
    return [
        ShardSpec(index=i, instances=ordered[start : start + per_shard], views=tuple(range(views)))
        for i, start in enumerate(range(0, len(ordered), per_shard))
    ]


def units_to_compute(shards: list[ShardSpec], committed: set[tuple[int, int]]) -> list[ShardSpec]:
    """The shards with views not committed yet, each with only those views."""
    todo = []
    for shard in shards:
        missing = tuple(v for v in shard.views if (shard.index, v) not in committed)
        if missing:
            todo.append(dataclasses.replace(shard, views=missing))
    return todo


def instance_to_json(inst: Instance) -> dict:
    d = dataclasses.asdict(inst)
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def instance_from_json(d: dict) -> Instance:
    kwargs = dict(d)
    for key in ("center", "scale", "joints"):
        kwargs[key] = np.asarray(kwargs[key], dtype=np.float32)
    return Instance(**kwargs)


# ----------------------------------------------------------------------------- crop task


def crop_shard(batch: dict, *, image_root: str, input_size, seed: int, store_crops: str, strict: bool = False) -> dict:
    """One shard row in -> one row per (instance, view to compute) out, with the crop the
    teacher sees; rows are view-major (all instances of a view together, in id order).

    A missing or undecodable image (permanent) becomes skipped rows, counted by reason, or
    stops the job with `strict`. Anything else, storage still failing after its retries
    included, fails the task: its units are not committed and a rerun computes them.
    """
    from distilpose.data.coco import ImageError, read_image
    from distilpose.data.transforms import affine_matrix, apply_view
    from distilpose.data.views import view_for

    rows: dict[str, list] = {k: [] for k in _CROP_COLUMNS}
    h, w = input_size
    for shard, payload, views in zip(batch["shard"], batch["instances"], batch["views"]):
        instances = [instance_from_json(d) for d in json.loads(payload)]
        views = json.loads(views)
        total = len(instances) * len(views)
        for inst in instances:
            try:
                image = read_image(image_root, inst.image_file)
                reason = ""
            except ImageError as exc:  # permanent: counted and reported, never silent
                if strict:
                    raise UserError(f"--strict: instance {inst.instance_id}: {exc}") from exc
                image, reason = None, f"image: {exc.reason.split(' (')[0]}"
            for v in views:
                view = view_for(inst, v, seed)
                jpeg = b""
                if image is not None:
                    crop, joints = apply_view(image, inst.joints, view, input_size)
                    if store_crops == "jpeg":  # the teacher sees the stored crop's pixels, as the student will
                        jpeg = encode_crop_jpeg(crop)
                        crop = decode_crop_jpeg(jpeg)
                else:
                    crop, joints = np.zeros((h, w, 3), np.uint8), np.zeros((len(inst.joints), 3), np.float32)
                rows["shard"].append(int(shard))
                rows["shard_rows"].append(total)
                rows["valid"].append(image is not None)
                rows["skip_reason"].append(reason)
                rows["instance_id"].append(inst.instance_id)
                rows["image_id"].append(inst.image_id)
                rows["view"].append(v)
                rows["view_params"].append(view.to_array())
                rows["affine"].append(affine_matrix(view, input_size))
                rows["joints"].append(joints[:, :2].astype(np.float32))
                rows["joint_weights"].append(joints[:, 2].astype(np.float32))
                rows["image"].append(crop)
                rows["crop_jpeg"].append(jpeg)
    out = {k: np.asarray(v) for k, v in rows.items() if k not in ("crop_jpeg", "skip_reason")}
    out["skip_reason"] = np.asarray(rows["skip_reason"], dtype=object)
    out["crop_jpeg"] = np.asarray(rows["crop_jpeg"], dtype=object)
    # Each image is read once (instance-major loop above), then the rows are put view-major.
    # Shards arrive one per batch, so sorting by (shard, view) keeps each shard together.
    order = np.lexsort((out["view"], out["shard"])) if len(out["view"]) else np.zeros(0, np.int64)
    return {k: v[order] for k, v in out.items()}


_CROP_COLUMNS = (
    "shard shard_rows valid skip_reason instance_id image_id view view_params affine joints joint_weights image"
).split() + ["crop_jpeg"]


# ----------------------------------------------------------------------------- teacher actor


class TeacherPredictor:
    """Ray Data callable class: builds the teacher once per actor, then runs whole shards."""

    def __init__(
        self, preset: str, checkpoint: str | None, spec: CacheSpec, batch_size: int, threads: int, precision: str
    ):
        import torch

        from distilpose.teacher_forward import build_teacher

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_teacher(preset, storage.local_copy(checkpoint) if checkpoint else None).to(self.device)
        self.spec = spec
        self.batch_size = batch_size
        self.precision = precision

    def __call__(self, batch: dict) -> dict:
        # One view at a time (rows are view-major): a unit's batches, and so its bytes, do not
        # depend on which other views run with it (a grown cache equals a fresh build).
        valid = batch["valid"].astype(bool)
        masks = [(batch["shard"] == shard) & (batch["view"] == view) & valid for shard, view in _units_in_order(batch)]
        parts = [self._run(batch["image"][rows]) for rows in masks if rows.any()] or [self._run(batch["image"][:0])]
        outputs = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        return encode_shard_rows(batch, outputs, self.spec)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from distilpose.teacher_forward import run_teacher

        return run_teacher(self.model, images, self.batch_size, self.device, precision=self.precision)


def _units_in_order(batch: dict) -> list[tuple[int, int]]:
    """(shard, view) of a view-major batch, in row order."""
    keys = list(zip(batch["shard"].tolist(), batch["view"].tolist()))
    return list(dict.fromkeys(keys))


def encode_shard_rows(batch: dict, outputs: dict, spec: CacheSpec) -> dict:
    """Scatter teacher outputs back onto all rows (invalid rows get zeros) and encode."""
    valid = batch["valid"].astype(bool)
    n = len(valid)
    full = {}
    for key, value in outputs.items():
        arr = np.zeros((n, *value.shape[1:]), np.float32) if value.ndim > 1 else np.zeros((n,), np.float32)
        if value.size:
            arr[valid] = value
        full[key] = arr
    record = {
        k: batch[k] for k in ("instance_id", "image_id", "view", "view_params", "affine", "joints", "joint_weights")
    }
    record.update(full)
    if spec.store_crops:
        record["crop_jpeg"] = batch["crop_jpeg"]
    encoded = encode_views(record, spec)
    for k in ("shard", "shard_rows", "valid", "skip_reason"):
        encoded[k] = batch[k]
    return encoded


# ----------------------------------------------------------------------------- sink


def _sink_base():
    from ray.data import Datasink

    return Datasink


class CacheSink(_sink_base()):
    """Writes each shard that arrives complete, one unit per view; the store commits each
    unit atomically."""

    def __init__(self, out: str, spec: CacheSpec, fmt: str):
        self.out, self.spec, self.fmt = out, spec, fmt

    def write(self, blocks, ctx) -> list[dict]:
        from ray.data.block import BlockAccessor

        columns: dict[str, list] = {}
        for block in blocks:
            for key, value in BlockAccessor.for_block(block).to_numpy().items():
                columns.setdefault(key, []).append(value)
        if not columns:
            return []
        rows = {k: np.concatenate(v) for k, v in columns.items()}
        return write_shard_rows(open_writer(self.out, self.spec, self.fmt), rows)


def write_shard_rows(writer, rows: dict[str, np.ndarray], announce: bool = True) -> list[dict]:
    """Commit the units of the complete shards in `rows` (encoded teacher rows, view-major).
    `announce`: a line per unit (a Ray worker's log; the driver shows the progress poll's)."""
    valid = rows["valid"].astype(bool)
    written = []
    for shard in np.unique(rows["shard"]):
        sel = rows["shard"] == shard
        expected = int(rows["shard_rows"][sel][0])
        if int(sel.sum()) != expected:
            raise RuntimeError(
                f"shard {shard} arrived split across Ray Data blocks ({int(sel.sum())} of {expected} rows); "
                "raise DataContext.target_max_block_size"
            )
        for view in np.unique(rows["view"][sel]):
            unit = sel & (rows["view"] == view)
            skipped = Counter(str(r) for r in rows["skip_reason"][unit & ~valid])
            skipped_ids: dict[str, list[int]] = {}
            for reason, iid in zip(rows["skip_reason"][unit & ~valid], rows["instance_id"][unit & ~valid]):
                ids = skipped_ids.setdefault(str(reason), [])
                if len(ids) < MAX_SKIPPED_IDS:
                    ids.append(int(iid))
            record = {k: v[unit & valid] for k, v in rows.items() if k not in _BOOKKEEPING}
            extra = {"skipped": dict(skipped), "skipped_ids": skipped_ids}
            info = writer.write_view(int(shard), int(view), record, extra=extra)
            if announce:
                print(f"[cache] shard {int(shard):05d} view {int(view)} committed: {info.rows} rows", flush=True)
            written.append({"shard": int(shard), "view": int(view), "rows": int(info.rows)})
    return written


_BOOKKEEPING = ("shard", "shard_rows", "valid", "skip_reason")
MAX_SKIPPED_IDS = 5  # instance ids kept per skip reason and unit, so a bad image can be found


# ----------------------------------------------------------------------------- driver


def run_cache_job(cfg: CacheJobConfig, start_ray: Callable[[], None] | None = None) -> CacheSummary:
    """Cache the teacher's outputs over the split. `start_ray` starts or joins Ray once the
    inputs are checked and shards are left to do: a mistake costs seconds, not Ray's start-up."""
    from distilpose.data.coco import data_fingerprint
    from distilpose.models import get_config
    from distilpose.teacher_forward import build_teacher

    t0 = time.perf_counter()
    teacher_cfg = get_config(cfg.teacher)
    if teacher_cfg.kind != "teacher":
        raise UserError(f"--teacher {cfg.teacher} is a {teacher_cfg.kind} preset, not a teacher")
    if cfg.checkpoint:  # a checkpoint of another preset fails here, not inside every teacher actor
        build_teacher(cfg.teacher, storage.local_copy(cfg.checkpoint))
    layout = resolve_layout(cfg.data, cfg.split, cfg.ann_file, cfg.images)
    instances, skip_report = load_instances(
        layout.ann_file, split_kind="train", input_size=teacher_cfg.input_size, strict=cfg.strict
    )
    if cfg.limit:
        instances = sorted(instances, key=lambda inst: inst.instance_id)[: cfg.limit]
    if not instances:
        raise UserError(f"no usable instances in {layout.ann_file}: {skip_report.summary()}")
    if cfg.token_views is not None and not teacher_cfg.has_tokens:
        raise UserError(f"--token-views {cfg.token_views}: teacher {cfg.teacher} has no tokens to store")
    cfg = dataclasses.replace(cfg, store_crops=resolve_store_crops(cfg.store_crops, cfg.out, layout.image_root))
    spec = CacheSpec.from_model_config(
        teacher_cfg,
        heatmap_encoding=cfg.heatmap_encoding,
        token_encoding=cfg.token_encoding,
        store_crops=cfg.store_crops == "jpeg",
        token_views=cfg.token_views,
    )
    # The writer first: it refuses a root of another layout or spec before job.json is touched.
    writer = open_writer(cfg.out, spec, cfg.format)
    identity = job_identity(cfg, layout, dataclasses.asdict(teacher_cfg), spec)
    views_before = claim_output(cfg.out, identity)
    shards = plan_shards(instances, cfg.shard_instances, cfg.views)
    committed_before = writer.committed_keys()
    todo = units_to_compute(shards, committed_before)
    units_total = len(shards) * cfg.views
    units_todo = sum(len(s.views) for s in todo)
    print(
        f"[cache] {len(instances)} instances x {cfg.views} views -> {len(shards)} shards x {cfg.views} views at "
        f"{cfg.out} ({cfg.format}); annotations skipped: {skip_report.summary()}",
        flush=True,
    )
    if cfg.token_views is not None and cfg.token_views < cfg.views:
        later = (
            f"view {cfg.token_views} holds"
            if cfg.token_views == cfg.views - 1
            else f"views {cfg.token_views}..{cfg.views - 1} hold"
        )
        print(
            f"[cache] tokens stored for views 0..{cfg.token_views - 1} of {cfg.views}; {later} heatmaps, Gaussians "
            "and confidences only",
            flush=True,
        )
    from pipeline.plan import estimate

    plan = estimate(
        len(instances),
        cfg.views,
        cfg.teacher,
        students=(),
        fmt=cfg.format,
        shard_instances=cfg.shard_instances,
        heatmap_encoding=cfg.heatmap_encoding,
        token_encoding=cfg.token_encoding,
        store_crops=cfg.store_crops == "jpeg",
        token_views=cfg.token_views,
    )
    if todo:  # a complete cache costs nothing more: no estimate to show
        print("[cache] estimate before starting (the whole cache):\n" + plan.table(), flush=True)
    if views_before is not None and views_before < cfg.views:
        computed_views = sorted({v for s in todo for v in s.views})
        print(
            f"[cache] growing V {views_before} -> {cfg.views}: reusing {units_total - units_todo} shard-views, "
            f"computing {units_todo} (views {_ranges(computed_views)})",
            flush=True,
        )
    elif views_before is not None:
        print(
            f"[cache] resuming: {units_total - units_todo} of {units_total} shard-views already committed", flush=True
        )

    if todo and cfg.engine == "in-process":
        _run_in_process(cfg, layout, teacher_cfg, spec, todo)
    elif todo:
        if start_ray is not None:
            start_ray()
        _run_pipeline(cfg, layout, teacher_cfg, spec, todo)

    committed = writer.committed()
    fingerprint = data_fingerprint(layout.ann_file)
    manifest = Manifest(
        teacher=TeacherInfo(
            preset=cfg.teacher,
            checkpoint_sha256=identity["teacher"]["checkpoint_sha256"],
            config=dataclasses.asdict(teacher_cfg),
            checkpoint=storage.absolute(cfg.checkpoint) if cfg.checkpoint else "",
            precision=cfg.teacher_precision,
        ),
        data=DataInfo(
            ann_file_sha256=fingerprint.sha256,
            num_images=fingerprint.num_images,
            split=cfg.split,
            ann_file=layout.ann_file,
            image_root=layout.image_root,
        ),
        views=cfg.views,
        seed=cfg.seed,
        extra={"annotation_skips": skip_report.to_dict(), "limit": cfg.limit, "shard_instances": cfg.shard_instances},
    )
    final = writer.finalize(manifest, expected_shards=len(shards), committed=committed)
    wall = time.perf_counter() - t0
    skipped = Counter(skip_report.counts)
    skipped_ids: dict[str, set[int]] = {}
    for unit in committed.values():
        skipped.update(unit.extra.get("skipped", {}))
        for reason, ids in unit.extra.get("skipped_ids", {}).items():
            skipped_ids.setdefault(reason, set()).update(ids)
    image_skips = "; ".join(f"{reason} [instance ids {_first_ids(ids)}]" for reason, ids in sorted(skipped_ids.items()))
    totals = Counter()
    for shard in final.shards:
        totals.update(shard.bytes_per_field)
    rows = final.num_rows
    views_computed = sum(len(s.instances) * len(s.views) for s in todo)
    return CacheSummary(
        out=cfg.out,
        instances=len(instances),
        views=cfg.views,
        shards_total=len(shards),
        units_total=units_total,
        units_reused=units_total - units_todo,
        views_computed=views_computed,
        rows=rows,
        skipped=dict(skipped),
        bytes_per_field={k: v / max(rows, 1) for k, v in totals.items()},
        wall_s=wall,
        views_per_s=views_computed / wall,
        complete=final.complete,
        # Both name the first ids of what they skipped, so it can be found and fixed.
        extra={"annotation_skips": skip_report.summary(), **({"image_skips": image_skips} if image_skips else {})},
    )


def _first_ids(ids: set[int]) -> str:
    more = ", ..." if len(ids) > MAX_SKIPPED_IDS else ""
    return ", ".join(map(str, sorted(ids)[:MAX_SKIPPED_IDS])) + more


def _ranges(values: list[int]) -> str:
    """[2, 3, 5] -> "2-3, 5"."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def shard_item(shard: ShardSpec) -> dict:
    """The one input row of a shard (JSON strings: Ray Data moves it as a plain table row)."""
    return {
        "shard": shard.index,
        "instances": json.dumps([instance_to_json(i) for i in shard.instances]),
        "views": json.dumps(shard.views),
    }


def _crop_kwargs(cfg: CacheJobConfig, layout: SplitFiles, teacher_cfg) -> dict:
    return dict(
        image_root=layout.image_root,
        input_size=tuple(teacher_cfg.input_size),
        seed=cfg.seed,
        store_crops=cfg.store_crops,
        strict=cfg.strict,
    )


def _teacher_kwargs(cfg: CacheJobConfig, spec: CacheSpec, threads: int) -> dict:
    return dict(
        preset=cfg.teacher,
        checkpoint=cfg.checkpoint,
        spec=spec,
        batch_size=cfg.batch_size,
        threads=threads,
        precision=cfg.teacher_precision,
    )


def _run_in_process(cfg: CacheJobConfig, layout: SplitFiles, teacher_cfg, spec: CacheSpec, todo: list[ShardSpec]):
    """`--engine in-process`: what the Ray Data stages do, one shard after another here: the
    same crop task, teacher and sink code, so the same units (tests/test_teacher_stage.py)."""
    print(f"[cache] in-process: {len(todo)} shards one after another, no Ray", flush=True)
    teacher = TeacherPredictor(**_teacher_kwargs(cfg, spec, threads=max(1, round(cfg.cpus_per_worker))))
    crop_kwargs = _crop_kwargs(cfg, layout, teacher_cfg)
    writer = open_writer(cfg.out, spec, cfg.format)
    with ShardProgress(writer, todo):
        for shard in todo:
            row = {k: np.asarray([v]) for k, v in shard_item(shard).items()}
            write_shard_rows(writer, teacher(crop_shard(row, **crop_kwargs)), announce=False)


def _run_pipeline(cfg: CacheJobConfig, layout: SplitFiles, teacher_cfg, spec: CacheSpec, todo: list[ShardSpec]):
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # One shard = one block from start to end; never let Ray split it.
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 1024 * 1024 * 1024)
    # A crop task's own error (storage still unavailable after its retries, --strict on a bad
    # image) reaches the driver as itself, not as a UserCodeException without its cause, so the
    # job can say it in one line (pipeline.cli.run_job).
    ctx.raise_original_map_exception = True
    total_cpus = ray.cluster_resources().get("CPU", 1)
    cpus_per_actor, side_cpus = cfg.cpus_per_worker, 1.0
    if cfg.gpus_per_worker == 0 and cfg.workers * cpus_per_actor >= total_cpus:
        # CPU-only and the actors would hold every CPU: the crop tasks upstream and the
        # write tasks downstream could then never be scheduled (a Ray Data deadlock, see docs/platform-notes.md
        # #ray-data-actor-pool-deadlock; per node, fractional leftovers do not help). Give the actors the
        # cluster and run the light crop/write tasks as zero-CPU tasks, bounded in number.
        cpus_per_actor, side_cpus = total_cpus / cfg.workers, 0.0
        print(
            f"[cache] CPU-only: {cfg.workers} teacher actors x {cpus_per_actor:.2f} CPU; crop and write tasks run "
            f"beside them (at most {cfg.workers} at a time)",
            flush=True,
        )
    items = [shard_item(s) for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        crop_shard,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs=_crop_kwargs(cfg, layout, teacher_cfg),
        num_cpus=side_cpus,
        compute=ray.data.TaskPoolStrategy(size=cfg.workers) if side_cpus == 0 else None,
    )
    ds = ds.map_batches(
        TeacherPredictor,
        batch_size=None,
        batch_format="numpy",
        fn_constructor_kwargs=_teacher_kwargs(cfg, spec, threads=max(1, round(cpus_per_actor))),
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=cpus_per_actor,
        num_gpus=cfg.gpus_per_worker,
    )
    with ShardProgress(open_writer(cfg.out, spec, cfg.format), todo):
        ds.write_datasink(CacheSink(cfg.out, spec, cfg.format), ray_remote_args={"num_cpus": min(side_cpus, 0.5)})
