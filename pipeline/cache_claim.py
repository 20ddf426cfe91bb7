"""What a cache being built is for (``job.json``), and the check that a rerun matches it.

Every setting that determines a unit's bytes must match on a rerun, except the number of
views: a unit's bytes never depend on V (views are seeded per (instance, view)), so a rerun
with a larger ``--views`` grows the cache in place and computes only the new units.
"""

from __future__ import annotations

import dataclasses
import json

from distilpose.data.layout import SplitFiles
from distilpose.errors import UserError
from distilpose.models.config import ModelConfig
from pipeline import storage
from pipeline.cache.schema import CacheSpec
from pipeline.mismatch import refuse_differences

JOB_FILE = "job.json"  # what identifies the cache being built; a rerun must match it


def job_identity(cfg, layout: SplitFiles, teacher_config: dict, spec: CacheSpec) -> dict:
    """Everything that determines the cache's content (``cfg``: a CacheJobConfig)."""
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
        "shard_instances": cfg.shard_instances,
        "format": cfg.format,
        "spec": spec.to_dict(),
    }
    return json.loads(json.dumps(identity))  # the form it has when read back from job.json


def resolve_store_crops(option: str, out: str, image_root: str) -> str:
    """``--store-crops auto`` -> "jpeg" or "none"; other values are kept.

    Stored crops cost bytes (~10 KB per view) and save every student epoch a read and decode
    of each source image: on S3 that is one GET per instance and epoch, which at COCO scale
    costs more than the stored bytes (`python -m pipeline.plan` prices both), and the loader's
    CPU per sample drops by a third. So auto stores them when the cache or the images are on
    S3 and keeps local caches (demos, tests) lean; a cache already at ``out`` keeps its choice,
    so a rerun resumes it rather than being refused for another spec."""
    if option != "auto":
        return option
    uri = storage.join(out, JOB_FILE)
    if storage.exists(uri):
        recorded = json.loads(storage.read_bytes(uri)).get("spec", {}).get("store_crops", False)
        choice, why = ("jpeg" if recorded else "none"), f"as the cache at {out} was started"
    elif storage.is_s3(out) or storage.is_s3(image_root):
        choice, why = "jpeg", "the cache or the images are on S3: students read no source image per epoch"
    else:
        choice, why = "none", "local cache and images: students rebuild crops from the images"
    print(f"[cache] --store-crops auto: {choice} ({why})", flush=True)
    return choice


def claim_output(out: str, identity: dict) -> int | None:
    """Record what this cache is for, or check that a partly or fully built one matches.

    Returns the views the cache was claimed with before (None for a new cache). A larger
    ``views`` is recorded (the cache grows); a smaller one is refused.
    """
    uri = storage.join(out, JOB_FILE)
    if not storage.exists(uri):
        storage.atomic_write_bytes(uri, _job_json(identity))
        return None
    existing = _with_added_fields(json.loads(storage.read_bytes(uri)))
    before, views = int(existing.get("views", 0)), int(identity["views"])
    if views < before:
        raise UserError(
            f"{out} holds {before} views per instance; --views {views} would shrink it. Rerun with "
            f"--views {before} (or more, to grow it); distillation reads a subset with --cache-views {views}."
        )
    keys = sorted((set(existing) | set(identity)) - {"views"})
    refuse_differences(
        {key: existing.get(key) for key in keys},
        {key: identity.get(key) for key in keys},
        what=f"{out} holds a cache built with different settings",
        advice="Use another --out, or delete it to rebuild.",
        recorded_as="cache has",
        error=UserError,
    )
    if views > before:
        storage.atomic_write_bytes(uri, _job_json(identity))
    return before


def _with_added_fields(recorded: dict) -> dict:
    """Give a job.json written by an older version the fields added since, at their defaults.

    Fields of the teacher's config and of the cache spec are only ever added with a default
    that keeps what older versions did (``tokens=True``, ``head="token"``, ...), so a cache
    claimed before a field existed was built with that default: resuming it after an upgrade
    must not be refused as "built with different settings". Rebuilding each through its class
    fills those defaults in the form a new job.json has; a record it cannot parse is compared
    as written."""
    teacher, spec = recorded.get("teacher"), recorded.get("spec")
    try:
        if isinstance(teacher, dict) and isinstance(teacher.get("config"), dict):
            config = dataclasses.asdict(ModelConfig(**teacher["config"]))
            teacher["config"] = json.loads(json.dumps(config))
        if isinstance(spec, dict):
            recorded["spec"] = json.loads(json.dumps(CacheSpec.from_dict(spec).to_dict()))
    except (TypeError, ValueError):
        pass  # unknown or invalid fields: the comparison below names them
    return recorded


def _job_json(identity: dict) -> bytes:
    return json.dumps(identity, indent=2, sort_keys=True).encode()
