"""(b) Cache reader throughput vs the student's training-step consumption rate.

    python bench/bench_cache_reader.py [--quick]

A paper-size cache (K=17, 64x48 heatmaps, D=192, P=256; default encodings i8-thresh /
int8-token-scale) is filled with teacher-like synthetic values (bench/_common.py) through
the real writers, in both formats, in shards of --shard-instances instances (32: 256 views at
V=8), one stored unit per view. Its rows belong to real instances of a small synthetic COCO
set (view parameters from the job's `view_for`), so the training loader can rebuild the
crops too. No teacher is run.

Measured side by side, interleaved, median of the repetitions:
- readers, with exactly the fields a full DistillLoss run reads (the loader's base fields +
  heatmaps, kpt_tokens, vis_tokens), decoded to float32:
    zarr  read_rows, random batches of --batch rows (uniform over the whole cache)
    zarr  read_shard, every shard in turn (all its views)
    wds   read_shard, every shard in turn (all its views)
- the training loader itself (`CachedViewStream`, one epoch): reads one view's unit per
  shard, rebuilds each crop from its JPEG, makes tensors;
- the student's consumption: one training step (forward, DistillLoss with all terms,
  backward, Adam step) of distilpose-s at batch 32 (paper size) and of distilpose-tiny
  (its own sizes), with --threads torch threads (the trainer's default is 1 per worker).

Ratio = reader views/s / student views/s (goal >= 5 for distilpose-s).

Then, on the paper-size caches: the epoch read fraction F = bytes one loader epoch reads /
total cache bytes (goal F <= 1/V + 10% = 1.1/V), counted from the manifest sizes of what the loader
opened (Zarr: the arrays of the fields it reads in each unit opened; WDS: each tar opened
whole), and the loader's read + decode CPU time per sample on a V=1 and a V=8 cache of the
same instances (about equal: an epoch decodes one view per instance whatever V is).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import _common as C
import numpy as np

NAME = "cache_reader"
TEACHER_FIELDS = ("heatmaps", "kpt_tokens", "vis_tokens")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 shards, 2 repetitions (smoke run)")
    p.add_argument("--shards", type=int, help="shards per format (default 4)")
    p.add_argument("--shard-instances", type=int, default=32, help="instances per shard (32 x 8 views = 256)")
    p.add_argument("--views", type=int, default=8, help="cached views per instance (the loader reads 1 of V)")
    p.add_argument("--batch", type=int, default=32, help="student batch size and random read batch size")
    p.add_argument("--random-batches", type=int, default=8, help="random read_rows batches per repetition")
    p.add_argument("--threads", type=int, default=1, help="torch threads (trainer default: 1 per worker)")
    p.add_argument("--reps", type=int)
    p.add_argument("--keep", action="store_true", help="keep the temporary caches")
    args = p.parse_args()
    args.shards = args.shards or (2 if args.quick else 4)
    args.reps = args.reps or (2 if args.quick else 3)
    return args


# ----------------------------------------------------------------------------- the cache


def make_data(args, tmp: str) -> str:
    """A synthetic COCO set with at least the instances the caches need."""
    from distilpose.data.coco import load_instances
    from distilpose.data.synthetic import make_synthetic_coco
    from pipeline.dataset_layout import resolve_layout

    needed = args.shards * args.shard_instances
    data = os.path.join(tmp, "data")
    images = max(4, needed // 2 + 8)
    while True:
        make_synthetic_coco(data, images, 1, seed=0)
        layout = resolve_layout(data, "train", None, None)
        instances, _ = load_instances(layout.ann_file, split_kind="train", input_size=C.PAPER_INPUT)
        if len(instances) >= needed:
            return data
        images = int(images * 1.5) + 1


def build_caches(args, tmp: str, data: str, tag: str, spec, input_size: tuple[int, int], views: int) -> dict:
    """A teacher-like cache of the data set's instances with ``views`` views, in zarr and in wds."""
    from distilpose.data.coco import load_coco, load_instances
    from distilpose.data.transforms import affine_matrix
    from distilpose.data.views import view_for
    from pipeline.cache import open_writer
    from pipeline.dataset_layout import resolve_layout
    from pipeline.teacher_stage import plan_shards

    instances_needed = args.shards * args.shard_instances
    layout = resolve_layout(data, "train", None, None)
    instances, _ = load_instances(layout.ann_file, split_kind="train", input_size=input_size)
    images = len(load_coco(layout.ann_file)[1])
    instances = sorted(instances, key=lambda inst: inst.instance_id)[:instances_needed]
    shards = plan_shards(instances, args.shard_instances, views)
    rng = np.random.default_rng(0)
    caches, write_s = {}, {}
    for fmt in ("zarr", "wds"):
        caches[fmt] = os.path.join(tmp, f"cache-{tag}-v{views}-{fmt}")
        write_s[fmt] = 0.0
    for shard in shards:
        n = len(shard.instances) * views
        rows = C.teacher_like_views(n, spec, rng, input_size=input_size)
        keys = [(inst, v) for inst in shard.instances for v in range(views)]
        rows["instance_id"] = np.asarray([inst.instance_id for inst, _ in keys], np.int64)
        rows["image_id"] = np.asarray([inst.image_id for inst, _ in keys], np.int64)
        rows["view"] = np.asarray([v for _, v in keys], np.int16)
        drawn = [view_for(inst, v, 0) for inst, v in keys]
        rows["view_params"] = np.stack([view.to_array() for view in drawn]).astype(np.float32)
        rows["affine"] = np.stack([affine_matrix(view, input_size) for view in drawn]).astype(np.float32)
        for fmt in caches:
            writer = open_writer(caches[fmt], spec, fmt)
            start = time.perf_counter()
            writer.write_shard(shard.index, rows)
            write_s[fmt] += time.perf_counter() - start
    total = len(instances) * views
    for fmt, uri in caches.items():
        open_writer(uri, spec, fmt).finalize(
            C.synthetic_manifest(views, layout.ann_file, layout.image_root, images), expected_shards=len(shards)
        )
    return {
        "tag": tag,
        "spec": spec,
        "input_size": input_size,
        "caches": caches,
        "layout": layout,
        "instances": len(instances),
        "rows": total,
        "write_views_per_s": {fmt: total / s for fmt, s in write_s.items()},
    }


