"""The student loader's CPU per sample, before and after the fast decode and warp, side by side.

    python bench/bench_loader_cost.py            # ~3 min on 2 busy cores
    python bench/bench_loader_cost.py --reps 7   # more repetitions: a steadier minimum

Setup as `bench_gpu.py --loader-cost`: 640x480 synthetic COCO JPEGs (~2 persons each),
256x192 crops, a cache with the paper's teacher fields (tokenpose-w48 sizes, default
encodings) in shards of 256 instances (the cache job's default), batch 16, one thread, no
prefetch. Two caches: crops rebuilt from the source
images, and stored JPEG crops (--store-crops).

CPU seconds (time.process_time: every thread of the process, zarr's reader threads
included), one epoch per repetition, the minimum over repetitions: what the loader costs
when nothing else competes, repeatable on a busy machine (a wall-clock time is not).

- whole loader: `pipeline.cache_loader.CachedViewStream` as it is (fast: simplejpeg decode,
  OpenCV warp, teacher fields decoded per batch), as a CPU worker runs it (images normalized
  in the loader) and as a GPU worker does (images left uint8, normalized on the device; the
  planner's figure), vs `PillowStream`, the same stream with the previous code paths (Pillow
  decode and warp, teacher fields decoded per shard, the old normalization);
- the pieces, thread CPU per call: source image decode, crop warp, stored-crop decode,
  normalization;
- samples/s vs loader processes (`--loader-processes` 0, 1, 2): the GPU worker's loader
  alone, wall clock (median of the repetitions, so it needs an idle machine to mean much),
  and the training process's own CPU per sample with processes (planning, hand-out, copying
  each batch out of shared memory): more processes add throughput until that ceiling.

Writes runs/bench/loader_cpu.json, pipeline/loader_cost.json (the figures the planner,
`pipeline.plan`, uses for loader cores per GPU) and docs/results.md's loader block.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import bench_cache_throughput as T
import numpy as np
from bench_gpu import LOADER_COST, make_stream, teacher_outputs_like, write_cache

from distilpose import fileio
from distilpose.data.coco import join_uri
from distilpose.data.fast_crop import pillow_decode, pillow_warp
from distilpose.data.transforms import ViewParams, _unflipped_affine, invert_affine
from pipeline.cache_loader import BatchMaker, CachedViewStream, RecentImages, shard_view

NAME = "loader_cpu"
# bench_gpu's loader-cost sizes with the cache job's default shard (256 instances, one object
# per array and view: the per-read overhead is shared by 256 samples, as at COCO scale).
SIZES = dataclasses.replace(LOADER_COST, images=384, shard_instances=256)
PLANNER_FILE = C.ROOT / "pipeline" / "loader_cost.json"
# The loader's code paths measured: (label, stream class, images normalized in the loader).
# A GPU worker leaves the images uint8 and normalizes them on the device (the distill
# worker's choice: pipeline.student_batch.on_device); a CPU worker normalizes in the loader.
CPU_WORKER, GPU_WORKER = "after, CPU worker", "after, GPU worker"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="epochs per case; the minimum CPU time counts")
    p.add_argument("--keep", action="store_true", help="keep the temporary data and caches")
    p.add_argument(
        "--no-planner-file", action="store_true", help=f"do not update {PLANNER_FILE.name} and docs/results.md"
    )
    p.add_argument(
        "--rewrite-docs",
        action="store_true",
        help="measure nothing: rewrite docs/results.md's loader block from runs/bench/loader_cpu.json",
    )
    return p.parse_args()


def normalize_before(x: np.ndarray):
    """The out-of-place arithmetic normalize_batch had, on the permuted (channels-last) view."""
    import torch

    t = torch.from_numpy(x).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (t - mean) / std


class PillowStream(CachedViewStream):
    """The loader as it was: Pillow decodes and warps, teacher fields decoded per shard,
    source images from a cache of the 64 most recent (`RecentImages`, not `PoolCrops`), and
    the images normalized by the old arithmetic (`PillowMaker`)."""

    def _load_shard(self, shard: int, fields: tuple[str, ...], epoch: int) -> dict[str, np.ndarray]:
        view = shard_view(self.seed, epoch, shard, self.views, self.first_view)
        return self.reader.read_shard(shard, fields=list(fields), view=view)


class PillowMaker(BatchMaker):
    def make(self, rows: dict[str, np.ndarray], epoch: int):
        normalize, self.normalize = self.normalize, False  # the shared code hands uint8 (N, 3, H, W)
        batch = super().make(rows, epoch)
        self.normalize = normalize
        # The crops as the old code had them, (N, H, W, 3) contiguous (one small uint8 copy).
        batch["image"] = normalize_before(batch["image"].permute(0, 2, 3, 1).contiguous().numpy())
        return batch

    def teacher_arrays(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {key: np.asarray(rows[key], dtype=np.float32) for key in self.teacher_fields}

    def crop(self, rows: dict[str, np.ndarray], i: int) -> np.ndarray:
        if self.use_crops:
            return pillow_decode(rows["crop_jpeg"][i])
        if "_recent" not in self.__dict__:
            self._recent = PillowImages(self.image_root)
        image_id = int(rows["image_id"][i])
        image = self._recent.get(image_id, self.image_files[image_id])
        view = ViewParams.from_array(rows["view_params"][i])
        crop = pillow_warp(image, invert_affine(_unflipped_affine(view, self.input_size)), self.input_size)
        return np.ascontiguousarray(crop[:, ::-1]) if view.flip else crop


class PillowImages(RecentImages):
    """`RecentImages` decoding with Pillow; counts its decodes."""

    decodes = 0

    def get(self, image_id: int, file_name: str) -> np.ndarray:
        if image_id not in self._images:
            if len(self._images) >= self.capacity:
                self._images.pop(next(iter(self._images)))
            uri = join_uri(self.image_root, file_name)
            self._images[image_id] = pillow_decode(fileio.read_bytes(uri, what=f"image {uri}"))
            self.decodes += 1
        return self._images[image_id]


def cpu_per_sample(stream, reps: int) -> dict:
    """One epoch per repetition: process CPU and wall seconds per sample, the minimum."""
    samples = stream.steps * stream.batch_size
    cpu, wall = [], []
    for epoch in range(reps + 1):  # epoch 0 warms up (imports, first reads)
        c, w = time.process_time(), time.perf_counter()
        for _ in stream.epoch(epoch):
            pass
        if epoch:
            cpu.append((time.process_time() - c) / samples)
            wall.append((time.perf_counter() - w) / samples)
    return {
        "samples": samples,
        "cpu ms/sample": 1e3 * min(cpu),
        "cpu ms, all reps": C.spread([1e3 * c for c in cpu]),
        "wall ms": 1e3 * min(wall),
    }


def thread_ms(fn, calls: int, reps: int) -> float:
    """Thread CPU ms per call of `fn`, the minimum over `reps` runs of `calls` calls."""
    best = float("inf")
    for _ in range(reps):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return 1e3 * best


def pieces(layout, crop_rows: list[dict], input_size: tuple[int, int], reps: int) -> list[dict]:
    """Each step of the crop path, before and after, on the bench's own images and views."""
    from distilpose.data.coco import read_image
    from distilpose.data.fast_crop import decode_jpeg, warp_affine
    from distilpose.data.transforms import normalize_batch
    from pipeline.cache.encodings import decode_crop_jpeg
    from pipeline.cache.schema import CROP_FIELD

    files = sorted(Path(layout.image_root).glob("*.jpg"))[:8]
    raws = [f.read_bytes() for f in files]
    images = [read_image(layout.image_root, f.name) for f in files]
    views = [ViewParams.from_array(v) for v in crop_rows[0]["view_params"][:8]]
    maps = [invert_affine(_unflipped_affine(v, input_size)) for v in views]
    jpegs = list(crop_rows[0][CROP_FIELD][:8])
    crops = np.stack([decode_crop_jpeg(j) for j in jpegs] * 2)

    def cycle(fn, items):
        it = iter(range(10**9))
        return lambda: fn(items[next(it) % len(items)])

    h, w = images[0].shape[:2]
    rows = [
        (f"decode {w}x{h} JPEG (per image)", cycle(pillow_decode, raws), cycle(decode_jpeg, raws), 1),
        (
            f"warp {input_size[1]}x{input_size[0]} crop",
            cycle(lambda im_m: pillow_warp(im_m[0], im_m[1], input_size), list(zip(images, maps))),
            cycle(lambda im_m: warp_affine(im_m[0], im_m[1], input_size), list(zip(images, maps))),
            1,
        ),
        ("decode stored JPEG crop", cycle(pillow_decode, jpegs), cycle(decode_crop_jpeg, jpegs), 1),
        ("normalize (per sample, batch 16)", lambda: normalize_before(crops), lambda: normalize_batch(crops), 16),
    ]
    out = []
    for name, before, after, per in rows:
        b, a = thread_ms(before, 8, reps) / per, thread_ms(after, 8, reps) / per
        out.append({"step": name, "before ms": b, "after ms": a, "before / after": b / a})
    return out


