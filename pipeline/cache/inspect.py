"""Print what a cache holds: ``python -m pipeline.cache.inspect URI``.

Counts, stored bytes per field per view, encodings, teacher, data fingerprint, shards and
their per-view units.
Works on finalized caches and, from the commit records, on partly written ones.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cache.base import committed_units, read_manifest
from pipeline.cache.manifest import Manifest, ShardInfo
from pipeline.cache.schema import HEATMAP_ENCODINGS, TOKEN_ENCODINGS, teacher_fields

SHARDS_SHOWN = 5  # first and last shards listed; the rest are summarized


def _bytes_per_view(shards: list[ShardInfo]) -> dict[str, float]:
    rows = sum(s.rows for s in shards) or 1
    totals: dict[str, int] = {}
    for shard in shards:
        for name, size in shard.bytes_per_field.items():
            totals[name] = totals.get(name, 0) + size
    return {name: size / rows for name, size in totals.items()}


def _field_table(shards: list[ShardInfo]) -> list[str]:
    per_view = _bytes_per_view(shards)
    total = sum(per_view.values())
    lines = ["stored bytes per view:"]
    for name, size in sorted(per_view.items(), key=lambda item: -item[1]):
        lines.append(f"  {name:<14} {size:>12,.1f} B  {100 * size / max(total, 1):5.1f}%")
    lines.append(f"  {'total':<14} {total:>12,.1f} B  ({sum(s.total_bytes for s in shards) / 2**20:,.1f} MiB)")
    return lines


def _shard_lines(shards: list[ShardInfo]) -> list[str]:
    instances = [s.instances for s in shards]
    lines = [
        f"shards: {len(shards)}, instances per shard min {min(instances)} / max {max(instances)}, "
        f"one unit per view ({sum(len(s.units) for s in shards)} units)"
    ]
    shown = shards if len(shards) <= 2 * SHARDS_SHOWN else shards[:SHARDS_SHOWN] + shards[-SHARDS_SHOWN:]
    for i, shard in enumerate(shown):
        if len(shown) < len(shards) and i == SHARDS_SHOWN:
            lines.append(f"  ... {len(shards) - len(shown)} more")
        lines.append(
            f"  {shard.name:<14} {shard.instances:>6} instances x {len(shard.units)} views "
            f"{shard.total_bytes / 2**20:>9.2f} MiB  view {shard.units[0].view}: sha256 {shard.units[0].sha256[:16]}"
        )
    return lines


def _manifest_lines(manifest: Manifest) -> list[str]:
    spec = manifest.spec
    teacher_precision = manifest.teacher.effective_precision
    lines = [
        f"schema version {manifest.schema_version}, created {manifest.created_at}, complete={manifest.complete}",
        f"rows (views): {manifest.num_rows:,}  views per instance: {manifest.views}  seed: {manifest.seed}",
        f"teacher: {manifest.teacher.preset}  checkpoint sha256 {manifest.teacher.checkpoint_sha256}  "
        f"precision {manifest.teacher.precision or 'not recorded'} (spot-checked as {teacher_precision})",
        f"data: split {manifest.data.split}, {manifest.data.num_images:,} images, "
        f"annotation sha256 {manifest.data.ann_file_sha256}",
    ]
    if spec is not None:
        tokens = f"D={spec.dim} P={spec.num_patches}" if spec.tokens else "no tokens (heatmap teacher)"
        if spec.token_views is not None:
            tokens += f" on views 0..{spec.token_views - 1} of {manifest.views} (--token-views)"
        lines += [
            f"spec: K={spec.num_joints} heatmaps {spec.heatmap_size[0]}x{spec.heatmap_size[1]} "
            f"{tokens} crops={'yes' if spec.store_crops else 'no'}",
            f"teacher fields: {', '.join(teacher_fields(spec))}",
            f"encodings: heatmaps {spec.heatmap_encoding} ({HEATMAP_ENCODINGS[spec.heatmap_encoding].error_bound})",
        ]
        if spec.tokens:
            lines.append(
                f"           tokens {spec.token_encoding} ({TOKEN_ENCODINGS[spec.token_encoding].error_bound})"
            )
    return lines


def describe_cache(uri: str) -> str:
    """Human-readable summary of the cache at ``uri``."""
    manifest = read_manifest(uri)
    if manifest is not None:
        lines = [f"cache {uri} [{manifest.format}]", *_manifest_lines(manifest)]
        shards = list(manifest.shards)
    else:
        units = committed_units(uri)
        if not units:
            return f"{uri}: no manifest.json and no commit records (not a cache, or nothing written yet)"
        shards = ShardInfo.from_units(list(units.values()))
        lines = [
            f"cache {uri} NOT FINALIZED: {len(units)} committed shard-view(s) in {len(shards)} shard(s), "
            f"{sum(s.rows for s in shards):,} rows so far"
        ]
    return "\n".join([*lines, *_field_table(shards), *_shard_lines(shards)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("uri", help="cache root: local path or s3://bucket/prefix")
    parser.add_argument("--render", metavar="ID", help="draw one view: global row number or INSTANCE_ID:VIEW")
    parser.add_argument("--png", default="view.png", help="with --render: output PNG (default view.png)")
    parser.add_argument("--data", help="with --render: data set root, to rebuild the crop from its image")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render is not None:
        from pipeline.cache.render import render_cli

        print(render_cli(args.uri, args.render, args.png, args.data))
        return 0
    print(describe_cache(args.uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
