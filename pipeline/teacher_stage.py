"""The teacher stage: run the teacher once over a split and shard its outputs into the cache.

Ray Data end to end:

    shard specs (one row per shard, deterministic membership)
      -> crop task:    decode each image, draw V seeded views per instance, warp the crops
      -> teacher actors (map_batches, callable class): batched forward under inference_mode,
                       Gaussian fit + confidence, encode to the cache schema
      -> CacheSink:    one shard per Ray Data block, committed atomically by the store

A shard is the unit of work *and* of resume: its members (instances, views) are fixed by
the plan, so a rerun skips committed shards and rebuilds the same bytes for the others.
Each shard is one Ray Data block from start to end (one input row per shard, whole-block
batches), which is what lets the sink check that a shard arrived complete.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from distilpose.data.coco import Instance, load_instances
from distilpose.data.layout import SplitFiles
from distilpose.errors import UserError
from distilpose.options import check_choices, option
from pipeline import storage
from pipeline.cache import open_writer
from pipeline.cache.encodings import decode_crop_jpeg, encode_crop_jpeg, encode_views
from pipeline.cache.manifest import DataInfo, Manifest, TeacherInfo
from pipeline.cache.schema import FORMATS, HEATMAP_ENCODINGS, TEACHER_PRECISIONS, TOKEN_ENCODINGS, CacheSpec
from pipeline.dataset_layout import resolve_layout
from pipeline.mismatch import refuse_differences
from pipeline.progress import ShardProgress


@dataclass
class CacheJobConfig:
    data: str = option(help="data set root (local or s3://): COCO 2017 or synthetic layout")
    teacher: str = option(help="teacher preset, e.g. tokenpose-w48 or tokenpose-tiny")
    out: str = option(help="cache root URI (local path or s3://bucket/prefix)")
    checkpoint: str | None = option(None, help="teacher checkpoint: ours or the official .pth (local or s3://)")
    format: str = option("zarr", choices=FORMATS, help="cache store")
    views: int = option(1, help="cached views per instance (view 0 = un-augmented)")
    split: str = option("train", help="data split")
    batch_size: int = option(32, help="teacher forward batch size")
    workers: int = option(1, help="teacher actors")
    gpus_per_worker: float = option(0.0, help="GPUs per teacher actor")
    cpus_per_worker: float = option(1.0, help="CPUs per teacher actor")
    store_crops: str = option("none", choices=("none", "jpeg"), help="also store each view's crop")
    shard_views: int = option(256, help="views per shard")
    seed: int = option(0, help="seed of the views' augmentation")
    heatmap_encoding: str = option("i8-thresh", choices=tuple(HEATMAP_ENCODINGS), help="heatmap encoding")
    teacher_precision: str = option(
        "fp32", choices=tuple(TEACHER_PRECISIONS), help="teacher forward: fp32 (TF32 on a GPU) or bf16/fp16 autocast"
    )
    token_encoding: str = option("int8-token-scale", choices=tuple(TOKEN_ENCODINGS), help="token encoding")
    ann_file: str | None = option(None, help="override the split's annotation json")
    images: str | None = option(None, help="override the split's image folder")
    limit: int | None = option(None, help="cache only the first N instances (smoke runs)")
    strict: bool = option(False, help="stop at the first malformed annotation instead of skipping it")

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class ShardSpec:
    index: int
    instances: list[Instance]


@dataclass
class CacheSummary:
    out: str
    instances: int
    views: int
    shards_total: int
    shards_skipped_as_committed: int
    rows: int
    skipped: dict[str, int]
    bytes_per_field: dict[str, float]
    wall_s: float
    views_per_s: float
    complete: bool
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        from distilpose.coco_metrics import format_table

        lines = [
            f"[cache] {'complete' if self.complete else 'INCOMPLETE'}: {self.out}",
            f"  instances {self.instances}  views/instance {self.views}  rows {self.rows}  "
            f"shards {self.shards_total} ({self.shards_skipped_as_committed} already committed, reused)",
            f"  wall {self.wall_s:.1f} s  throughput {self.views_per_s:.1f} views/s (views computed this run)",
            "  skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"),
            *([f"  annotations: {self.extra['annotation_skips']}"] if "annotation_skips" in self.extra else []),
        ]
        total = sum(self.bytes_per_field.values())
        rows = [{"field": k, "bytes/view": v} for k, v in sorted(self.bytes_per_field.items(), key=lambda kv: -kv[1])]
        rows.append({"field": "TOTAL", "bytes/view": total})
        return "\n".join(lines) + "\n" + format_table(rows, float_fmt=",.0f")


# ----------------------------------------------------------------------------- planning


def plan_shards(instances: list[Instance], views: int, shard_views: int) -> list[ShardSpec]:
    """Fixed shard membership: instances in id order, whole instances (all views) per shard."""
    per_shard = max(1, shard_views // views)
    ordered = sorted(instances, key=lambda inst: inst.instance_id)
    return [
        ShardSpec(index=i, instances=ordered[start : start + per_shard])
        for i, start in enumerate(range(0, len(ordered), per_shard))
    ]


def instance_to_json(inst: Instance) -> dict:
    d = dataclasses.asdict(inst)
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def instance_from_json(d: dict) -> Instance:
    kwargs = dict(d)
    for key in ("center", "scale", "joints"):
        kwargs[key] = np.asarray(kwargs[key], dtype=np.float32)
    return Instance(**kwargs)


# ----------------------------------------------------------------------------- crop task


def crop_shard(batch: dict, *, image_root: str, input_size, views: int, seed: int, store_crops: str) -> dict:
    """One shard row in -> one row per (instance, view) out, with the crop the teacher sees."""
    from distilpose.data.coco import read_image
    from distilpose.data.transforms import affine_matrix, apply_view
    from distilpose.data.views import view_for

    rows: dict[str, list] = {k: [] for k in _CROP_COLUMNS}
    h, w = input_size
    for shard, payload in zip(batch["shard"], batch["instances"]):
        instances = [instance_from_json(d) for d in json.loads(payload)]
        total = len(instances) * views
        for inst in instances:
            try:
                image = read_image(image_root, inst.image_file)
                reason = ""
            except Exception as exc:  # counted and reported, never silent
                image, reason = None, f"image: {type(exc).__name__}"
            for v in range(views):
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
    return out


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
        from distilpose.teacher_forward import run_teacher

        images = batch["image"][batch["valid"]]
        outputs = run_teacher(self.model, images, self.batch_size, self.device, precision=self.precision)
        return encode_shard_rows(batch, outputs, self.spec)


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
    """Writes each shard that arrives complete; the store commits it atomically."""

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
        writer = open_writer(self.out, self.spec, self.fmt)
        written = []
        for shard in np.unique(rows["shard"]):
            sel = rows["shard"] == shard
            expected = int(rows["shard_rows"][sel][0])
            if int(sel.sum()) != expected:
                raise RuntimeError(
                    f"shard {shard} arrived split across Ray Data blocks ({int(sel.sum())} of {expected} rows); "
                    "raise DataContext.target_max_block_size"
                )
            keep = sel & rows["valid"].astype(bool)
            skipped = Counter(str(r) for r in rows["skip_reason"][sel & ~rows["valid"].astype(bool)])
            record = {k: v[keep] for k, v in rows.items() if k not in ("shard", "shard_rows", "valid", "skip_reason")}
            info = writer.write_shard(int(shard), record, extra={"skipped": dict(skipped)})
            print(f"[cache] shard {int(shard):05d} committed: {info.rows} views", flush=True)
            written.append({"shard": int(shard), "rows": int(info.rows)})
        return written


# ----------------------------------------------------------------------------- driver

JOB_FILE = "job.json"  # what identifies the cache being built; a rerun must match it


def job_identity(cfg: CacheJobConfig, layout: SplitFiles, teacher_config: dict, spec: CacheSpec) -> dict:
    """Everything that determines the cache's content: a rerun that differs must not mix in."""
    identity = {
        "teacher": {
            "preset": cfg.teacher,
            "checkpoint_sha256": storage.sha256(cfg.checkpoint) if cfg.checkpoint else "random-init",
            "config": teacher_config,
            "precision": cfg.teacher_precision,
        },
        "data": {"ann_file_sha256": storage.sha256(layout.ann_file), "split": cfg.split, "limit": cfg.limit},
        "views": cfg.views,
        "seed": cfg.seed,
        "shard_views": cfg.shard_views,
        "format": cfg.format,
        "spec": spec.to_dict(),
    }
    return json.loads(json.dumps(identity))  # the form it has when read back from job.json