def _as(stream, cls) -> None:
    """Give a built stream the other code path (its batch maker included)."""
    stream.__class__ = cls
    if cls is PillowStream:
        stream.maker.__class__ = PillowMaker


PROCESSES = (0, 1, 2)  # loader processes measured (0: batches built in the training process)


def processes_curve(readers: dict, layout, sizes, device, reps: int) -> list[dict]:
    """A GPU worker's loader alone (images left uint8), one epoch per repetition after a
    warm-up epoch (process start-up): wall samples/s with 0, 1 and 2 loader processes, and
    the training process's own CPU per sample (planning, hand-out, copy-out: the ceiling that
    more processes cannot lift)."""
    rows = []
    for path, reader in readers.items():
        for n in PROCESSES:
            stream = make_stream(reader, layout, sizes, device, prefetch=0)
            stream.normalize, stream.processes = False, n
            walls, own = [], []
            try:
                for epoch in range(reps + 1):
                    c, w = time.process_time(), time.perf_counter()
                    for _ in stream.epoch(epoch):
                        pass
                    if epoch:
                        walls.append(time.perf_counter() - w)
                        own.append(time.process_time() - c)
            finally:
                stream.close()
            samples = stream.steps * stream.batch_size
            rows.append(
                {
                    "crops": path,
                    "processes": n,
                    "samples/s": samples / C.median(walls),
                    "samples/s, all reps": C.spread([samples / w for w in walls]),
                    "training process cpu ms/sample": 1e3 * min(own) / samples,
                }
            )
            print(f"{path} {n} loader process(es): {rows[-1]['samples/s']:.0f} samples/s", flush=True)
    base = {r["crops"]: r["samples/s"] for r in rows if r["processes"] == 0}
    for r in rows:
        r["vs in-process"] = r["samples/s"] / base[r["crops"]]
    return rows


