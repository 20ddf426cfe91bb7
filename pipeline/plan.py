"""What a teacher cache and the student runs on it will cost, before anything runs.

    python -m pipeline.plan --instances 149813 --views 8 --teacher tokenpose-w48 \\
        [--students distilpose-s,distilpose-l] [--gpu-type h100|a100|l4] [--epochs 300] \\
        [--format zarr|wds] [--shard-instances 256] [--price-per-gpu-hour X] [--utilization 0.35] \\
        [--token-views Vt]
    print(estimate(instances=149_813, views=8, teacher="tokenpose-w48").table())

Arithmetic on the cache schema and the models' sizes; every constant below is an assumption
printed with the table. Compute figures are compute-bound lower bounds (a job waiting on its
input runs below ``utilization``: measure a short run and pass the real figure). Bytes per
view: each stored array's dtype x shape, the heatmaps x a measured zstd ratio, tokens and
small fields uncompressed (so it leans high), plus each store's container overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from pipeline.cache.schema import (
    CROP_FIELD,
    DEFAULT_HEATMAP_ENCODING,
    DEFAULT_TOKEN_ENCODING,
    FORMATS,
    HEATMAP_ENCODINGS,
    HEATMAP_FIELD,
    TOKEN_ENCODINGS,
    TOKEN_FIELDS,
    CacheSpec,
    stored_arrays,
)
from pipeline.cloud_prices import (
    DEFAULT_UTILIZATION,
    FLOPS_PER_MAC,
    FWD_BWD_FACTOR,
    GIB,
    GPU_TYPES,
    MULTIPART_PART_SIZE,
    MULTIPART_THRESHOLD,
    S3_GET_PRICE_PER_1000,
    S3_PRICE_PER_GB_MONTH,
    S3_PUT_PRICE_PER_1000,
    GpuType,
)
from pipeline.premise import load_replay_study, replay_advice, study_for, token_views_advice, views_advice

# Heatmap bytes after zstd-3 / raw encoded bytes, measured with the Zarr writer on 256
# teacher-like views (Gaussians on an N(0, 0.003) noise floor, as real teacher output has).
# Noise-free maps compress 2.5-7x better: these are the pessimistic figures. Missing = raw.
# i8-thresh: 64 views of tests/test_cache_store.py's teacher-like data (8,166 B of 52,224).
HEATMAP_COMPRESSED_RATIO = {
    "i8-thresh": 0.156,
    "u8-thresh": 0.116,
    "u8-joint-scale": 0.300,
    "fp16": 0.925,
    "fp16-thresh": 0.111,
}
# JPEG quality 95 of a natural-image crop: ~4 bits per pixel (assumption; depends on content).
CROP_JPEG_BYTES_PER_PIXEL = 0.5

# WebDataset: one tar member per group per view (small fields share one), each a 512 B
# header + its .npy (128 B header + payload) padded to 512 B.
TAR_BLOCK = 512
NPY_HEADER = 128
WDS_GROUPS_WITHOUT_CROPS = ("small", HEATMAP_FIELD, *TOKEN_FIELDS)
# Zarr: a zarr.json per array (~1 KB with the sharding codec) and one for the group.
ZARR_METADATA_BYTES = 1024

# CPU ms per sample of the student loader (pipeline.cache_loader.CachedViewStream: shard reads,
# the paper loss's teacher fields, crop + normalize) at 256x192 from 640x480 JPEGs, one thread:
# "rebuild" decodes the source image and warps the crop, "stored" decodes the cached JPEG crop
# (--store-crops). Written by `python bench/bench_loader_cost.py` (process CPU seconds, the
# minimum of several epochs) and shipped with the package.
LOADER_COST_FILE = Path(__file__).with_name("loader_cost.json")
CROP_PATHS = ("rebuild", "stored")

# Fields a student epoch reads (pipeline.cache_loader.BASE_FIELDS + the paper loss's teacher fields).
STUDENT_BASE_FIELDS = ("instance_id", "image_id", "view", "view_params", "joints", "joint_weights")
STUDENT_TEACHER_FIELDS = ("kpt_tokens", "vis_tokens", HEATMAP_FIELD)


@cache
def _training_process_ms(path: Path = LOADER_COST_FILE) -> str:
    """The training process's own CPU per sample with loader processes, as measured."""
    measured = json.loads(Path(path).read_text()).get("training_process_cpu_ms_per_sample", {})
    if not measured:
        return "not measured"
    return ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(measured.items()))


