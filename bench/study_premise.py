"""The premise study: is a student distilled from the teacher cache as good as one distilled
with the teacher online, and how many cached views V does it take?

    make demo                                           # synthetic data + trained tiny teacher
    python bench/study_premise.py                       # cache V=1..16, the sweep, the report
    python bench/study_premise.py --space sweeps/premise-tiny.yaml --name premise-tiny
    python bench/study_premise.py --report-only         # re-read finished trials

Three phases, each resumable (a rerun reuses what is done):

1. cache: `jobs/cache_teacher.py` with `--views 1`, then 2, 4, 8, 16 on the same output.
   Each run grows the cache in place and computes only the new views, so the wall time of
   the runs up to V is what building a V-view cache costs; the bytes of a V-view cache are
   those of its first V views (`<out>/cache_growth.json`).
2. sweeps: `jobs/sweep.py` with the study's space (online teacher with fresh augmentation,
   online teacher on the cache's views, the cache read with `cache_views` = 1..16, and no
   distillation; every trial the same student and schedule), one sweep per seed.
3. report: val AP mean and spread per configuration, wall time per run, cache bytes and
   build time per V: a CSV and a PNG under docs/, a markdown table on stdout, and the
   smallest V within 1 AP of the fresh-augmentation online run.

The study does a fixed amount of work (epochs, views, seeds); only its wall time depends
on the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.premise import STUDIES, WITHIN_AP, PremiseStudy  # noqa: E402  (the planner reads what this writes)

TEACHER_AP_MIN = 0.25  # below this the teacher has not learnt the data: the study means little
ONLINE_FRESH = "online-fresh"


def _run(cmd: list[str]) -> float:
    """Run a job as a user would; returns its wall seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def teacher_val_ap(demo: Path) -> float:
    metrics = json.loads((demo / "teacher" / "eval.json").read_text())["metrics"]
    return float(next(v["AP"] for k, v in metrics.items() if "gt" in k))


def grow_cache(args, cache: Path) -> list[dict]:
    """Build the cache one V at a time (each run adds views); each step's wall time."""
    record_path = Path(args.out) / "cache_growth.json"
    growth = json.loads(record_path.read_text()) if record_path.exists() else []
    done = {row["views"] for row in growth}
    for views in args.views:
        if views in done:
            print(f"[study] cache V={views}: reusing (built earlier)", flush=True)
            continue
        seconds = _run(
            [
                sys.executable,
                "jobs/cache_teacher.py",
                "--data", str(args.demo / "data"),
                "--teacher", args.teacher,
                "--checkpoint", str(args.demo / "teacher" / "teacher.pt"),
                "--out", str(cache),
                "--views", str(views),
                "--shard-instances", str(args.shard_instances),
                "--workers", str(args.cache_workers),
            ]
        )  # fmt: skip
        growth.append({"views": views, "step_s": seconds})
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(growth, indent=2))
    return growth


def cache_costs(growth: list[dict], cache: Path) -> list[dict]:
    """Add each V's build time (the growth steps up to V) and bytes (its first V views)."""
    from pipeline.cache import open_reader

    reader = open_reader(str(cache))
    built = 0.0
    for row in sorted(growth, key=lambda r: r["views"]):
        built += row["step_s"]
        row["build_s"] = built
        units = [u for u in reader.manifest.units() if u.view < row["views"]]
        row["bytes"] = sum(u.total_bytes for u in units)
        row["bytes_per_view"] = row["bytes"] / sum(u.rows for u in units)
    return sorted(growth, key=lambda r: r["views"])


def run_sweeps(args, cache: Path) -> list[Path]:
    """One sweep per seed (every configuration of seed 0 first, then seed 1, ...), so a
    study cut short still compares every configuration."""
    dirs = []
    for seed in args.seeds:
        name = f"{args.name}-seed{seed}"
        if not args.report_only:
            _run(
                [
                    sys.executable,
                    "jobs/sweep.py",
                    "--cache", str(cache),
                    "--space", args.space,
                    "--storage", args.out,
                    "--name", name,
                    "--val", str(args.demo / "data"),
                    "--set", f"seed={seed}",
                    "--max-concurrent", str(args.max_concurrent),
                ]
            )  # fmt: skip
        dirs.append(Path(args.out) / name)
    return dirs


