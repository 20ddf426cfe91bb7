"""(4) Training step time from the cache vs with the online teacher, same student, same batch.

    python bench/bench_distill_step.py            # batch 8, 2 repetitions (what `make bench` runs)
    python bench/bench_distill_step.py --quick    # batch 8, 1 repetition (smoke run)
    python bench/bench_distill_step.py --full     # batch 32, the training default (slow on CPU)

Per student (distilpose-s, distilpose-l; random init, train mode, Adam, DistillLoss with the
paper weights, every term on) and the paper teacher tokenpose-w48 (random init, seeded,
built by the training code's own `pipeline.distill.worker.online_teacher`), measured side by side,
interleaved, median:

- cached: decode the batch's encoded teacher fields (heatmaps i8-thresh, tokens
  int8-token-scale: the raw arrays a cache read returns, decoded to float32 and made into
  tensors as the loader does), then student forward + loss + backward + optimizer step;
- online: the teacher forward under no_grad on the same images (what `--online-teacher`
  runs), then the same student step, in the training loop's order (student forward, teacher,
  loss, backward, step); --teacher-first adds a variant that runs the teacher first.

Same images, targets, threads and batch for both. Ratio = online / cached (goal >= 3 for
distilpose-s). The loader's other work (shard reads, crop rebuild) is the same in both
modes and left out; bench_cache_reader.py measures it.
"""

from __future__ import annotations

import argparse
import time

import _common as C
import numpy as np

NAME = "distill_step"
TEACHER_FIELDS = ("heatmaps", "kpt_tokens", "vis_tokens")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 8, 1 repetition")
    p.add_argument("--full", action="store_true", help="batch 32 (the training default)")
    p.add_argument("--batch", type=int, help="batch size (default 8; --full: 32)")
    p.add_argument("--reps", type=int, help="timed repetitions after one warm-up (default 2; --quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the trainer's default: 1 per worker)")
    p.add_argument("--students", default="distilpose-s,distilpose-l")
    p.add_argument("--teacher", default="tokenpose-w48")
    p.add_argument(
        "--teacher-first", action="store_true", help="also time an online variant that runs the teacher first"
    )
    args = p.parse_args()
    args.batch = args.batch or (32 if args.full else 8)
    args.reps = args.reps or (1 if args.quick else 2)
    args.students = [s.strip() for s in args.students.split(",") if s.strip()]
    return args


def step_inputs(teacher: str, batch: int):
    """One training batch for `teacher`'s input size: the cache spec, the raw (encoded)
    teacher fields a cache read hands to decode_fields, images, targets, joint weights."""
    import torch

    from distilpose.models import get_config
    from pipeline.cache.encodings import encode_views
    from pipeline.cache.schema import CacheSpec, arrays_for_fields

    teacher_config = get_config(teacher)
    h, w = teacher_config.input_size
    spec = CacheSpec.from_model_config(teacher_config)
    rows = C.teacher_like_views(batch, spec, np.random.default_rng(0), input_size=(h, w))
    encoded = encode_views(rows, spec)
    raw = {name: encoded[name] for name in arrays_for_fields(spec, TEACHER_FIELDS)}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        image = torch.randn(batch, 3, h, w)
    target = torch.from_numpy(rows["joints"]) / torch.tensor([w, h], dtype=torch.float32)
    weight = torch.from_numpy(rows["joint_weights"])
    return spec, raw, image, target, weight


def decode_teacher_fields(raw: dict, spec) -> dict:
    """The loader's work on the teacher fields: decode to float32, make tensors."""
    import torch

    from pipeline.cache.encodings import decode_fields

    fields = decode_fields(raw, spec, TEACHER_FIELDS)
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in fields.items()}


