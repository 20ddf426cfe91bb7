"""Train a heatmap teacher (TokenPose) on a COCO-format data set, then evaluate it on val.

    python jobs/train_teacher.py --data /tmp/synth --teacher tokenpose-tiny --epochs 30 \
        --time-budget-s 210 --out runs/teacher-tiny

Data layouts: DIR/annotations/person_keypoints_{train,val}.json + DIR/images/{train,val}/
(synthetic) or DIR/annotations/person_keypoints_{train,val}2017.json + DIR/{train,val}2017/.
Writes OUT/teacher.pt (our checkpoint format), OUT/train_log.csv and OUT/eval.json; the same
command with the same --out resumes from OUT/teacher.pt.
"""

import argparse
import sys

import _bootstrap  # noqa: F401


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data set root")
    p.add_argument("--teacher", default="tokenpose-tiny", help="teacher preset")
    p.add_argument(
        "--model-override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a ModelConfig field of the preset, e.g. dim=96 or hrnet_modules=[1,1] (repeatable)",
    )
    p.add_argument("--epochs", type=int, default=20, help="epochs (an upper bound when --time-budget-s is set)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--recipe",
        choices=["spec", "fast"],
        default="spec",
        help="spec: the official recipe; fast: for minutes-long CPU runs (He init, lr 3e-3, no augmentation)",
    )
    p.add_argument("--lr", type=float, help="default: from the recipe")
    p.add_argument("--sigma", type=float, help="heatmap Gaussian sigma in heatmap px (default: from the recipe)")
    p.add_argument("--aug", choices=["spec", "light", "none"], help="augmentation preset (default: from the recipe)")
    p.add_argument(
        "--backbone-init",
        choices=["kaiming", "official"],
        help="backbone conv init: official = mmpose N(0, 0.001), kaiming = He (default: from the recipe)",
    )
    p.add_argument("--out", default="runs/teacher", help="run directory (checkpoint, logs, eval.json)")
    p.add_argument("--time-budget-s", type=float, help="stop training after this many seconds of training")
    p.add_argument(
        "--budget-clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what --time-budget-s counts: wall-clock time or the training process CPU time (fair on shared machines)",
    )
    p.add_argument("--workers-dataloader", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 + one worker suits 2 cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/teacher.pt exists")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--no-flip-test", action="store_true", help="evaluate without the flip test")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from distilpose.teacher_training import TeacherTrainConfig, parse_overrides, train_teacher

    cfg = TeacherTrainConfig.from_recipe(
        args.recipe,
        data=args.data,
        teacher=args.teacher,
        model_overrides=parse_overrides(args.model_override),
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        sigma=args.sigma,
        aug=args.aug,
        backbone_init=args.backbone_init,
        time_budget_s=args.time_budget_s,
        budget_clock=args.budget_clock,
        workers=args.workers_dataloader,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
        resume=not args.no_resume,
        evaluate=not args.no_eval,
        eval_flip_test=not args.no_flip_test,
    )
    result = train_teacher(cfg)
    state = result.state
    print(
        f"[teacher] done in {result.wall_s:.1f} s: {state.epoch} epochs, {state.iteration} iterations, "
        f"{state.elapsed_s:.0f} s training{' (stopped by the time budget)' if state.stopped_by_budget else ''}; "
        f"checkpoint {result.checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