def images_per_sample(stream) -> float:
    """Source images decoded per sample in one epoch."""
    for _ in stream.epoch(0):
        pass
    decodes = stream.maker._recent.decodes if isinstance(stream, PillowStream) else stream.maker.pool_crops.decodes
    return decodes / (stream.steps * stream.batch_size)


def main() -> None:
    from distilpose.data.synthetic import make_synthetic_coco
    from distilpose.models import get_config
    from pipeline.cache.schema import CacheSpec

    args = parse_args()
    if args.rewrite_docs:
        saved = json.loads((C.RESULTS_DIR / f"{NAME}.json").read_text())
        write_docs(saved, saved["report"], saved["context"])
        return
    import torch

    C.set_threads(1)
    sizes = SIZES
    device = torch.device("cpu")
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench-loader-", dir=C.RESULTS_DIR if C.RESULTS_DIR.exists() else None)
    try:
        synth = make_synthetic_coco(os.path.join(tmp, "data"), sizes.images, 1, seed=0, image_size=sizes.image_size)
        config = get_config(sizes.teacher)
        input_size = tuple(config.input_size)
        layout, shards = T.plan(os.path.join(tmp, "data"), sizes.teacher, sizes.views, sizes.shard_instances, None)
        crop_rows, _ = T.precompute_crops(layout, shards, input_size, store_crops="jpeg")
        spec = CacheSpec.from_model_config(config)
        encoded = teacher_outputs_like(crop_rows, spec, input_size)
        readers = {
            path: write_cache(
                os.path.join(tmp, f"cache-{path}"),
                dataclasses.replace(spec, store_crops=path == "stored"),
                encoded,
                crop_rows,
                layout,
                sizes.views,
                synth.images["train"],
            )
            for path in ("rebuild", "stored")
        }
        rows = []
        for path, reader in readers.items():
            codes = (("before (Pillow)", PillowStream, True), (CPU_WORKER, CachedViewStream, True))
            for code, cls, normalize in (*codes, (GPU_WORKER, CachedViewStream, False)):
                stream = make_stream(reader, layout, sizes, device, prefetch=0)
                _as(stream, cls)  # same arguments, the other code path
                stream.normalize = normalize
                rows.append({"crops": path, "code": code, **cpu_per_sample(stream, args.reps)})
                print(f"{path} {code}: {rows[-1]['cpu ms/sample']:.3f} ms CPU/sample", flush=True)
        by = {(r["crops"], r["code"]): r["cpu ms/sample"] for r in rows}
        for r in rows:
            r["before / this"] = by[(r["crops"], "before (Pillow)")] / r["cpu ms/sample"]
        decoded = {}
        for code, cls in (("before", PillowStream), ("after", CachedViewStream)):
            stream = make_stream(readers["rebuild"], layout, sizes, device, prefetch=0)  # decodes: either mode
            _as(stream, cls)
            decoded[code] = images_per_sample(stream)
        curve = processes_curve(readers, layout, sizes, device, args.reps)
        report = {
            "sizes": dataclasses.asdict(sizes),
            "reps": args.reps,
            "loader": rows,
            "pieces": pieces(layout, crop_rows, input_size, args.reps),
            "images_decoded_per_sample": decoded,
            # What a GPU worker's loader costs (the planner's cores per GPU), and a CPU worker's.
            "cpu_ms_per_sample": {path: by[(path, GPU_WORKER)] for path in readers},
            "cpu_ms_per_sample_cpu_worker": {path: by[(path, CPU_WORKER)] for path in readers},
            "cpu_ms_per_sample_before": {path: by[(path, "before (Pillow)")] for path in readers},
            "processes": curve,
        }
        text = render(report)
        report["wall_s"] = time.perf_counter() - started
        print("\n" + text + f"\n\nwall {report['wall_s']:.0f} s", flush=True)
        C.write_results(NAME, {"context": C.context(), **report, "report": text})
        if not args.no_planner_file:
            write_planner_file(report)
            write_docs(report, text, C.context())
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def write_docs(report: dict, text: str, ctx: dict) -> None:
    """docs/results.md's loader block: the run's tables, with the machine they came from."""
    head = (
        f"Measured {ctx['time'][:16].replace('T', ' ')} UTC on {ctx['host_cpus']} CPUs (load average "
        f"{ctx['loadavg_1m']:.1f} at the end), {report['reps']} repetitions:"
    )
    C.write_docs_block(C.ROOT / "docs" / "results.md", "bench_loader_cost", f"{head}\n\n```\n{text}\n```")
    print("docs/results.md: the loader block", flush=True)


