"""Student sweeps with Ray Tune against one teacher cache.

A sweep space is a YAML file:

    base:                       # DistillConfig fields shared by every trial
      student: distilpose-tiny
      epochs: 10
    trials:                     # named trials, each overriding base fields
      - {name: none, no_distill: true}
      - {name: all}
      - {name: other, cache: runs/cache-w48}   # a trial's own cache (another teacher) replaces --cache
    grid:                       # optional: every trial is crossed with these values
      lr: [0.001, 0.0005]

Each trial is one distillation run (a Ray Train TorchTrainer inside a Tune function
trainable, the Train V2 way) with its own run directory under
`<storage>/<sweep>/runs/<trial>` (checkpoints, logs, exported student); rerunning the same
sweep command restores the Tune experiment: finished trials are kept as they are and each
unfinished trial resumes from its own last checkpoint. `<storage>/<sweep>/results.csv` ranks
the trials by val AP (with `val`), else by training loss.

Paths: Tune runs every trial with its trial folder as working directory, so local paths
(cache, storage, overrides such as `val`) are made absolute on the driver.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
from dataclasses import dataclass

import yaml

from distilpose.errors import UserError
from distilpose.options import option
from pipeline import storage
from pipeline.distill import DistillConfig
from pipeline.distill.hooks import WorkerHooks

RESULT_COLUMNS = ("trial", "student", "profile", "AP", "AP50", "AP75", "APM", "APL", "AR", "train/loss", "epoch")
# The trial's own driver only waits on its TorchTrainer; the workers hold the CPUs. Its
# share is carved out of the workers' (see trial_config), so N concurrent trials of W
# workers x C CPUs fit in exactly N*W*C CPUs (a 2-CPU machine runs 2 one-worker trials).
TRIAL_CPUS = 0.01


@dataclass
class SweepConfig:
    cache: str = option(help="teacher cache URI")
    space: str = option(help="sweep YAML (base / trials / grid)")
    storage: str = option("runs", help="sweep root (local or s3://)")
    name: str = option("sweep", help="sweep name; the same name resumes")
    trials: int | None = option(None, help="run only the first N trials")
    only: str | None = option(None, metavar="NAME,NAME", help="run only the trials with these names")
    max_concurrent: int = option(1, help="trials run at once")
    overrides: dict = option(  # DistillConfig fields forced on every trial (e.g. val, data)
        default_factory=dict,
        flag="--set",
        metavar="FIELD=VALUE",
        help="override a DistillConfig field on every trial, e.g. --set epochs=8 (repeatable)",
    )


# Fields renamed since a sweep was started: a restored Tune experiment keeps its trials' old
# keys, which would otherwise be dropped silently (trial_config keeps only known fields).
RENAMED_FIELDS = {"backbone_init": "conv_init"}


def load_space(path: str) -> list[dict]:
    """Expand a sweep YAML into a list of trial override dicts (each with a unique name)."""
    doc = yaml.safe_load(storage.read_bytes(path)) or {}
    unknown = set(doc) - {"base", "trials", "grid"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (expected base, trials, grid)")
    base = doc.get("base") or {}
    trials = doc.get("trials") or [{"name": "default"}]
    grid = doc.get("grid") or {}
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    expanded = []
    for trial in trials:
        if "name" not in trial:
            raise ValueError(f"{path}: every trial needs a name: {trial}")
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            t = {**base, **trial, **dict(zip(keys, values))}
            if keys:
                t["name"] = trial["name"] + "-" + "-".join(f"{k}{v}" for k, v in zip(keys, values))
            bad = set(t) - fields
            if bad:
                renamed = "".join(f"; {k} is now {RENAMED_FIELDS[k]}" for k in sorted(bad) if k in RENAMED_FIELDS)
                raise ValueError(f"{path}: trial {t['name']}: unknown fields {sorted(bad)}{renamed}")
            try:  # a value outside an option's choices (e.g. a misspelt conv_init)
                DistillConfig(**{"cache": "", **t})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: trial {t['name']}: {e}") from None
            expanded.append(t)
    names = [t["name"] for t in expanded]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: trial names must be unique: {names}")
    return expanded


def trial_name(trial) -> str:
    """Tune's name for a trial (progress tables, logs): the space's trial name."""
    return str(trial.config["trial"]["name"])


def trial_dirname(trial) -> str:
    return f"{trial_name(trial)}_{trial.trial_id}"


def trial_config(config: dict) -> DistillConfig:
    """The DistillConfig of one trial: the space's fields, then the sweep-wide overrides."""
    trial = {RENAMED_FIELDS.get(k, k): v for k, v in config["trial"].items()}
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    kwargs = {k: v for k, v in trial.items() if k in fields}
    # A trial may name its own cache (the student-teacher table: one cache per teacher).
    kwargs.update(cache=trial.get("cache") or config["cache"], storage=config["runs_storage"], name=trial["name"])
    kwargs.update(config.get("overrides") or {})
    cfg = DistillConfig(**kwargs)
    if not cfg.gpu and cfg.cpus_per_worker > TRIAL_CPUS:
        cfg = dataclasses.replace(cfg, cpus_per_worker=cfg.cpus_per_worker - TRIAL_CPUS / cfg.workers)
    return cfg


