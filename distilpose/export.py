"""Export a trained student to ONNX or TorchScript and check the file against eager PyTorch.

    report = export_student("runs/s/best.pt", "onnx")      # -> runs/s/best.onnx
    print(report.summary())                                 # max |exported - eager| per output

Both formats take one input ``image`` (N, 3, H, W), normalized as in training, with a dynamic
batch axis, and return ``coords`` (N, K, 2) in [0, 1] of the crop, ``sigma`` (N, K, 2) in
heatmap px and ``score`` (N, K) raw confidence; ``with_tokens`` adds ``kpt_tokens`` and
``vis_tokens`` (only useful for distillation experiments on the exported model).

ONNX goes through the TorchScript-based exporter (``dynamo=False``): the dynamo exporter,
torch's default, needs the ``onnxscript`` package, which this project does not depend on.
onnx / onnxruntime are dev dependencies, so they are imported only when used.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distilpose.models.checkpoints import load_checkpoint
from distilpose.options import check_choices, option

FORMATS = ("onnx", "torchscript")
MIN_OPSET = 17  # LayerNormalization is a native op from opset 17 on
DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("coords", "sigma", "score")
TOKEN_OUTPUT_NAMES = ("kpt_tokens", "vis_tokens")
BATCH_AXIS = "batch"
# Batch size of the example input used for tracing; deliberately not one of the verification
# batch sizes, so the checks prove that the batch axis is really dynamic.
TRACE_BATCH = 2
DEFAULT_VERIFY_BATCHES = (3, 5)
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
    """Write ``model`` (a student) as ONNX with a dynamic batch axis; returns the output names."""
    _check_student(model)
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    wrapper = StudentExportWrapper(model, with_tokens).eval()
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

    onnx.checker.check_model(onnx.load(str(path)))
    return names


def export_torchscript(model: nn.Module, path: PathLike, with_tokens: bool = False) -> tuple[str, ...]:
    """Trace ``model`` (a student) to TorchScript and save it; returns the output names.

    Tracing records tensor sizes as ops, so the saved module accepts any batch size.
    """
    _check_student(model)
    wrapper = StudentExportWrapper(model, with_tokens).eval()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _quiet_torchscript(), torch.no_grad():
        traced = torch.jit.trace(wrapper, example_input(model, TRACE_BATCH))
    traced.save(str(path))
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

    checkpoint: str = option(help="student checkpoint (this project's format)")
    format: str = option(choices=FORMATS, help="output format")
    out: str | None = option(None, help="output file (default: next to the checkpoint, .onnx / .torchscript.pt)")
    opset: int = option(DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    tokens: bool = option(False, help="also output kpt_tokens and vis_tokens")
    tolerance: float = option(1e-4, help="max abs diff accepted in the verification")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.opset < MIN_OPSET:
            raise ValueError(f"--opset must be >= {MIN_OPSET}")


def export_student(
    checkpoint: PathLike,
    fmt: str,
    out: PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    with_tokens: bool = False,
    verify_batches: Sequence[int] = DEFAULT_VERIFY_BATCHES,
) -> ExportReport:
    """Load a student checkpoint (our format) and export + verify it; ``out`` defaults to the
    checkpoint's name with ``.onnx`` / ``.torchscript.pt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    model, _ = load_checkpoint(checkpoint)
    if model.config.kind != "student":
        raise ValueError(f"{checkpoint}: holds a {model.config.kind} ({model.config.name}); only students are exported")
    return export_model(model, out or default_output_path(checkpoint, fmt), fmt, opset, with_tokens, verify_batches)
