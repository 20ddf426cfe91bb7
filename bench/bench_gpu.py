"""GPU readiness in one script (<= 8 min on one GPU), every comparison side by side.

    make bench-gpu                    # one CUDA GPU: paper teacher and students
    BENCH_SMOKE=1 make bench-gpu      # the same code on the CPU at tiny sizes (the test suite runs it)
    python bench/bench_gpu.py --loader-cost   # CPU: loader CPU seconds per sample at paper size
    python bench/bench_loader_cost.py         # CPU: the same, before/after side by side (the planner's figures)

(a) teacher caching vs the bare teacher forward, same crops, same batch, fp32 (TF32 on) and
    bf16 autocast: `bare` = model(x) on crops already on the device; `actor as coded` = the
    cache actor's own work per shard (`run_teacher`: CPU normalize, float32 upload, fp32 with
    TF32 matmuls, the cache job's default; Gaussian fit; copies; `encode_shard_rows`);
    `actor, uint8 upload` = the same with the crops uploaded as pinned uint8 and normalized on
    the device (distilpose.device).
(b) one training step from the cache vs with the online teacher (`pipeline.distill.worker.online_teacher`),
    per student, AMP as the training loop runs it (fp16 autocast + GradScaler on a GPU),
    batches pinned and copied non_blocking (distilpose.device.to_device); + channels_last.
(c) DistilPose-S training throughput from a real cache (written from (a)'s teacher outputs)
    through the real loader (`pipeline.cache_loader.CachedViewStream`: crop rebuild from the
    stored view parameters, the paper loss's teacher fields, prefetch thread, pinned batches)
    vs synthetic tensors already on the device, same model, batch and AMP (goal: within 2x).
(d) peak GPU memory of every case.
(e) the loader alone: CPU seconds per sample (all threads), with crops rebuilt and with
    stored JPEG crops; with (c)'s GPU throughput, the CPU cores one GPU needs to be fed.

Results: runs/bench/gpu.json (gpu_smoke.json, loader_cost.json).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import _common as C
import bench_cache_throughput as T
import numpy as np
from bench_distill_step import decode_teacher_fields, step_inputs

NAME = "gpu"


@dataclass(frozen=True)
class Sizes:
    teacher: str
    students: tuple[str, ...]
    images: int  # synthetic train images (~2 persons each)
    views: int
    shard_instances: int
    teacher_batch: int
    train_batch: int
    steps: int  # training steps per timed repetition in (b)
    reps: int
    image_size: tuple[int, int] = (480, 640)  # (H, W): COCO's typical image, what the loader decodes


FULL = Sizes("tokenpose-w48", ("distilpose-s", "distilpose-l"), 768, 2, 128, 128, 64, 20, 3)
SMOKE = Sizes("tokenpose-tiny", ("distilpose-tiny", "distilpose-l-tiny"), 6, 2, 4, 8, 4, 1, 1, (256, 256))
LOADER_COST = Sizes("tokenpose-w48", ("distilpose-s",), 96, 1, 64, 8, 16, 1, 3)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", default=os.environ.get("BENCH_SMOKE") == "1")
    p.add_argument("--loader-cost", action="store_true", help="only (e), at paper size, teacher-like fields")
    p.add_argument("--keep", action="store_true", help="keep the temporary data and caches")
    return p.parse_args()


# ----------------------------------------------------------------------------- timing


def timed_cases(cases: dict, device, reps: int, label: str) -> tuple[dict, dict, dict]:
    """`C.interleaved` with the device synchronized inside each timed call; also each
    case's CPU seconds and its peak device memory (None on the CPU)."""
    from distilpose.device import peak_memory_bytes, reset_peak_memory, synchronize

    peaks: dict[str, int | None] = {}

    def wrap(name, fn):
        def run():
            reset_peak_memory(device)
            fn()
            synchronize(device)
            peak = peak_memory_bytes(device)
            peaks[name] = None if peak is None else max(peak, peaks.get(name) or 0)

        return run

    cpu: dict[str, list[float]] = {}
    times = C.interleaved({k: wrap(k, f) for k, f in cases.items()}, reps=reps, warmup=1, label=label, cpu_times=cpu)
    return {k: C.median(v) for k, v in times.items()}, {k: C.median(v) for k, v in cpu.items()}, peaks


def gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f}"


# ----------------------------------------------------------------------------- (a) caching


def caching(sizes: Sizes, device, model, crop_rows: list[dict], spec) -> tuple[list[dict], list[dict]]:
    """(a): rows of the table, and the actor's encoded shards (for the cache of (c))."""
    import torch

    from distilpose.device import normalize_on_device, synchronize
    from distilpose.teacher_forward import run_teacher
    from pipeline.teacher_stage import encode_shard_rows

    crops = np.concatenate([r["image"][r["valid"]] for r in crop_rows])
    n, bs = len(crops), sizes.teacher_batch
    on_device = [normalize_on_device(crops[i : i + bs], device) for i in range(0, n, bs)]
    synchronize(device)
    encoded: list[dict] = []

    def bare(dtype):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for x in on_device:
                    model(x)

        return run

    def actor_as_coded():
        encoded.clear()
        for rows in crop_rows:
            encoded.append(encode_shard_rows(rows, run_teacher(model, rows["image"][rows["valid"]], bs, device), spec))

    def actor_uint8(dtype):
        from distilpose.heatmaps import fit_gaussians

        def run():
            for rows in crop_rows:
                images = rows["image"][rows["valid"]]
                parts: dict[str, list] = {}
                with torch.inference_mode():
                    for i in range(0, len(images), bs):
                        x = normalize_on_device(images[i : i + bs], device)
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                            out = model(x)
                        gauss, conf = fit_gaussians(out.heatmaps.float())
                        fields = dict(heatmaps=out.heatmaps, kpt_tokens=out.kpt_tokens, vis_tokens=out.vis_tokens)
                        for k, v in {**fields, "gauss": gauss, "confidence": conf}.items():
                            parts.setdefault(k, []).append(v.float().cpu().numpy())
                encode_shard_rows(rows, {k: np.concatenate(v) for k, v in parts.items()}, spec)

        return run

    precisions = {"fp32/TF32": torch.float32, "bf16": torch.bfloat16}
    cases = {f"bare {p}": bare(d) for p, d in precisions.items()}
    cases["actor as coded"] = actor_as_coded
    cases.update({f"actor, uint8 upload, {p}": actor_uint8(d) for p, d in precisions.items()})
    med, cpu, peaks = timed_cases(cases, device, sizes.reps, "caching")
    coded = "fp32/TF32"  # run_teacher's default precision, as the cache job runs it
    rows = []
    for name, seconds in med.items():
        precision = next((p for p in precisions if name.endswith(p)), coded)  # "as coded": run_teacher's
        rows.append(
            {
                "case": name,
                "precision": precision,
                "views/s": n / seconds,
                "/ bare, same precision": med[f"bare {precision}"] / seconds,
                "cpu s/view": cpu[name] / n,
                "peak GiB": gib(peaks[name]),
            }
        )
    return rows, encoded


def write_cache(out: str, spec, encoded: list[dict], crop_rows: list[dict], layout, views: int, num_images: int):
    """A finalized cache of the actor's encoded shards (stored crops too when spec says so)."""
    from pipeline.cache import open_reader, open_writer
    from pipeline.cache.encodings import bytes_array
    from pipeline.cache.schema import CROP_FIELD

    writer = open_writer(out, spec, "zarr")
    for index, (enc, rows) in enumerate(zip(encoded, crop_rows)):
        record = {k: v for k, v in enc.items() if k not in ("shard", "shard_rows", "valid", "skip_reason")}
        if spec.store_crops:
            record[CROP_FIELD] = bytes_array(rows[CROP_FIELD])
        writer.write_shard(index, record)
    manifest = C.synthetic_manifest(views, layout.ann_file, layout.image_root, num_images)
    writer.finalize(manifest, expected_shards=len(encoded))
    return open_reader(out)


