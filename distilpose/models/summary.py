"""Parameter and GFLOP counts per preset, counted the way the paper counts them.

    python -m distilpose.models.summary [preset ...]

Convention (docs/method.md#parameter-and-flop-counts; mmcv `get_model_complexity_info` as used by the official
tools/get_flops.py): "GFLOPs" = multiply-accumulates of Conv2d, ConvTranspose2d (per input
pixel) and Linear (bias not counted) + 2 x numel per BatchNorm / LayerNorm (affine) + numel
per ReLU call + numel per upsample output + input numel per pooling; attention matmuls (QK^T,
AV), softmax and GELU are not counted. Params = trainable parameters only (the fixed sine
position table is a buffer, not a parameter).

The SimpleBaseline / HRNet papers counted otherwise (the HRNet repository's
`get_model_summary`): conv and transposed-conv MACs per *output* pixel plus Linear MACs, no
norms or activations, divided by 1024^3. `count_gflops_hrnet_repo` reproduces that count, so
both published figures can be checked (the "papers" column).

Models are built on the meta device: shapes only, no memory and no arithmetic.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .presets import MMPOSE_FIGURES, ORIGINAL_PAPER_FIGURES, PAPER_FIGURES, PRESETS, build_model, get_config

CONVENTION = (
    "GFLOPs = Conv/Deconv/Linear multiply-accumulates (no bias) + 2*numel per BN/LN + numel per ReLU, "
    "upsample and pooling, attention matmuls/softmax/GELU not counted (mmcv, as in the paper and mmpose's "
    "figures); input 1x3xHxW. Params = trainable parameters (fixed sine position table excluded).\n"
    "published: DistilPose paper (token models) or mmpose's own figures (heatmap models, DeepPose). "
    "hrnet-repo: the SimpleBaseline/HRNet papers' count (conv MACs per output pixel / 1024^3), beside "
    "those papers' figures."
)
CONV_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


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

    def input_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        total[0] += inputs[0].numel()

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
            handles.append(m.register_forward_hook(norm_hook))
        elif isinstance(m, nn.ReLU | nn.Upsample):
            handles.append(m.register_forward_hook(output_hook))
        elif isinstance(m, nn.MaxPool2d | nn.AdaptiveAvgPool2d):  # mmcv's pool hook: input numel
            handles.append(m.register_forward_hook(input_hook))
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
    # conv / Linear modules leaves out the attention matmuls (no module of their own). It counts
    # a transposed conv per input pixel, as mmcv does.
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    conv_linear = sum(
        sum(per_module.get(f"{root}.{name}", {}).values())
        for name, m in model.named_modules()
        if isinstance(m, CONV_MODULES)
    )
    return (conv_linear // 2 + elementwise[0]) / 1e9


def count_gflops_hrnet_repo(model: nn.Module, input_size: tuple[int, int] | None = None) -> float:
    """The SimpleBaseline / HRNet papers' "GFLOPs" (HRNet repository, `get_model_summary`): per
    conv or transposed conv, weight numel x output pixels; per Linear, output numel x inputs;
    nothing else; divided by 1024^3."""
    if input_size is None:
        input_size = model.config.input_size
    total = [0]

    def conv_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features
        else:
            total[0] += module.weight.numel() * output.shape[-2] * output.shape[-1]

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, CONV_MODULES)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0] / 1024**3


def summarize(name: str) -> dict:
    config = get_config(name)
    with torch.device("meta"):
        model = build_model(config)
    row = {
        "name": name,
        "kind": config.kind,
        "input": f"{config.input_size[0]}x{config.input_size[1]}",
        "params": count_params(model),
        "gflops": count_gflops(model),
        "tokens": f"K={config.num_joints} D={config.dim} P={config.num_patches}" if config.has_tokens else "none",
    }
    if name in ORIGINAL_PAPER_FIGURES:
        row["gflops_hrnet_repo"] = count_gflops_hrnet_repo(model)
    return row


def published(name: str) -> tuple[float, float] | None:
    """(params in M, GFLOPs) as published in the counter `count_gflops` follows, if any."""
    return PAPER_FIGURES.get(name) or MMPOSE_FIGURES.get(name)


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'preset':<20}{'kind':<9}{'input':<9}{'params':>13}{'GFLOPs':>9}  {'published':<16}"
        f"{'hrnet-repo':<11}{'papers':<14}{'tokens'}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        figures = published(r["name"])
        figures_txt = f"{figures[0]:.2f}M / {figures[1]:.2f}" if figures else "-"
        original = ORIGINAL_PAPER_FIGURES.get(r["name"])
        original_txt = f"{original[0]:.1f}M / {original[1]:.1f}" if original else "-"
        repo_txt = f"{r['gflops_hrnet_repo']:.2f}" if "gflops_hrnet_repo" in r else "-"
        lines.append(
            f"{r['name']:<20}{r['kind']:<9}{r['input']:<9}{r['params']:>13,}{r['gflops']:>9.4f}  "
            f"{figures_txt:<16}{repo_txt:<11}{original_txt:<14}{r['tokens']}"
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