def loader_cpu_ms(path: Path = LOADER_COST_FILE) -> dict[str, float]:
    """The measured loader CPU ms per sample, {"rebuild": ms, "stored": ms}."""
    try:
        measured = json.loads(Path(path).read_text())["cpu_ms_per_sample"]
        return {k: float(measured[k]) for k in CROP_PATHS}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"no loader measurement in {path} ({e}); run python bench/bench_loader_cost.py") from e


def loader_cores(samples_per_s: float, crops: str) -> float:
    """CPU cores the loader needs to produce `samples_per_s` ("rebuild" or "stored" crops)."""
    return samples_per_s * loader_cpu_ms()[crops] / 1e3


@dataclass(frozen=True)
class ModelCost:
    preset: str
    input_size: tuple[int, int]
    gmacs_paper: float  # the paper's convention (conv/linear MACs + norms; no attention matmuls)
    gmacs_attention: float  # QK^T and AV matmuls, which that convention leaves out

    @property
    def forward_gflops(self) -> float:
        return FLOPS_PER_MAC * (self.gmacs_paper + self.gmacs_attention)


def attention_gmacs(config) -> float:
    """MACs of the attention matmuls: per layer QK^T and AV, each T x T x D, T = K + P tokens."""
    tokens = config.num_joints + config.num_patches
    return config.depth * 2 * tokens * tokens * config.token_dim / 1e9  # 0 without tokens


@cache
def model_cost(preset: str) -> ModelCost:
    """GMACs of one forward pass at batch 1 (model built on the meta device: no memory, no maths)."""
    import torch

    from distilpose.models import build_model, get_config
    from distilpose.models.summary import count_gflops

    config = get_config(preset)
    with torch.device("meta"):
        model = build_model(config)
    return ModelCost(preset, tuple(config.input_size), count_gflops(model), attention_gmacs(config))


def gpu_hours(samples: float, gflops_per_sample: float, gpu: GpuType, utilization: float) -> float:
    return samples * gflops_per_sample * 1e9 / (gpu.peak_tflops * 1e12 * utilization) / 3600


def field_bytes_per_view(spec: CacheSpec, input_size: tuple[int, int]) -> dict[str, float]:
    """Estimated stored payload bytes per view of each logical field (before container overhead)."""
    sizes: dict[str, float] = {}
    for array in stored_arrays(spec).values():
        if array.field == CROP_FIELD:
            nbytes = input_size[0] * input_size[1] * CROP_JPEG_BYTES_PER_PIXEL
        else:
            nbytes = np.dtype(array.dtype).itemsize * math.prod(array.shape)
            if array.field == HEATMAP_FIELD:
                nbytes *= heatmap_ratio(spec.heatmap_encoding)
        sizes[array.field] = sizes.get(array.field, 0.0) + nbytes
    return sizes


def heatmap_ratio(encoding: str) -> float:
    return HEATMAP_COMPRESSED_RATIO.get(encoding, 1.0)


def _tar_member_bytes(payload: float) -> float:
    return TAR_BLOCK + math.ceil((NPY_HEADER + payload) / TAR_BLOCK) * TAR_BLOCK


def wds_view_bytes(fields: dict[str, float]) -> float:
    """Bytes one view occupies in a tar: small fields packed in one member, the rest one each."""
    small = sum(v for k, v in fields.items() if k not in (*WDS_GROUPS_WITHOUT_CROPS, CROP_FIELD))
    total = _tar_member_bytes(small)
    total += sum(_tar_member_bytes(fields[k]) for k in (HEATMAP_FIELD, *TOKEN_FIELDS) if k in fields)
    if CROP_FIELD in fields:
        total += TAR_BLOCK + math.ceil(fields[CROP_FIELD] / TAR_BLOCK) * TAR_BLOCK
    return total


def zarr_arrays(spec: CacheSpec) -> int:
    """Zarr arrays per shard: one per stored array, crops as bytes + offsets."""
    return len(stored_arrays(spec)) + (1 if spec.store_crops else 0)


def objects_per_unit(spec: CacheSpec, fmt: str) -> int:
    """Storage objects per unit (one view of a shard), its commit record included (see
    zarr_store / wds_store)."""
    if fmt == "zarr":
        return 1 + 2 * zarr_arrays(spec) + 1  # group zarr.json, per array zarr.json + data, commit
    return 1 + 1  # the tar, commit


def put_requests(object_bytes: float) -> int:
    if object_bytes < MULTIPART_THRESHOLD:
        return 1
    return 2 + math.ceil(object_bytes / MULTIPART_PART_SIZE)


