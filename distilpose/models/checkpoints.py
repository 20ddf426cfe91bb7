"""Checkpoints: this project's format, official mmpose `.pth` files, and teacher -> student init.

Our format is a `torch.save`d dict ``{format_version, config (asdict), state_dict, extra}``;
everything is read with ``torch.load(weights_only=True)`` so no file can run code on load.

Official files (yshMars/DistilPose, mmpose v0.22) hold ``state_dict`` (maybe under
``module.``) with keys ``backbone.*`` and ``keypoint_head.tokenpose.*`` (teacher) or
``keypoint_head.tokenhead.*`` (students). Backbone names are identical to ours; the head maps
onto ``encoder.*`` / ``tde.*`` plus ``heatmap_head.*`` / ``reg_head.*`` (the official
``mlp_head``). The official head also stores the fixed sine table ``pos_embedding``; ours is
a non-persistent buffer, so it is checked against the file instead of loaded as a weight.

mmpose 0.x heatmap models (SimpleBaseline, HRNet top-down) hold ``backbone.*`` and
``keypoint_head.deconv_layers.*`` / ``keypoint_head.final_layer.*``; mmpose's DeepPose
``backbone.*`` and ``keypoint_head.fc.*``. Their heads map onto ``head.*`` with the same
inner names, and there is no position table.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distilpose import fileio
from distilpose.errors import UserError

from .config import ModelConfig
from .presets import build_model, get_config

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PathLike = str | os.PathLike

# (official prefix, our prefix), most specific first, per layout: "teacher" / "student" (the
# token models), "heatmap" (heatmap teachers without tokens), "regression" (DeepPose).
_OFFICIAL_PREFIXES = {
    "teacher": (
        ("keypoint_head.tokenpose.mlp_head.", "heatmap_head."),
        ("keypoint_head.tokenpose.", "encoder."),
        ("backbone.", "backbone."),
    ),
    "student": (
        ("keypoint_head.tokenhead.mlp_head.", "reg_head."),
        ("keypoint_head.tokenhead.", "tde."),
        ("backbone.", "backbone."),
    ),
    "heatmap": (("keypoint_head.", "head."), ("backbone.", "backbone.")),
    "regression": (("keypoint_head.", "head."), ("backbone.", "backbone.")),
}
_OFFICIAL_HEADS = {
    "keypoint_head.tokenpose.": "teacher",
    "keypoint_head.tokenhead.": "student",
    "keypoint_head.final_layer.": "heatmap",
    "keypoint_head.fc.": "regression",
}
_POS_TOLERANCE = 1e-4  # float32 sine table recomputed on another machine / torch version
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file name and what is wrong."""


@dataclass
class LoadReport:
    """Outcome of matching a file's tensors against a model (names in the file's layout)."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # "name: file (..) vs model (..)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for title, names in (
            ("missing (in the model, not in the file)", self.missing),
            ("unexpected (in the file, not in the model)", self.unexpected),
            ("shape/value mismatch", self.mismatched),
        ):
            if names:
                listed = "\n    ".join(_compact(names))
                parts.append(f"  {len(names)} {title}:\n    {listed}")
        return "\n".join(parts)


def _compact(names: list[str]) -> list[str]:
    """Up to _MAX_LISTED lines naming every key: long lists are grouped by module prefix."""
    if len(names) <= _MAX_LISTED:
        return names
    for depth in range(8, 0, -1):  # the finest grouping that still fits
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(".".join(name.split(":")[0].split(".")[:depth]), []).append(name)
        if len(groups) <= _MAX_LISTED:
            return [
                members[0] if len(members) == 1 else f"{prefix}.* ({len(members)} tensors)"
                for prefix, members in groups.items()
            ]
    return [*names[:_MAX_LISTED], f"... and {len(names) - _MAX_LISTED} more"]


# --------------------------------------------------------------------------- file reading


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars/dtypes that mmcv checkpoints keep in `meta` (e.g. best_score).

    Allow-listing them keeps weights_only=True (no arbitrary code) while accepting files written
    with numpy 1.x (`numpy.core...`) or 2.x (`numpy._core...`).
    """
    scalar = np._core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in np.dtypes.__all__ if n.endswith("DType")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def _read(path: PathLike) -> Any:
    """The checkpoint's content (a local path or s3://), read through `distilpose.fileio`."""
    try:
        data = fileio.read_bytes(str(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{path}: checkpoint file does not exist (or is not a file)") from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"{path}: holds a Python object ({unsafe.group(1)}) that safe (weights_only) loading "
                "refuses; only tensors, numbers, strings and containers are accepted. Re-save just its "
                "state_dict."
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", str(e), re.S)
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or another file type): "
            f"{detail.group(1) if detail else e}"
        ) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated or foreign files
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or another file type): {type(e).__name__}: {e}"
        ) from None