# ----------------------------------------------------------------------------- readers


def reader_cases(built: dict, args) -> dict:
    from distilpose.data.coco import load_coco
    from pipeline.cache import open_reader
    from pipeline.cache_loader import BASE_FIELDS, CachedViewStream

    fields = list(BASE_FIELDS + TEACHER_FIELDS)
    zarr_reader = open_reader(built["caches"]["zarr"])
    wds_reader = open_reader(built["caches"]["wds"])
    rng = np.random.default_rng(1)
    _, images = load_coco(built["layout"].ann_file)
    image_files = {i: info.file_name for i, info in images.items()}

    def random_rows() -> int:
        for _ in range(args.random_batches):
            rows = rng.choice(len(zarr_reader), size=args.batch, replace=False)
            zarr_reader.read_rows(rows, fields=fields)
        return args.random_batches * args.batch

    def sequential(reader) -> int:
        for index in reader.shard_indices:
            reader.read_shard(index, fields=fields)
        return len(reader)

    def loader_for(reader) -> CachedViewStream:
        return make_loader(reader, built, image_files, args.batch)

    def stream(reader) -> int:
        delivered = 0
        for batch in loader_for(reader).epoch(0):
            delivered += len(batch["image"])
        return delivered

    # The loader's crop rebuild alone (JPEG decode + affine warp), on the views one epoch
    # delivers from the first shard; through the loader's own (private) crop method.
    first = zarr_reader.read_shard(
        zarr_reader.shard_indices[0], fields=["instance_id", "image_id", "view", "view_params"]
    )
    first = {k: v[first["view"] == 0] for k, v in first.items()}

    def crops_only() -> int:
        loader = loader_for(zarr_reader)
        for i in range(len(first["image_id"])):
            loader._crop(first, i)
        return len(first["image_id"])

    tag = built["tag"]
    return {
        f"{tag}: zarr read_rows random": random_rows,
        f"{tag}: zarr read_shard sequential": lambda: sequential(zarr_reader),
        f"{tag}: wds read_shard sequential": lambda: sequential(wds_reader),
        f"{tag}: zarr CachedViewStream (loader)": lambda: stream(zarr_reader),
        f"{tag}: wds CachedViewStream (loader)": lambda: stream(wds_reader),
        f"{tag}: crop rebuild only (part of loader)": crops_only,
    }


def make_loader(reader, built: dict, image_files: dict, batch: int):
    from pipeline.cache_loader import CachedViewStream

    return CachedViewStream(
        reader,
        image_root=built["layout"].image_root,
        image_files=image_files,
        input_size=built["input_size"],
        teacher_fields=TEACHER_FIELDS,
        rank=0,
        world_size=1,
        batch_size=batch,
        seed=0,
    )


