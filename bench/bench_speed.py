"""(6) Inference speed, end to end per person: the teacher and both students side by side.

    python bench/bench_speed.py            # batch 1 and 32, eager + ONNX Runtime, 2 threads (what `make bench` runs)
    python bench/bench_speed.py --full     # + TorchScript, 1 and 2 threads
    python bench/bench_speed.py --quick    # batch 1 and 4, eager + ONNX Runtime, 2 repetitions (smoke run)

Models: tokenpose-w48 (the teacher), distilpose-s and distilpose-l at paper size (256x192),
seeded random init (speed does not depend on the weights). One person = pre-processing (the
identity crop of a person box from a decoded 480x640 image, normalized: `build_sample`, as
evaluation and jobs/predict.py do it), the forward pass, and decoding to image px by
`inference.predict` (the teacher's heatmaps with DARK, the students' regression output), no
flip test. Runtimes: PyTorch eager, the model exported by distilpose/export.py in ONNX Runtime
and as TorchScript. CPU with the given thread counts (torch and onnxruntime alike); with CUDA
available the eager (and ONNX Runtime CUDA, when installed) cases run there too.

Per (threads, batch) every model x runtime case runs once per round, a fixed number of
rounds (interleaved); figures are medians. Ratios: student persons/s / teacher persons/s in
the same runtime, next to the paper's 4.90x (DistilPose-S) and 1.63x (DistilPose-L). Also
the max |ONNX Runtime - PyTorch| of each model's raw outputs on the benchmark's crops.

The default and --full runs write docs/speed.json and docs/speed.md (the README quotes them);
every run writes runs/bench/speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import _common as C
import numpy as np

NAME = "speed"
TEACHER = "tokenpose-w48"
STUDENTS = ("distilpose-s", "distilpose-l")
# The paper's speed column (FPS, the heatmap teacher's post-processing included).
PAPER_FPS = {"tokenpose-w48": 7.8, "distilpose-s": 40.2, "distilpose-l": 13.4}
# The speed-ups the paper prints. They are not 40.2 / 7.8 = 5.15 and 13.4 / 7.8 = 1.72: they
# correspond to a reference of ~8.2 FPS. Both are kept as published.
PAPER_RATIO = {"distilpose-s": 4.90, "distilpose-l": 1.63}
IMAGE_SIZE = (480, 640)
DOCS = C.ROOT / "docs"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 and 4, 2 repetitions, no docs/ output")
    p.add_argument("--full", action="store_true", help="eager, ONNX Runtime and TorchScript; 1 and 2 threads")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 32; --quick: 1 4)")
    p.add_argument("--threads", type=int, nargs="+", help="CPU thread counts (default 2; --full: 1 2)")
    p.add_argument("--runtimes", nargs="+", choices=("eager", "onnx", "torchscript"), help="default eager onnx")
    p.add_argument("--reps", type=int, help="timed rounds (default 3; --quick: 2)")
    p.add_argument("--models", nargs="+", default=[TEACHER, *STUDENTS])
    p.add_argument(
        "--rewrite-docs",
        action="store_true",
        help="measure nothing: rewrite docs/speed.md and README's table from docs/speed.json",
    )
    args = p.parse_args()
    args.batches = args.batches or ([1, 4] if args.quick else [1, 32])
    args.threads = args.threads or ([1, 2] if args.full else [2])
    args.runtimes = args.runtimes or (["eager", "onnx", "torchscript"] if args.full else ["eager", "onnx"])
    args.reps = args.reps or (2 if args.quick else 3)
    return args


# ----------------------------------------------------------------------------- inputs


def person_boxes(count: int, seed: int = 0):
    """Decoded synthetic images (480x640) and `count` person instances on them (cycled)."""
    from distilpose.data.coco import Instance, box_to_center_scale
    from distilpose.data.synthetic import render_image

    rng = np.random.default_rng(seed)
    images, boxes = [], []
    while len(boxes) < count:
        rendered = render_image(rng, IMAGE_SIZE)
        images.append(rendered.pixels)
        boxes += [(len(images) - 1, person["bbox"]) for person in rendered.persons]
    instances = []
    for index, (image_index, bbox) in enumerate(boxes[:count]):
        center, scale = box_to_center_scale(bbox)
        instances.append(
            Instance(index, image_index, "", center, scale, np.zeros((17, 3), np.float32), 1.0, bbox[2] * bbox[3])
        )
    return images, instances


def end_to_end(model, images, instances, device):
    """One batch, end to end: crop + normalize each person, forward, decode to image px."""
    import torch

    from distilpose.data.dataset import SampleSpec, build_sample
    from distilpose.data.transforms import identity_view
    from distilpose.inference import predict

    spec = SampleSpec(tuple(model.config.input_size))

    def run():
        samples = [build_sample(images[i.image_id], i, identity_view(i), spec) for i in instances]
        batch = {
            "image": torch.stack([s["image"] for s in samples]),
            "affine": torch.stack([s["affine"] for s in samples]),
            "image_id": torch.tensor([i.image_id for i in instances]),
            "box_score": torch.ones(len(instances)),
        }
        return predict(model, [batch], flip_test=False, device=device)

    return run


# ----------------------------------------------------------------------------- models


def build_models(presets, runtimes, threads, tmp: Path, device: str):
    """{(preset, runtime): model}; exported files are written once, sessions per thread count."""
    import torch

    from distilpose.export import export_onnx, export_torchscript, load_exported
    from distilpose.models import build_model

    models = {}
    for preset in presets:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            eager = build_model(preset).eval().to(device)
        if "eager" in runtimes:
            models[(preset, "eager")] = eager
        if "onnx" in runtimes:
            path = tmp / f"{preset}.onnx"
            if not path.exists():
                print(f"exporting {preset} to ONNX", flush=True)
                export_onnx(eager.cpu(), path)
                eager.to(device)
            providers = ["CPUExecutionProvider"]
            if device == "cuda" and "CUDAExecutionProvider" in onnx_providers():
                providers.insert(0, "CUDAExecutionProvider")
            models[(preset, "onnx")] = load_exported(path, threads=threads, providers=providers)
        if "torchscript" in runtimes:
            path = tmp / f"{preset}.torchscript.pt"
            if not path.exists():
                print(f"exporting {preset} to TorchScript", flush=True)
                export_torchscript(eager.cpu(), path)
                eager.to(device)
            models[(preset, "torchscript")] = load_exported(path).to(device)
    return models


def onnx_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def onnx_vs_eager(models, images: np.ndarray) -> dict[str, dict[str, float]]:
    """max |ONNX Runtime - eager| per model and raw output on the benchmark's crops."""
    import torch

    diffs = {}
    for (preset, runtime), model in models.items():
        eager = models.get((preset, "eager"))
        if runtime != "onnx" or eager is None:
            continue
        x = torch.from_numpy(images)
        with torch.inference_mode():
            a, b = eager(x.to(next(eager.parameters()).device)), model(x)
        names = ("coords", "sigma", "score") if hasattr(b, "coords") else ("heatmaps",)
        diffs[preset] = {n: float((getattr(a, n).cpu() - getattr(b, n)).abs().max()) for n in names}
    return diffs


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- run