def _strip_module_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DataParallel/DDP checkpoints prefix every key with 'module.'."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _official_state_dict(raw: Any, path: PathLike) -> dict[str, Tensor]:
    if isinstance(raw, dict) and "format_version" in raw:
        raise CheckpointError(f"{path}: is a distilpose checkpoint (our format); use load_checkpoint()")
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found (top-level keys: {_keys_of(raw)})")
    return _strip_module_prefix(state)


def _keys_of(raw: Any) -> str:
    return ", ".join(map(str, list(raw)[:10])) if isinstance(raw, dict) else type(raw).__name__


# --------------------------------------------------------------------------- our format


def _check_weights_only_safe(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | float | str | Tensor):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_weights_only_safe(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} must be str or int to be loadable with weights_only")
            _check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where}: {type(value).__name__} cannot be read back with torch.load(weights_only=True); "
        "store tensors, numbers, strings, lists or dicts"
    )


def save_checkpoint(path: PathLike, model: nn.Module, extra: dict | None = None) -> None:
    """Write model weights + config (+ `extra`: optimizer state, epoch, ...) atomically."""
    _check_weights_only_safe(extra, "extra")
    payload = {
        "format_version": FORMAT_VERSION,
        "config": asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    fileio.atomic_torch_save(payload, str(path))  # readers never see a half-written checkpoint


def _config_from(raw: dict, path: PathLike) -> ModelConfig:
    cfg = raw.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: 'config' entry is missing or not a dict")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{path}: config has fields this version does not know: {unknown}")
    try:
        return ModelConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from None


def load_checkpoint(path: PathLike, preset: str | None = None) -> tuple[nn.Module, dict | None]:
    """Rebuild the model saved by `save_checkpoint` (on CPU) and return it with its `extra`.

    `preset`, if given, must equal the preset name recorded in the file.
    """
    return _model_from_ours(_read(path), path, preset)


def _model_from_ours(raw: Any, path: PathLike, preset: str | None) -> tuple[nn.Module, dict | None]:
    if not is_ours(raw):
        hint = (
            "; it looks like an official mmpose checkpoint: use load_official(model, path)"
            if isinstance(raw, dict) and "state_dict" in raw
            else ""
        )
        raise CheckpointError(f"{path}: not a distilpose checkpoint (no format_version){hint}")
    if raw["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {raw['format_version']} is not supported (expected {FORMAT_VERSION})"
        )
    config = _config_from(raw, path)
    if preset is not None and config.name != preset:
        raise CheckpointError(f"{path}: holds a {config.name!r} model, expected preset {preset!r}")
    state = raw.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' entry is missing or not a dict")
    model = build_model(config)
    report = _match(model.state_dict(), state)
    if not report.ok:
        raise CheckpointError(f"{path}: weights do not fit the {config.name!r} model it records:\n{report.describe()}")
    model.load_state_dict(state)
    return model, raw.get("extra")


def is_ours(raw: Any) -> bool:
    """True for the content of a `save_checkpoint` file (an official mmpose file has no
    format_version)."""
    return isinstance(raw, dict) and "format_version" in raw


