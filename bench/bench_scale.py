"""How cost grows with the data set: 1k, 4k, 16k and 32k instances, local and S3 (moto).

    python bench/bench_scale.py                       # the fixed sizes below, local + S3
    python bench/bench_scale.py --sizes 1000,4000 --stores local   # a part of it

Per size and store, on synthetic instances (one rendered pool of images, its annotations
replicated under new image and instance ids, so every size reads the same image files):

- cache build: the real job (`run_cache_job`: Ray Data, tokenpose-tiny teacher, untrained
  seeded weights, 1 view per instance, 1 teacher actor, zarr, 256-view shards), wall seconds
  and CPU seconds of this process and every process below it (Ray's raylet, workers and
  actors; sampled from /proc every 0.5 s, so a process living < 0.5 s is missed) - the
  machine is shared, so CPU seconds are the steadier figure; the moto server's own CPU is
  reported apart;
- what it wrote: bytes, object count, manifest bytes;
- one student epoch read through the training loader (`CachedViewStream`: shard reads, the
  paper loss's teacher fields, crop rebuild from the images; batch 32, no prefetch thread),
  wall and CPU seconds;
- `pipeline.plan.estimate` for the same size beside the measured bytes and objects.

Per-instance figures should stay flat (within 20% of the smallest size's). Writes
docs/scale.png, docs/scale.csv (beside the PNG) and runs/bench/scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.ROOT / "tests"))
from local_services import moto_server, proc_stats  # noqa: E402  (shared with the tests)

NAME = "scale"
SIZES = (1000, 4000, 16000, 32000)
TEACHER, STUDENT = "tokenpose-tiny", "distilpose-tiny"
POOL_IMAGES = 64
BATCH = 32


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="instances per run, comma-separated")
    p.add_argument("--stores", default="local,s3")
    p.add_argument("--png", default=str(C.ROOT / "docs" / "scale.png"))
    p.add_argument("--resume", action="store_true", help="keep the rows of runs/bench/scale.json, run the others")
    p.add_argument("--plot-only", action="store_true", help="table and PNG again from runs/bench/scale.json")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.stores = [s for s in args.stores.split(",") if s]
    return args


# ----------------------------------------------------------------------------- CPU accounting


def _cpu_seconds_by_pid() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, user + system CPU seconds)} of every process we may read."""
    tick = os.sysconf("SC_CLK_TCK")
    return {pid: (int(f[1]), (int(f[11]) + int(f[12])) / tick) for pid, f in proc_stats().items()}


class TreeCpu:
    """CPU seconds of a process and all its descendants between start() and stop(), and of
    the processes in `apart`, counted separately (and not in the tree)."""

    def __init__(self, root: int, apart: tuple[int, ...] = (), interval_s: float = 0.5):
        self.root, self.apart, self.interval_s = root, set(apart), interval_s
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.stop_event = threading.Event()

    def _sample(self) -> None:
        procs = _cpu_seconds_by_pid()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = set(), [self.root, *self.apart]
        while todo:
            pid = todo.pop()
            if pid in procs and pid not in tree:
                tree.add(pid)
                todo += children.get(pid, [])
        initial = not self.last
        for pid in tree:
            # A process first seen after the initial sample was started while measuring.
            self.first.setdefault(pid, procs[pid][1] if initial else 0.0)
            self.last[pid] = procs[pid][1]

    def __enter__(self) -> TreeCpu:
        self._sample()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self._sample()

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self._sample()

    def seconds(self) -> tuple[float, float]:
        """(tree CPU seconds, `apart` CPU seconds) used while measuring."""
        used = {pid: self.last[pid] - self.first[pid] for pid in self.last}
        apart = sum(v for pid, v in used.items() if pid in self.apart)
        return sum(used.values()) - apart, apart


# ----------------------------------------------------------------------------- data


def replicate(pool: str, out: str, instances: int) -> str:
    """A synthetic data set of exactly `instances` people: the pool's train annotations
    repeated under new image and annotation ids, image files shared (symlinked)."""
    source = json.loads(Path(pool, "annotations", "person_keypoints_train.json").read_text())
    people = [a for a in source["annotations"] if a.get("num_keypoints", 1) > 0 and not a.get("iscrowd")]
    by_image: dict[int, list[dict]] = {}
    for ann in people:
        by_image.setdefault(ann["image_id"], []).append(ann)
    images, annotations, round_ = [], [], 0
    while len(annotations) < instances:
        for image in source["images"]:
            for ann in by_image.get(image["id"], []):
                if len(annotations) == instances:
                    break
                if not annotations or annotations[-1]["image_id"] != image["id"] + round_ * 10**6:
                    images.append({**image, "id": image["id"] + round_ * 10**6})
                annotations.append({**ann, "id": len(annotations) + 1, "image_id": image["id"] + round_ * 10**6})
        round_ += 1
    Path(out, "annotations").mkdir(parents=True, exist_ok=True)
    Path(out, "annotations", "person_keypoints_train.json").write_text(
        json.dumps({**source, "images": images, "annotations": annotations})
    )
    os.symlink(os.path.abspath(os.path.join(pool, "images")), os.path.join(out, "images"))
    return out