def main() -> None:
    import torch

    from distilpose.losses import DistillLoss
    from distilpose.models import build_model
    from pipeline.distill import DistillConfig
    from pipeline.distill.worker import online_teacher
    from pipeline.plan import model_cost

    args = parse_args()
    C.set_threads(args.threads)
    spec, raw, image, target, weight = step_inputs(args.teacher, args.batch)
    loss_fn = DistillLoss()
    print(f"building {args.teacher} (online teacher, seeded random init) and students {args.students}", flush=True)
    teacher = online_teacher(
        DistillConfig(cache="unused", student=args.students[0], online_teacher=args.teacher), torch.device("cpu")
    )

    def decoded_fields() -> dict:
        return decode_teacher_fields(raw, spec)

    # Where a step's time goes: seconds per part, one entry per call (first = warm-up).
    parts: dict[str, dict[str, list[float]]] = {}

    def make_steps(preset: str):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model(preset).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def student_step(mode: str, get_teacher_fields, teacher_first: bool = False) -> None:
            record = parts.setdefault(f"{preset} {mode}", {})
            seconds: dict[str, float] = {}

            def timed(name: str, fn):
                start = time.process_time()  # CPU seconds: steadier than wall time on a shared box
                value = fn()
                seconds[name] = time.process_time() - start
                return value

            # The training loop's order is student forward, then teacher fields; the variant
            # runs the teacher first, before the student's autograd graph holds its memory.
            if teacher_first:
                teacher_fields = timed("teacher fields", get_teacher_fields)
            out = timed("student forward", lambda: model(image))
            if not teacher_first:
                teacher_fields = timed("teacher fields", get_teacher_fields)
            total, _ = timed("loss", lambda: loss_fn(out, target, weight, teacher_fields))
            timed("backward", lambda: (optimizer.zero_grad(set_to_none=True), total.backward()))
            timed("optimizer", optimizer.step)
            for name in ("student forward", "teacher fields", "loss", "backward", "optimizer"):
                record.setdefault(name, []).append(seconds[name])

        def cached() -> None:
            student_step("cached", decoded_fields)

        def online() -> None:
            student_step("online", lambda: teacher(image))

        def online_teacher_first() -> None:
            student_step("online, teacher first", lambda: teacher(image), teacher_first=True)

        return cached, online, online_teacher_first

    cases = {}
    for preset in args.students:
        cached, online, online_teacher_first = make_steps(preset)
        cases[f"{preset} cached"] = cached
        cases[f"{preset} online"] = online
        if args.teacher_first:
            cases[f"{preset} online, teacher first"] = online_teacher_first
    cases["decode teacher fields only"] = decoded_fields
    print(f"batch {args.batch}, threads {args.threads}, 1 warm-up + {args.reps} interleaved repetitions", flush=True)
    cpu: dict[str, list[float]] = {}
    times = C.interleaved(cases, reps=args.reps, warmup=1, label="step", cpu_times=cpu)
    med = {name: C.median(t) for name, t in times.items()}
    med_cpu = {name: C.median(t) for name, t in cpu.items()}

    rows_out = []
    ratios, paired, cpu_ratios, ratios_teacher_first = {}, {}, {}, {}
    for preset in args.students:
        cached, online = med[f"{preset} cached"], med[f"{preset} online"]
        ratios[preset] = online / cached
        # Each round's online step ran right after its cached step: their ratio shares the
        # machine's load at that moment, so the median of these pairs resists load spikes.
        paired[preset] = C.median([o / c for o, c in zip(times[f"{preset} online"], times[f"{preset} cached"])])
        cpu_ratios[preset] = med_cpu[f"{preset} online"] / med_cpu[f"{preset} cached"]
        if args.teacher_first:
            ratios_teacher_first[preset] = med[f"{preset} online, teacher first"] / cached
        rows_out.append(
            {
                "student": preset,
                "cached s/step": cached,
                "online s/step": online,
                "cached spread": C.spread(times[f"{preset} cached"]),
                "online spread": C.spread(times[f"{preset} online"]),
                "cached views/s": args.batch / cached,
                "online views/s": args.batch / online,
                "online/cached": ratios[preset],
                "paired ratio": paired[preset],
                "cached cpu s": med_cpu[f"{preset} cached"],
                "online cpu s": med_cpu[f"{preset} online"],
                "cpu online/cached": cpu_ratios[preset],
            }
        )
        if args.teacher_first:
            rows_out[-1]["teacher-first online/cached"] = ratios_teacher_first[preset]
    decode_s = med["decode teacher fields only"]
    part_rows = [
        {"step": step, **{name: C.median(values[1:]) for name, values in record.items()}}
        for step, record in parts.items()
    ]
    # MACs per view: the paper's count plus the attention matmuls it leaves out (pipeline.plan).
    gmacs = {
        name: model_cost(name).gmacs_paper + model_cost(name).gmacs_attention for name in (*args.students, args.teacher)
    }
    lines = [
        f"teacher {args.teacher}; batch {args.batch}; torch threads {args.threads}; "
        f"{args.reps} interleaved repetitions after 1 warm-up, medians",
        "",
        C.table(rows_out),
        "",
        f"decode of the batch's teacher fields (i8-thresh heatmaps, int8 tokens -> fp32 tensors): "
        f"{1e3 * decode_s:.1f} ms/step",
        "",
        "CPU seconds per step by part (medians; 'teacher fields' = decode when cached, teacher forward when online)",
        C.table(part_rows),
        "",
        "achieved rates (GMACs per view incl. attention x batch / median CPU seconds of the part):",
    ]
    for preset in args.students:
        cached_parts = {k: C.median(v[1:]) for k, v in parts[f"{preset} cached"].items()}
        teacher_s = C.median(parts[f"{preset} online"]["teacher fields"][1:])
        lines.append(
            f"  {preset}: student forward {args.batch * gmacs[preset] / cached_parts['student forward']:.1f} GMAC/s, "
            f"backward = {cached_parts['backward'] / cached_parts['student forward']:.2f} x forward; "
            f"teacher forward {args.batch * gmacs[args.teacher] / teacher_s:.1f} GMAC/s"
        )
    lines.append("")
    for preset, ratio in ratios.items():
        goal = f" ({C.verdict(min(ratio, cpu_ratios[preset]), 3.0)})" if preset == "distilpose-s" else ""
        # MAC count only: a training step ~ 3x its forward (backward ~ 2x forward).
        expected = 1 + gmacs[args.teacher] / (3 * gmacs[preset])
        lines.append(
            f"  {preset}: online / cached = {ratio:.2f} wall (paired per round {paired[preset]:.2f}), "
            f"{cpu_ratios[preset]:.2f} CPU time{goal}; "
            f"MAC-count expectation 1 + {gmacs[args.teacher]:.2f}/(3 x {gmacs[preset]:.2f}) = {expected:.2f}"
        )
    text = "\n".join(lines)
    print("\n" + text)
    C.write_results(
        NAME if not args.full else NAME + "_full",
        {
            "context": C.context(threads=args.threads, batch=args.batch, teacher=args.teacher),
            "times_s": times,
            "median_s": med,
            "ratio_online_over_cached": ratios,
            "ratio_online_over_cached_paired": paired,
            "ratio_online_over_cached_cpu": cpu_ratios,
            "cpu_s": cpu,
            "ratio_online_teacher_first_over_cached": ratios_teacher_first,
            "parts_s": parts,
            "report": text,
        },
    )


if __name__ == "__main__":
    main()
