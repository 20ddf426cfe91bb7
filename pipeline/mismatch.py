"""Refuse to continue with something made for another configuration.

A cache root, a partly built cache and a run directory each record what they were made
with; a command that asks for something else must stop with one message that names every
difference, not continue and mix two configurations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

MAX_VALUE_CHARS = 100


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _as_mapping(value: Any) -> Any:
    """A config dataclass (a CacheSpec, ...) compared field by field, like a dict."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _differences(label: str, recorded: Any, current: Any, recorded_as: str, current_as: str) -> list[str]:
    """One line per differing leaf; nested mappings are compared key by key, so the line
    names ``teacher.config.depth`` rather than two truncated copies of ``teacher``."""
    if recorded == current:
        return []
    recorded, current = _as_mapping(recorded), _as_mapping(current)
    if not (isinstance(recorded, Mapping) and isinstance(current, Mapping)):
        return [f"{label}: {recorded_as} {_short(recorded)}, {current_as} {_short(current)}"]
    lines = []
    for key in sorted(set(recorded) | set(current), key=str):
        sub = f"{label}.{key}"
        if key not in recorded:
            lines.append(f"{sub}: not recorded, {current_as} {_short(current[key])}")
        elif key not in current:
            lines.append(f"{sub}: {recorded_as} {_short(recorded[key])}, not set in {current_as}")
        else:
            lines += _differences(sub, recorded[key], current[key], recorded_as, current_as)
    return lines


def refuse_differences(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    what: str,
    advice: str,
    recorded_as: str = "recorded",
    current_as: str = "this run",
    labels: Mapping[str, str] | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``error`` listing every key of ``current`` whose value in ``recorded`` differs
    (a key missing from ``recorded`` differs too); return quietly when all match.

    ``what`` heads the message, ``advice`` ends it, ``labels`` name keys for humans."""
    labels = labels or {}
    lines = []
    for key, value in current.items():
        label = labels.get(key, key)
        if key not in recorded:
            lines.append(f"{label}: not recorded, {current_as} {_short(value)}")
        else:
            lines += _differences(label, recorded[key], value, recorded_as, current_as)
    if lines:
        raise error(f"{what} ({len(lines)} difference(s)):\n  - " + "\n  - ".join(lines) + f"\n{advice}")
