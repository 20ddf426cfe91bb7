"""Checks of a finished cache.

``verify_cache`` recomputes every unit's sha256 and compares it with the commit records
and the manifest. Run it after copying a cache, or when a reader fails: Zarr reads a lost
chunk object as fill values and a tar has no per-member checksum, so a silent bit flip or
a partial copy is only found by hashing the stored bytes.

``spot_check`` re-runs the teacher on a few cached views and compares its outputs with the
stored ones: it finds a cache whose bytes are intact but whose content is wrong (another
teacher, other images, rows mixed up), which no checksum can. It allows what the cache
promises: the encoding's bound plus the tolerance of the precision the teacher ran in, both
recorded in the manifest.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.cache import open_reader, wds_store, zarr_store
from pipeline.cache.base import SHARDS_DIR, TMP_PREFIX, read_commits, read_manifest
from pipeline.cache.encodings import decode_crop_jpeg, encode_crop_jpeg, error_bound
from pipeline.cache.manifest import ViewUnit
from pipeline.cache.schema import HEATMAP_FIELD, TEACHER_PRECISIONS, TOKEN_FIELDS, field_names

OK, MISSING, TRUNCATED, CORRUPT = "ok", "missing", "truncated", "corrupt"
DIGESTS: dict[str, Callable[[str], tuple[str, int] | None]] = {
    zarr_store.FORMAT: zarr_store.stored_digest,
    wds_store.FORMAT: wds_store.stored_digest,
}


@dataclass(frozen=True)
class UnitCheck:
    name: str
    status: str  # ok | missing | truncated | corrupt
    rows: int
    expected_bytes: int
    actual_bytes: int
    expected_sha256: str
    actual_sha256: str

    def describe(self) -> str:
        if self.status == OK:
            return f"{self.name}: ok ({self.rows} rows)"
        if self.status == MISSING:
            return f"{self.name}: MISSING ({self.rows} rows lost)"
        return (
            f"{self.name}: {self.status.upper()} ({self.actual_bytes:,} of {self.expected_bytes:,} bytes, "
            f"sha256 {self.actual_sha256[:12]} != {self.expected_sha256[:12]})"
        )


@dataclass
class VerifyReport:
    uri: str
    format: str
    finalized: bool
    expected_rows: int
    checks: list[UnitCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # cache-level inconsistencies
    leftovers: list[str] = field(default_factory=list)  # uncommitted units, temp files

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.status == OK for c in self.checks)

    @property
    def rows_ok(self) -> int:
        return sum(c.rows for c in self.checks if c.status == OK)

    def by_status(self, status: str) -> list[UnitCheck]:
        return [c for c in self.checks if c.status == status]

    def summary(self) -> str:
        counts = Counter(c.status for c in self.checks)
        state = "finalized" if self.finalized else "NOT finalized (no manifest.json)"
        lines = [
            f"cache {self.uri} [{self.format or '?'}], {state}",
            f"shard-views: {len(self.checks)} checked: "
            + ", ".join(f"{counts.get(s, 0)} {s}" for s in (OK, CORRUPT, TRUNCATED, MISSING)),
            f"rows: {self.rows_ok:,} verified of {self.expected_rows:,} expected",
        ]
        lines += [f"  {c.describe()}" for c in self.checks if c.status != OK]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  leftover (not part of the cache): {name}" for name in self.leftovers]
        lines.append("RESULT: OK" if self.ok else "RESULT: FAILED")
        return "\n".join(lines)


def _expected_units(uri: str, report: VerifyReport) -> list[ViewUnit]:
    """Units the cache claims to hold, cross-checking manifest and commit records."""
    manifest = read_manifest(uri)
    records = read_commits(uri)
    commits = {key: ViewUnit.from_dict(r["unit"]) for key, r in records.items()}
    if manifest is None:
        formats = {r.get("format") for r in records.values()}
        report.format = formats.pop() if len(formats) == 1 else ""
        if not commits:
            report.problems.append("no manifest.json and no commit records: not a cache (or empty)")
        elif not report.format:
            report.problems.append(f"commit records disagree on the store format: {sorted(map(str, formats))}")
        units = [commits[key] for key in sorted(commits)]
    else:
        report.finalized = True
        report.format = manifest.format
        units = manifest.units()
        if manifest.num_rows != sum(u.rows for u in units):
            report.problems.append(
                f"manifest num_rows {manifest.num_rows} != sum of unit rows {sum(u.rows for u in units)}"
            )
        for unit in units:
            commit = commits.get((unit.shard, unit.view))
            if commit is None:
                report.problems.append(f"{unit.name}: listed in the manifest but has no commit record")
            elif commit != unit:
                report.problems.append(f"{unit.name}: commit record differs from the manifest entry")
        listed = {(u.shard, u.view) for u in units}
        for key in sorted(set(commits) - listed):
            report.problems.append(f"{commits[key].name}: committed but not in the manifest (written after finalize?)")
    report.expected_rows = sum(u.rows for u in units)
    return units


def check_unit(unit_uri: str, unit: ViewUnit, fmt: str) -> UnitCheck:
    digest = DIGESTS[fmt](unit_uri)
    expected = dict(name=unit.name, rows=unit.rows, expected_bytes=unit.total_bytes, expected_sha256=unit.sha256)
    if digest is None:
        return UnitCheck(status=MISSING, actual_bytes=0, actual_sha256="", **expected)
    sha256, size = digest
    if sha256 == unit.sha256:
        status = OK
    elif size < unit.total_bytes:
        status = TRUNCATED
    else:
        status = CORRUPT
    return UnitCheck(status=status, actual_bytes=size, actual_sha256=sha256, **expected)


def _leftovers(uri: str, fmt: str, known: set[str]) -> list[str]:
    """Objects below shards/ that belong to no listed unit (temp files, uncommitted units)."""
    depth = 2 if fmt == zarr_store.FORMAT else 1  # shard-00012/view-003.zarr/... vs shard-00012.view-003.tar
    found = set()
    for path in storage.find_files(storage.join(uri, SHARDS_DIR)):
        parts = path.split("/")
        top = "/".join(parts[:depth])
        if any(p.startswith(TMP_PREFIX) for p in parts[:depth]) or top not in known:
            found.add(top)
    return sorted(found)


def verify_cache(uri: str) -> VerifyReport:
    """Hash every unit the cache claims to hold and report what is wrong."""
    uri = uri.rstrip("/")
    report = VerifyReport(uri=uri, format="", finalized=False, expected_rows=0)
    units = _expected_units(uri, report)
    if report.format not in DIGESTS:
        if report.format:
            report.problems.append(f"unknown store format {report.format!r}")
        return report
    for unit in units:
        report.checks.append(check_unit(storage.join(uri, SHARDS_DIR, unit.name), unit, report.format))
    report.leftovers = _leftovers(uri, report.format, {u.name for u in units})
    return report


# ----------------------------------------------------------------------------- spot check


@dataclass
class SpotCheck:
    rows: list[int]
    max_abs: dict[str, float]
    tolerance: dict[str, float]
    precision: str = "fp32"  # what the cache says its teacher ran in

    @property
    def ok(self) -> bool:
        return all(self.max_abs[k] <= self.tolerance[k] for k in self.max_abs)

    def summary(self) -> str:
        parts = [f"{k} max|diff| {v:.4g} (tol {self.tolerance[k]:.3g})" for k, v in self.max_abs.items()]
        verdict = "OK" if self.ok else "MISMATCH: the cache does not match this teacher (stale or wrong cache?)"
        head = f"[spot-check] {len(self.rows)} views re-run through the teacher (fp32 vs a {self.precision} cache): "
        return head + "; ".join(parts) + f" -> {verdict}"


def spot_check(uri: str, n: int, checkpoint: str | None = None, seed: int = 0, batch_size: int = 16) -> SpotCheck:
    """Re-run the teacher on n random cached views and compare with what the cache holds."""
    # torch only here: the rest of pipeline.cache (and `--verify`) stays free of it.
    import torch

    from distilpose.data.coco import load_coco, read_image
    from distilpose.data.transforms import crop_of_view
    from distilpose.teacher_forward import build_teacher, run_teacher

    reader = open_reader(uri)
    manifest = reader.manifest
    if checkpoint and storage.sha256(checkpoint) != manifest.teacher.checkpoint_sha256:
        raise ValueError(
            f"--checkpoint {checkpoint} is not the teacher this cache was built with "
            f"(sha256 {manifest.teacher.checkpoint_sha256[:12]}...)"
        )
    if checkpoint is None and manifest.teacher.checkpoint_sha256 != "random-init":
        raise ValueError("--spot-check needs --checkpoint: the teacher checkpoint the cache was built with")
    rows = sorted(np.random.default_rng(seed).choice(len(reader), size=min(n, len(reader)), replace=False).tolist())
    # The teacher outputs the spot check compares: heatmaps, and the tokens when the teacher has them.
    compared = [name for name in ("heatmaps", "kpt_tokens", "vis_tokens") if name in field_names(reader.spec)]
    tokens = [name for name in compared if name in TOKEN_FIELDS]
    cached = reader.read_rows(np.asarray(rows), fields=["image_id", "view_params", "view", HEATMAP_FIELD])
    # A cache built with --token-views has tokens on its first views only: compare them there.
    with_tokens = np.asarray([reader.spec.has_tokens(int(v)) for v in cached["view"]], dtype=bool)
    if tokens and with_tokens.any():
        cached.update(reader.read_rows(np.asarray(rows)[with_tokens], fields=tokens))
    else:
        compared = [HEATMAP_FIELD]
    _, images = load_coco(manifest.data.ann_file)
    model = build_teacher(manifest.teacher.preset, storage.local_copy(checkpoint) if checkpoint else None)
    input_size = tuple(model.config.input_size)
    crops = np.stack(
        [
            crop_of_view(read_image(manifest.data.image_root, images[int(i)].file_name), v, input_size)
            for i, v in zip(cached["image_id"], cached["view_params"])
        ]
    )
    if reader.spec.store_crops:  # the teacher ran on the decoded stored JPEG
        crops = np.stack([decode_crop_jpeg(encode_crop_jpeg(crop)) for crop in crops])
    fresh = run_teacher(model, crops, batch_size, torch.device("cpu"))
    precision = TEACHER_PRECISIONS[manifest.teacher.effective_precision]
    max_abs, tolerance = {}, {}
    for name in compared:
        expected = fresh[name] if name == HEATMAP_FIELD else fresh[name][with_tokens]
        max_abs[name] = float(np.abs(cached[name] - expected).max())
        # What the cache promises: the encoding's bound, plus the drift of the precision it
        # was computed in (a few % for bf16), relative to the field's largest value.
        rel = precision.heatmap_tolerance if name == HEATMAP_FIELD else precision.token_tolerance
        bound = float(error_bound(name, expected, reader.spec).max())
        tolerance[name] = bound + rel * float(np.abs(expected).max()) + 1e-6
    return SpotCheck(rows=rows, max_abs=max_abs, tolerance=tolerance, precision=precision.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify the checksums of a teacher-output cache.")
    parser.add_argument("uri", help="cache root: local path or s3://bucket/prefix")
    args = parser.parse_args(argv)
    report = verify_cache(args.uri)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