def collect(sweep_dirs: list[Path], seeds: list[int]) -> dict[str, list[dict]]:
    """Finished trials by configuration (trial name): AP and training wall time (the sum of
    its epoch times)."""
    by_config: dict[str, list[dict]] = {}
    for sweep_dir, seed in zip(sweep_dirs, seeds):
        results = sweep_dir / "results.csv"
        for row in csv.DictReader(results.open()) if results.exists() else []:
            if row.get("AP") in ("", None):
                continue
            epochs = list(csv.DictReader((sweep_dir / "runs" / row["trial"] / "logs" / "epochs.csv").open()))
            train_s = sum(float(e["epoch_time_s"]) for e in epochs)
            by_config.setdefault(row["trial"], []).append({"seed": seed, "AP": float(row["AP"]), "train_s": train_s})
    return by_config


def summarize(by_config: dict[str, list[dict]], growth: list[dict]) -> list[dict]:
    growth_by_v = {g["views"]: g for g in growth}
    table = []
    for config, runs in by_config.items():
        aps = [r["AP"] for r in runs]
        row = {
            "configuration": config,
            "runs": len(runs),
            "seeds": " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])),
            "AP_mean": statistics.fmean(aps),
            "AP_std": statistics.stdev(aps) if len(aps) > 1 else 0.0,
            "AP_min": min(aps),
            "AP_max": max(aps),
            "train_s_mean": statistics.fmean(r["train_s"] for r in runs),
            "views": "",
            "cache_bytes": "",
            "cache_build_s": "",
        }
        if config.startswith("cache-v"):
            views = int(config.removeprefix("cache-v"))
            row["views"] = views
            if views in growth_by_v:
                row["cache_bytes"] = growth_by_v[views]["bytes"]
                row["cache_build_s"] = round(growth_by_v[views]["build_s"], 1)
        table.append(row)
    order = {ONLINE_FRESH: 0, "online-cache-views": 1, "none": 99}
    return sorted(table, key=lambda r: (order.get(r["configuration"], 2), r["views"] or 0))


def smallest_good_v(summary: PremiseStudy | None) -> str:
    """The answer to the study's question, by the planner's own rule (pipeline.premise)."""
    if summary is None:
        return f"no {ONLINE_FRESH} run finished: no reference"
    best = summary.smallest_views_within()
    bound = f"within {WITHIN_AP * 100:.0f} AP of {ONLINE_FRESH} ({summary.online_fresh_ap:.3f})"
    if best is None:
        return f"no cached V reaches {bound}"
    return f"smallest V {bound}: V={best} ({summary.cache_ap[best]:.3f})"


def study_summary(table: list[dict], space: str) -> PremiseStudy | None:
    """What the planner needs (`pipeline/studies/<name>.json`, read by pipeline.premise)."""
    from pipeline.sweep import load_space

    online = next((r for r in table if r["configuration"] == ONLINE_FRESH), None)
    if online is None:
        return None
    base = load_space(str(ROOT / space))[0]  # every trial shares the student and schedule
    finished = sorted({int(s) for r in table for s in r["seeds"].split()})
    return PremiseStudy(
        student=base["student"],
        epochs=int(base["epochs"]),
        seeds=tuple(finished),
        online_fresh_ap=round(online["AP_mean"], 4),
        cache_ap={r["views"]: round(r["AP_mean"], 4) for r in table if r["views"] != ""},
        where=f"{base['student']}, synthetic data, {base['epochs']}-epoch schedule, {len(finished)} seed(s)",
    )


