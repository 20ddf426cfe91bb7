"""What a teacher caching job reports when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheSummary:
    out: str
    instances: int
    views: int
    shards_total: int
    units_total: int  # shard-views
    units_reused: int  # committed before this run
    views_computed: int  # (instance, view) rows the teacher ran on in this run
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
            f"  instances {self.instances}  views/instance {self.views}  rows {self.rows}  shards {self.shards_total}",
            f"  shard-views {self.units_total}: {self.units_reused} already committed (reused), "
            f"{self.units_total - self.units_reused} computed; views computed this run {self.views_computed}",
            f"  wall {self.wall_s:.1f} s  throughput {self.views_per_s:.1f} views/s (views computed this run)",
            "  skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"),
            *([f"  annotations: {self.extra['annotation_skips']}"] if "annotation_skips" in self.extra else []),
            *([f"  images: {self.extra['image_skips']}"] if "image_skips" in self.extra else []),
        ]
        total = sum(self.bytes_per_field.values())
        rows = [{"field": k, "bytes/view": v} for k, v in sorted(self.bytes_per_field.items(), key=lambda kv: -kv[1])]
        rows.append({"field": "TOTAL", "bytes/view": total})
        return "\n".join(lines) + "\n" + format_table(rows, float_fmt=",.0f")
