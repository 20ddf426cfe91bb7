"""The replay study: does a student distilled from cached views keep up with the teacher
online once each view is replayed as often as a 300-epoch recipe replays it?

    make demo                                   # synthetic data + a tiny teacher trained with augmentation
    python bench/study_replay.py                # teacher check, caches, sweeps, report (resumable)
    python bench/study_replay.py --subsets 128 --seeds 0,1,2
    python bench/study_replay.py --report-only  # re-read finished trials

Every trial runs the same number of steps (~1,000 of batch 32) on a training subset of N
instances, so N sets the epochs (128: 250, 256: 125, 512: 62) and a cache arm of K views
replays each view epochs / K times (K = 8 on 128 instances: 31 times, as 300 epochs at
V = 8 replay each view 37 times). Arms, differing in one thing each:

- online-fresh: the teacher in the loop on a fresh augmentation per instance per epoch;
- cache-kK: the teacher's outputs on the cache's augmented views 1..K (view 0, the
  un-augmented crop the official pipeline never draws, is excluded);
- cache-k4-flip, cache-k8-flip: K = 4 and 8 with the label-side flip (`--label-flip`, the
  remedy candidate: twice the distinct crops per cached view);
- none-fresh / none-k8: no distillation, on fresh views / on cached views 1..8 (the
  baselines matched to online-fresh and cache-k8);
- cache-k16-t8 (optional group e, run only when named with --groups): K = 16 from a second
  cache per subset built with `--token-views 9`, so only views 0..8 store the teacher's tokens
  and L_KT / L_VT are masked on views 9..16 (the "more views per byte" remedy: about the
  bytes of K = 8 with the heatmap targets of K = 16).

Phases, each resumable:

0. teacher check (before any student runs): PCK of the teacher on the cached views of the
   smallest subset, view 0 vs the augmented ones; far below on augmented views means its
   targets there are wrong, and the study stops;
1. caches: `jobs/cache_teacher.py --limit N --views 17` per subset (and, with group e,
   `--views 17 --token-views 9` into cache-nN-t8);
2. sweeps: `jobs/sweep.py` with sweeps/premise-replay.yaml, `--set epochs=E --set seed=S`,
   one sweep per (subset, arm group, seed): two arms at a time, each group for every seed
   before the next group (ARM_GROUPS: online-fresh and K = 8 first), subsets in the order given;
3. detector boxes: each finished trial's final student evaluated with the data set's person
   detections too (GT-box AP comes from the trial itself);
4. report: docs/premise-replay.{csv,png,md} and pipeline/studies/premise-replay.json (the
   planner's data): AP per arm (mean, spread), each cache arm's
   paired difference to online-fresh per seed, against replays per view, and the K the
   planner recommends for a schedule (pipeline.premise.ReplayStudy.recommend).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _common as C  # noqa: E402
from study_premise import _ints, _run, teacher_val_ap, write_csv  # noqa: E402

from pipeline.premise import STUDIES, WITHIN_AP, ReplayPoint, ReplayStudy, remedy_advice  # noqa: E402

NAME = "premise-replay"
SPACE = "sweeps/premise-replay.yaml"
ONLINE = "online-fresh"
CACHED_VIEWS = 17  # view 0 + 16 augmented views: K = 2..16 draw among views 1..K
TOKEN_VIEWS = 9  # the token-views cache: tokens for view 0 and augmented views 1..8 only
TARGET_STEPS = 1000
# Augmented-view PCK below this fraction of view 0's: the teacher's targets on augmented
# crops are not trustworthy, and neither is any comparison built on them.
MIN_PCK_RATIO = 0.8
PLANNER_EPOCHS = (300, 210, 100)  # schedules the report answers for (the paper's 300 first)


def arm_views(trial: str) -> int | None:
    """K of a cached arm ("cache-k8", "cache-k8-flip", "none-k8"); None for fresh views."""
    found = re.search(r"-k(\d+)", trial)
    return int(found.group(1)) if found else None


# Arm suffix -> the option it adds (--token-views: of the cache job, read through a second cache).
REMEDIES = {"flip": "--label-flip", f"t{TOKEN_VIEWS - 1}": f"--token-views {TOKEN_VIEWS}"}


def is_cache_arm(trial: str) -> bool:
    """The cached arms: plain (what the recommendation is about) or with a remedy."""
    return re.fullmatch(r"cache-k\d+(-(" + "|".join(REMEDIES) + "))?", trial) is not None


def arm_remedy(trial: str) -> str:
    suffix = trial.rsplit("-", 1)[-1]
    return REMEDIES.get(suffix, "")


def teacher_check(args, subset: int) -> dict:
    """PCK on view 0 vs the augmented views of the first `subset` train instances (the ones
    `--limit subset` caches), with the cache's seed."""
    path = Path(args.out) / "teacher_check.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    from distilpose.data.coco import load_instances
    from distilpose.data.layout import split_files
    from distilpose.teacher_forward import build_teacher
    from distilpose.view_accuracy import teacher_view_accuracy

    torch.set_num_threads(2)
    teacher = build_teacher(args.teacher, args.demo / "teacher" / "teacher.pt")
    files = split_files(str(args.demo / "data"), "train")
    instances, _ = load_instances(files.ann_file, split_kind="train", input_size=teacher.config.input_size)
    instances = sorted(instances, key=lambda inst: inst.instance_id)[:subset]
    accuracy = teacher_view_accuracy(teacher, instances, files.image_root, views=CACHED_VIEWS, seed=args.cache_seed)
    check = {**accuracy.to_dict(), "line": accuracy.line()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(check, indent=2))
    return check


