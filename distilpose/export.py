"""Export a trained student to ONNX or TorchScript and check the file against eager PyTorch.

    report = export_student("runs/s/best.pt", "onnx")      # -> runs/s/best.onnx
    print(report.summary())                                 # max |exported - eager| per output

Both formats take one input ``image`` (N, 3, H, W), normalized as in training, with a dynamic
batch axis, and return ``coords`` (N, K, 2) in [0, 1] of the crop, ``sigma`` (N, K, 2) in
heatmap px and ``score`` (N, K) raw confidence; ``with_tokens`` adds ``kpt_tokens`` and
``vis_tokens`` (only useful for distillation experiments on the exported model).

``export_onnx`` / ``export_torchscript`` also take a teacher (one output, ``heatmaps``), so that
bench/bench_speed.py can time it in the same runtimes; the export job ships students only.
Both write the preset into the file (ONNX metadata / a TorchScript extra file), and
:func:`load_exported` reads it back: an exported file runs through ``inference.predict`` like
the eager model (jobs/predict.py).

ONNX goes through the TorchScript-based exporter (``dynamo=False``): the dynamo exporter,
torch's default, needs the ``onnxscript`` package, which this project does not depend on.
onnx / onnxruntime are dev dependencies, so they are imported only when used.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distilpose.models import get_config
from distilpose.models.checkpoints import CheckpointError, load_model
from distilpose.options import check_options, option

FORMATS = ("onnx", "torchscript")
MIN_OPSET = 17  # LayerNormalization is a native op from opset 17 on
DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("coords", "sigma", "score")
TOKEN_OUTPUT_NAMES = ("kpt_tokens", "vis_tokens")
TEACHER_OUTPUT_NAMES = ("heatmaps",)
# Where an exported file records what it holds: an ONNX metadata key, a TorchScript extra file.
METADATA_KEY = "distilpose"
TORCHSCRIPT_METADATA_FILE = "distilpose.json"
BATCH_AXIS = "batch"
# Batch size of the example input used for tracing; deliberately not one of the verification
# batch sizes, so the checks prove that the batch axis is really dynamic.
TRACE_BATCH = 2
DEFAULT_VERIFY_BATCHES = (3, 5)
# Max |exported - eager| accepted on every output (coords: fraction of the crop, so 1e-4 is
# 0.02 px of a 192 px wide crop; sigma: heatmap px; score). Measured: ~1e-7 (ONNX), 0 (TorchScript).
TOLERANCE = 1e-4
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}

PathLike = str | os.PathLike


class StudentExportWrapper(nn.Module):
    """A student whose forward returns a flat tuple of tensors (exporters cannot return dataclasses)."""

    def __init__(self, student: nn.Module, with_tokens: bool = False) -> None:
        super().__init__()
        self.student = student
        self.with_tokens = with_tokens

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + (TOKEN_OUTPUT_NAMES if self.with_tokens else ())

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.student(image)
        outputs = (out.coords, out.sigma, out.score)
        if self.with_tokens:
            outputs += (out.kpt_tokens, out.vis_tokens)
        return outputs


class TeacherExportWrapper(nn.Module):
    """A teacher whose forward returns its heatmaps only (what decoding needs)."""

    output_names = TEACHER_OUTPUT_NAMES

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return (self.teacher(image).heatmaps,)


def export_wrapper(model: nn.Module, with_tokens: bool = False) -> nn.Module:
    """The flat-tuple module an exporter traces: a student's or a teacher's."""
    kind = getattr(getattr(model, "config", None), "kind", None)
    if kind == "student":
        return StudentExportWrapper(model, with_tokens).eval()
    if kind == "teacher" and not with_tokens:
        return TeacherExportWrapper(model).eval()
    raise ValueError(f"cannot export a {kind or type(model).__name__}{' with tokens' if with_tokens else ''}")


def export_metadata(model: nn.Module) -> dict[str, str]:
    return {"preset": model.config.name, "kind": model.config.kind}


@dataclass
class ExportReport:
    """What was written and how far it is from the eager model (per batch size and output)."""

    path: Path
    format: str
    preset: str
    output_names: tuple[str, ...]
    opset: int | None = None
    max_abs_diff: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def worst_diff(self) -> float:
        return max((d for per_batch in self.max_abs_diff.values() for d in per_batch.values()), default=0.0)

    def summary(self) -> str:
        opset = f", opset {self.opset}" if self.opset is not None else ""
        lines = [
            f"exported {self.preset} -> {self.path} ({self.format}{opset}); outputs {', '.join(self.output_names)}"
        ]
        for batch, diffs in sorted(self.max_abs_diff.items()):
            parts = "  ".join(f"{name} {value:.3e}" for name, value in diffs.items())
            lines.append(f"  batch {batch}: max |exported - eager|: {parts}")
        lines.append(f"  max abs diff overall: {self.worst_diff:.3e}")
        return "\n".join(lines)


def _check_student(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or config.kind != "student":
        kind = getattr(config, "kind", type(model).__name__)
        raise ValueError(f"export supports student models only, got a {kind}")


def example_input(model: nn.Module, batch: int, seed: int = 0) -> Tensor:
    """Deterministic normalized-image-like input (N, 3, H, W) for tracing and checks."""
    height, width = model.config.input_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


@contextmanager
def _quiet_torchscript():
    # Tracing warns about every Python-side shape check (e.g. the encoder's input size
    # check), and torch marks TorchScript (and the ONNX exporter built on it) deprecated;
    # all expected here, and they would bury the diff report.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def export_onnx(
    model: nn.Module, path: PathLike, opset: int = DEFAULT_OPSET, with_tokens: bool = False
) -> tuple[str, ...]:
    """Write ``model`` as ONNX with a dynamic batch axis; returns the output names."""
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    wrapper = export_wrapper(model, with_tokens)
    names = wrapper.output_names
    dynamic_axes = {name: {0: BATCH_AXIS} for name in (INPUT_NAME, *names)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _quiet_torchscript(), torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example_input(model, TRACE_BATCH),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(names),
            dynamic_axes=dynamic_axes,
        )
    import onnx

    exported = onnx.load(str(path))
    onnx.helper.set_model_props(exported, {METADATA_KEY: json.dumps(export_metadata(model))})
    onnx.checker.check_model(exported)
    onnx.save(exported, str(path))
    return names


def export_torchscript(model: nn.Module, path: PathLike, with_tokens: bool = False) -> tuple[str, ...]:
    """Trace ``model`` to TorchScript and save it; returns the output names.

    Tracing records tensor sizes as ops, so the saved module accepts any batch size.
    """
    wrapper = export_wrapper(model, with_tokens)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _quiet_torchscript(), torch.no_grad():
        traced = torch.jit.trace(wrapper, example_input(model, TRACE_BATCH))
    traced.save(str(path), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(export_metadata(model))})
    return wrapper.output_names


def onnx_opset(path: PathLike) -> int:
    """Default-domain opset a saved ONNX model declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def run_onnx(path: PathLike, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run an exported ONNX student with onnxruntime (CPU) on normalized images (N, 3, H, W)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
    return dict(zip(names, values))


def run_torchscript(path: PathLike, images: np.ndarray, output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run a saved TorchScript student on normalized images (N, 3, H, W)."""
    with _quiet_torchscript():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        values = module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
    return {name: v.numpy() for name, v in zip(output_names, values)}


def run_eager(model: nn.Module, images: np.ndarray, with_tokens: bool = False) -> dict[str, np.ndarray]:
    wrapper = StudentExportWrapper(model, with_tokens).eval()
    with torch.no_grad():
        values = wrapper(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
    return {name: v.numpy() for name, v in zip(wrapper.output_names, values)}


def max_abs_diffs(exported: dict[str, np.ndarray], eager: dict[str, np.ndarray]) -> dict[str, float]:
    missing = sorted(set(eager) - set(exported))
    if missing:
        raise ValueError(f"exported model lacks outputs {missing}; it has {sorted(exported)}")
    diffs = {}
    for name, reference in eager.items():
        if exported[name].shape != reference.shape:
            raise ValueError(f"output {name!r}: exported shape {exported[name].shape} vs eager {reference.shape}")
        diffs[name] = float(np.abs(exported[name].astype(np.float64) - reference).max())
    return diffs


def verify_export(
    model: nn.Module,
    path: PathLike,
    fmt: str,
    batch_sizes: Sequence[int] = DEFAULT_VERIFY_BATCHES,
    with_tokens: bool = False,
) -> dict[int, dict[str, float]]:
    """Max |exported - eager| per output, for one random batch of each size in ``batch_sizes``."""
    model.eval()
    results = {}
    for batch in batch_sizes:
        images = example_input(model, batch, seed=batch).numpy()
        eager = run_eager(model, images, with_tokens)
        if fmt == "onnx":
            exported = run_onnx(path, images)
        else:
            exported = run_torchscript(path, images, tuple(eager))
        results[batch] = max_abs_diffs(exported, eager)
    return results


def default_output_path(checkpoint: PathLike, fmt: str) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.rsplit(".", 1)[0] + SUFFIX[fmt])


def export_model(
    model: nn.Module,
    out: PathLike,
    fmt: str,
    opset: int = DEFAULT_OPSET,
    with_tokens: bool = False,
    verify_batches: Sequence[int] = DEFAULT_VERIFY_BATCHES,
) -> ExportReport:
    """Export an in-memory student, then verify the file against it."""
    _check_student(model)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    model.eval()
    if fmt == "onnx":
        names = export_onnx(model, out, opset, with_tokens)
    else:
        names = export_torchscript(model, out, with_tokens)
    report = ExportReport(
        path=Path(out),
        format=fmt,
        preset=model.config.name,
        output_names=names,
        opset=onnx_opset(out) if fmt == "onnx" else None,
    )
    report.max_abs_diff = verify_export(model, out, fmt, verify_batches, with_tokens)
    return report


@dataclass
class ExportRequest:
    """What jobs/export.py exports and how closely it must match the eager model."""

    checkpoint: str = option(help="student checkpoint: this project's format or an official .pth (with --model)")
    format: str = option(choices=FORMATS, help="output format")
    model: str | None = option(None, help="student preset; checked against the file (needed for an official .pth)")
    out: str | None = option(None, help="output file (default: next to the checkpoint, .onnx / .torchscript.pt)")
    opset: int = option(DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    tokens: bool = option(False, help="also output kpt_tokens and vis_tokens")
    tolerance: float = option(TOLERANCE, help="max abs diff accepted in the verification")

    def __post_init__(self) -> None:
        check_options(self)
        if self.opset < MIN_OPSET:
            raise ValueError(f"--opset must be >= {MIN_OPSET}")


def export_student(
    checkpoint: PathLike,
    fmt: str,
    out: PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    with_tokens: bool = False,
    verify_batches: Sequence[int] = DEFAULT_VERIFY_BATCHES,
    preset: str | None = None,
) -> ExportReport:
    """Load a student checkpoint (our format, or an official mmpose .pth of `preset`; told apart
    by content) and export + verify it; ``out`` defaults to the checkpoint's name with ``.onnx``
    / ``.torchscript.pt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    model = load_model(checkpoint, preset)
    if model.config.kind != "student":
        raise ValueError(f"{checkpoint}: holds a {model.config.kind} ({model.config.name}); only students are exported")
    return export_model(model, out or default_output_path(checkpoint, fmt), fmt, opset, with_tokens, verify_batches)


# --------------------------------------------------------------------------- running exported files


@dataclass
class ExportedStudentOutput:
    coords: Tensor  # (N, K, 2) in [0, 1] of the crop
    sigma: Tensor  # (N, K, 2) heatmap px
    score: Tensor  # (N, K) raw confidence


@dataclass
class ExportedTeacherOutput:
    heatmaps: Tensor  # (N, K, Hh, Wh)


def exported_format(path: PathLike) -> str | None:
    """'onnx' or 'torchscript' for a file this module writes, None for anything else.

    ONNX files are known by their suffix (protobuf has no magic number); a TorchScript
    archive by its ``constants.pkl`` member, which ``torch.save`` checkpoints do not have.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return "torchscript"
    return None


def onnx_session(path: PathLike, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime session; ``threads`` sets its intra-op pool (None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


class ExportedModel(nn.Module):
    """An exported file behind the eager model's interface, so ``inference.predict`` runs it
    unchanged: ``forward(image)`` returns ``.coords``/``.sigma``/``.score`` (student) or
    ``.heatmaps`` (teacher); ``config`` is the preset's."""

    def __init__(
        self,
        path: PathLike,
        fmt: str,
        config,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.path, self.format, self.config = Path(path), fmt, config
        self.output_names = OUTPUT_NAMES if config.kind == "student" else TEACHER_OUTPUT_NAMES
        self.session = onnx_session(path, threads, providers) if fmt == "onnx" else None
        self.module = None
        if fmt == "torchscript":
            with _quiet_torchscript():
                self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, image: Tensor) -> ExportedStudentOutput | ExportedTeacherOutput:
        if self.session is not None:
            feed = {INPUT_NAME: np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)}
            values = [torch.from_numpy(v) for v in self.session.run(list(self.output_names), feed)]
        else:
            values = self.module(image)
        named = dict(zip(self.output_names, values))
        if self.config.kind == "student":
            return ExportedStudentOutput(**named)
        return ExportedTeacherOutput(**named)


def _recorded_metadata(path: PathLike, fmt: str) -> dict:
    try:
        if fmt == "onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            text = props.get(METADATA_KEY, "")
        else:
            extra = {TORCHSCRIPT_METADATA_FILE: ""}
            with _quiet_torchscript():
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            text = extra[TORCHSCRIPT_METADATA_FILE]
    except Exception as e:  # a truncated or foreign file fails in the protobuf/zip readers
        raise CheckpointError(f"{path}: not a readable {fmt} model ({type(e).__name__}: {e})") from None
    text = text.decode() if isinstance(text, bytes) else text
    return json.loads(text) if text else {}


def load_exported(
    path: PathLike, preset: str | None = None, threads: int | None = None, providers: Sequence[str] | None = None
) -> ExportedModel:
    """An exported ONNX / TorchScript file as an :class:`ExportedModel`.

    The preset comes from the file (written by :func:`export_onnx` / :func:`export_torchscript`);
    ``preset``, when given, must equal it. A file exported without one needs ``preset``.
    """
    fmt = exported_format(path)
    if fmt is None:
        raise CheckpointError(f"{path}: not an exported model (expected a .onnx file or a TorchScript archive)")
    recorded = _recorded_metadata(path, fmt).get("preset")
    if recorded and preset and recorded != preset:
        raise CheckpointError(f"{path}: holds a {recorded!r} model, expected preset {preset!r}")
    name = recorded or preset
    if not name:
        raise CheckpointError(f"{path}: the file records no preset; name it (--model PRESET)")
    config = get_config(name)
    model = ExportedModel(path, fmt, config, threads, providers)
    if model.session is not None:
        _check_onnx_input(model.session, config, path)
    return model.eval()


def _check_onnx_input(session, config, path: PathLike) -> None:
    shape = session.get_inputs()[0].shape  # ["batch", 3, H, W]
    if list(shape[1:]) != [3, *config.input_size]:
        raise CheckpointError(
            f"{path}: takes input {shape[1:]} but preset {config.name!r} is [3, {config.input_size[0]}, "
            f"{config.input_size[1]}]"
        )
