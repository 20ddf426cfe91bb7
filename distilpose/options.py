"""Config options written once: a dataclass field holds an option's default, help text and
allowed values or least value; a job's argparse and the config's validation are generated
from it.

    @dataclass
    class Config:
        data: str = option(help="data set root")                   # required: --data
        epochs: int = option(20, minimum=1, help="training epochs")  # --epochs 20, >= 1
        format: str = option("zarr", help="store", choices=FORMATS)  # --format {zarr,wds}

        def __post_init__(self) -> None:
            check_options(self)                            # a typo or --epochs 0 is an error

    add_dataclass_args(parser, Config)
    cfg = config_from_args(Config, parser.parse_args())

Only fields declared with `option()` are on the command line; their flag is `--field-name`
unless `flag=` names another. A bool option is a switch that flips its default (`--gpu`
for default False, e.g. `flag="--no-flip-test"` for default True), or with `negatable=True`
takes both `--flip-test` and `--no-flip-test`; a `tuple[int, ...]`
option takes several values (none given: None); a `dict` option is repeated KEY=VALUE.

KEY=VALUE (one rule for every job): VALUE is read as JSON when it parses as JSON
(`8` -> 8, `1e-3` -> 0.001, `true` -> True, `null` -> None, `[1,1]` -> [1, 1]), else it is
the text as written (`tokenpose-w48`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

from distilpose.errors import UserError

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    *,
    help: str,
    choices: Sequence[str] | None = None,
    minimum: int | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    default_factory: Any = MISSING,
    hidden: bool = False,
    negatable: bool = False,
    group: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option (`minimum`: the least value a
    count may take, None allowed where the default is None; `hidden`: left out of --help;
    `negatable`: a bool option given as --x or --no-x; `group`: the --help section it is
    listed in, e.g. the data-source options every data-reading job shares)."""
    metadata = {
        "group": group,
        "help": help,
        "negatable": negatable,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "flag": flag,
        "metavar": metavar,
        "hidden": hidden,
    }
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_options(cfg: Any) -> None:
    """Raise ValueError for a string option outside its choices, UserError (one line, named
    by its flag) for a number below its minimum (call from __post_init__)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        minimum = f.metadata.get("minimum")
        value = getattr(cfg, f.name)
        if choices and isinstance(value, str) and value not in choices:
            raise ValueError(f"{type(cfg).__name__}.{f.name}: {value!r} is not one of {', '.join(map(repr, choices))}")
        if minimum is not None and value is not None and value < minimum:
            raise UserError(f"{_flag(f)} must be >= {minimum}, got {value}")


def parse_key_values(items: Sequence[str], flag: str = "KEY=VALUE") -> dict[str, Any]:
    """["views=2", "teacher.preset=tokenpose-w48"] -> {"views": 2, "teacher.preset": "tokenpose-w48"}."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: use KEY=VALUE, e.g. epochs=8")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def _options(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type without None) of each option of `cls`."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        found.append((f, kind))
    return found


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def help_with_default(text: str, default: Any) -> str:
    """`text` plus "(default: X)" where --help would not show the default otherwise: not for
    a required option, a switch, a None default (the help says what absence means) or a help
    that already names its default."""
    if default is MISSING or default is None or isinstance(default, bool) or "default" in text:
        return text
    if isinstance(default, tuple | list) and not default:
        return text
    if isinstance(default, dict):
        return text if not default else f"{text} (default: {json.dumps(default)})"
    return f"{text} (default: {default})"


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, required: bool = True) -> None:
    """One argument per option of `cls`; an option without a default is required (unless
    `required=False`: the job then checks what it needs). Options the user does not give are
    absent from the parsed namespace, so the dataclass default applies. Options with a
    `group` are listed under that heading in --help; every option's help shows its default.
    A class can reword an inherited option's help for its job in `OPTION_HELP` (name -> text)."""
    reworded = getattr(cls, "OPTION_HELP", {})
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, kind in _options(cls):
        meta = f.metadata
        default = _default(f)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        text = help_with_default(reworded.get(f.name, meta["help"]), default)
        if kind is bool and meta["negatable"] and "default" not in text:  # --x / --no-x: which one holds
            text += f" (default: {'on' if default else 'off'})"
        kwargs["help"] = argparse.SUPPRESS if meta["hidden"] else text
        origin = typing.get_origin(kind)
        if kind is bool and meta["negatable"]:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is bool:
            kwargs["action"] = "store_false" if default is True else "store_true"
        elif origin is tuple:
            kwargs.update(nargs="*", type=typing.get_args(kind)[0])
        elif origin is dict or kind is dict:
            kwargs.update(action="append", metavar=meta["metavar"] or "KEY=VALUE")
        else:
            choices = meta["choices"]
            kwargs.update(type=type(choices[0]) if choices else kind, choices=choices, metavar=meta["metavar"])
        if default is MISSING and required:
            kwargs["required"] = True
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        action = target.add_argument(_flag(f), **kwargs)
        action.config_default = default  # argparse's own default is SUPPRESS: for --help checks


def option_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of `cls` given on the command line, as config values; raises ValueError
    for a malformed KEY=VALUE."""
    given = vars(args)
    values: dict[str, Any] = {}
    for f, kind in _options(cls):
        if f.name not in given:
            continue
        value = given[f.name]
        if typing.get_origin(kind) is tuple:
            value = tuple(value) or None
        elif typing.get_origin(kind) is dict or kind is dict:
            value = parse_key_values(value, _flag(f))
        values[f.name] = value
    return values


def config_from_args(cls: type, args: argparse.Namespace, **fields: Any) -> Any:
    """`cls` built from the options given on the command line plus `fields` (ValueError for
    a malformed KEY=VALUE or a value outside an option's choices)."""
    return cls(**option_values(cls, args), **fields)