@dataclass(frozen=True)
class StudentPlan:
    preset: str
    forward_gflops: float
    gpu_hours_per_epoch: float
    gpu_hours_total: float
    cost_total: float
    gets_per_epoch: int  # cache objects
    image_gets_per_epoch: int  # source images, to rebuild crops (0 with stored crops)
    online_teacher_gpu_hours_per_epoch: float
    teacher_to_epoch_ratio: float  # caching the teacher costs this many student epochs
    samples_per_s_per_gpu: float  # compute-bound training rate
    loader_cores_per_gpu: float  # CPU cores the loader needs to keep one GPU at that rate
    # {gpu type: {"rebuild"|"stored": cores}} at each GPU type's compute-bound rate
    loader_cores_by_gpu: dict[str, dict[str, float]] = field(default_factory=dict)
    input_bound_factor: float = 1.0  # max(1, cores needed / CPUs per GPU): GPU-hours x this when starved


@dataclass(frozen=True)
class CropsCost:
    """One way to feed the students (crops stored in the cache or rebuilt from the images)."""

    loader_cores: dict[str, float]  # per student: CPU cores per GPU
    gets_per_run: int  # cache + image GETs of all student runs
    request_cost: float  # all PUTs and GETs, teacher stage included
    storage_cost: float  # for the plan's months
    gpu_cost: float  # students' GPU dollars, x each one's input-bound factor
    total: float  # the plan's total this way, loader-starved GPU-hours counted


@dataclass(frozen=True)
class Plan:
    instances: int
    views: int
    teacher: str
    gpu_type: str
    epochs: int
    format: str
    shard_instances: int
    utilization: float
    price_per_gpu_hour: float
    storage_months: float
    spec: CacheSpec
    views_total: int
    instances_per_shard: int
    shards: int
    units: int  # shard-views: the unit of storage
    objects_per_unit: int  # of a unit with tokens (the cache's first token_views views)
    objects_total: int
    bytes_per_view_by_field: dict[str, float]  # mean over the views (tokens on token_views of them)
    bytes_per_view: float  # mean over the views
    bytes_total: float
    teacher_forward_gflops: float
    teacher_gpu_hours: float
    teacher_cost: float
    storage_cost_per_month: float
    put_requests: int
    image_gets_teacher: int  # the teacher stage reads each instance's image once
    students: tuple[StudentPlan, ...] = ()
    request_cost: float = 0.0
    total_cost: float = 0.0
    assumptions: tuple[str, ...] = field(default_factory=tuple)
    cpus_per_gpu: float = 0.0  # what the cluster gives each GPU's loader
    crops: dict[str, CropsCost] = field(default_factory=dict)  # the run both ways: stored crops or rebuilt
    token_views: int | None = None  # tokens stored for views 0..token_views-1 only (None: every view)
    bytes_per_view_with_tokens: float = 0.0  # a view of the first token_views
    bytes_per_view_without_tokens: float = 0.0  # a later view (0 when every view has tokens)
    objects_per_unit_without_tokens: int = 0

    @property
    def crops_choice(self) -> str:
        """The cheaper way ("stored" or "rebuild"), counting loader-starved GPU-hours."""
        return min(self.crops, key=lambda k: (self.crops[k].total, k != "rebuild")) if self.crops else ""

    def table(self) -> str:
        return format_plan(self)


def _gets_per_unit_epoch(spec: CacheSpec, fmt: str) -> int:
    """GET requests to read one unit (the loader reads one view of each shard per epoch)."""
    if fmt == "wds":
        return 1
    fields = {*STUDENT_BASE_FIELDS, *STUDENT_TEACHER_FIELDS, CROP_FIELD}
    arrays = sum(1 for a in stored_arrays(spec).values() if a.field in fields)
    arrays += 1 if spec.store_crops else 0  # crop bytes + their offsets
    # Group zarr.json, then per array its zarr.json and one GET of the whole shard object
    # (zarr fetches a fully selected shard in one request).
    return 1 + 2 * arrays


