"""(a) Caching throughput vs the bare teacher forward, same inputs, same workers.

    python bench/bench_cache_throughput.py [--quick] [--paper]

Measured side by side, interleaved (bare, job, bare, job, ...):

- job:  the full Ray Data cache job (`pipeline.teacher_stage.run_cache_job`, workers=1,
        zarr, real crop tasks, teacher actor, Gaussian fit, encoding, atomic shard commits,
        manifest) on a synthetic COCO set, into a fresh output each repetition;
- bare: a plain loop of the same teacher (same seeded, BatchNorm-calibrated weights) over
        the same crops (precomputed with the job's own `crop_shard`), same batch size,
        same torch thread count as the job's teacher actor: `model(normalize_batch(crops))`.

Reported views/s and ratios:
- end to end: views / run_cache_job wall (planning, Ray Data start, actor start with its
  teacher build, every shard, finalize; `ray.init` is reported apart, it is paid once per
  driver and not per job);
- steady state: views of shards 2..n / (commit time of shard n - commit time of shard 1),
  from the commit records' mtimes, i.e. what the pipeline sustains once it is running;
- a per-view breakdown (same process, same threads) of where a view's time goes: crop,
  normalize + forward, Gaussian fit + copies, encode, shard write, and the steady rate the
  stage layout predicts (crop tasks and the teacher actor each hold one of the 2 CPUs).

--paper adds the paper teacher (tokenpose-w48, ~17 GFLOPs/view) on a few views.
Results: runs/bench/cache_throughput.json (cache_throughput_paper.json with --paper); the
jobs' own output goes to runs/bench/cache_throughput-<teacher>-jobs.log.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np

NAME = "cache_throughput"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller data set, one repetition (smoke run)")
    p.add_argument("--paper", action="store_true", help="also measure the paper teacher tokenpose-w48 (slow)")
    p.add_argument("--images", type=int, help="synthetic train images (~2 persons each)")
    p.add_argument("--views", type=int, help="views per instance for the tiny teacher")
    p.add_argument("--shard-instances", type=int, default=32, help="instances per shard (each stored per view)")
    p.add_argument("--batch-size", type=int, default=32, help="teacher batch size (the job's default: 32)")
    p.add_argument("--reps", type=int, help="interleaved repetitions of (bare, job)")
    p.add_argument("--paper-instances", type=int, default=12, help="instances for --paper (x --paper-views views)")
    p.add_argument("--paper-views", type=int, default=4)
    p.add_argument("--paper-shard-instances", type=int, default=4)
    p.add_argument("--paper-batch-size", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the temporary data and caches")
    args = p.parse_args()
    args.images = args.images or (40 if args.quick else 120)
    args.views = args.views or (4 if args.quick else 8)
    args.reps = args.reps or (1 if args.quick else 2)
    return args


# ----------------------------------------------------------------------------- pieces


def plan(data: str, teacher: str, views: int, shard_instances: int, limit: int | None):
    """The job's own shard plan (same instances, same order, same membership)."""
    from distilpose.data.coco import load_instances
    from distilpose.models import get_config
    from pipeline.dataset_layout import resolve_layout
    from pipeline.teacher_stage import plan_shards

    layout = resolve_layout(data, "train", None, None)
    instances, _ = load_instances(layout.ann_file, split_kind="train", input_size=get_config(teacher).input_size)
    if limit:
        instances = sorted(instances, key=lambda inst: inst.instance_id)[:limit]
    return layout, plan_shards(instances, shard_instances, views)


def precompute_crops(layout, shards, input_size, seed: int = 0, store_crops: str = "none") -> tuple[list[dict], float]:
    """Every shard's crop rows, made by the job's crop task function; and its seconds."""
    from pipeline.teacher_stage import crop_shard, instance_to_json

    rows, start = [], time.perf_counter()
    for shard in shards:
        batch = {
            "shard": np.asarray([shard.index]),
            "instances": np.asarray([json.dumps([instance_to_json(i) for i in shard.instances])], dtype=object),
            "views": np.asarray([json.dumps(list(shard.views))], dtype=object),
        }
        rows.append(
            crop_shard(
                batch,
                image_root=layout.image_root,
                input_size=input_size,
                seed=seed,
                store_crops=store_crops,
            )
        )
    return rows, time.perf_counter() - start