def token_cache(out: str | Path, subset: int) -> Path:
    """The subset's second cache, with tokens on views 0..TOKEN_VIEWS-1 only (arm group e)."""
    return Path(out) / f"cache-n{subset}-t{TOKEN_VIEWS - 1}"


def build_caches(args) -> dict[int, Path]:
    caches = {}
    for subset in args.subsets:
        cache = Path(args.out) / f"cache-n{subset}"
        caches[subset] = cache
        if args.report_only:
            continue
        builds = [(cache, [])]
        if any(group in TOKEN_VIEWS_GROUPS for group in args.groups):
            builds.append((token_cache(args.out, subset), ["--token-views", str(TOKEN_VIEWS)]))
        for out, extra in builds:
            _run(
                [
                    sys.executable, "jobs/cache_teacher.py",
                    "--data", str(args.demo / "data"),
                    "--teacher", args.teacher,
                    "--checkpoint", str(args.demo / "teacher" / "teacher.pt"),
                    "--out", str(out),
                    "--views", str(CACHED_VIEWS),
                    "--limit", str(subset),
                    "--shard-instances", str(args.shard_instances),
                    "--workers", str(args.cache_workers),
                    "--seed", str(args.cache_seed),
                    *extra,
                ]
            )  # fmt: skip
    return caches


def subset_epochs(cache: Path, batch_size: int = 32) -> tuple[int, int]:
    """(instances, epochs) of a subset: epochs that make about TARGET_STEPS steps."""
    from pipeline.cache import open_reader
    from pipeline.cache_loader import steps_per_epoch

    reader = open_reader(str(cache))
    instances = sum(s.instances for s in reader.manifest.shards)
    return instances, max(1, round(TARGET_STEPS / steps_per_epoch(reader, 1, batch_size)))


# Arms in the order they are run: each group for every seed before the next group, so a
# study cut short has the arms that decide the 300-epoch answer (online-fresh and K = 8 at
# ~31 replays) paired over all seeds first. Two arms a group: two trials side by side.
ARM_GROUPS = {
    "a": ("online-fresh", "cache-k8"),
    "b": ("cache-k4-flip", "cache-k8-flip"),
    "c": ("cache-k4", "cache-k16"),
    "d": ("cache-k2", "none-fresh", "none-k8"),
    "e": (f"cache-k16-t{TOKEN_VIEWS - 1}",),
}
# Groups run only when named with --groups: e reads the token-views cache (built only then).
OPTIONAL_GROUPS = ("e",)
TOKEN_VIEWS_GROUPS = ("e",)