def estimate(
    instances: int,
    views: int,
    teacher: str,
    students: Sequence[str] = ("distilpose-s", "distilpose-l"),
    gpu_type: str = "h100",
    epochs: int = 300,
    fmt: str = "zarr",
    shard_instances: int = 256,
    price_per_gpu_hour: float | None = None,
    utilization: float = DEFAULT_UTILIZATION,
    heatmap_encoding: str = DEFAULT_HEATMAP_ENCODING,
    token_encoding: str = DEFAULT_TOKEN_ENCODING,
    store_crops: bool = False,
    storage_months: float = 1.0,
    cpus_per_gpu: float | None = None,
    compare_crops: bool = True,
    token_views: int | None = None,
) -> Plan:
    """Bytes, objects, requests, GPU-hours and dollars of caching ``teacher`` over ``instances`` x
    ``views`` and training each student for ``epochs`` epochs from the cache. ``cpus_per_gpu``
    (default: the GPU type's usual instance) feeds each GPU's loader; with ``compare_crops`` the
    plan also holds the run with and without stored crops (`Plan.crops`, `Plan.crops_choice`).
    ``token_views``: the tokens are stored for the first ``token_views`` views only (the cache
    job's ``--token-views``; None: every view)."""
    _check_inputs(instances, views, gpu_type, epochs, fmt, shard_instances, utilization)
    if token_views is not None and not 1 <= token_views <= views:
        raise ValueError(f"token_views must be in 1..views ({views}), got {token_views}")
    gpu = GPU_TYPES[gpu_type]
    price = gpu.price_per_hour if price_per_gpu_hour is None else float(price_per_gpu_hour)
    cpus = gpu.vcpus_per_gpu if cpus_per_gpu is None else float(cpus_per_gpu)
    if cpus <= 0:
        raise ValueError(f"cpus_per_gpu must be > 0, got {cpus}")
    crops_path = "stored" if store_crops else "rebuild"
    from distilpose.models import get_config

    teacher_config = get_config(teacher)
    if teacher_config.kind != "teacher":
        raise ValueError(f"{teacher!r} is a {teacher_config.kind} preset, not a teacher")
    if token_views is not None and not teacher_config.has_tokens:
        raise ValueError(f"token_views: teacher {teacher!r} has no tokens")
    spec = CacheSpec.from_model_config(
        teacher_config,
        heatmap_encoding=heatmap_encoding,
        token_encoding=token_encoding,
        store_crops=store_crops,
        token_views=token_views,
    )

    # Instances per shard as pipeline.teacher_stage.plan_shards cuts them; one unit per view.
    instances_per_shard = min(shard_instances, instances)
    shards = math.ceil(instances / instances_per_shard)
    units = shards * views
    views_total = instances * views

    # Two kinds of unit: views 0..Vt-1 with tokens, the later ones without (spec.unit_spec).
    with_tokens = views if token_views is None else token_views
    kinds = [_unit_cost(spec.unit_spec(0), fmt, teacher_config, instances_per_shard, with_tokens)]
    if with_tokens < views:
        kinds.append(
            _unit_cost(spec.unit_spec(with_tokens), fmt, teacher_config, instances_per_shard, views - with_tokens)
        )
    names = dict.fromkeys(name for k in kinds for name in k.fields)
    fields = {name: sum(k.count * k.fields.get(name, 0.0) for k in kinds) / views for name in names}
    bytes_per_view = sum(k.count * k.bytes_per_view for k in kinds) / views
    bytes_total = sum(instances * k.count * k.bytes_per_view + shards * k.count * k.overhead for k in kinds)
    per_unit_objects = kinds[0].objects
    objects_total = sum(shards * k.count * k.objects for k in kinds) + 2  # + manifest.json + job.json
    # The big object may be multipart.
    puts = sum(shards * k.count * (k.objects - 1 + put_requests(k.largest_object)) for k in kinds) + 2

    teacher_cost = model_cost(teacher)
    teacher_hours = gpu_hours(views_total, teacher_cost.forward_gflops, gpu, utilization)
    storage_cost = bytes_total / GIB * S3_PRICE_PER_GB_MONTH

    student_plans = []
    # The loader reads one unit per shard, its view drawn uniformly: with or without tokens.
    gets_per_epoch = round(shards * sum(k.count * _gets_per_unit_epoch(k.spec, fmt) for k in kinds) / views)
    for name in students:
        cost = model_cost(name)
        if tuple(cost.input_size) != tuple(teacher_config.input_size):
            raise ValueError(f"student {name} input {cost.input_size} != teacher {teacher} {teacher_config.input_size}")
        # One view per instance per epoch (pipeline.cache_loader reads one unit per shard).
        per_epoch = gpu_hours(instances, FWD_BWD_FACTOR * cost.forward_gflops, gpu, utilization)
        online = gpu_hours(instances, teacher_cost.forward_gflops, gpu, utilization)
        rate = instances / (per_epoch * 3600)
        # The compute-bound rate scales with each GPU type's peak (same utilization).
        by_gpu = {
            name: {path: loader_cores(rate * other.peak_tflops / gpu.peak_tflops, path) for path in CROP_PATHS}
            for name, other in GPU_TYPES.items()
        }
        student_plans.append(
            StudentPlan(
                preset=name,
                forward_gflops=cost.forward_gflops,
                gpu_hours_per_epoch=per_epoch,
                gpu_hours_total=per_epoch * epochs,
                cost_total=per_epoch * epochs * price,
                gets_per_epoch=gets_per_epoch,
                image_gets_per_epoch=0 if store_crops else instances,
                online_teacher_gpu_hours_per_epoch=online,
                teacher_to_epoch_ratio=teacher_hours / per_epoch,
                samples_per_s_per_gpu=rate,
                loader_cores_per_gpu=loader_cores(rate, crops_path),
                loader_cores_by_gpu=by_gpu,
                input_bound_factor=max(1.0, loader_cores(rate, crops_path) / cpus),
            )
        )
    gets_total = instances + sum((s.gets_per_epoch + s.image_gets_per_epoch) * epochs for s in student_plans)
    request_cost = puts / 1000 * S3_PUT_PRICE_PER_1000 + gets_total / 1000 * S3_GET_PRICE_PER_1000
    total = teacher_hours * price + sum(s.cost_total for s in student_plans) + storage_cost * storage_months
    total += request_cost
    plan = Plan(
        instances=instances,
        views=views,
        teacher=teacher,
        gpu_type=gpu_type,
        epochs=epochs,
        format=fmt,
        shard_instances=shard_instances,
        utilization=utilization,
        price_per_gpu_hour=price,
        storage_months=storage_months,
        spec=spec,
        views_total=views_total,
        instances_per_shard=instances_per_shard,
        shards=shards,
        units=units,
        objects_per_unit=per_unit_objects,
        objects_total=objects_total,
        bytes_per_view_by_field=fields,
        bytes_per_view=bytes_per_view,
        bytes_total=bytes_total,
        teacher_forward_gflops=teacher_cost.forward_gflops,
        teacher_gpu_hours=teacher_hours,
        teacher_cost=teacher_hours * price,
        storage_cost_per_month=storage_cost,
        put_requests=puts,
        image_gets_teacher=instances,
        students=tuple(student_plans),
        request_cost=request_cost,
        total_cost=total,
        assumptions=_assumptions(gpu, price, utilization, spec, store_crops),
        cpus_per_gpu=cpus,
        token_views=token_views,
        bytes_per_view_with_tokens=kinds[0].bytes_per_view,
        bytes_per_view_without_tokens=kinds[1].bytes_per_view if len(kinds) > 1 else 0.0,
        objects_per_unit_without_tokens=kinds[1].objects if len(kinds) > 1 else 0,
    )
    if not compare_crops:
        return plan
    args = (instances, views, teacher, students, gpu_type, epochs, fmt, shard_instances, price_per_gpu_hour)
    args += (utilization, heatmap_encoding, token_encoding)
    other = estimate(*args, not store_crops, storage_months, cpus_per_gpu, compare_crops=False, token_views=token_views)
    both = {crops_path: plan, ("rebuild" if store_crops else "stored"): other}
    return dataclasses.replace(plan, crops={path: crops_cost(p) for path, p in both.items()})


