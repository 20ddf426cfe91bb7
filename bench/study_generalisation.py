"""The paper's generalisation table at demo scale: a heatmap teacher without tokens
(SimpleBaseline) and a DeepPose regression student, with and without Simulated Heatmaps.

    python bench/study_generalisation.py                 # data, teacher, cache, sweep, report
    python bench/study_generalisation.py --report-only   # re-read the finished trials

Four phases, each resumable (a rerun reuses what is done), each a job run as a user would:

1. data: `jobs/make_synthetic.py` (the demo's synthetic COCO, smaller).
2. teacher: `jobs/train_teacher.py --teacher simplebaseline-tiny --recipe fast-aug`, a fixed
   number of epochs, evaluated on val (its AP is the teacher row).
3. cache: `jobs/cache_teacher.py`: heatmaps, Gaussians and confidences only (no tokens).
4. sweep: `jobs/sweep.py` with sweeps/generalisation-tiny.yaml: deeppose-tiny without a teacher
   (L_reg) and with Simulated Heatmaps (L_reg + L_SH + L_CS), each over the seeds; both start
   their ResNet from the teacher's (the same architecture), as DistilPose-L starts from its
   teacher's HRNet.

The report, docs/generalisation.json and docs/generalisation.md (written here, never by
hand), puts the val AP (mean, spread and per seed) beside the paper's row: SimpleBaseline-R50
teacher 70.4 AP; DeepPose-R50 52.6 AP, with Simulated Heatmaps 59.7 AP. Every phase does a
fixed amount of work (images, epochs, seeds); only the wall times depend on the machine.
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

TEACHER = "simplebaseline-tiny"
SPACE = "sweeps/generalisation-tiny.yaml"
# The paper's row (DistilPose, Table "generalisation", COCO val, 256x192).
PAPER = {
    "teacher": {"model": "SimpleBaseline-R50", "AP": 70.4},
    "student": {"model": "DeepPose-R50", "AP": 52.6},
    "student_sh": {"model": "DeepPose-R50 + Simulated Heatmaps", "AP": 59.7},
}
TRIALS = {"deeppose": "student", "deeppose+sh": "student_sh"}


def _run(cmd: list[str]) -> float:
    """Run a job as a user would; returns its wall seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def commands(args) -> dict[str, list[str]]:
    out = Path(args.out)  # as given: the commands run from the repository root
    data, teacher = out / "data", out / "teacher"
    py = "python"
    return {
        "data": [py, "jobs/make_synthetic.py", "--out", str(data), "--train", str(args.train_images)]
        + ["--val", str(args.val_images), "--seed", "0"],
        "teacher": [py, "jobs/train_teacher.py", "--data", str(data), "--teacher", TEACHER, "--recipe", "fast-aug"]
        + ["--epochs", str(args.teacher_epochs), "--out", str(teacher)],
        "cache": [py, "jobs/cache_teacher.py", "--data", str(data), "--teacher", TEACHER]
        + ["--checkpoint", str(teacher / "teacher.pt"), "--out", str(out / "cache"), "--views", str(args.views)]
        + ["--shard-instances", str(args.shard_instances)],
        "sweep": [py, "jobs/sweep.py", "--cache", str(out / "cache"), "--space", SPACE, "--storage", str(out)]
        + ["--name", "sweep", "--val", str(data), "--set", f"init_backbone={teacher / 'teacher.pt'}"]
        + ["--set", f"epochs={args.student_epochs}", "--max-concurrent", str(args.max_concurrent)],
    }


def study_dir(args) -> Path:
    """The study folder; a relative --out is below the repository (the jobs run from there)."""
    return ROOT / args.out


def run_phases(args) -> dict[str, float]:
    out = study_dir(args)
    times_path = out / "phase_times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    done = {
        "data": (out / "data" / "annotations" / "person_keypoints_val.json").exists(),
        "teacher": (out / "teacher" / "eval.json").exists(),
        "cache": (out / "cache" / "manifest.json").exists()
        and json.loads((out / "cache" / "manifest.json").read_text()).get("complete", False),
        "sweep": False,  # a finished sweep reruns nothing (Tune restores it)
    }
    for phase, cmd in commands(args).items():
        if done[phase]:
            print(f"[study] {phase}: reusing {out}", flush=True)
            continue
        seconds = _run([sys.executable, *cmd[1:]])
        times.setdefault(phase, round(seconds, 1))  # the run that did the work, not a later no-op rerun
        out.mkdir(parents=True, exist_ok=True)
        times_path.write_text(json.dumps(times, indent=2) + "\n")
    return times


def teacher_ap(out: Path) -> float:
    metrics = json.loads((out / "teacher" / "eval.json").read_text())["metrics"]
    return float(next(v["AP"] for k, v in metrics.items() if "gt" in k))


def collect(out: Path) -> dict[str, list[dict]]:
    """Finished trials by configuration: per seed the val AP and the training wall time."""
    results = out / "sweep" / "results.csv"
    by_config: dict[str, list[dict]] = {}
    for row in csv.DictReader(results.open()) if results.exists() else []:
        if row.get("AP") in ("", None) or row.get("error"):
            continue
        name, _, seed = row["trial"].rpartition("-seed")
        epochs = list(csv.DictReader((out / "sweep" / "runs" / row["trial"] / "logs" / "epochs.csv").open()))
        by_config.setdefault(name, []).append(
            {
                "seed": int(seed),
                "AP": float(row["AP"]),
                "epochs": int(float(row["epoch"])),
                "train_s": round(sum(float(e["epoch_time_s"]) for e in epochs), 1),
            }
        )
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in by_config.items()}