# ----------------------------------------------------------------------------- one run


def build(data: str, out: str, checkpoint: str, moto_pid: int | None) -> dict:
    from pipeline.teacher_stage import CacheJobConfig, run_cache_job

    cfg = CacheJobConfig(
        data=data,
        teacher=TEACHER,
        out=out,
        checkpoint=checkpoint,
        views=1,
        workers=1,
        shard_instances=256,
        batch_size=32,
    )
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    with TreeCpu(os.getpid(), (moto_pid,) if moto_pid else ()) as cpu:
        summary = run_cache_job(cfg)
    wall = time.perf_counter() - start
    if not summary.complete or summary.rows == 0:
        raise RuntimeError(f"cache job at {out} did not complete: {summary}")
    tree, moto = cpu.seconds()
    return {"build_wall_s": wall, "build_cpu_s": tree, "build_moto_cpu_s": moto, "load_1m": load0, "rows": summary.rows}


def footprint(out: str) -> dict:
    from pipeline import storage

    files = storage.find_files(out)
    return {
        "bytes": sum(files.values()),
        "objects": len(files),
        "manifest_bytes": files.get("manifest.json", 0),
    }


def read_epoch(out: str, moto_pid: int | None) -> dict:
    from distilpose.data.coco import load_coco
    from distilpose.losses import DistillLoss
    from distilpose.models import get_config
    from pipeline.cache import open_reader
    from pipeline.cache_loader import CachedViewStream

    start = time.perf_counter()
    with TreeCpu(os.getpid(), (moto_pid,) if moto_pid else ()) as cpu:
        reader = open_reader(out)
        _, images = load_coco(reader.manifest.data.ann_file)
        stream = CachedViewStream(
            reader,
            image_root=reader.manifest.data.image_root,
            image_files={i: info.file_name for i, info in images.items()},
            input_size=get_config(STUDENT).input_size,
            teacher_fields=tuple(DistillLoss().needed_teacher_fields),
            rank=0,
            world_size=1,
            batch_size=BATCH,
            seed=0,
        )
        samples = sum(len(batch["image"]) for batch in stream.epoch(0))
    tree, moto = cpu.seconds()
    return {"read_wall_s": time.perf_counter() - start, "read_cpu_s": tree, "read_moto_cpu_s": moto, "read": samples}


def planned(instances: int) -> dict:
    from pipeline.plan import estimate

    plan = estimate(instances, 1, TEACHER, students=(), fmt="zarr", shard_instances=256)
    return {"plan_bytes": plan.bytes_total, "plan_objects": plan.objects_total, "shards": plan.shards}


# ----------------------------------------------------------------------------- output

PER_INSTANCE = {
    "build_wall_s": "build wall ms",
    "build_cpu_s": "build cpu ms",
    "bytes": "bytes",
    "objects": "objects",
    "manifest_bytes": "manifest B",
    "read_wall_s": "read wall ms",
    "read_cpu_s": "read cpu ms",
}


def per_instance(row: dict) -> dict:
    n = row["instances"]
    return {label: row[key] / n * (1e3 if key.endswith("_s") else 1) for key, label in PER_INSTANCE.items()}


def marginal(rows: list[dict], row: dict) -> dict:
    """CPU ms per added instance since the next smaller size: the per-job fixed cost (Ray
    Data and actor start, teacher build) cancels, what grows faster than linear does not."""
    smaller = [r for r in rows if r["store"] == row["store"] and r["instances"] < row["instances"]]
    if not smaller:
        return {"build cpu ms/added inst": "-", "read cpu ms/added inst": "-"}
    prev, added = smaller[-1], row["instances"] - smaller[-1]["instances"]
    return {
        "build cpu ms/added inst": 1e3 * (row["build_cpu_s"] - prev["build_cpu_s"]) / added,
        "read cpu ms/added inst": 1e3 * (row["read_cpu_s"] - prev["read_cpu_s"]) / added,
    }