def epoch_read_fraction(uri: str, built: dict, args) -> float:
    """Bytes one loader epoch reads / the cache's bytes, from the manifest sizes of what the
    loader opened: per unit, the fields it asked for (Zarr fetches only their arrays, each
    array's zarr.json included), or the whole tar (WDS)."""
    from distilpose.data.coco import load_coco
    from pipeline.cache import open_reader

    reader = open_reader(uri)
    read_bytes = 0
    real = reader._read_raw

    def counted(unit, arrays, rows):
        nonlocal read_bytes
        fields = {a.field for a in arrays.values()}
        whole = reader.format == "wds"
        read_bytes += unit.total_bytes if whole else sum(unit.bytes_per_field.get(f, 0) for f in fields)
        return real(unit, arrays, rows)

    reader._read_raw = counted
    _, images = load_coco(built["layout"].ann_file)
    for _ in make_loader(reader, built, {i: info.file_name for i, info in images.items()}, args.batch).epoch(0):
        pass
    return read_bytes / sum(s.total_bytes for s in reader.manifest.shards)


def decode_cpu_per_sample(uri: str, built: dict, args) -> float:
    """CPU seconds per sample of the loader's reads and decode (no crop rebuild) over one
    epoch, median of --reps epochs."""
    from pipeline.cache import open_reader
    from pipeline.cache_loader import BASE_FIELDS

    reader = open_reader(uri)
    loader = make_loader(reader, built, {}, args.batch)
    per_sample = []
    for epoch in range(args.reps):
        start, samples = time.process_time(), 0
        for shard in reader.shard_indices:
            samples += len(loader._load_shard(shard, BASE_FIELDS + TEACHER_FIELDS, epoch)["instance_id"])
        per_sample.append((time.process_time() - start) / samples)
    return C.median(per_sample)


def view_major_lines(args, built_v: dict, built_1: dict) -> tuple[list[str], dict]:
    """The epoch read fraction at V=args.views and the decode CPU per sample at V=1 vs V."""
    lines, results = [], {"read_fraction": {}, "decode_cpu_ms_per_sample": {}}
    for fmt in ("zarr", "wds"):
        fraction = epoch_read_fraction(built_v["caches"][fmt], built_v, args)
        goal = 1.1 / args.views  # 1/V + 10%
        results["read_fraction"][fmt] = fraction
        lines.append(
            f"epoch read fraction: {fraction:.3f} (V={args.views}, {fmt}); goal <= 1/V + 10% = {goal:.3f}: "
            + ("ok" if fraction <= goal else "ABOVE")
        )
    for fmt in ("zarr", "wds"):
        ms = {
            v: 1e3 * decode_cpu_per_sample(b["caches"][fmt], b, args) for v, b in ((1, built_1), (args.views, built_v))
        }
        results["decode_cpu_ms_per_sample"][fmt] = ms
        lines.append(
            f"decode CPU per sample ({fmt}): V=1 {ms[1]:.2f} ms, V={args.views} {ms[args.views]:.2f} ms "
            f"(ratio {ms[args.views] / ms[1]:.2f})"
        )
    return lines, results


# ----------------------------------------------------------------------------- students


def student_step_fn(preset: str, batch: int):
    """One training step of `preset` with every DistillLoss term, teacher fields as tensors."""
    import torch

    from distilpose.losses import DistillLoss
    from distilpose.models import build_model, get_config
    from pipeline.cache.schema import CacheSpec

    config = get_config(preset)
    spec = CacheSpec.from_model_config(config)
    rows = C.teacher_like_views(batch, spec, np.random.default_rng(2), input_size=tuple(config.input_size))
    h, w = config.input_size
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(config).train()
        image = torch.randn(batch, 3, h, w)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DistillLoss()
    target = torch.from_numpy(rows["joints"]) / torch.tensor([w, h], dtype=torch.float32)
    weight = torch.from_numpy(rows["joint_weights"])
    teacher = {k: torch.from_numpy(rows[k]) for k in TEACHER_FIELDS}

    def step() -> int:
        out = model(image)
        total, _ = loss_fn(out, target, weight, teacher)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return batch

    return step


# ----------------------------------------------------------------------------- main


