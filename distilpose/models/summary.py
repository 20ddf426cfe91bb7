"""Parameter and GFLOP counts per preset, counted the way the paper counts them.

    python -m distilpose.models.summary [preset ...]

Convention (docs/method.md#parameter-and-flop-counts; mmcv `get_model_complexity_info` as used by the official
tools/get_flops.py): "GFLOPs" = multiply-accumulates of Conv2d and Linear (bias not counted)
+ 2 x numel per BatchNorm / LayerNorm (affine) + numel per ReLU call + numel per upsample
output; attention matmuls (QK^T, AV), softmax and GELU are not counted. Params = trainable
parameters only (the fixed sine position table is a buffer, not a parameter).

Models are built on the meta device: shapes only, no memory and no arithmetic.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .presets import PAPER_FIGURES, PRESETS, build_model, get_config

CONVENTION = (
    "GFLOPs = Conv/Linear multiply-accumulates (no bias) + 2*numel per BN/LN + numel per ReLU and "
    "upsample, attention matmuls/softmax/GELU not counted (mmcv, as in the paper); input 1x3xHxW. "
    "Params = trainable parameters (fixed sine position table excluded)."
)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def _elementwise_counter(model: nn.Module):
    """Forward hooks adding mmcv's per-element costs of norms, ReLUs and upsampling."""
    total = [0]

    def norm_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
        total[0] += inputs[0].numel() * (2 if affine else 1)

    def output_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        total[0] += output.numel()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
            handles.append(m.register_forward_hook(norm_hook))
        elif isinstance(m, nn.ReLU | nn.Upsample):
            handles.append(m.register_forward_hook(output_hook))
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def count_gflops(model: nn.Module, input_size: tuple[int, int] | None = None) -> float:
    """Paper-convention GFLOPs of one forward pass at batch 1 (see module docstring)."""
    if input_size is None:
        input_size = model.config.input_size
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with _elementwise_counter(model) as elementwise, FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                model(x)
    finally:
        model.train(was_training)
    # FlopCounterMode keys per-module totals by "<RootClass>.<qualified name>"; summing only
    # Conv2d / Linear modules leaves out the attention matmuls (no module of their own).
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    conv_linear = sum(
        sum(per_module.get(f"{root}.{name}", {}).values())
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    )
    return (conv_linear // 2 + elementwise[0]) / 1e9


def summarize(name: str) -> dict:
    config = get_config(name)
    with torch.device("meta"):
        model = build_model(config)
    return {
        "name": name,
        "kind": config.kind,
        "input": f"{config.input_size[0]}x{config.input_size[1]}",
        "params": count_params(model),
        "gflops": count_gflops(model),
        "tokens": f"K={config.num_joints} D={config.dim} P={config.num_patches}",
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'preset':<19}{'kind':<9}{'input':<9}{'params':>13}{'GFLOPs':>9}  {'paper':<16}{'tokens'}"
    lines = [header, "-" * len(header)]
    for r in rows:
        paper = PAPER_FIGURES.get(r["name"])
        paper_txt = f"{paper[0]:.2f}M / {paper[1]:.2f}" if paper else "-"
        lines.append(
            f"{r['name']:<19}{r['kind']:<9}{r['input']:<9}{r['params']:>13,}{r['gflops']:>9.4f}  "
            f"{paper_txt:<16}{r['tokens']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=list(PRESETS), help="presets to count (default: all)")
    args = parser.parse_args(argv)
    print(format_table([summarize(name) for name in args.presets]))
    print()
    print(CONVENTION)


if __name__ == "__main__":
    main()