def actor_threads(workers: int, cpus_per_worker: float) -> int:
    """The torch thread count `_run_pipeline` gives each CPU teacher actor."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    cpus = total / workers if workers * cpus_per_worker >= total else cpus_per_worker
    return max(1, round(cpus))


def bare_forward(model, crops: np.ndarray, batch_size: int) -> None:
    import torch

    from distilpose.data.transforms import normalize_batch

    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            model(normalize_batch(crops[start : start + batch_size]))


def commit_times(out: str) -> list[tuple[float, int]]:
    """(commit record mtime, rows) per committed shard, in commit order."""
    commits = Path(out) / "commits"
    found = []
    for path in commits.glob("shard-*.json"):
        record = json.loads(path.read_text())
        found.append((path.stat().st_mtime, int(record["shard"]["rows"])))
    return sorted(found)


def run_job(cfg, log: io.StringIO) -> dict:
    from pipeline.teacher_stage import run_cache_job

    started = time.time()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        summary = run_cache_job(cfg)
    wall = time.perf_counter() - t0
    commits = commit_times(cfg.out)
    views = summary.rows
    steady = None
    if len(commits) >= 3:
        span = commits[-1][0] - commits[0][0]
        steady = sum(rows for _, rows in commits[1:]) / span if span > 0 else None
    return {
        "wall_s": wall,
        "views": views,
        "views_per_s": views / wall,
        "steady_views_per_s": steady,
        "shards": len(commits),
        "first_commit_s": commits[0][0] - started if commits else None,
        "after_last_commit_s": time.time() - commits[-1][0] if commits else None,
        "commit_offsets_s": [round(t - started, 3) for t, _ in commits],
        "complete": summary.complete,
    }


def breakdown(model, crop_rows: list[dict], crop_s: float, spec, batch_size: int, tmp: str) -> dict:
    """Seconds per view of each step a view goes through, measured in this process: the
    teacher actor's work (`run_teacher` = normalize + forward, then Gaussian fit and numpy
    copies; `encode_shard_rows`) split into its parts, and the sink's shard write."""
    import torch

    from distilpose.teacher_forward import run_teacher
    from pipeline.cache import open_writer
    from pipeline.teacher_stage import encode_shard_rows

    views = sum(len(r["image"]) for r in crop_rows)
    timings: dict[str, float] = {}
    t_encode = t_write = 0.0
    writer = open_writer(tempfile.mkdtemp(prefix="breakdown-", dir=tmp), spec, "zarr")
    for index, rows in enumerate(crop_rows):
        images = rows["image"][rows["valid"]]
        outputs = run_teacher(model, images, batch_size, torch.device("cpu"), timings=timings)
        t0 = time.perf_counter()
        encoded = encode_shard_rows(rows, outputs, spec)
        t1 = time.perf_counter()
        record = {k: v for k, v in encoded.items() if k not in ("shard", "shard_rows", "valid", "skip_reason")}
        writer.write_shard(index, record)
        t_encode += t1 - t0
        t_write += time.perf_counter() - t1
    t_fwd, t_fit = timings.get("forward", 0.0), timings.get("fit", 0.0)
    per_view = {
        "crop (crop task)": crop_s / views,
        "normalize+forward (actor)": t_fwd / views,
        "fit+copies (actor)": t_fit / views,
        "encode (actor)": t_encode / views,
        "write+commit (sink)": t_write / views,
    }
    actor = (t_fwd + t_fit + t_encode) / views
    crop, write = per_view["crop (crop task)"], per_view["write+commit (sink)"]
    # Two CPUs: crop tasks and the actor each hold one; writes squeeze in beside them.
    predicted = min(1 / actor, 1 / crop, 2 / (actor + crop + write))
    return {
        "views": views,
        "ms_per_view": {k: 1e3 * v for k, v in per_view.items()},
        "actor_ms_per_view": 1e3 * actor,
        "predicted_steady": predicted,
    }