def measure(args, device: str, threads: int, tmp: Path, images, instances) -> tuple[list[dict], dict]:
    import torch

    if device == "cpu":
        C.set_threads(threads)
    models = build_models(args.models, args.runtimes, threads, tmp, device)
    rows = []
    for batch in args.batches:
        cases = {
            f"{preset} {runtime}": end_to_end(model, images, instances[:batch], torch.device(device))
            for (preset, runtime), model in models.items()
        }
        label = f"{device} {threads}t batch {batch}" if device == "cpu" else f"{device} batch {batch}"
        warm = {
            name: end_to_end(m, images, instances[:1], torch.device(device)) for name, m in zip(cases, models.values())
        }
        C.interleaved(warm, reps=0, warmup=1, label=f"{label} warm-up at batch 1")
        cpu: dict[str, list[float]] = {}
        wall = C.interleaved(cases, reps=args.reps, warmup=0, label=label, cpu_times=cpu)
        for (preset, runtime), name in zip(models, cases):
            median = C.median(wall[name])
            rows.append(
                {
                    "model": preset,
                    "runtime": runtime,
                    "device": device,
                    "threads": threads if device == "cpu" else None,
                    "batch": batch,
                    "persons_per_s": batch / median,
                    "ms_per_person": 1000 * median / batch,
                    "wall_s": wall[name],
                    "cpu_s": cpu[name],
                }
            )
    input_size = tuple(next(iter(models.values())).config.input_size)
    return rows, onnx_vs_eager(models, crops(images, instances[: max(args.batches)], input_size))