def sweep_name(subset: int, seed: int, group: str, arms: list[str]) -> str:
    """One sweep per (subset, seed, group); a group some of whose arms finished elsewhere runs
    the rest under a name of its own (a restored sweep keeps the trial list it started with)."""
    name = f"replay-n{subset}-seed{seed}-{group}"
    return name if list(arms) == list(ARM_GROUPS[group]) else name + "-" + "+".join(arms)


def finished_trials(out: Path, subset: int, seed: int) -> dict[str, Path]:
    """Finished trials of (subset, seed) by arm name -> run folder, over every sweep of that
    pair (one per arm group; an older layout ran all arms in one sweep)."""
    done = {}
    for epochs_csv in sorted(out.glob(f"replay-n{subset}-seed{seed}*/runs/*/logs/epochs.csv")):
        rows = list(csv.DictReader(epochs_csv.open()))
        last = rows[-1] if rows else {}
        finished = last.get("AP") not in ("", None) and last.get("epoch") == last.get("epochs")
        run_dir = epochs_csv.parents[1]
        if finished and run_dir.name not in done:
            done[run_dir.name] = run_dir
    return done


def recorded_caches(out: Path) -> dict[int, Path]:
    """The subsets' caches in the study folder (cache-nN; not the token-views ones)."""
    found = (re.fullmatch(r"cache-n(\d+)", p.name) for p in out.glob("cache-n*"))
    return {int(m.group(1)): out / m.group(0) for m in found if m}


def recorded_seeds(out: Path, seeds: list[int]) -> list[int]:
    """`seeds` and every seed a sweep in the study folder ran."""
    found = (re.match(r"replay-n\d+-seed(\d+)", p.name) for p in out.glob("replay-n*-seed*"))
    return sorted(set(seeds) | {int(m.group(1)) for m in found if m})


def run_sweeps(args, caches: dict[int, Path]) -> None:
    for subset, cache in caches.items():
        _, epochs = subset_epochs(cache)
        for group in args.groups:
            for seed in args.seeds:
                done = finished_trials(Path(args.out), subset, seed)
                arms = [arm for arm in ARM_GROUPS[group] if arm not in done]
                if not arms:
                    continue
                _run(
                    [
                        sys.executable, "jobs/sweep.py",
                        "--cache", str(token_cache(args.out, subset) if group in TOKEN_VIEWS_GROUPS else cache),
                        "--space", SPACE,
                        "--only", ",".join(arms),
                        "--storage", args.out,
                        "--name", sweep_name(subset, seed, group, arms),
                        "--val", str(args.demo / "data"),
                        "--set", f"seed={seed}",
                        "--set", f"epochs={epochs}",
                        "--max-concurrent", str(args.max_concurrent),
                    ]
                )  # fmt: skip


def det_ap(args, run_dir: Path, student: str) -> float | None:
    """The trial's final student evaluated with the data set's person detections (kept in
    the trial's folder, so a rerun reuses it)."""
    from distilpose.evaluate import EvalRequest, detections_file, run_evaluation

    out = run_dir / "eval_det.json"
    if not out.exists():
        boxes = detections_file(str(args.demo / "data"))
        checkpoint = run_dir / "export" / "student_latest.pt"
        if boxes is None or not checkpoint.exists():
            return None
        run_evaluation(
            EvalRequest(
                data=str(args.demo / "data"),
                model=student,
                checkpoint=str(checkpoint),
                boxes=boxes,
                profile="intended",
                out=str(out),
            )
        )
    return float(json.loads(out.read_text())["metrics"]["AP"])


