"""Student sweeps with Ray Tune against one teacher cache.

A sweep space is a YAML file:

    base:                       # DistillConfig fields shared by every trial
      student: distilpose-tiny
      epochs: 10
    trials:                     # named trials, each overriding base fields
      - {name: none, no_distill: true}
      - {name: all}
    grid:                       # optional: every trial is crossed with these values
      lr: [0.001, 0.0005]

Each trial is one distillation run (a Ray Train TorchTrainer inside a Tune function
trainable, the Train V2 way) with its own run directory under
`<storage>/<sweep>/runs/<trial>`; rerunning the same sweep command restores the Tune
experiment and each unfinished trial resumes from its own last checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import os
from dataclasses import dataclass

import yaml

from pipeline import storage
from pipeline.distill import DistillConfig

RESULT_COLUMNS = ("trial", "student", "AP", "AP50", "AP75", "APM", "APL", "AR", "train/loss", "epochs")


@dataclass
class SweepConfig:
    cache: str
    space: str
    storage: str
    name: str
    trials: int | None = None  # run only the first N trials of the space
    max_concurrent: int = 1
    overrides: dict | None = None  # DistillConfig fields forced on every trial (e.g. val, data)


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
                raise ValueError(f"{path}: trial {t['name']}: unknown fields {sorted(bad)}")
            expanded.append(t)
    names = [t["name"] for t in expanded]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: trial names must be unique: {names}")
    return expanded


def _trial_fn(config: dict) -> None:
    """Tune function trainable: one distillation run; Train metrics are forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.distill import build_trainer

    trial = dict(config["trial"])
    trial_name = trial["name"]
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    kwargs = {k: v for k, v in trial.items() if k in fields}
    kwargs.update(cache=config["cache"], storage=config["runs_storage"], name=trial_name)
    kwargs.update(config.get("overrides") or {})
    cfg = DistillConfig(**kwargs)
    result = build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        raise result.error


def run_sweep(cfg: SweepConfig) -> list[dict]:
    from ray import tune

    trials = load_space(cfg.space)
    if cfg.trials:
        trials = trials[: cfg.trials]
    sweep_root = storage.join(cfg.storage, cfg.name)
    runs_storage = storage.join(sweep_root, "runs")
    tune_storage = cfg.storage if "://" in cfg.storage else os.path.abspath(cfg.storage)
    param_space = {
        "trial": tune.grid_search(trials),
        "cache": cfg.cache,
        "runs_storage": runs_storage if "://" in runs_storage else os.path.abspath(runs_storage),
        "overrides": cfg.overrides or {},
    }
    trainable = tune.with_resources(_trial_fn, {"cpu": 0.01})
    experiment = storage.join(tune_storage, cfg.name)
    if tune.Tuner.can_restore(experiment):
        print(f"[sweep] resuming sweep '{cfg.name}' from {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True, param_space=param_space)
    else:
        print(f"[sweep] starting sweep '{cfg.name}': {len(trials)} trials -> {experiment}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=tune_storage, failure_config=tune.FailureConfig(max_failures=1)
            ),
        )
    grid = tuner.fit()
    rows = []
    for result in grid:
        trial = result.config["trial"] if result.config else {}
        metrics = result.metrics or {}
        rows.append(
            {
                "trial": trial.get("name", "?"),
                "student": trial.get("student", ""),
                **{k: metrics.get(k) for k in RESULT_COLUMNS[2:]},
                "error": repr(result.error)[:200] if result.error else "",
            }
        )
    rows.sort(key=lambda r: -(r["AP"] if isinstance(r["AP"], int | float) else -1.0))
    write_results_csv(storage.join(sweep_root, "results.csv"), rows)
    return rows


def write_results_csv(uri: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(RESULT_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    storage.atomic_write_bytes(uri, buf.getvalue().encode())
