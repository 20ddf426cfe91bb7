"""Refuse to continue with something made for another configuration.

A cache root, a partly built cache and a run directory each record what they were made
with; a command that asks for something else must stop with one message that names every
difference, not continue and mix two configurations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_VALUE_CHARS = 100


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


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
        elif recorded[key] != value:
            lines.append(f"{label}: {recorded_as} {_short(recorded[key])}, {current_as} {_short(value)}")
    if lines:
        raise error(f"{what} ({len(lines)} difference(s)):\n  - " + "\n  - ".join(lines) + f"\n{advice}")