def report(rows: list[dict]) -> str:
    table = []
    for row in rows:
        first = next(r for r in rows if r["store"] == row["store"])
        flat = {k: v / per_instance(first)[k] for k, v in per_instance(row).items()}
        table.append(
            {
                "store": row["store"],
                "instances": row["instances"],
                "shards": row["shards"],
                "build s": row["build_wall_s"],
                "build cpu s": row["build_cpu_s"],
                "moto cpu s": row["build_moto_cpu_s"] + row["read_moto_cpu_s"] if row["store"] == "s3" else "-",
                "MB": row["bytes"] / 1e6,
                "plan MB": row["plan_bytes"] / 1e6,
                "objects": row["objects"],
                "plan objects": row["plan_objects"],
                "manifest KB": row["manifest_bytes"] / 1e3,
                "epoch read s": row["read_wall_s"],
                "read cpu s": row["read_cpu_s"],
                "load": row["load_1m"],
                **{f"{k}/inst": v for k, v in per_instance(row).items() if k in ("build cpu ms", "read cpu ms")},
                "max drift": max(abs(v - 1) for v in flat.values()),
                **marginal(rows, row),
            }
        )
    return C.table(table)


def plot(rows: list[dict], png: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = sorted({r["store"] for r in rows})
    fig, axes = plt.subplots(1, len(stores), figsize=(6 * len(stores), 4.2), squeeze=False)
    for ax, store in zip(axes[0], stores):
        mine = [r for r in rows if r["store"] == store]
        base = per_instance(mine[0])
        sizes = [r["instances"] for r in mine]
        for label in PER_INSTANCE.values():
            ax.plot(sizes, [per_instance(r)[label] / base[label] for r in mine], marker="o", label=label)
        ax.axhspan(0.8, 1.2, color="0.9", zorder=0)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(sizes, [f"{s / 1000:g}k" for s in sizes])
        ax.set_xlabel("instances")
        ax.set_ylabel(f"per instance / at {sizes[0] / 1000:g}k")
        ax.set_title(f"{store}: per-instance cost (grey: within 20%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot written to {png}", flush=True)


def save(rows: list[dict], png: str) -> None:
    rows.sort(key=lambda r: (r["store"], r["instances"]))
    text = report(rows)
    print("\n" + text, flush=True)
    with open(Path(png).with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, png)
    C.write_results(NAME, {"context": C.context(), "rows": rows, "report": text})


def main() -> None:
    args = parse_args()
    if args.plot_only:  # the planner's figures recomputed: it may have changed since
        rows = json.loads((C.RESULTS_DIR / f"{NAME}.json").read_text())["rows"]
        save([row | planned(row["instances"]) for row in rows], args.png)
        return
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="scale-", dir=C.RESULTS_DIR)
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp  # a private cluster no other ray.init() can join
    saved = C.RESULTS_DIR / f"{NAME}.json"
    rows: list[dict] = json.loads(saved.read_text())["rows"] if args.resume and saved.exists() else []
    with contextlib.ExitStack() as stack:
        moto_pid = None
        if "s3" in args.stores:
            import boto3

            endpoint, moto_pid = stack.enter_context(moto_server())
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="scale")
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        stack.callback(shutil.rmtree, ray_tmp, ignore_errors=True)
        stack.callback(_shutdown_ray)
        from distilpose.data.synthetic import make_synthetic_coco
        from pipeline import storage
        from pipeline.ray_env import init_ray

        pool = os.path.join(tmp, "pool")
        make_synthetic_coco(pool, POOL_IMAGES, 1, seed=0)
        # BatchNorm-calibrated random weights: outputs vary with the crop as a trained
        # teacher's do (a plain random init compresses unrealistically well).
        checkpoint = C.save_teacher_checkpoint(C.calibrated_teacher(TEACHER), os.path.join(tmp, "teacher.pt"))
        init_ray(num_cpus=2)
        # Warm-up job, not measured: Ray's worker processes and imports are paid once per
        # driver, not per cache build.
        build(replicate(pool, os.path.join(tmp, "data-warmup"), 64), os.path.join(tmp, "warmup"), checkpoint, None)
        for instances in args.sizes:
            data = replicate(pool, os.path.join(tmp, f"data-{instances}"), instances)
            for store in args.stores:
                if any(r["store"] == store and r["instances"] == instances for r in rows):
                    continue
                out = f"s3://scale/cache-{instances}" if store == "s3" else os.path.join(tmp, f"cache-{instances}")
                print(f"== {instances} instances, {store}", flush=True)
                pid = moto_pid if store == "s3" else None
                row = {"store": store, "instances": instances} | build(data, out, checkpoint, pid)
                row |= footprint(out) | read_epoch(out, pid) | planned(instances)
                rows.append(row)
                print(json.dumps(row), flush=True)
                storage.remove(out, recursive=True)  # moto keeps objects in memory
                save(rows, args.png)  # after every row: a long run that is stopped keeps what it measured
            shutil.rmtree(data)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    main()