def measure_teacher(name: str, data: str, tmp: str, *, views, shard_instances, batch_size, limit, reps) -> dict:
    from distilpose.models import get_config
    from pipeline.cache.schema import CacheSpec
    from pipeline.teacher_stage import CacheJobConfig

    print(f"\n== {name}: {views} views/instance, shards of {shard_instances} instances, batch {batch_size}", flush=True)
    config = get_config(name)
    threads = actor_threads(workers=1, cpus_per_worker=1.0)
    C.set_threads(threads)
    model = C.calibrated_teacher(name)
    checkpoint = C.save_teacher_checkpoint(model, os.path.join(tmp, f"{name}.pt"))
    layout, shards = plan(data, name, views, shard_instances, limit)
    crop_rows, crop_s = precompute_crops(layout, shards, tuple(config.input_size))
    crops = np.concatenate([r["image"][r["valid"]] for r in crop_rows])
    print(f"  {len(crops)} views in {len(shards)} shards; teacher actor threads = bare threads = {threads}", flush=True)
    bare_forward(model, crops[:batch_size], batch_size)  # warm-up (allocator, kernels)

    log = io.StringIO()
    jobs: list[dict] = []
    counter = iter(range(1_000_000))

    def job() -> None:
        cfg = CacheJobConfig(
            data=data,
            teacher=name,
            out=os.path.join(tmp, f"cache-{name}-{next(counter)}"),
            checkpoint=checkpoint,
            format="zarr",
            views=views,
            batch_size=batch_size,
            workers=1,
            shard_instances=shard_instances,
            limit=limit,
        )
        jobs.append(run_job(cfg, log))

    times = C.interleaved(
        {"bare": lambda: bare_forward(model, crops, batch_size), "job": job}, reps=reps, warmup=0, label=name
    )
    (C.RESULTS_DIR / f"{NAME}-{name}-jobs.log").write_text(log.getvalue())
    if not all(j["complete"] and j["views"] == len(crops) for j in jobs):
        raise RuntimeError(f"a cache job did not cache all {len(crops)} views: {jobs}\n{log.getvalue()[-3000:]}")
    print("  per-view breakdown (in-process, same threads) ...", flush=True)
    parts = breakdown(model, crop_rows, crop_s, CacheSpec.from_model_config(config), batch_size, tmp)

    n = len(crops)
    bare_rate = n / C.median(times["bare"])
    e2e = C.median([j["views_per_s"] for j in jobs])
    steady_values = [j["steady_views_per_s"] for j in jobs if j["steady_views_per_s"]]
    steady = C.median(steady_values) if steady_values else None
    # Fixed cost of a job: its wall time minus what its views take at the steady rate.
    overhead = C.median([j["wall_s"] - j["views"] / steady for j in jobs]) if steady else None
    return {
        "teacher": name,
        "views": n,
        "views_per_instance": views,
        "shards": len(shards),
        "shard_instances": shard_instances,
        "batch_size": batch_size,
        "threads": threads,
        "workers": 1,
        "reps": reps,
        "bare_s": times["bare"],
        "job_s": times["job"],
        "bare_views_per_s": bare_rate,
        "job_views_per_s_e2e": e2e,
        "job_views_per_s_steady": steady,
        "ratio_e2e": e2e / bare_rate,
        "ratio_steady": steady / bare_rate if steady else None,
        # Each job ran right after a bare loop: per-round ratios share the machine's load.
        "ratio_steady_paired": C.median(
            [j["steady_views_per_s"] * b / n for j, b in zip(jobs, times["bare"]) if j["steady_views_per_s"]]
        )
        if steady
        else None,
        "ratio_e2e_paired": C.median([b / j["wall_s"] for j, b in zip(jobs, times["bare"])]),
        "fixed_overhead_s": overhead,
        "views_for_goal_e2e": views_for_ratio(0.85, bare_rate, steady, overhead),
        "jobs": jobs,
        "breakdown": parts,
    }