def load_model(checkpoint: PathLike, preset: str | None = None) -> nn.Module:
    """The model in `checkpoint`, in eval mode: our format (which records its preset; `preset`,
    if given, must match) or an official mmpose `.pth` (weights only: `preset` says which
    model), told apart by the file's content. The one loader of evaluate, visualize and the
    cache job's teacher."""
    raw = _read(checkpoint)
    if is_ours(raw):
        model, _ = _model_from_ours(raw, checkpoint, preset)
        return model.eval()
    if preset is None:
        raise CheckpointError(
            f"{checkpoint}: an official mmpose checkpoint (no format_version) records no model: name its preset"
        )
    model = build_model(get_config(preset))
    _load_official_state(model, _official_state_dict(raw, checkpoint), checkpoint, strict=True)
    return model.eval()


def load_teacher(preset: str, checkpoint: PathLike | None = None) -> nn.Module:
    """A teacher preset in eval mode: random init without `checkpoint`, else its weights from
    our format or an official mmpose file (`load_model`)."""
    config = get_config(preset)
    if config.kind != "teacher":
        raise UserError(f"preset {preset!r} is a {config.kind}, not a teacher")
    if checkpoint is None:
        return build_model(config).eval()
    return load_model(checkpoint, preset)


def _match(expected: dict[str, Tensor], given: dict[str, Tensor]) -> LoadReport:
    report = LoadReport()
    for name, tensor in expected.items():
        if name not in given:
            report.missing.append(name)
        elif given[name].shape != tensor.shape:
            report.mismatched.append(f"{name}: file {tuple(given[name].shape)} vs model {tuple(tensor.shape)}")
        else:
            report.loaded += 1
    report.unexpected = [name for name in given if name not in expected]
    return report


# --------------------------------------------------------------------------- official files


def _kind_of(model: nn.Module) -> str:
    """The model's official layout: "teacher" / "student" (token models), "heatmap", "regression"."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"{type(model).__name__} has no ModelConfig .config; build it with build_model()")
    return config.kind if config.has_tokens else config.head


def from_official_key(key: str, kind: str) -> str | None:
    """Official name -> ours, or None when the name belongs to no part of a `kind` model."""
    for official, ours in _OFFICIAL_PREFIXES[kind]:
        if key.startswith(official):
            return ours + key[len(official) :]
    return None


def to_official_key(key: str, kind: str) -> str:
    for official, ours in _OFFICIAL_PREFIXES[kind]:
        if key.startswith(ours):
            return official + key[len(ours) :]
    raise KeyError(f"{key!r} has no official counterpart")


def _encoder_name(kind: str) -> str | None:
    """The token encoder's attribute (it holds the fixed sine table); None without tokens."""
    return {"teacher": "encoder", "student": "tde"}.get(kind)


def to_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our weights under the official mmpose names, including a token model's fixed `pos_embedding`."""
    kind = _kind_of(model)
    state = {to_official_key(k, kind): v for k, v in model.state_dict().items()}
    encoder_name = _encoder_name(kind)
    if encoder_name:
        encoder = getattr(model, encoder_name)
        state[to_official_key(f"{encoder_name}.pos_embedding", kind)] = encoder.pos_embedding.detach().clone()
    return state


def _check_pos_embedding(file_pos: Tensor | None, ours: Tensor, name: str, report: LoadReport) -> bool:
    """True if the file's sine table may replace ours (same shape, same values)."""
    if file_pos is None:
        return False
    if file_pos.shape != ours.shape:
        report.mismatched.append(f"{name}: file {tuple(file_pos.shape)} vs model {tuple(ours.shape)}")
        return False
    diff = (file_pos.float() - ours.float().cpu()).abs().max().item()
    if diff > _POS_TOLERANCE:
        report.mismatched.append(f"{name}: values differ from the fixed sine table by up to {diff:.3g}")
        return False
    return True


def load_official(model: nn.Module, path: PathLike, strict: bool = True) -> LoadReport:
    """Load an official mmpose / DistilPose `.pth` into a teacher or student built here
    (TokenPose / DistilPose from the DistilPose repository; SimpleBaseline, HRNet top-down and
    DeepPose from mmpose 0.x).

    strict: any missing, unexpected or mismatched tensor raises one CheckpointError listing
    them all. Non-strict: loads every tensor that fits and returns the report.
    """
    return _load_official_state(model, _official_state_dict(_read(path), path), path, strict)