def summarize(by_config: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name in TRIALS:
        runs = by_config.get(name, [])
        if not runs:
            continue
        aps = [r["AP"] for r in runs]
        rows.append(
            {
                "configuration": name,
                "runs": len(runs),
                "AP_mean": round(statistics.fmean(aps), 4),
                "AP_std": round(statistics.stdev(aps), 4) if len(aps) > 1 else 0.0,
                "AP_min": min(aps),
                "AP_max": max(aps),
                "per_seed": runs,
            }
        )
    return rows


def markdown(study: dict) -> str:
    t, rows = study["teacher"], {r["configuration"]: r for r in study["students"]}
    lines = [
        "# Generalisation: a heatmap teacher without tokens, a DeepPose student",
        "",
        f"Written by `bench/study_generalisation.py` ({study['when']}); numbers from `docs/generalisation.json`.",
        "",
        f"Demo scale: synthetic data ({study['setup']['train_images']} train / {study['setup']['val_images']} val "
        f"images), teacher `{TEACHER}` ({study['setup']['teacher_epochs']} epochs), cache of "
        f"{study['setup']['views']} views with heatmaps, Gaussians and confidences only, student `deeppose-tiny` "
        f"({study['setup']['student_epochs']} epochs, backbone from the teacher's ResNet), seeds "
        f"{', '.join(map(str, study['setup']['seeds']))}. val AP on GT boxes (pycocotools), flip test.",
        "",
        "| model | demo scale: val AP, 0-1 (mean, min-max over seeds) | paper: COCO val AP, % |",
        "|---|---|---|",
        f"| teacher: SimpleBaseline | {t['AP']:.3f} (`{TEACHER}`) | {PAPER['teacher']['AP']} "
        f"({PAPER['teacher']['model']}) |",
    ]
    for name, key in TRIALS.items():
        r = rows.get(name)
        ours = f"{r['AP_mean']:.3f} ({r['AP_min']:.3f}-{r['AP_max']:.3f}, {r['runs']} runs)" if r else "not run"
        lines.append(f"| {PAPER[key]['model'].replace('-R50', '')} | {ours} | {PAPER[key]['AP']} |")
    if study.get("gain") is not None:
        paper_gain = PAPER["student_sh"]["AP"] - PAPER["student"]["AP"]
        lines.append(
            f"| gain from Simulated Heatmaps | {study['gain']:+.3f} ({study['ratio']:.1f}x) | {paper_gain:+.1f} |"
        )
    lines += ["", "Per seed (val AP):", ""]
    for r in study["students"]:
        seeds = ", ".join(f"seed {s['seed']}: {s['AP']:.3f}" for s in r["per_seed"])
        lines.append(f"- {r['configuration']}: {seeds}")
    lines += ["", "Commands (each phase reused when its output exists):", "", "```"]
    lines += [" ".join(cmd) for cmd in study["commands"].values()]
    lines += ["```", "", f"Wall seconds per phase on this machine: {study['phase_times']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/generalisation", help="study folder (relative: below the repository)")
    p.add_argument("--train-images", type=int, default=300)
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--shard-instances", type=int, default=64)
    p.add_argument("--student-epochs", type=int, default=20)
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (one CPU each)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    p.add_argument("--report-only", action="store_true", help="only re-read the finished trials")
    args = p.parse_args(argv)

    out = study_dir(args)
    times = {} if args.report_only else run_phases(args)
    if args.report_only and (out / "phase_times.json").exists():
        times = json.loads((out / "phase_times.json").read_text())
    from pipeline.sweep import load_space

    seeds = sorted({int(t["seed"]) for t in load_space(str(ROOT / SPACE))})
    students = summarize(collect(out))
    if not students:
        print("[study] no finished trial yet", flush=True)
        return 1
    by_name = {r["configuration"]: r for r in students}
    both = {"deeppose", "deeppose+sh"} <= set(by_name)
    gain = round(by_name["deeppose+sh"]["AP_mean"] - by_name["deeppose"]["AP_mean"], 4) if both else None
    ratio = round(by_name["deeppose+sh"]["AP_mean"] / max(by_name["deeppose"]["AP_mean"], 1e-9), 2) if both else None
    study = {
        "when": time.strftime("%Y-%m-%d"),
        "setup": {
            "train_images": args.train_images,
            "val_images": args.val_images,
            "teacher": TEACHER,
            "teacher_epochs": args.teacher_epochs,
            "views": args.views,
            "student": "deeppose-tiny",
            "student_epochs": args.student_epochs,
            "seeds": seeds,
            "space": SPACE,
        },
        "teacher": {"preset": TEACHER, "AP": round(teacher_ap(out), 4)},
        "students": students,
        "gain": gain,
        "ratio": ratio,
        "paper": PAPER,
        "commands": commands(args),
        "phase_times": times,
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "generalisation.json").write_text(json.dumps(study, indent=2) + "\n")
    text = markdown(study)
    (args.docs / "generalisation.md").write_text(text)
    print(text)
    print(f"[study] wrote {args.docs / 'generalisation.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