@dataclass(frozen=True)
class _UnitCost:
    """What one kind of unit costs (with tokens, or without them from view token_views on)."""

    spec: CacheSpec  # the unit's (CacheSpec.unit_spec)
    count: int  # units of this kind per shard
    fields: dict[str, float]  # payload bytes per view and field
    bytes_per_view: float
    overhead: float  # per unit
    largest_object: float
    objects: int  # per unit, its commit record included


def _unit_cost(spec: CacheSpec, fmt: str, teacher_config, instances_per_shard: int, count: int) -> _UnitCost:
    fields = field_bytes_per_view(spec, tuple(teacher_config.input_size))
    if fmt == "wds":
        bytes_per_view = wds_view_bytes(fields)
        overhead = 2 * TAR_BLOCK  # end-of-archive blocks
        largest_object = instances_per_shard * bytes_per_view
    else:
        bytes_per_view = sum(fields.values())
        overhead = (1 + zarr_arrays(spec)) * ZARR_METADATA_BYTES
        largest_object = instances_per_shard * max(fields.values())
    return _UnitCost(spec, count, fields, bytes_per_view, overhead, largest_object, objects_per_unit(spec, fmt))


def crops_cost(plan: Plan) -> CropsCost:
    gpu_cost = sum(s.cost_total * s.input_bound_factor for s in plan.students)
    storage = plan.storage_cost_per_month * plan.storage_months
    return CropsCost(
        loader_cores={s.preset: s.loader_cores_per_gpu for s in plan.students},
        gets_per_run=sum((s.gets_per_epoch + s.image_gets_per_epoch) * plan.epochs for s in plan.students),
        request_cost=plan.request_cost,
        storage_cost=storage,
        gpu_cost=gpu_cost,
        total=plan.teacher_cost + gpu_cost + storage + plan.request_cost,
    )