def claim_output(out: str, identity: dict) -> bool:
    """Record what this cache is for, or check a partly built one matches. True when resuming."""
    uri = storage.join(out, JOB_FILE)
    if storage.exists(uri):
        existing = json.loads(storage.read_bytes(uri))
        refuse_differences(
            existing,
            {key: identity.get(key) for key in sorted(set(existing) | set(identity))},
            what=f"{out} holds a cache built with different settings",
            advice="Use another --out, or delete it to rebuild.",
            recorded_as="cache has",
        )
        return True
    storage.atomic_write_bytes(uri, json.dumps(identity, indent=2, sort_keys=True).encode())
    return False


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
    spec = CacheSpec.from_model_config(
        teacher_cfg,
        heatmap_encoding=cfg.heatmap_encoding,
        token_encoding=cfg.token_encoding,
        store_crops=cfg.store_crops == "jpeg",
    )
    identity = job_identity(cfg, layout, dataclasses.asdict(teacher_cfg), spec)
    resuming = claim_output(cfg.out, identity)
    shards = plan_shards(instances, cfg.views, cfg.shard_views)
    writer = open_writer(cfg.out, spec, cfg.format)
    committed_before = writer.committed_indices()
    todo = [s for s in shards if s.index not in committed_before]
    print(
        f"[cache] {len(instances)} instances x {cfg.views} views -> {len(shards)} shards at {cfg.out} "
        f"({cfg.format}); annotations skipped: {skip_report.summary()}",
        flush=True,
    )
    from pipeline.plan import estimate

    plan = estimate(
        len(instances),
        cfg.views,
        cfg.teacher,
        students=(),
        fmt=cfg.format,
        shard_views=cfg.shard_views,
        heatmap_encoding=cfg.heatmap_encoding,
        token_encoding=cfg.token_encoding,
        store_crops=cfg.store_crops == "jpeg",
    )
    if todo:  # a complete cache costs nothing more: no estimate to show
        print("[cache] estimate before starting:\n" + plan.table(), flush=True)
    if resuming:
        print(f"[cache] resuming: {len(shards) - len(todo)} of {len(shards)} shards already committed", flush=True)

    if todo:
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
        extra={"annotation_skips": skip_report.to_dict(), "limit": cfg.limit, "shard_views": cfg.shard_views},
    )
    final = writer.finalize(manifest, expected_shards=len(shards), committed=committed)
    wall = time.perf_counter() - t0
    skipped = Counter(skip_report.counts)
    for info in committed.values():
        skipped.update(info.extra.get("skipped", {}))
    totals = Counter()
    for info in final.shards:
        totals.update(info.bytes_per_field)
    rows = final.num_rows
    return CacheSummary(
        out=cfg.out,
        instances=len(instances),
        views=cfg.views,
        shards_total=len(shards),
        shards_skipped_as_committed=len(shards) - len(todo),
        rows=rows,
        skipped=dict(skipped),
        bytes_per_field={k: v / max(rows, 1) for k, v in totals.items()},
        wall_s=wall,
        views_per_s=sum(len(s.instances) for s in todo) * cfg.views / wall,
        complete=final.complete,
        extra={"annotation_skips": skip_report.summary()},  # names the first ids of malformed ones
    )