def _load_official_state(model: nn.Module, official: dict[str, Tensor], path: PathLike, strict: bool) -> LoadReport:
    kind = _kind_of(model)
    encoder_name = _encoder_name(kind)
    pos_key = to_official_key(f"{encoder_name}.pos_embedding", kind) if encoder_name else None

    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    present: set[str] = set()  # our names the file has, fitting or not
    report = LoadReport()
    for key, tensor in official.items():
        if key == pos_key:
            continue
        name = from_official_key(key, kind)
        if name is None or name not in ours:
            report.unexpected.append(key)
            continue
        present.add(name)
        if tensor.shape != ours[name].shape:
            report.mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(ours[name].shape)}")
        else:
            mapped[name] = tensor
    report.missing = [to_official_key(k, kind) for k in ours if k not in present]
    report.loaded = len(mapped)
    encoder = getattr(model, encoder_name) if encoder_name else None
    pos_fits = encoder is not None and _check_pos_embedding(
        official.get(pos_key), encoder.pos_embedding, pos_key, report
    )

    if strict and not report.ok:
        raise CheckpointError(
            f"{path}: does not fit the {model.config.name!r} model ({kind}):\n{report.describe()}"
            f"{_head_hint(official, kind)}"
        )
    model.load_state_dict(mapped, strict=False)
    if pos_fits:
        with torch.no_grad():
            encoder.pos_embedding.copy_(official[pos_key])
    log.info("%s: loaded %d tensors into %s", path, report.loaded, model.config.name)
    return report


def _head_hint(official: dict[str, Tensor], kind: str) -> str:
    for prefix, file_kind in _OFFICIAL_HEADS.items():
        if file_kind != kind and any(k.startswith(prefix) for k in official):
            return f"\n  hint: the file holds a {file_kind} head ({prefix}*) but the model is a {kind}"
    return "\n  hint: the file was probably made for another preset (other backbone or sizes)"


# --------------------------------------------------------------------------- teacher -> student


@dataclass
class BackboneInitReport:
    loaded: int  # student backbone tensors copied from the teacher (parameters + BN buffers)
    teacher_only: list[str]  # teacher backbone tensors with no student counterpart

    def __str__(self) -> str:
        return (
            f"initialized {self.loaded} student backbone tensors from the teacher; "
            f"{len(self.teacher_only)} teacher-only tensors skipped"
        )


def init_student_backbone_from_teacher(student: nn.Module, teacher_ckpt: PathLike) -> BackboneInitReport:
    """Copy the teacher's backbone weights into the student's backbone by name.

    For DistilPose-L this is HRNet stages 1-3, the official recipe (docs/method.md#distilpose-l; the 'backbone.'
    prefix is stripped explicitly). Teacher tensors with no student counterpart (transition3,
    stage4, the last stage-3 module's fuse_layers.1/2) are skipped and reported. Every student
    backbone tensor must be covered with the same shape, otherwise CheckpointError.
    `teacher_ckpt` may be in our format or an official mmpose file.
    """
    raw = _read(teacher_ckpt)
    if isinstance(raw, dict) and "format_version" in raw:
        if _config_from(raw, teacher_ckpt).kind != "teacher":
            raise CheckpointError(f"{teacher_ckpt}: is a student checkpoint, expected a teacher")
        state = raw.get("state_dict") or {}
    else:
        state = _official_state_dict(raw, teacher_ckpt)
    teacher = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if not teacher:
        raise CheckpointError(f"{teacher_ckpt}: has no backbone.* tensors")

    student_state = student.backbone.state_dict()
    report = _match(student_state, teacher)
    if report.missing or report.mismatched:
        raise CheckpointError(
            f"{teacher_ckpt}: the teacher backbone does not cover the {student.config.name!r} backbone "
            f"(another width or depth?):\n{LoadReport(0, report.missing, [], report.mismatched).describe()}"
        )
    student.backbone.load_state_dict({k: v for k, v in teacher.items() if k in student_state})
    result = BackboneInitReport(loaded=report.loaded, teacher_only=report.unexpected)
    log.info("%s: %s", teacher_ckpt, result)
    return result
