"""Student sweeps (Ray Tune around Ray Train): sweep spaces, ranking, a one-trial sweep in the
session's Ray that is re-run and must not train again, and (heavy) a 2-trial sweep through
`jobs/sweep.py` scored on val AP, re-run the same way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import ROOT, read_csv, read_starts, run_job

from pipeline.distill import DistillConfig
from pipeline.distill.hooks import ENV as HOOKS_ENV
from pipeline.sweep import SweepConfig, load_space, rank_key

ABLATION = ROOT / "sweeps" / "ablation.yaml"
ABLATION_TINY = ROOT / "sweeps" / "ablation-tiny.yaml"
PAPER_ROWS = {  # Table 4 of the paper: which loss terms each row uses
    "none": set(),
    "cs": {"cs"},
    "sh": {"sh"},
    "cs+sh": {"cs", "sh"},
    "kt": {"kt"},
    "vt": {"vt"},
    "kt+vt": {"kt", "vt"},
    "all": {"kt", "vt", "sh", "cs"},
}


def _write(path: Path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def test_ablation_yaml_is_the_papers_8_rows() -> None:
    trials = load_space(str(ABLATION))
    assert [t["name"] for t in trials] == list(PAPER_ROWS)
    for trial in trials:
        cfg = DistillConfig(cache="c", **{k: v for k, v in trial.items()})
        enabled = {k.removeprefix("alpha_") for k, v in cfg.alphas().items() if v > 0}
        assert enabled == PAPER_ROWS[trial["name"]], trial["name"]
        assert cfg.student == "distilpose-s" and cfg.epochs == 300  # the paper's schedule by default
    assert trials[0]["no_distill"] is True


def test_tiny_ablation_has_the_same_rows_on_the_teacher_initialised_tiny_student() -> None:
    paper = load_space(str(ABLATION))
    tiny = load_space(str(ABLATION_TINY))
    loss_keys = ("no_distill", "alpha_kt", "alpha_vt", "alpha_sh", "alpha_cs")
    strip = [{k: t.get(k) for k in ("name", *loss_keys)} for t in paper]
    assert [{k: t.get(k) for k in ("name", *loss_keys)} for t in tiny] == strip
    assert {t["student"] for t in tiny} == {"distilpose-l-tiny"}


def test_trial_driver_cpu_is_carved_out_of_the_workers_share() -> None:
    """Two 1-worker CPU trials must fit a 2-CPU cluster together (0.01 + 0.99 each)."""
    from pipeline.sweep import TRIAL_CPUS, trial_config

    def config(**trial):
        return {"trial": {"name": "t", "student": "distilpose-tiny", **trial}, "cache": "c", "runs_storage": "r"}

    one = trial_config(config())
    assert one.cpus_per_worker + TRIAL_CPUS == pytest.approx(1.0)
    two = trial_config(config(workers=2, cpus_per_worker=2.0))
    assert 2 * two.cpus_per_worker + TRIAL_CPUS == pytest.approx(4.0)
    assert round(two.cpus_per_worker) == 2  # the worker's torch thread count is unchanged
    assert trial_config(config(gpu=True)).cpus_per_worker == 1.0


def test_load_space_expands_grid_and_rejects_unknown_fields(tmp_path) -> None:
    space = {
        "base": {"student": "distilpose-tiny", "epochs": 2},
        "trials": [{"name": "a"}, {"name": "b", "alpha_kt": 0.0}],
        "grid": {"lr": [0.001, 0.0005], "batch_size": [8]},
    }
    trials = load_space(_write(tmp_path / "s.yaml", space))
    assert [t["name"] for t in trials] == [
        "a-lr0.001-batch_size8",
        "a-lr0.0005-batch_size8",
        "b-lr0.001-batch_size8",
        "b-lr0.0005-batch_size8",
    ]
    expected = {"student": "distilpose-tiny", "epochs": 2, "alpha_kt": 0.0, "lr": 0.001, "batch_size": 8}
    assert trials[2] == {**expected, "name": "b-lr0.001-batch_size8"}
    assert [t["name"] for t in load_space(_write(tmp_path / "d.yaml", {"base": {"epochs": 1}}))] == ["default"]
    bad = [
        ({"trials": [{"name": "a", "alpha_xx": 1}]}, "unknown fields \\['alpha_xx'\\]"),
        ({"grid": {"learning_rate": [1]}}, "unknown fields \\['learning_rate'\\]"),
        ({"trials": [{"lr": 1}]}, "every trial needs a name"),
        ({"trials": [{"name": "a"}, {"name": "a"}]}, "names must be unique"),
        ({"trails": []}, "unknown top-level keys \\['trails'\\]"),
        ({"base": {"conv_init": "kaimnig"}}, "trial default: DistillConfig.conv_init: 'kaimnig' is not one of"),
        ({"base": {"backbone_init": "kaiming"}}, "backbone_init is now conv_init"),
    ]
    for i, (doc, message) in enumerate(bad):
        with pytest.raises(ValueError, match=message):
            load_space(_write(tmp_path / f"bad{i}.yaml", doc))


def test_sweeps_take_the_profile_from_the_space_or_set_and_show_it(tmp_path) -> None:
    from types import SimpleNamespace

    from pipeline.sweep import RESULT_COLUMNS, result_row, trial_config

    space = {"trials": [{"name": "paper"}, {"name": "ours", "profile": "intended"}]}
    trials = load_space(_write(tmp_path / "p.yaml", space))
    config = {"cache": "c", "runs_storage": "r", "overrides": {}}
    assert [trial_config({**config, "trial": t}).profile for t in trials] == ["official", "intended"]
    forced = {**config, "overrides": {"profile": "intended"}}
    assert trial_config({**forced, "trial": trials[0]}).profile == "intended"
    # A Tune experiment started before the rename restores its trials with the old key.
    legacy = {**config, "trial": {"name": "old", "backbone_init": "kaiming"}}
    assert trial_config(legacy).conv_init == "kaiming"
    with pytest.raises(ValueError, match="DistillConfig.profile: 'paper' is not one of"):
        load_space(_write(tmp_path / "bad.yaml", {"base": {"profile": "paper"}}))
    # The results table has a profile column, as the trial ran it (--set wins over the space).
    assert "profile" in RESULT_COLUMNS

    def row(config):
        return result_row(SimpleNamespace(config=config, metrics={"AP": 0.5}, error=None))

    assert row({**config, "trial": trials[0]})["profile"] == "official"
    assert row({**config, "trial": trials[1]})["profile"] == "intended"
    assert row({**forced, "trial": trials[0]})["profile"] == "intended"


def test_results_rank_by_ap_then_loss_failures_last() -> None:
    rows = [
        {"trial": "low", "AP": 0.1, "train/loss": 0.1, "error": ""},
        {"trial": "failed", "AP": None, "train/loss": None, "error": "RuntimeError()"},
        {"trial": "high", "AP": 0.5, "train/loss": 0.9, "error": ""},
        {"trial": "tie-worse-loss", "AP": 0.1, "train/loss": 0.2, "error": ""},
        {"trial": "no-val", "AP": None, "train/loss": 0.01, "error": ""},
    ]
    assert [r["trial"] for r in sorted(rows, key=rank_key)] == ["high", "low", "tie-worse-loss", "no-val", "failed"]


@pytest.mark.heavy  # two sweep jobs, each with its own Ray start and two trials: minutes
@pytest.mark.timeout(480)
def test_two_trial_sweep_ranks_by_ap_and_rerun_trains_nothing(tiny_cache, tiny_data, tmp_path, monkeypatch) -> None:
    """`jobs/sweep.py` with two trials (each a full run with its exported student), ranked by
    AP, then the same command again: it resumes the sweep and trains nothing."""
    space = _write(
        tmp_path / "space.yaml",
        {
            # The YAML's student (distilpose-s) is overridden by --set: the results must say what ran.
            "base": {"student": "distilpose-s", "epochs": 1, "batch_size": 8, "warmup_iters": 2, "log_every": 1},
            "trials": [{"name": "none", "no_distill": True}, {"name": "all"}],
        },
    )
    pid_dir = tmp_path / "pids"
    monkeypatch.setenv(HOOKS_ENV, json.dumps({"pid_dir": str(pid_dir)}))  # the job reads it (run_job passes it)
    args = [
        *("--cache", tiny_cache, "--space", space, "--storage", str(tmp_path / "sweeps"), "--name", "abl"),
        *("--val", tiny_data, "--set", "flip_test=false"),
        *("--set", "student=distilpose-tiny"),
    ]
    first = run_job("sweep.py", args, timeout_s=360)
    assert first.returncode == 0, first.stdout[-4000:]
    assert "starting sweep 'abl': 2 trials" in first.stdout
    results = tmp_path / "sweeps" / "abl" / "results.csv"
    rows = read_csv(results)
    assert {r["trial"] for r in rows} == {"none", "all"} and not any(r["error"] for r in rows)
    assert {r["student"] for r in rows} == {"distilpose-tiny"}
    table_rows = [line for line in first.stdout.splitlines() if line.startswith(("none ", "all "))]
    assert len(table_rows) == 2 and all("distilpose-tiny" in line for line in table_rows), first.stdout[-2000:]
    aps = [float(r["AP"]) for r in rows]  # --val: every trial is scored on COCO AP
    assert aps == sorted(aps, reverse=True)
    assert [r["trial"] for r in rows] == [r["trial"] for r in sorted(rows, key=_csv_rank_key)]
    assert all(int(r["epoch"]) == 1 for r in rows)
    runs = tmp_path / "sweeps" / "abl" / "runs"
    for trial in ("none", "all"):  # each trial is a full distillation run with its exported student
        assert (runs / trial / "export" / "student_latest.pt").exists()
        assert (runs / trial / "export" / "student_best.pt").exists()
    starts = len(read_starts(pid_dir))
    assert starts == 2
    # Tune's own folders and progress tables carry the space's trial names.
    tune_dirs = sorted(p.name for p in (tmp_path / "sweeps" / "abl").iterdir() if p.is_dir() and p.name != "runs")
    assert [d.split("_")[0] for d in tune_dirs] == ["all", "none"], tune_dirs

    again = run_job("sweep.py", args, timeout_s=240)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "resuming sweep 'abl'" in again.stdout
    assert len(read_starts(pid_dir)) == starts, "a finished trial was trained again"
    assert read_csv(results) == rows


def test_results_name_the_student_the_trial_ran_not_the_spaces() -> None:
    from pipeline.sweep import trial_row

    config = {
        "trial": {"name": "all", "student": "distilpose-s"},
        "cache": "c",
        "runs_storage": "r",
        "overrides": {"student": "distilpose-tiny"},
    }
    row = trial_row(config, {"AP": 0.5}, None)
    assert (row["trial"], row["student"], row["AP"], row["error"]) == ("all", "distilpose-tiny", 0.5, "")
    assert trial_row({**config, "overrides": {}}, {}, None)["student"] == "distilpose-s"


def _csv_rank_key(row: dict) -> tuple:
    number = {k: (float(row[k]) if row.get(k) not in (None, "") else None) for k in ("AP", "train/loss")}
    return rank_key({**row, **number})


def test_sweep_overrides_are_checked() -> None:
    from pipeline.sweep import resolve_overrides

    assert resolve_overrides({"val": "data", "epochs": 3}) == {"val": str(Path("data").resolve()), "epochs": 3}
    with pytest.raises(ValueError, match="unknown DistillConfig fields.*'epoch'"):
        resolve_overrides({"epoch": 3})
    assert "placement_strategy" in {f.name for f in dataclasses.fields(DistillConfig)}
    # Test hooks are not config: pipeline.distill.hooks
    assert not {"pid_dir", "step_sleep_s"} & {f.name for f in dataclasses.fields(DistillConfig)}


def test_every_shipped_sweep_space_loads() -> None:
    # A misspelt field or choice in a shipped space fails here, not an hour into a study.
    spaces = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert len(spaces) >= 4
    for path in spaces:
        trials = load_space(str(path))
        assert trials and all("name" in t for t in trials), path
    premise = {t["name"]: t for t in load_space(str(ROOT / "sweeps" / "premise-l-tiny.yaml"))}
    assert premise["online-fresh"]["online_views"] == "fresh" and premise["cache-v16"]["cache_views"] == 16


def test_only_picks_trials_by_name() -> None:
    from distilpose.errors import UserError
    from pipeline.sweep import sweep_trials

    space = str(ROOT / "sweeps" / "premise-replay.yaml")
    cfg = SweepConfig(cache="c", space=space, only="cache-k8,online-fresh")
    trials, _ = sweep_trials(cfg)
    assert [t["name"] for t in trials] == ["online-fresh", "cache-k8"]  # the space's order
    with pytest.raises(UserError, match="no trial named cache-k9 in .*premise-replay.yaml \\(it has online-fresh"):
        sweep_trials(SweepConfig(cache="c", space=space, only="cache-k9"))


def test_a_trial_can_name_its_own_cache() -> None:
    # The paper's student x teacher table needs one cache per teacher.
    from pipeline.sweep import sweep_trials, trial_config

    space = str(ROOT / "sweeps" / "student-teacher.yaml")
    trials, shared = sweep_trials(SweepConfig(cache="runs/cache-w48", space=space))
    configs = {t["name"]: trial_config({**shared, "trial": t}) for t in trials}
    assert sorted(configs) == sorted(f"{s}-{t}" for s in "sl" for t in ("none", "stemnet", "w48"))
    assert configs["s-stemnet"].cache == str((Path.cwd() / "runs" / "cache-stemnet").resolve())
    assert configs["s-none"].cache == configs["l-w48"].cache == shared["cache"]  # --cache, made absolute
    assert configs["s-none"].no_distill and configs["l-stemnet"].student == "distilpose-l"
    assert all(c.alphas()["alpha_kt"] > 0 for n, c in configs.items() if not n.endswith("none"))


def test_generalisation_spaces_switch_the_token_losses_off() -> None:
    for name in ("generalisation.yaml", "generalisation-tiny.yaml"):
        trials = {t["name"]: t for t in load_space(str(ROOT / "sweeps" / name))}
        for trial in trials.values():
            cfg = DistillConfig(cache="c", **trial)
            assert cfg.student.startswith("deeppose-") and cfg.alpha_kt == cfg.alpha_vt == 0.0
        with_sh = [DistillConfig(cache="c", **t) for n, t in trials.items() if n.startswith("deeppose+sh")]
        assert with_sh and all(c.alphas()["alpha_sh"] > 0 and c.alphas()["alpha_cs"] > 0 for c in with_sh)