def write_planner_file(report: dict) -> None:
    """The figures `pipeline.plan` reads (the package ships this file)."""
    s = report["sizes"]
    payload = {
        "written_by": "python bench/bench_loader_cost.py",
        "what": (
            "CPU ms per sample of pipeline.cache_loader.CachedViewStream on a GPU worker (images normalized on "
            f"the device; cpu_worker: in the loader), one thread, batch {s['train_batch']}, "
            f"{s['image_size'][1]}x{s['image_size'][0]} JPEGs -> 256x192 crops, {s['teacher']} teacher fields; "
            f"process CPU time, minimum of {report['reps']} epochs"
        ),
        "cpu_ms_per_sample": {k: round(v, 4) for k, v in report["cpu_ms_per_sample"].items()},
        "cpu_ms_per_sample_cpu_worker": {k: round(v, 4) for k, v in report["cpu_ms_per_sample_cpu_worker"].items()},
        "cpu_ms_per_sample_before": {k: round(v, 4) for k, v in report["cpu_ms_per_sample_before"].items()},
        "images_decoded_per_sample": {k: round(v, 3) for k, v in report["images_decoded_per_sample"].items()},
        "pieces_ms": {r["step"]: round(r["after ms"], 4) for r in report["pieces"]},
        # With --loader-processes: the training process's own CPU per sample (planning, hand-out,
        # copy-out), the ceiling of one worker however many processes read and build its batches.
        "training_process_cpu_ms_per_sample": {
            r["crops"]: round(r["training process cpu ms/sample"], 4)
            for r in report["processes"]
            if r["processes"] == max(PROCESSES)
        },
        "samples_per_s_by_processes": {
            path: {str(r["processes"]): round(r["samples/s"], 1) for r in report["processes"] if r["crops"] == path}
            for path in report["cpu_ms_per_sample"]
        },
        "machine": C.context(),
    }
    PLANNER_FILE.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"planner figures: {PLANNER_FILE.relative_to(C.ROOT)}", flush=True)


def render(report: dict) -> str:
    lines = [
        "the loader, one epoch per repetition, process CPU (all threads), minimum:",
        C.table(report["loader"]),
        "source images decoded per sample (rebuild): "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["images_decoded_per_sample"].items()),
        "\nthe pieces, thread CPU per call, minimum:",
        C.table(report["pieces"]),
        f"\nsamples/s vs loader processes (GPU worker's loader alone, wall, median; {os.cpu_count()} CPUs here):",
        C.table(report["processes"]),
    ]
    goals = {"stored": 1.0, "rebuild": 2.5}
    for path, ms in report["cpu_ms_per_sample"].items():
        lines.append(
            f"{path}: {ms:.2f} ms CPU/sample ({'meets' if ms <= goals[path] else 'ABOVE'} goal <= {goals[path]})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