def main() -> None:
    from distilpose.models import get_config
    from pipeline.cache.schema import CacheSpec

    args = parse_args()
    C.set_threads(args.threads)
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="cache-reader-", dir=C.RESULTS_DIR)
    try:
        data = make_data(args, tmp)
        # Each student is compared with a cache of its own teacher's sizes: the paper cache for
        # distilpose-s, the tiny one (32x24 heatmaps, D=64, P=64, 128x96 crops) for distilpose-tiny.
        pairs = {"paper": "distilpose-s", "tiny": "distilpose-tiny"}
        built, readers, students = {}, {}, {}
        for tag, student in pairs.items():
            config = get_config(student)
            spec = CacheSpec.from_model_config(config)
            print(
                f"building {tag}-size caches {spec.dims()}: {args.shards} shards x {args.shard_instances} instances "
                f"x {args.views} views",
                flush=True,
            )
            built[tag] = build_caches(args, tmp, data, tag, spec, tuple(config.input_size), args.views)
            print(
                f"  {built[tag]['rows']} views ({built[tag]['instances']} instances x {args.views} views); write "
                + ", ".join(f"{k} {v:.0f} views/s" for k, v in built[tag]["write_views_per_s"].items()),
                flush=True,
            )
            readers[tag] = reader_cases(built[tag], args)
            students[tag] = (f"{student} train step (batch {args.batch})", student_step_fn(student, args.batch))
        views: dict[str, int] = {}

        def counted(name, fn):
            def run() -> None:
                views[name] = fn()

            return run

        cases = {name: counted(name, fn) for tag in pairs for name, fn in readers[tag].items()}
        cases.update({name: counted(name, fn) for name, fn in students.values()})
        cpu: dict[str, list[float]] = {}
        times = C.interleaved(cases, reps=args.reps, warmup=1, label="reader", cpu_times=cpu)
        rates = {name: views[name] / C.median(times[name]) for name in cases}
        cpu_rates = {name: views[name] / C.median(cpu[name]) for name in cases}

        config = get_config(pairs["paper"])
        print("building the paper-size V=1 caches of the same instances for the decode comparison", flush=True)
        built_1 = build_caches(
            args, tmp, data, "paper", CacheSpec.from_model_config(config), tuple(config.input_size), 1
        )
        view_lines, view_results = view_major_lines(args, built["paper"], built_1)

        reader_rows, ratios = [], {}
        for tag in pairs:
            student_name = students[tag][0]
            for name in readers[tag]:
                ratios[name] = rates[name] / rates[student_name]
                cpu_ratio = cpu_rates[name] / cpu_rates[student_name]
                reader_rows.append(
                    {
                        "reader": name,
                        "views/s": rates[name],
                        "s/rep": C.median(times[name]),
                        "views/rep": views[name],
                        "consumer": pairs[tag],
                        "ratio": ratios[name],
                        "views/cpu-s": cpu_rates[name],
                        "cpu ratio": cpu_ratio,
                        "goal 5": "ok" if min(ratios[name], cpu_ratio) >= 5 else "BELOW",
                    }
                )
        student_rows = [
            {
                "student step": name,
                "views/s": rates[name],
                "views/cpu-s": cpu_rates[name],
                "s/step": C.median(times[name]),
                "spread s": C.spread(times[name]),
            }
            for name, _ in students.values()
        ]
        lines = [
            f"caches: {args.shards} shards x {args.shard_instances} instances, V={args.views} views/instance, "
            "default encodings; paper size K=17, 64x48, D=192, P=256; tiny size K=17, 32x24, D=64, P=64",
            f"fields read: the loader's base fields + {', '.join(TEACHER_FIELDS)} (all a full DistillLoss needs)",
            f"torch threads {args.threads}; batch {args.batch}; {args.reps} interleaved repetitions, medians",
            "",
            C.table(reader_rows),
            "",
            C.table(student_rows),
            "",
            "ratio = reader views/s / the consumer's training-step views/s (goal >= 5); cpu ratio: the same with"
            " CPU seconds (this process, all threads), which leave out waiting for a core on a shared machine.",
            "The loader (CachedViewStream) reads one view's unit per shard (1/V of the cache) and rebuilds every"
            " crop from its JPEG; read_shard sequential reads all V views of every shard.",
            "It runs synchronously in the training loop: a reader at ratio r adds ~1/r to the step time.",
            "",
            *view_lines,
            "read fraction: bytes from the manifest sizes of what the loader opened (Zarr: the arrays of the "
            "fields read; WDS: whole tars); decode CPU: the loader's reads + decode, no crop rebuild, median epoch.",
        ]
        text = "\n".join(lines)
        print("\n" + text)
        C.write_results(
            NAME,
            {
                "context": C.context(threads=args.threads, batch=args.batch, views_per_instance=args.views),
                "caches": {
                    tag: {
                        "rows": b["rows"],
                        "instances": b["instances"],
                        "shards": args.shards,
                        "shard_instances": args.shard_instances,
                        "spec": b["spec"].to_dict(),
                        "write_views_per_s": b["write_views_per_s"],
                    }
                    for tag, b in built.items()
                },
                "times_s": times,
                "views_per_rep": views,
                "views_per_s": rates,
                "cpu_s": cpu,
                "views_per_cpu_s": cpu_rates,
                "ratio_reader_over_student": ratios,
                "view_major": view_results,
                "report": text,
            },
        )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