def crops(images, instances, input_size: tuple[int, int]) -> np.ndarray:
    """The normalized crops (N, 3, H, W) the timed runs feed the models."""
    from distilpose.data.dataset import SampleSpec, build_sample
    from distilpose.data.transforms import identity_view

    spec = SampleSpec(input_size)
    return np.stack([build_sample(images[i.image_id], i, identity_view(i), spec)["image"].numpy() for i in instances])


def ratios(rows: list[dict]) -> list[dict]:
    """Student / teacher persons/s per (device, threads, runtime, batch)."""
    key = ("device", "threads", "runtime", "batch")
    teacher = {tuple(r[k] for k in key): r for r in rows if r["model"] == TEACHER}
    out = []
    for r in rows:
        base = teacher.get(tuple(r[k] for k in key))
        if r["model"] in STUDENTS and base:
            out.append(
                {
                    **{k: r[k] for k in key},
                    "student": r["model"],
                    "ratio": r["persons_per_s"] / base["persons_per_s"],
                    # The same ratio from this process's CPU seconds: on a shared machine it
                    # leaves out the time spent waiting for a core.
                    "ratio_cpu": C.median(base["cpu_s"]) / C.median(r["cpu_s"]),
                    "paper": PAPER_RATIO[r["model"]],
                }
            )
    return out


def ratio_table(ratio_rows: list[dict]) -> list[str]:
    """Markdown rows: student / teacher persons/s per (device, threads, runtime, batch), and
    in brackets the ratio of CPU seconds; the paper's ratios last."""
    lines = [
        "| device | threads | runtime | batch | DistilPose-S / teacher | DistilPose-L / teacher |",
        "|---|---|---|---|---|---|",
    ]
    grouped: dict[tuple, dict[str, dict]] = {}
    for r in ratio_rows:
        grouped.setdefault((r["device"], r["threads"], r["runtime"], r["batch"]), {})[r["student"]] = r
    for (device, threads, runtime, batch), by_student in grouped.items():
        cells = [
            f"{r['ratio']:.2f}x ({r['ratio_cpu']:.2f}x)" if r else "-"
            for r in (by_student.get("distilpose-s"), by_student.get("distilpose-l"))
        ]
        lines.append(f"| {device} | {threads or '-'} | {runtime} | {batch} | {cells[0]} | {cells[1]} |")
    lines.append(
        "| paper (FPS ratio as printed) | | | | "
        f"{PAPER_RATIO['distilpose-s']:.2f}x | {PAPER_RATIO['distilpose-l']:.2f}x |"
    )
    return lines


def measured_on(ctx: dict) -> str:
    return (
        f"Measured {ctx['time'][:16].replace('T', ' ')} UTC by "
        f"`{' '.join(['python bench/bench_speed.py', *ctx['argv']])}`"
        f"; {ctx['cpu_model']}, {ctx['host_cpus']} logical CPUs, load "
        f"average {ctx['loadavg_1m']:.1f} at the end; torch {ctx['torch']}, onnxruntime {ctx['onnxruntime']}"
    )