def _trial_fn(config: dict) -> None:
    """Tune function trainable: one distillation run; Train metrics are forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.distill import build_trainer, export_checkpoints, prepare_run

    # A retried or restored trial finds its Train run's snapshot and resumes from it.
    cfg, _ = prepare_run(trial_config(config))
    hooks = WorkerHooks.from_dict(config.get("hooks"))
    result = build_trainer(cfg, callbacks=[TuneReportCallback()], hooks=hooks).fit()
    if result.error:
        raise result.error
    exported = export_checkpoints(cfg, result)
    # The final metrics once more, from this process: a trial whose Train run had already
    # finished (sweep killed before Tune recorded it) reports nothing through the callback.
    tune.report({**(result.metrics or {}), "exported_student": exported["latest"]})


def warn_if_cluster_too_small(configs: list[DistillConfig], max_concurrent: int = 1) -> None:
    """Each trial needs its Train workers' CPUs plus its driver's (`trial_config` carves the
    driver's share out of the workers'); Ray waits forever for a trial that cannot fit, and
    runs fewer trials at once than asked when several do not fit together."""
    import ray

    from pipeline.distill import worker_resources

    if not ray.is_initialized():
        return
    have = ray.cluster_resources().get("CPU", 0.0)
    needs = []
    for cfg in configs:
        need = cfg.workers * worker_resources(cfg)["CPU"] + TRIAL_CPUS
        needs.append(need)
        if need > have + 1e-9:  # carving leaves float dust: 0.99 + 0.01
            print(
                f"[sweep] WARNING: trial {cfg.name} needs {need:g} CPUs, the cluster has {have:g}: it waits "
                "until the cluster grows (lower workers/cpus_per_worker with --set to fit)",
                flush=True,
            )
    together = sum(sorted(needs)[:max_concurrent])
    if max_concurrent > 1 and together > have + 1e-9:
        print(
            f"[sweep] WARNING: {max_concurrent} concurrent trials need {together:g} CPUs, the cluster has "
            f"{have:g}: fewer trials will run at once than --max-concurrent asks",
            flush=True,
        )


def resolve_overrides(overrides: dict) -> dict:
    """Check sweep-wide overrides name DistillConfig fields; make their local paths absolute."""
    from pipeline.distill import resolve_paths

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown DistillConfig fields in the sweep overrides: {sorted(unknown)}")
    resolved = resolve_paths(DistillConfig(**{"cache": "", "student": "", **overrides}))
    return {k: getattr(resolved, k) for k in overrides}


def sweep_trials(cfg: SweepConfig) -> tuple[list[dict], dict]:
    """The space's trials (the first `trials`) and what every trial shares (absolute paths:
    Tune runs each trial in its own folder as working directory)."""
    trials = load_space(cfg.space)
    if cfg.only:
        names = [n for n in cfg.only.split(",") if n]
        known = [t["name"] for t in trials]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(
                f"--only {cfg.only}: no trial named {', '.join(unknown)} in {cfg.space} (it has {', '.join(known)})"
            )
        trials = [t for t in trials if t["name"] in names]
    if cfg.trials:
        trials = trials[: cfg.trials]
    # Tune runs each trial in its own folder: a trial's own cache path must be absolute too.
    trials = [{**t, "cache": storage.absolute(t["cache"])} if t.get("cache") else t for t in trials]
    shared = {
        "cache": storage.absolute(cfg.cache),
        "runs_storage": storage.absolute(storage.join(cfg.storage, cfg.name, "runs")),
        "overrides": resolve_overrides(cfg.overrides),
    }
    return trials, shared


def check_sweep(cfg: SweepConfig) -> list[DistillConfig]:
    """Refuse a bad space, cache or student before any trial starts; the trials' configs."""
    from pipeline.distill import check_cache_for_run

    trials, shared = sweep_trials(cfg)
    configs = [trial_config({**shared, "trial": trial}) for trial in trials]
    for config in configs:
        check_cache_for_run(config)
    return configs