def collect(args, caches: dict[int, Path]) -> list[dict]:
    """One row per finished trial: subset, arm, seed, AP (GT and detector boxes), wall time."""
    from pipeline.sweep import load_space

    student = load_space(str(ROOT / SPACE))[0]["student"]
    rows = []
    for subset, cache in caches.items():
        if not (cache / "manifest.json").exists():
            continue
        instances, epochs = subset_epochs(cache)
        for seed in args.seeds:
            for trial, run_dir in finished_trials(Path(args.out), subset, seed).items():
                epoch_rows = list(csv.DictReader((run_dir / "logs" / "epochs.csv").open()))
                if int(float(epoch_rows[-1]["epoch"])) != epochs:
                    continue  # run with another schedule
                views = arm_views(trial)
                rows.append(
                    {
                        "instances": instances,
                        "epochs": epochs,
                        "trial": trial,
                        "views": views or "",
                        "replays_per_view": round(epochs / views, 1) if views else "",
                        "seed": seed,
                        "AP_gt": float(epoch_rows[-1]["AP"]),
                        "AP_det": det_ap(args, run_dir, student),
                        "train_s": sum(float(e["epoch_time_s"]) for e in epoch_rows),
                    }
                )
    return rows


def _spread(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per (subset, arm): AP mean and spread for both box kinds, and the paired difference to
    online-fresh (same subset, same seed) with its spread."""
    online = {(r["instances"], r["seed"]): r for r in rows if r["trial"] == ONLINE}
    table = []
    for key in sorted({(r["instances"], r["trial"]) for r in rows}, key=_arm_order):
        runs = [r for r in rows if (r["instances"], r["trial"]) == key]
        first = runs[0]
        entry = {
            "instances": key[0],
            "epochs": first["epochs"],
            "trial": key[1],
            "views": first["views"],
            "replays_per_view": first["replays_per_view"],
        }
        for boxes in ("gt", "det"):
            aps = [r[f"AP_{boxes}"] for r in runs if r[f"AP_{boxes}"] is not None]
            diffs = [
                r[f"AP_{boxes}"] - online[(r["instances"], r["seed"])][f"AP_{boxes}"]
                for r in runs
                if (r["instances"], r["seed"]) in online and r[f"AP_{boxes}"] is not None
            ]
            for name, values in (("AP", aps), ("diff", diffs)):
                spread = _spread(values) if values else {}
                for stat in ("mean", "std", "min", "max"):
                    entry[f"{name}_{boxes}_{stat}"] = spread.get(stat, "")
            entry[f"diffs_{boxes}"] = " ".join(f"{d * 100:+.1f}" for d in diffs)
        entry["seeds"] = " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        entry["train_s_mean"] = statistics.fmean(r["train_s"] for r in runs)
        table.append(entry)
    return table


def _arm_order(key: tuple[int, str]) -> tuple:
    instances, trial = key
    order = {ONLINE: 0, "none-fresh": 90, "none-k8": 91}
    return instances, order.get(trial, 1), arm_views(trial) or 0, trial


def replay_study(table: list[dict], steps: int) -> ReplayStudy:
    from pipeline.sweep import load_space

    student = load_space(str(ROOT / SPACE))[0]["student"]
    points = tuple(
        ReplayPoint(
            views=int(r["views"]),
            instances=r["instances"],
            epochs=r["epochs"],
            diff_mean=round(r["diff_gt_mean"], 4),
            diff_std=round(r["diff_gt_std"], 4),
            diff_min=round(r["diff_gt_min"], 4),
            diff_max=round(r["diff_gt_max"], 4),
            seeds=len(r["seeds"].split()),
            remedy=arm_remedy(r["trial"]),
        )
        for r in table
        if is_cache_arm(r["trial"]) and r["diff_gt_mean"] != ""
    )
    subsets = sorted({p.instances for p in points})
    seeds = max((p.seeds for p in points), default=0)
    where = (
        f"{student}, synthetic data, ~{steps} steps, {'/'.join(map(str, subsets))} instances, "
        f"up to {seeds} paired seed(s)"
    )
    return ReplayStudy(student=student, steps=steps, points=points, where=where)


def recommendation_lines(study: ReplayStudy) -> list[str]:
    lines = []
    for epochs in PLANNER_EPOCHS:
        best, checked = study.recommend(epochs)
        seen = ", ".join(
            f"K={k}: {p.diff_mean * 100:+.1f} AP at {p.replays:.0f} replays ({p.instances} inst.)" for k, p in checked
        )
        if best is not None:
            lines.append(f"{epochs} epochs: K={best} ({seen})")
        elif checked:
            lines.append(
                f"{epochs} epochs: no measured K within {WITHIN_AP * 100:.0f} AP ({seen}){remedy_advice(epochs, study)}"
            )
        else:
            lines.append(f"{epochs} epochs: not measured (no K at about {epochs}/K replays yet)")
    return lines


def markdown(table: list[dict]) -> str:
    def ap(r, boxes):
        m = r[f"AP_{boxes}_mean"]
        return f"{m:.3f} ± {r[f'AP_{boxes}_std']:.3f}" if m != "" else ""

    def diff(r, boxes):
        m = r[f"diff_{boxes}_mean"]
        if m == "" or r["trial"] == ONLINE:
            return ""
        return f"{m * 100:+.1f} ± {r[f'diff_{boxes}_std'] * 100:.1f} ({r[f'diffs_{boxes}']})"

    lines = [
        "| instances | epochs | arm | replays/view | seeds | AP (GT boxes) | paired diff vs online, AP points "
        "(per seed) | AP (det. boxes) | paired diff (det.) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['instances']} | {r['epochs']} | {r['trial']} | {r['replays_per_view']} | {r['seeds']} "
            f"| {ap(r, 'gt')} | {diff(r, 'gt')} | {ap(r, 'det')} | {diff(r, 'det')} | {r['train_s_mean']:.0f} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], title: str, path: Path) -> None:
    """Paired difference to online-fresh (GT boxes) against replays per view, one line per K;
    the matched no-distillation baselines as horizontal marks per subset."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.4))
    ax = fig.add_subplot()
    cached = [r for r in table if is_cache_arm(r["trial"]) and not arm_remedy(r["trial"]) and r["diff_gt_mean"] != ""]
    for i, k in enumerate(sorted({r["views"] for r in cached})):
        pts = sorted((r for r in cached if r["views"] == k), key=lambda r: r["replays_per_view"])
        ax.errorbar(
            [r["replays_per_view"] for r in pts],
            [r["diff_gt_mean"] * 100 for r in pts],
            yerr=[
                [(r["diff_gt_mean"] - r["diff_gt_min"]) * 100 for r in pts],
                [(r["diff_gt_max"] - r["diff_gt_mean"]) * 100 for r in pts],
            ],
            marker="o",
            capsize=3,
            color=f"C{i}",
            label=f"cache K={k} (min-max over seeds)",
        )
    remedy_marks = {
        "--label-flip": ("*", "cache K + label-side flip (at the stored views' replay count)"),
        f"--token-views {TOKEN_VIEWS}": ("D", f"cache K, tokens on views 0..{TOKEN_VIEWS - 1} only"),
    }
    for remedy, (marker, label) in remedy_marks.items():
        points = [
            r
            for r in table
            if is_cache_arm(r["trial"]) and arm_remedy(r["trial"]) == remedy and r["diff_gt_mean"] != ""
        ]
        if points:
            ax.scatter(
                [r["replays_per_view"] for r in points],
                [r["diff_gt_mean"] * 100 for r in points],
                marker=marker,
                s=90 if marker == "*" else 40,
                color="k",
                zorder=3,
                label=label,
            )
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.axhspan(-WITHIN_AP * 100, 0.0, color="C2", alpha=0.1, label=f"within {WITHIN_AP * 100:.0f} AP")
    ax.axvline(300 / 8, color="C7", linestyle=":", label="300 epochs at K=8 (37 replays)")
    for r in table:
        if r["trial"] == "none-fresh" and r["diff_gt_mean"] != "":
            ax.axhline(r["diff_gt_mean"] * 100, color="C7", linestyle="--", linewidth=0.8)
    ax.plot([], [], color="C7", linestyle="--", linewidth=0.8, label="no distillation, fresh views (per subset)")
    ax.set_xscale("log")
    ax.set_xlabel("replays per cached view (epochs / K)")
    ax.set_ylabel("AP - online-fresh AP, paired by seed (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def results_block(table: list[dict], check: dict, study: ReplayStudy, recommendations: list[str]) -> str:
    lines = [
        f"Teacher check: {check['line']}.",
        "",
        markdown(table),
        "",
        f"![paired difference vs replays per view]({NAME}.png)",
        "",
        "Recommended cached views (the smallest K whose measured paired difference at epochs / K replays is "
        f"within {WITHIN_AP * 100:.0f} AP or better; `pipeline.premise.ReplayStudy.recommend`, what the planner "
        "prints):",
        "",
    ]
    lines += [f"- {line}" for line in recommendations]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo", help="make demo's folder (data, teacher)")
    p.add_argument("--teacher", default="tokenpose-tiny")
    p.add_argument("--out", default=str(ROOT / "runs" / "replay"), help="study folder (caches, sweeps)")
    p.add_argument("--subsets", type=_ints, default=[128, 512, 256], help="training subsets (instances), in order")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="seeds per subset, in order")
    p.add_argument(
        "--groups",
        type=lambda text: [g for g in text.split(",") if g],
        default=[g for g in ARM_GROUPS if g not in OPTIONAL_GROUPS],
        help="arm groups to run, in order ("
        + "; ".join(f"{g}: {' + '.join(a)}" for g, a in ARM_GROUPS.items())
        + f"); default all but {', '.join(OPTIONAL_GROUPS)}",
    )
    p.add_argument("--cache-seed", type=int, default=0, help="the caches' view seed")
    p.add_argument("--shard-instances", type=int, default=32)
    p.add_argument("--cache-workers", type=int, default=2)
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (one CPU each)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="the page, table and plot")
    p.add_argument("--studies", type=Path, default=STUDIES, help="the planner's summary (package data)")
    p.add_argument("--report-only", action="store_true", help="only re-read the finished trials")
    args = p.parse_args(argv)
    unknown = [g for g in args.groups if g not in ARM_GROUPS]
    if unknown:
        p.error(f"--groups: unknown group(s) {', '.join(unknown)}; choose from {', '.join(ARM_GROUPS)}")

    if not (args.demo / "teacher" / "teacher.pt").exists():
        p.error(f"{args.demo}/teacher/teacher.pt does not exist: run `make demo` first (or pass --demo)")
    print(f"[study] teacher {args.teacher} val AP {teacher_val_ap(args.demo):.3f} (GT boxes)", flush=True)
    check = teacher_check(args, min(args.subsets))
    print(f"[study] {check['line']}", flush=True)
    if check["ratio"] < MIN_PCK_RATIO:
        print(
            f"[study] the teacher's augmented-view PCK is below {MIN_PCK_RATIO:.0%} of its view-0 PCK: its targets "
            "on augmented crops are not trustworthy, so neither is this study. Train it with augmentation "
            "(jobs/train_teacher.py --recipe fast-aug; make demo does). Stopping.",
            flush=True,
        )
        return 1
    caches = build_caches(args)
    if not args.report_only:
        run_sweeps(args, caches)
    # The report covers every subset and seed the study folder holds, not only this run's:
    # a run of one more subset must not drop the others from the docs and the planner's data.
    report = argparse.Namespace(**{**vars(args), "seeds": recorded_seeds(Path(args.out), args.seeds)})
    rows = collect(report, {**recorded_caches(Path(args.out)), **caches})
    if not rows:
        print("[study] no finished trial yet", flush=True)
        return 1
    table = summarize(rows)
    study = replay_study(table, TARGET_STEPS)
    args.docs.mkdir(parents=True, exist_ok=True)
    write_csv(table, args.docs / f"{NAME}.csv")
    plot(table, f"{NAME}: {study.where}", args.docs / f"{NAME}.png")
    recommendations = recommendation_lines(study)
    summary = {**study.to_json(), "teacher_check": check, "recommendations": recommendations}
    args.studies.mkdir(parents=True, exist_ok=True)
    (args.studies / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    C.write_docs_block(args.docs / f"{NAME}.md", "study_replay", results_block(table, check, study, recommendations))
    print(markdown(table))
    for line in recommendations:
        print(f"[study] recommended views for {line}")
    print(f"[study] wrote {args.docs / NAME}.csv, .png, the results in .md; {args.studies / NAME}.json (the planner's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