def markdown(rows: list[dict], ratio_rows: list[dict], ctx: dict) -> str:
    lines = [
        f"{measured_on(ctx)}. Persons/s end to end (crop + normalize, forward, decoding), median of the timed "
        "rounds; in brackets the ratio of the medians of this process's CPU seconds (steadier on a shared machine).",
        "",
        *ratio_table(ratio_rows),
        "",
        "| device | threads | runtime | batch | model | persons/s | ms/person |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['threads'] or '-'} | {r['runtime']} | {r['batch']} | {r['model']} | "
            f"{C.fmt(r['persons_per_s'])} | {C.fmt(r['ms_per_person'])} |"
        )
    return "\n".join(lines) + "\n"


def readme_block(ratio_rows: list[dict], ctx: dict) -> str:
    """The README's speed table: the ratios only; docs/speed.md has the absolute figures."""
    return "\n".join(
        [
            "Student / teacher persons/s end to end (pre-processing, forward, decoding: DARK for the teacher), "
            "paper-size models; in brackets the ratio of CPU seconds. "
            f"{measured_on(ctx)}; absolute figures in [docs/speed.md](docs/speed.md).",
            "",
            *ratio_table(ratio_rows),
        ]
    )


def write_docs(payload: dict) -> None:
    DOCS.joinpath("speed.md").write_text(markdown(payload["rows"], payload["ratios"], payload["context"]))
    C.write_docs_block(C.ROOT / "README.md", "bench_speed", readme_block(payload["ratios"], payload["context"]))
    print("written: docs/speed.md and README.md's speed table (from docs/speed.json)")


def main() -> None:
    import onnxruntime
    import torch

    args = parse_args()
    if args.rewrite_docs:
        write_docs(json.loads(DOCS.joinpath("speed.json").read_text()))
        return
    images, instances = person_boxes(max(args.batches))
    devices = [("cpu", t) for t in args.threads]
    if torch.cuda.is_available():
        devices.append(("cuda", None))
    print(
        f"bench_speed: {args.models}, runtimes {args.runtimes}, batches {args.batches}, {args.reps} rounds", flush=True
    )
    rows, diffs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for device, threads in devices:
            device_rows, device_diffs = measure(args, device, threads or 1, Path(tmp), images, instances)
            rows += device_rows
            diffs.update({f"{device} {k}": v for k, v in device_diffs.items()})
    ratio_rows = ratios(rows)
    ctx = C.context(
        cpu_model=cpu_model(),
        onnxruntime=onnxruntime.__version__,
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )
    print("\nstudent / teacher persons/s (paper: DistilPose-S 4.90x, DistilPose-L 1.63x)")
    print(C.table(ratio_rows, ["device", "threads", "runtime", "batch", "student", "ratio", "ratio_cpu", "paper"]))
    print(f"\npersons/s end to end on {ctx['cpu_model']} ({ctx['host_cpus']} CPUs, load {ctx['loadavg_1m']:.1f})")
    print(C.table(rows, ["device", "threads", "runtime", "batch", "model", "persons_per_s", "ms_per_person"]))
    print("\nmax |ONNX Runtime - PyTorch| on the benchmark's crops")
    for name, per_output in diffs.items():
        print(f"  {name}: " + "  ".join(f"{k} {v:.2e}" for k, v in per_output.items()))
    payload = {
        "context": ctx,
        "paper_fps": PAPER_FPS,
        "paper_ratio": PAPER_RATIO,
        "ratios": ratio_rows,
        "rows": rows,
        "onnx_max_abs_diff": diffs,
    }
    C.write_results(NAME, payload)
    if not args.quick:
        DOCS.joinpath("speed.json").write_text(json.dumps(payload, indent=2, default=C._json_default) + "\n")
        write_docs(payload)


if __name__ == "__main__":
    main()