def markdown(table: list[dict]) -> str:
    lines = [
        "| configuration | runs | val AP mean | spread (min-max) | train wall s / run | cache bytes | cache build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        size = f"{r['cache_bytes'] / 1e6:.1f} MB" if r["cache_bytes"] != "" else ""
        lines.append(
            f"| {r['configuration']} | {r['runs']} | {r['AP_mean']:.3f} | {r['AP_min']:.3f}-{r['AP_max']:.3f} "
            f"| {r['train_s_mean']:.0f} | {size} | {r['cache_build_s']} |"
        )
    return "\n".join(lines)


def write_csv(table: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(table: list[dict], title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    cached = [r for r in table if r["views"] != ""]
    if cached:
        xs = [r["views"] for r in cached]
        ax.errorbar(
            xs,
            [r["AP_mean"] for r in cached],
            yerr=[[r["AP_mean"] - r["AP_min"] for r in cached], [r["AP_max"] - r["AP_mean"] for r in cached]],
            marker="o",
            capsize=3,
            label="from the cache (V views)",
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    styles = {ONLINE_FRESH: ("C1", "-"), "online-cache-views": ("C2", "--"), "none": ("C7", ":")}
    for r in table:
        if r["configuration"] in styles:
            color, line = styles[r["configuration"]]
            ax.axhline(r["AP_mean"], color=color, linestyle=line, label=f"{r['configuration']} (mean)")
            ax.axhspan(r["AP_min"], r["AP_max"], color=color, alpha=0.12)
    ax.set_xlabel("cached views per instance V")
    ax.set_ylabel("val AP (mean, min-max over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo", help="make demo's folder (data, teacher)")
    p.add_argument("--teacher", default="tokenpose-tiny")
    p.add_argument("--out", default=str(ROOT / "runs" / "premise"), help="study folder (cache, sweeps)")
    p.add_argument("--space", default="sweeps/premise-l-tiny.yaml")
    p.add_argument("--name", default="premise-l-tiny", help="sweep name stem (and the docs/ file stem)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="one sweep per seed, in this order")
    p.add_argument("--views", type=_ints, default=[1, 2, 4, 8, 16], help="cache sizes, grown in this order")
    p.add_argument("--shard-instances", type=int, default=64)
    p.add_argument("--cache-workers", type=int, default=2)
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (one CPU each)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="the table and plot")
    p.add_argument("--studies", type=Path, default=STUDIES, help="the planner's summary (package data)")
    p.add_argument("--report-only", action="store_true", help="only re-read the finished trials")
    args = p.parse_args(argv)

    if not (args.demo / "teacher" / "teacher.pt").exists():
        p.error(f"{args.demo}/teacher/teacher.pt does not exist: run `make demo` first (or pass --demo)")
    teacher_ap = teacher_val_ap(args.demo)
    print(f"[study] teacher {args.teacher} val AP {teacher_ap:.3f} (GT boxes)", flush=True)
    if teacher_ap < TEACHER_AP_MIN:
        print(f"[study] WARNING: below {TEACHER_AP_MIN}: the comparison means little", flush=True)
    cache = Path(args.out) / "cache"
    if args.report_only:
        growth = json.loads((Path(args.out) / "cache_growth.json").read_text())
    else:
        growth = grow_cache(args, cache)
    growth = cache_costs(growth, cache)
    sweep_dirs = run_sweeps(args, cache)
    table = summarize(collect(sweep_dirs, args.seeds), growth)
    if not table:
        print("[study] no finished trial yet", flush=True)
        return 1
    args.docs.mkdir(parents=True, exist_ok=True)
    write_csv(table, args.docs / f"{args.name}.csv")
    plot(table, f"{args.name}: teacher AP {teacher_ap:.3f}", args.docs / f"{args.name}.png")
    summary = study_summary(table, args.space)
    if summary is not None:
        args.studies.mkdir(parents=True, exist_ok=True)
        (args.studies / f"{args.name}.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    print(markdown(table))
    print(f"[study] {smallest_good_v(summary)}")
    print(f"[study] wrote {args.docs / args.name}.csv, .png and {args.studies / args.name}.json (the planner's advice)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
