"""Config options written once (distilpose.options): the generated CLI, KEY=VALUE values and
the validation of closed-set string options, on every job's config."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from distilpose.options import add_dataclass_args, check_options, config_from_args, option, parse_key_values


@dataclass
class Example:
    data: str = option(help="data root")
    epochs: int = option(20, minimum=1, help="epochs")
    limit: int | None = option(None, minimum=1, help="first N")
    fmt: str = option("zarr", choices=("zarr", "wds"), help="store")
    steps: tuple[int, ...] | None = option(None, help="milestones")
    flip: bool = option(True, flag="--no-flip", help="no flip")
    gpu: bool = option(False, help="gpu")
    extra: dict = option(default_factory=dict, flag="--set", help="overrides")
    internal: int = 3  # not an option

    def __post_init__(self) -> None:
        check_options(self)


def _parse(*argv: str) -> Example:
    p = argparse.ArgumentParser()
    add_dataclass_args(p, Example)
    return config_from_args(Example, p.parse_args(list(argv)))


def test_generated_cli_defaults_flags_and_values() -> None:
    assert _parse("--data", "d") == Example(data="d")
    cfg = _parse("--data", "d", "--epochs", "3", "--fmt", "wds", "--steps", "3", "5", "--no-flip", "--gpu")
    assert (cfg.epochs, cfg.fmt, cfg.steps, cfg.flip, cfg.gpu) == (3, "wds", (3, 5), False, True)
    assert _parse("--data", "d", "--steps").steps is None
    assert _parse("--data", "d", "--set", "a=1", "--set", "b=x").extra == {"a": 1, "b": "x"}
    with pytest.raises(SystemExit):  # argparse: required option, choices, non-options
        _parse()
    with pytest.raises(SystemExit):
        _parse("--data", "d", "--fmt", "zar")
    with pytest.raises(SystemExit):
        _parse("--data", "d", "--internal", "4")


def test_key_value_rule() -> None:
    parsed = parse_key_values(["dim=96", "hrnet_modules=[1,1]", "name=x", "lr=1e-3", "gpu=true", "sha=0a1b"])
    assert parsed == {"dim": 96, "hrnet_modules": [1, 1], "name": "x", "lr": 0.001, "gpu": True, "sha": "0a1b"}
    with pytest.raises(ValueError, match="--set 'dim': use KEY=VALUE"):
        parse_key_values(["dim"], "--set")


def test_closed_set_strings_are_checked_when_the_config_is_built() -> None:
    with pytest.raises(ValueError, match=r"Example.fmt: 'zar' is not one of 'zarr', 'wds'"):
        Example(data="d", fmt="zar")


def test_job_configs_refuse_typos() -> None:
    from distilpose.teacher_training import TeacherTrainConfig
    from pipeline.distill import DistillConfig
    from pipeline.teacher_stage import CacheJobConfig

    with pytest.raises(ValueError, match="DistillConfig.conv_init: 'kaiminng'"):
        DistillConfig(cache="c", conv_init="kaiminng")
    with pytest.raises(ValueError, match="DistillConfig.sh_weighting"):
        DistillConfig(cache="c", sh_weighting="per_sample")
    with pytest.raises(ValueError, match="TeacherTrainConfig.aug: 'heavy'"):
        TeacherTrainConfig(data="d", aug="heavy")
    with pytest.raises(ValueError, match="CacheJobConfig.heatmap_encoding"):
        CacheJobConfig(data="d", teacher="t", out="o", heatmap_encoding="u8")


def test_a_count_below_its_minimum_is_a_user_error_named_by_its_flag() -> None:
    from distilpose.errors import UserError

    assert _parse("--data", "d", "--epochs", "1").epochs == 1 and _parse("--data", "d").limit is None
    with pytest.raises(UserError, match=r"^--epochs must be >= 1, got 0$"):
        _parse("--data", "d", "--epochs", "0")
    with pytest.raises(UserError, match=r"^--limit must be >= 1, got -2$"):
        _parse("--data", "d", "--limit", "-2")