# ----------------------------------------------------------------------------- (b) steps


@dataclass
class Trainer:
    """The training loop's step (pipeline.distill.train_loop_per_worker) on one device."""

    model: object
    optimizer: object
    scaler: object
    loss_fn: object
    device: object
    channels_last: bool = False
    teacher: object = None

    @classmethod
    def build(cls, preset: str, device, channels_last: bool = False, teacher: str | None = None):
        import torch

        from distilpose.device import prepare_model
        from distilpose.losses import DistillLoss
        from distilpose.models import build_model
        from pipeline.distill import DistillConfig
        from pipeline.distill.worker import online_teacher

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = prepare_model(build_model(preset).train(), device, channels_last)
        online = None
        if teacher:
            online = online_teacher(DistillConfig(cache="unused", student=preset, online_teacher=teacher), device)
        return cls(
            model=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
            scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),  # --amp on a GPU
            loss_fn=DistillLoss(),
            device=device,
            channels_last=channels_last,
            teacher=online,
        )

    def step(self, batch: dict, on_device: bool = False) -> None:
        import torch

        from pipeline.student_batch import on_device as to_device_normalized

        if not on_device:
            batch = to_device_normalized(batch, self.device, self.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            out = self.model(batch["image"])
            targets = self.teacher(batch["image"]) if self.teacher is not None else batch
            total, _ = self.loss_fn(out, batch["target"], batch["target_weight"], targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def host_batch(sizes: Sizes) -> dict:
    """A decoded training batch in (pinned) host memory, as the loader hands it over."""
    from distilpose.device import pin_batch

    spec, raw, image, target, weight = step_inputs(sizes.teacher, sizes.train_batch)
    return pin_batch({"image": image, "target": target, "target_weight": weight, **decode_teacher_fields(raw, spec)})


def steps(sizes: Sizes, device) -> list[dict]:
    batch = host_batch(sizes)
    cases = {}
    for preset in sizes.students:
        modes = {
            "cached": Trainer.build(preset, device),
            "online": Trainer.build(preset, device, teacher=sizes.teacher),
            "cached, channels_last": Trainer.build(preset, device, channels_last=True),
        }
        for mode, trainer in modes.items():
            cases[f"{preset} {mode}"] = lambda t=trainer: [t.step(batch) for _ in range(sizes.steps)]
    med, cpu, peaks = timed_cases(cases, device, sizes.reps, "steps")
    rows = []
    for name, seconds in med.items():
        preset = name.split()[0]
        rows.append(
            {
                "case": name,
                "ms/step": 1e3 * seconds / sizes.steps,
                "samples/s": sizes.train_batch * sizes.steps / seconds,
                "online / this": med[f"{preset} online"] / seconds,
                "cpu ms/step": 1e3 * cpu[name] / sizes.steps,
                "peak GiB": gib(peaks[name]),
            }
        )
    return rows


# ----------------------------------------------------------------------------- (c) loader


def make_stream(reader, layout, sizes: Sizes, device, prefetch: int):
    from distilpose.data.coco import load_coco
    from distilpose.losses import DistillLoss
    from distilpose.models import get_config
    from pipeline.cache_loader import CachedViewStream

    _, images = load_coco(layout.ann_file)
    crops = bool(reader.spec.store_crops)
    return CachedViewStream(
        reader,
        image_root=None if crops else layout.image_root,
        image_files=None if crops else {i: info.file_name for i, info in images.items()},
        input_size=get_config(sizes.students[0]).input_size,
        teacher_fields=tuple(DistillLoss().needed_teacher_fields),
        rank=0,
        world_size=1,
        batch_size=sizes.train_batch,
        seed=0,
        prefetch=prefetch,
        pin_memory=device.type == "cuda",
        normalize=device.type != "cuda",  # as the distill worker: a GPU normalizes the uint8 images
    )


def loader_vs_synthetic(sizes: Sizes, device, reader, layout) -> tuple[list[dict], float]:
    """(c): one epoch of student training through the loader vs synthetic device tensors."""
    from distilpose.device import to_device

    preset = sizes.students[0]
    trainer = Trainer.build(preset, device)
    stream = make_stream(reader, layout, sizes, device, prefetch=2)
    synthetic = to_device(host_batch(sizes), device)
    epochs = iter(range(10**6))
    cases = {
        f"{preset} real cache + loader": lambda: [trainer.step(b) for b in stream.epoch(next(epochs))],
        f"{preset} synthetic on device": lambda: [trainer.step(synthetic, True) for _ in range(stream.steps)],
    }
    # At full width where there are cores to spare: the batches built in loader processes
    # (--loader-processes), all CPUs but the training process's one, at most 8.
    processes = min((os.cpu_count() or 1) - 1, 8)
    wide = make_stream(reader, layout, sizes, device, prefetch=2)
    wide.processes = processes
    if processes >= 2:
        name = f"{preset} real cache + {processes} loader processes"
        cases[name] = lambda: [trainer.step(b) for b in wide.epoch(next(epochs))]
    try:
        med, cpu, peaks = timed_cases(cases, device, sizes.reps, "loader")
    finally:
        wide.close()
    samples = stream.steps * sizes.train_batch
    rows = [
        {
            "case": name,
            "steps": stream.steps,
            "samples/s": samples / seconds,
            "synthetic / this": seconds / med[f"{preset} synthetic on device"],  # throughput ratio
            "cpu ms/sample": 1e3 * cpu[name] / samples,
            "peak GiB": gib(peaks[name]),
        }
        for name, seconds in med.items()
    ]
    return rows, samples / med[f"{preset} real cache + loader"]


def loader_cpu(sizes: Sizes, device, readers: dict, layout) -> list[dict]:
    """(e): the loader alone, one epoch, no prefetch thread: CPU seconds per sample."""
    streams = {name: make_stream(r, layout, sizes, device, prefetch=0) for name, r in readers.items()}
    epochs = iter(range(10**6))
    cases = {name: (lambda s=s: sum(1 for _ in s.epoch(next(epochs)))) for name, s in streams.items()}
    med, cpu, _ = timed_cases(cases, device, sizes.reps, "loader cpu")
    return [
        {
            "loader": name,
            "samples": streams[name].steps * sizes.train_batch,
            "wall ms/sample": 1e3 * med[name] / (streams[name].steps * sizes.train_batch),
            "cpu ms/sample": 1e3 * cpu[name] / (streams[name].steps * sizes.train_batch),
        }
        for name in cases
    ]


# ----------------------------------------------------------------------------- main


def teacher_outputs_like(crop_rows: list[dict], spec, input_size) -> list[dict]:
    """Encoded shards with teacher-like fields (no teacher run): for the loader's cost, which
    depends on the fields' sizes and the crops, not on the teacher's values."""
    from pipeline.teacher_stage import encode_shard_rows

    rng = np.random.default_rng(0)
    out = []
    for rows in crop_rows:
        n = int(rows["valid"].sum())
        fake = C.teacher_like_views(n, spec, rng, input_size=input_size)
        fields = {k: fake[k] for k in ("heatmaps", "kpt_tokens", "vis_tokens", "gauss", "confidence")}
        out.append(encode_shard_rows(rows, fields, spec))
    return out


def main() -> None:
    import dataclasses

    import torch

    from distilpose.data.synthetic import make_synthetic_coco
    from distilpose.models import get_config
    from pipeline.cache.schema import CacheSpec

    args = parse_args()
    sizes = LOADER_COST if args.loader_cost else SMOKE if args.smoke else FULL
    if args.smoke or args.loader_cost:
        device = torch.device("cpu")
        C.set_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" on a GPU means TF32 matmuls and convs
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        raise SystemExit("error: no CUDA GPU here; run BENCH_SMOKE=1 make bench-gpu for the CPU smoke run")
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench-gpu-", dir=C.RESULTS_DIR if C.RESULTS_DIR.exists() else None)
    try:
        synth = make_synthetic_coco(os.path.join(tmp, "data"), sizes.images, 1, seed=0, image_size=sizes.image_size)
        print(f"synthetic data: {synth.seconds:.1f} s", flush=True)
        config = get_config(sizes.teacher)
        layout, shards = T.plan(os.path.join(tmp, "data"), sizes.teacher, sizes.views, sizes.shard_instances, None)
        crop_rows, _ = T.precompute_crops(layout, shards, tuple(config.input_size), store_crops="jpeg")
        spec = CacheSpec.from_model_config(config)
        views = sum(int(r["valid"].sum()) for r in crop_rows)
        print(f"{device}: {synth.persons['train']} persons, {views} views in {len(shards)} shards", flush=True)
        report: dict = {"sizes": dataclasses.asdict(sizes), "device": str(device)}
        if args.loader_cost:
            encoded = teacher_outputs_like(crop_rows, spec, tuple(config.input_size))
        else:
            model = C.calibrated_teacher(sizes.teacher).to(device)
            report["caching"], encoded = caching(sizes, device, model, crop_rows, spec)
            del model
            report["steps"] = steps(sizes, device)
        readers = {
            crops: write_cache(
                os.path.join(tmp, f"cache-{crops.split()[0]}"),
                dataclasses.replace(spec, store_crops=crops == "stored JPEG crops"),
                encoded,
                crop_rows,
                layout,
                sizes.views,
                synth.images["train"],
            )
            for crops in ("rebuilt crops", "stored JPEG crops")
        }
        if not args.loader_cost:
            report["loader"], gpu_rate = loader_vs_synthetic(sizes, device, readers["rebuilt crops"], layout)
        report["loader_cpu"] = loader_cpu(sizes, device, readers, layout)
        text = render(report, None if args.loader_cost else gpu_rate, device)
        report["wall_s"] = time.perf_counter() - started
        print("\n" + text + f"\n\nwall {report['wall_s']:.0f} s", flush=True)
        name = "loader_cost" if args.loader_cost else NAME + ("_smoke" if args.smoke else "")
        C.write_results(name, {"context": C.context(device=str(device)), **report, "report": text})
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def render(report: dict, gpu_rate: float | None, device) -> str:
    s = report["sizes"]
    lines = [f"device {device}; teacher {s['teacher']}; students {', '.join(s['students'])}"]
    if "caching" in report:
        lines += [f"\n(a) teacher caching vs bare forward, batch {s['teacher_batch']}", C.table(report["caching"])]
        lines += [f"\n(b) training step, batch {s['train_batch']}, AMP", C.table(report["steps"])]
        for row in report["steps"]:
            if row["case"] == f"{s['students'][0]} cached":
                lines.append(f"{row['case']}: online / cached {row['online / this']:.2f} ")
                lines[-1] += C.verdict(row["online / this"], 3.0)
        lines += ["\n(c) student training from the real cache through the loader", C.table(report["loader"])]
        ratio = report["loader"][0]["synthetic / this"]
        lines.append(f"synthetic / real {ratio:.2f} ({'meets' if ratio <= 2 else 'ABOVE'} goal <= 2)")
    lines += ["\n(e) the loader alone (no prefetch thread), one epoch", C.table(report["loader_cpu"])]
    if gpu_rate is not None:
        for row in report["loader_cpu"]:
            cores = gpu_rate * row["cpu ms/sample"] / 1e3
            lines.append(f"{row['loader']}: {cores:.1f} CPU cores feed {gpu_rate:.0f} samples/s ((c) on {device})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