def _run_pipeline(cfg: CacheJobConfig, layout: SplitFiles, teacher_cfg, spec: CacheSpec, todo: list[ShardSpec]):
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # One shard = one block from start to end; never let Ray split it.
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 1024 * 1024 * 1024)
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
    items = [{"shard": s.index, "instances": json.dumps([instance_to_json(i) for i in s.instances])} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        crop_shard,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs=dict(
            image_root=layout.image_root,
            input_size=tuple(teacher_cfg.input_size),
            views=cfg.views,
            seed=cfg.seed,
            store_crops=cfg.store_crops,
        ),
        num_cpus=side_cpus,
        compute=ray.data.TaskPoolStrategy(size=cfg.workers) if side_cpus == 0 else None,
    )
    ds = ds.map_batches(
        TeacherPredictor,
        batch_size=None,
        batch_format="numpy",
        fn_constructor_kwargs=dict(
            preset=cfg.teacher,
            checkpoint=cfg.checkpoint,
            spec=spec,
            batch_size=cfg.batch_size,
            threads=max(1, round(cpus_per_actor)),
            precision=cfg.teacher_precision,
        ),
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=cpus_per_actor,
        num_gpus=cfg.gpus_per_worker,
    )
    with ShardProgress(open_writer(cfg.out, spec, cfg.format), todo, cfg.views):
        ds.write_datasink(CacheSink(cfg.out, spec, cfg.format), ray_remote_args={"num_cpus": min(side_cpus, 0.5)})