def run_sweep(cfg: SweepConfig, hooks: WorkerHooks | None = None) -> list[dict]:
    """Run (or resume) the sweep; `hooks`: test hooks for every trial's workers (pipeline.distill.hooks)."""
    from ray import tune

    trials, shared = sweep_trials(cfg)
    if hooks:
        shared["hooks"] = hooks.to_dict()
    sweep_root = storage.join(cfg.storage, cfg.name)
    param_space = {"trial": tune.grid_search(trials), **shared}
    warn_if_cluster_too_small(check_sweep(cfg), cfg.max_concurrent)
    trainable = tune.with_resources(_trial_fn, {"cpu": TRIAL_CPUS})
    tune_storage = storage.absolute(cfg.storage)
    experiment = storage.join(tune_storage, cfg.name)
    if tune.Tuner.can_restore(experiment):
        print(f"[sweep] resuming sweep '{cfg.name}' from {experiment}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True, param_space=param_space)
    else:
        print(f"[sweep] starting sweep '{cfg.name}': {len(trials)} trials -> {experiment}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=cfg.max_concurrent,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=tune_storage, failure_config=tune.FailureConfig(max_failures=1)
            ),
        )
    grid = tuner.fit()
    rows = [result_row(result) for result in grid]
    rows.sort(key=rank_key)
    write_results_csv(storage.join(sweep_root, "results.csv"), rows)
    return rows


def result_row(result) -> dict:
    return trial_row(result.config, result.metrics or {}, result.error)


def trial_row(config: dict | None, metrics: dict, error: BaseException | None) -> dict:
    """One results row; student and profile are the ones the trial ran (the space's value, then --set)."""
    cfg = trial_config(config) if config else None
    return {
        "trial": config["trial"]["name"] if config else "?",
        "student": cfg.student if cfg else "",
        "profile": cfg.profile if cfg else "",
        **{k: metrics.get(k) for k in RESULT_COLUMNS[3:]},
        "error": repr(error)[:200] if error else "",
    }


def rank_key(row: dict) -> tuple:
    """Best first: highest AP; without AP (no --val, or failed) lowest train loss; failures last."""
    ap, loss = row.get("AP"), row.get("train/loss")
    number = (int, float)
    return (
        bool(row.get("error")),
        -(ap if isinstance(ap, number) else -1.0),
        loss if isinstance(loss, number) else float("inf"),
    )


def write_results_csv(uri: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [*RESULT_COLUMNS, "error"])
    writer.writeheader()
    writer.writerows(rows)
    storage.atomic_write_bytes(uri, buf.getvalue().encode())