def _check_inputs(
    instances: int, views: int, gpu_type: str, epochs: int, fmt: str, shard_instances: int, utilization: float
) -> None:
    if instances < 1 or views < 1 or epochs < 0 or shard_instances < 1:
        raise ValueError(
            f"need instances >= 1, views >= 1, epochs >= 0, shard_instances >= 1; got {instances}, {views}, "
            f"{epochs}, {shard_instances}"
        )
    for what, value, choices in (("GPU type", gpu_type, GPU_TYPES), ("cache format", fmt, FORMATS)):
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")


def _assumptions(gpu: GpuType, price: float, utilization: float, spec: CacheSpec, store_crops: bool) -> tuple[str, ...]:
    ratio = heatmap_ratio(spec.heatmap_encoding)
    measured = spec.heatmap_encoding in HEATMAP_COMPRESSED_RATIO
    lines = [
        f"GPU {gpu.name}: {gpu.peak_tflops:g} dense bf16/fp16 TFLOPs peak x {utilization:g} utilization; "
        f"${price:g}/GPU-hour (h100 989/$4.0, a100 312/$2.5, l4 121/$0.8)",
        "FLOPs = 2 x MACs; MACs = the paper's count (conv/linear + norms) + attention matmuls it omits; "
        f"training = {FWD_BWD_FACTOR:g} x forward; compute-bound, except where a LOADER-BOUND row says the "
        "loader needs more CPU cores per GPU than the cluster has (it then sets the pace)",
        "teacher: one forward per cached view; student: one view per instance per epoch",
        f"heatmaps {spec.heatmap_encoding}: raw bytes x {ratio:.3f} ("
        + ("measured zstd ratio, noisy maps; ESTIMATE" if measured else "no measured ratio: counted raw")
        + "); tokens and small fields counted uncompressed",
        f"S3 Standard ${S3_PRICE_PER_GB_MONTH}/GB-month (GB = 2^30 B), PUT ${S3_PUT_PRICE_PER_1000}/1000, "
        f"GET ${S3_GET_PRICE_PER_1000}/1000, in-region transfer free",
        "a student epoch reads one view unit of every shard (1/V of the cache): "
        "Zarr = group + 2 GETs per array read, WDS = 1 GET per unit; without stored crops every instance's "
        "image is read from S3 once by the teacher stage and once per student epoch (upper bound: the "
        "loader's small image cache saves some)",
        f"loader CPU per sample ({LOADER_COST_FILE.name}, written by bench/bench_loader_cost.py: one thread, "
        f"process CPU, minimum of several epochs): crops rebuilt {loader_cpu_ms()['rebuild']:.2f} ms, stored "
        f"{loader_cpu_ms()['stored']:.2f} ms (a GPU worker's: images normalized on the device); cores per GPU = "
        f"its compute-bound samples/s x that; one core feeds {1e3 / loader_cpu_ms()['rebuild']:,.0f} (rebuilt) or "
        f"{1e3 / loader_cpu_ms()['stored']:,.0f} (stored) samples/s, so past that rate a worker needs "
        "--loader-processes N and --cpus-per-worker N+1 (the processes read and build; the training process "
        f"keeps {_training_process_ms()} of CPU per sample: planning, hand-out, copy-out)",
    ]
    if store_crops:
        lines.append(f"crop JPEGs: {CROP_JPEG_BYTES_PER_PIXEL:g} B/pixel of the input crop")
    return tuple(lines)


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _dollars(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 or x == 0 else f"${x:.4f}"


def _hours(h: float) -> str:
    return f"{h:,.3f} GPU-h" if h < 10 else f"{h:,.1f} GPU-h"


def format_plan(plan: Plan) -> str:
    rows: list[tuple[str, str]] = [
        ("cache", f"{plan.instances:,} instances x {plan.views} views = {plan.views_total:,} views, "
                  f"teacher {plan.teacher}, format {plan.format}"),
        ("spec", f"K={plan.spec.num_joints} heatmaps {plan.spec.heatmap_size[0]}x{plan.spec.heatmap_size[1]} "
                 f"({plan.spec.heatmap_encoding}), {_tokens_text(plan)}, "
                 f"crops {'jpeg' if plan.spec.store_crops else 'no'}"),
        ("bytes per view", f"{plan.bytes_per_view:,.0f} B  ("
                           + ("mean over the views: " if _mixed(plan) else "") + ", ".join(
            f"{k} {v:,.0f}" for k, v in sorted(plan.bytes_per_view_by_field.items(), key=lambda kv: -kv[1])
        ) + ")"),
        *_token_views_rows(plan),
        ("cache size (estimate)", _bytes(plan.bytes_total)),
        ("student epoch reads", f"{_bytes(plan.bytes_total / plan.views)} (one view unit per shard: 1/{plan.views})"),
        ("shards", f"{plan.shards:,} x {plan.instances_per_shard} instances, one unit per view"),
        ("objects", f"{plan.units:,} shard-views x {_objects_text(plan)} + 2 = {plan.objects_total:,}"),
        ("PUT requests (cache)", f"{plan.put_requests:,}"),
        ("GET requests (teacher)", f"{plan.image_gets_teacher:,} image reads"),
        ("teacher forward", f"{plan.teacher_forward_gflops:.2f} GFLOPs/view"),
        ("teacher GPU-hours", f"{_hours(plan.teacher_gpu_hours)}  {_dollars(plan.teacher_cost)}  "
                              f"({plan.gpu_type}, ${plan.price_per_gpu_hour:g}/h)"),
        ("S3 storage", f"{_dollars(plan.storage_cost_per_month)} / month"),
    ]  # fmt: skip
    replay = load_replay_study()
    for s in plan.students:
        cores = {k: loader_cores(s.samples_per_s_per_gpu, k) for k in CROP_PATHS}
        by_gpu = ", ".join(f"{g} {c['rebuild']:.1f}/{c['stored']:.1f}" for g, c in s.loader_cores_by_gpu.items())
        online = s.online_teacher_gpu_hours_per_epoch
        rows += [
            (f"student {s.preset}", f"{s.forward_gflops:.2f} GFLOPs fwd; {_hours(s.gpu_hours_per_epoch)} per epoch, "
                                    f"{_hours(s.gpu_hours_total)} for {plan.epochs} epochs = {_dollars(s.cost_total)}"),
            ("  GET requests", f"{s.gets_per_epoch:,} cache + {s.image_gets_per_epoch:,} image per epoch, "
                               f"{(s.gets_per_epoch + s.image_gets_per_epoch) * plan.epochs:,} per run"),
            ("  teacher cost / epoch", f"{s.teacher_to_epoch_ratio:.2f} (the cache costs that many student epochs)"),
            ("  online teacher instead", f"+{_hours(online)} per epoch (+{100 * online / s.gpu_hours_per_epoch:.0f}% "
                                         f"of the student's compute), {_hours(online * plan.epochs)} per run vs "
                                         f"{_hours(plan.teacher_gpu_hours)} once for the cache"),
            ("  loader CPU per GPU", f"{s.loader_cores_per_gpu:.1f} cores for {s.samples_per_s_per_gpu:,.0f} samples/s "
                                     f"(crops rebuilt {cores['rebuild']:.1f}; stored {cores['stored']:.1f}); "
                                     f"rebuilt/stored by GPU type: {by_gpu}"),
            *_loader_flag(s, plan),
            ("  views (replay study)", replay_advice(plan.epochs, replay)),
            ("  views (short schedules)", views_advice(plan.views, plan.epochs, study_for(s.preset))),
        ]  # fmt: skip
    rows += _crops_rows(plan)
    rows += [
        ("S3 requests", f"{_dollars(plan.request_cost)}"),
        ("estimated total", f"{_dollars(plan.total_cost)}  (teacher"
                            + (f" + {len(plan.students)} student(s) x {plan.epochs} epochs" if plan.students else "")
                            + f" + {plan.storage_months:g} month(s) storage + requests)"),
    ]  # fmt: skip
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


def _mixed(plan: Plan) -> bool:
    """Whether some views of the cache hold no tokens (--token-views below --views)."""
    return plan.token_views is not None and plan.token_views < plan.views


def _tokens_text(plan: Plan) -> str:
    if not plan.spec.tokens:
        return "no tokens"
    text = f"tokens D={plan.spec.dim} P={plan.spec.num_patches} ({plan.spec.token_encoding})"
    return text + (f" on views 0..{plan.token_views - 1} only" if _mixed(plan) else "")


def _objects_text(plan: Plan) -> str:
    if not _mixed(plan):
        return f"{plan.objects_per_unit} objects"
    return (
        f"{plan.objects_per_unit} objects (views 0..{plan.token_views - 1}) or "
        f"{plan.objects_per_unit_without_tokens} (views {plan.token_views}..{plan.views - 1}, no token arrays)"
    )


def _token_views_rows(plan: Plan) -> list[tuple[str, str]]:
    """With --token-views: a view with and without tokens, and what that saves against tokens on every view."""
    if not _mixed(plan):
        return []
    full, less = plan.bytes_per_view_with_tokens, plan.bytes_per_view_without_tokens
    saved = full - plan.bytes_per_view
    return [
        ("  --token-views " + str(plan.token_views), f"a view with tokens {full:,.0f} B, without {less:,.0f} B; "
                                                      f"{plan.token_views} of {plan.views} views with tokens: "
                                                      f"{saved:,.0f} B per view ({100 * saved / full:.0f}%) less "
                                                      "than tokens on every view"),
        ("  measured", token_views_advice(load_replay_study())),
    ]  # fmt: skip


def _loader_flag(s: StudentPlan, plan: Plan) -> list[tuple[str, str]]:
    """A row when the cluster has fewer CPUs per GPU than the loader needs."""
    if s.input_bound_factor <= 1.0:
        return []
    f = s.input_bound_factor
    return [
        ("  LOADER-BOUND", f"needs {s.loader_cores_per_gpu:.1f} CPU cores per GPU, the cluster has "
                           f"{plan.cpus_per_gpu:g} (--cpus-per-gpu): the GPU runs at {100 / f:.0f}% of its rate, "
                           f"{_hours(s.gpu_hours_total * f)} = {_dollars(s.cost_total * f)} instead"),
    ]  # fmt: skip


def _crops_rows(plan: Plan) -> list[tuple[str, str]]:
    """The run with stored crops and with rebuilt ones, and the cheaper."""
    if not plan.crops:
        return []
    rows = []
    for path, label in (("stored", "stored crops"), ("rebuild", "rebuilt crops")):
        c = plan.crops[path]
        cores = ", ".join(f"{k} {v:.1f}" for k, v in c.loader_cores.items())
        rows.append((f"{label} (both ways)", f"{_dollars(c.total)} total: loader cores/GPU {cores}; "
                                             f"{c.gets_per_run:,} GETs/run ({_dollars(c.request_cost)} requests); "
                                             f"storage {_dollars(c.storage_cost)}; student GPUs "
                                             f"{_dollars(c.gpu_cost)} (loader-bound counted)"))  # fmt: skip
    choice = plan.crops_choice
    other = "rebuild" if choice == "stored" else "stored"
    saved = plan.crops[other].total - plan.crops[choice].total
    # The cache job's default (--store-crops auto) stores them for S3 caches or images.
    flag = "--store-crops jpeg; auto does so on S3" if choice == "stored" else "--store-crops none"
    rows.append(
        (
            "crops: use",
            f"{'stored' if choice == 'stored' else 'rebuilt'} crops ({flag}): "
            f"{_dollars(saved)} less than {'rebuilt' if choice == 'stored' else 'stored'}",
        )
    )
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, required=True, help="person instances in the split")
    p.add_argument("--views", type=int, required=True, help="cached views per instance")
    p.add_argument("--teacher", required=True, help="teacher preset, e.g. tokenpose-w48")
    p.add_argument("--students", default="distilpose-s,distilpose-l", help="comma-separated student presets")
    p.add_argument("--gpu-type", choices=list(GPU_TYPES), default="h100")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--format", choices=list(FORMATS), default="zarr")
    p.add_argument("--shard-instances", type=int, default=256)
    p.add_argument("--price-per-gpu-hour", type=float, help="$ per GPU-hour (default per GPU type)")
    p.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION, help="fraction of peak FLOPs")
    p.add_argument("--heatmap-encoding", choices=list(HEATMAP_ENCODINGS), default=DEFAULT_HEATMAP_ENCODING)
    p.add_argument("--token-encoding", choices=list(TOKEN_ENCODINGS), default=DEFAULT_TOKEN_ENCODING)
    p.add_argument("--store-crops", action="store_true", help="cache JPEG crops too")
    p.add_argument(
        "--token-views",
        type=int,
        metavar="VT",
        help="tokens stored for views 0..VT-1 only, as the cache job's --token-views (default: every view)",
    )
    p.add_argument("--storage-months", type=float, default=1.0, help="months of S3 storage in the total")
    p.add_argument(
        "--cpus-per-gpu", type=float, help="CPU cores per GPU for the loader (default: the GPU type's usual instance)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    students = tuple(s for s in args.students.split(",") if s)
    try:
        plan = estimate(
            args.instances, args.views, args.teacher, students, args.gpu_type, args.epochs, args.format,
            args.shard_instances, args.price_per_gpu_hour, args.utilization, args.heatmap_encoding,
            args.token_encoding, args.store_crops, args.storage_months, args.cpus_per_gpu,
            token_views=args.token_views,
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