def views_for_ratio(goal: float, bare: float, steady: float | None, overhead: float | None) -> float | None:
    """Views a job needs for its end-to-end rate N / (overhead + N / steady) to reach
    goal x bare; None when the steady rate itself is below that (never reached)."""
    if not steady or overhead is None or steady <= goal * bare:
        return None
    return goal * bare * max(overhead, 0.0) / (1 - goal * bare / steady)


# ----------------------------------------------------------------------------- main


def report(results: list[dict], ray_init_s: float) -> str:
    lines = []
    rows = []
    for r in results:
        job0 = r["jobs"][0]
        rows.append(
            {
                "teacher": r["teacher"],
                "views": r["views"],
                "shards": r["shards"],
                "batch": r["batch_size"],
                "threads": r["threads"],
                "bare v/s": r["bare_views_per_s"],
                "job e2e v/s": r["job_views_per_s_e2e"],
                "job steady v/s": r["job_views_per_s_steady"],
                "ratio e2e": r["ratio_e2e"],
                "ratio steady": r["ratio_steady"],
                "paired steady": r["ratio_steady_paired"],
                "1st commit s": job0["first_commit_s"],
                "job wall s": C.median(r["job_s"]),
            }
        )
    lines.append(C.table(rows))
    lines.append(f"ray.init (once per driver, not in the job figures): {ray_init_s:.2f} s")
    for r in results:
        b = r["breakdown"]
        ms = b["ms_per_view"]
        lines.append(f"\n{r['teacher']}: ms per view, measured in-process ({r['threads']} thread(s))")
        lines.append(C.table([{"step": k, "ms/view": v, "share": v / sum(ms.values())} for k, v in ms.items()]))
        lines.append(
            f"teacher actor total {b['actor_ms_per_view']:.3g} ms/view vs bare loop "
            f"{1e3 / r['bare_views_per_s']:.3g} ms/view"
        )
        lines.append(
            f"predicted steady rate from the stage layout (crop task || teacher actor on 2 CPUs): "
            f"{b['predicted_steady']:.1f} views/s = {b['predicted_steady'] / r['bare_views_per_s']:.2f} x bare"
        )
        steady = r["ratio_steady"]
        need = r["views_for_goal_e2e"]
        if r["fixed_overhead_s"] is not None:
            lines.append(
                f"fixed cost per job (wall - views/steady rate: Ray Data start, actor start + teacher build, "
                f"first crops, finalize): {r['fixed_overhead_s']:.1f} s; end-to-end ratio reaches 0.85 from "
                + (f"~{need:,.0f} views per job" if need else "never (steady rate below 0.85 x bare)")
            )
        lines.append(
            f"ratio caching/bare: end to end {r['ratio_e2e']:.2f} ({C.verdict(r['ratio_e2e'], 0.85)}), "
            + (f"steady state {steady:.2f} ({C.verdict(steady, 0.85)})" if steady else "steady state n/a (< 3 shards)")
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="cache-throughput-", dir=C.RESULTS_DIR)
    # A private Ray temp dir: no other user's plain ray.init() can join this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        from distilpose.data.synthetic import make_synthetic_coco
        from pipeline.ray_env import init_ray

        data = os.path.join(tmp, "data")
        synth = make_synthetic_coco(data, args.images, 1, seed=0)
        print(f"synthetic data: {synth.images['train']} images, {synth.persons['train']} persons", flush=True)
        t0 = time.perf_counter()
        init_ray()
        ray_init_s = time.perf_counter() - t0
        results = [
            measure_teacher(
                "tokenpose-tiny",
                data,
                tmp,
                views=args.views,
                shard_instances=args.shard_instances,
                batch_size=args.batch_size,
                limit=None,
                reps=args.reps,
            )
        ]
        if args.paper:
            results.append(
                measure_teacher(
                    "tokenpose-w48",
                    data,
                    tmp,
                    views=args.paper_views,
                    shard_instances=args.paper_shard_instances,
                    batch_size=args.paper_batch_size,
                    limit=args.paper_instances,
                    reps=args.reps,
                )
            )
        text = report(results, ray_init_s)
        print("\n" + text)
        payload = {"context": C.context(ray_init_s=ray_init_s), "results": results, "report": text}
        C.write_results(NAME + ("_paper" if args.paper else ""), payload)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
