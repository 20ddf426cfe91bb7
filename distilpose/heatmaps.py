"""Heatmap maths: render, decode, fit and sample keypoint heatmaps.

Conventions (mmpose, see spec section 0): pixel centres sit on integer coordinates,
coordinates are ``(x, y)``, sizes are ``(H, W)``. Every function is vectorized over the
leading ``(N, K)`` batch x joint dimensions and works on CPU float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# cv2.GaussianBlur with ksize 11 and sigma 0 derives sigma = 0.3 * ((11 - 1) / 2 - 1) + 0.8 = 2.0;
# this is the "modulate_kernel 11" the teacher's DARK post-processing uses.
DARK_BLUR_KERNEL = 11
DARK_BLUR_SIGMA = 2.0
# Taylor steps longer than one cell mean the local quadratic model is not trustworthy
# (near-singular Hessian, noise); bounding the step keeps the answer next to the argmax.
MAX_SUBPIXEL_STEP = 1.0
# Logarithms of maps need strictly positive values; this is mmpose's floor for DARK.
LOG_FLOOR = 1e-10

# Gaussian fit: half-size of the square window around the argmax that the fit reads.
FIT_RADIUS = 5
# Pixels below this fraction of the floor-corrected peak carry mostly noise in log space.
FIT_REL_THRESHOLD = 0.05
# A map whose floor-corrected peak is below this is treated as flat (nothing to fit).
FLAT_PEAK = 1e-6
MIN_FIT_SIGMA = 0.1


def _check_maps(heatmaps: torch.Tensor) -> None:
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must have shape (N, K, H, W), got {tuple(heatmaps.shape)}")


def _axis_grid(length: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(length, dtype=like.dtype, device=like.device)


def render_gaussian_heatmaps(
    joints: torch.Tensor,
    size: tuple[int, int],
    sigma: float = 2.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit-peak Gaussians centred on continuous joint positions (mmpose unbiased encoding).

    joints: (N, K, 2) heatmap px (x, y); size: (H, W); weights: optional (N, K), multiplied
    into the maps so invisible joints (weight 0) get an all-zero map. Returns (N, K, H, W).
    """
    height, width = size
    joints = joints.to(torch.get_default_dtype()) if not joints.is_floating_point() else joints
    xs = _axis_grid(width, joints)
    ys = _axis_grid(height, joints)
    # exp(-(dx^2 + dy^2) / 2s^2) factorizes into a row and a column profile: H + W exps
    # per joint instead of H * W.
    profile_x = torch.exp(-((xs - joints[..., 0:1]) ** 2) / (2 * sigma**2))
    profile_y = torch.exp(-((ys - joints[..., 1:2]) ** 2) / (2 * sigma**2))
    heatmaps = profile_y.unsqueeze(-1) * profile_x.unsqueeze(-2)
    if weights is not None:
        heatmaps = heatmaps * weights.to(heatmaps.dtype)[..., None, None]
    return heatmaps


def render_simulated_heatmaps(mu: torch.Tensor, sigma: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The student's simulated heatmaps of L_SH (spec section 4), differentiable in mu and sigma.

    S(y, x) = exp(-0.5 * ((x - mu_x)^2 / (sigma_x^2 + 1e-9) + (y - mu_y)^2 / (sigma_y^2 + 1e-9)))
    on the grid x in 0..W-1, y in 0..H-1. mu, sigma: (N, K, 2) heatmap px (x, y).
    Returns (N, K, H, W), peak 1.
    """
    height, width = size
    xs = _axis_grid(width, mu)
    ys = _axis_grid(height, mu)
    variance = sigma**2 + 1e-9
    # Same formula, factorized into x and y profiles; autograd then keeps O(H + W) per joint.
    profile_x = torch.exp(-0.5 * (xs - mu[..., 0:1]) ** 2 / variance[..., 0:1])
    profile_y = torch.exp(-0.5 * (ys - mu[..., 1:2]) ** 2 / variance[..., 1:2])
    return profile_y.unsqueeze(-1) * profile_x.unsqueeze(-2)


def sample_heatmaps(heatmaps: torch.Tensor, coords_norm: torch.Tensor) -> torch.Tensor:
    """Heatmap value at the nearest cell of normalized coordinates (the L_CS target).

    heatmaps: (N, K, H, W); coords_norm: (N, K, 2) (x, y) in [0, 1] of the crop.
    Cell: row = round(clamp(y, 0, 1) * (H - 1)), col = round(clamp(x, 0, 1) * (W - 1)),
    as in the official ScoreLoss (H - 1 / W - 1 here, unlike the H / W of L_SH). Joints
    outside [0, 1] get 0, also as coded there. Returns (N, K); never carries gradient.
    """
    _check_maps(heatmaps)
    height, width = heatmaps.shape[-2:]
    coords = coords_norm.detach()
    col = torch.round(coords[..., 0].clamp(0, 1) * (width - 1)).long()
    row = torch.round(coords[..., 1].clamp(0, 1) * (height - 1)).long()
    flat_index = (row * width + col).unsqueeze(-1)
    values = heatmaps.detach().flatten(-2).gather(-1, flat_index).squeeze(-1)
    inside = ((coords >= 0) & (coords <= 1)).all(dim=-1)
    return torch.where(inside, values, torch.zeros_like(values))


def _argmax_cells(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(col, row) long tensors (N, K) of each map's maximum, and the maximum values."""
    width = heatmaps.shape[-1]
    maxvals, flat_index = heatmaps.flatten(-2).max(dim=-1)
    return flat_index % width, flat_index // width, maxvals


def _gaussian_blur(heatmaps: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect-101 borders (cv2.GaussianBlur's default)."""
    n, k, height, width = heatmaps.shape
    offsets = torch.arange(kernel_size, dtype=heatmaps.dtype, device=heatmaps.device) - kernel_size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad = kernel_size // 2
    maps = heatmaps.reshape(n * k, 1, height, width)
    # torch "reflect" mirrors without repeating the edge, i.e. reflect-101; it needs pad < size.
    mode = "reflect" if pad < min(height, width) else "replicate"
    maps = F.pad(maps, (pad, pad, pad, pad), mode=mode)
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))
    maps = F.conv2d(maps, kernel.view(1, 1, -1, 1))
    return maps.reshape(n, k, height, width)


def _taylor_offsets(log_maps: torch.Tensor, col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Newton step -H^-1 g of the log map at (col, row); zero where there is no proper maximum."""
    height, width = log_maps.shape[-2:]
    flat_maps = log_maps.flatten(-2)
    # The 3x3 stencil needs all neighbours on the map; border cells keep the integer argmax
    # (as mmpose's DARK does) because padded neighbours would fake a slope towards the edge.
    inside = (col >= 1) & (col <= width - 2) & (row >= 1) & (row <= height - 2)

    def at(dx: int, dy: int) -> torch.Tensor:
        index = (row + dy).clamp(0, height - 1) * width + (col + dx).clamp(0, width - 1)
        return flat_maps.gather(-1, index.unsqueeze(-1)).squeeze(-1)

    centre = at(0, 0)
    grad_x = 0.5 * (at(1, 0) - at(-1, 0))
    grad_y = 0.5 * (at(0, 1) - at(0, -1))
    hess_xx = at(1, 0) - 2 * centre + at(-1, 0)
    hess_yy = at(0, 1) - 2 * centre + at(0, -1)
    hess_xy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
    det = hess_xx * hess_yy - hess_xy**2
    # Only a negative-definite Hessian describes a peak; flat maps (det 0) stay on the argmax.
    is_peak = inside & (det > 1e-12) & (hess_xx < 0)
    safe_det = torch.where(is_peak, det, torch.ones_like(det))
    step_x = -(hess_yy * grad_x - hess_xy * grad_y) / safe_det
    step_y = -(hess_xx * grad_y - hess_xy * grad_x) / safe_det
    step = torch.stack([step_x, step_y], dim=-1).clamp(-MAX_SUBPIXEL_STEP, MAX_SUBPIXEL_STEP)
    return torch.where(is_peak.unsqueeze(-1), step, torch.zeros_like(step))


def decode_heatmaps(
    heatmaps: torch.Tensor, blur_kernel: int | None = DARK_BLUR_KERNEL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax + DARK sub-pixel refinement (Zhang et al. 2020, the teacher's 'unbiased' post-process).

    The map is smoothed with a Gaussian (kernel 11, sigma 2; ``blur_kernel=None`` skips it),
    floored at 1e-10 and logged; one Newton step of the second-order Taylor expansion of the
    log map at the argmax gives the offset. The log of a Gaussian is quadratic, so the step is
    exact for Gaussian-shaped peaks, unlike the classic quarter-pixel shift. Flat maps,
    saddles and argmaxes on the border row/column keep the integer argmax; steps are bounded
    to one cell.

    heatmaps: (N, K, H, W). Returns coords (N, K, 2) heatmap px (x, y) and maxvals (N, K)
    (the raw map's maximum, mmpose's joint confidence).
    """
    _check_maps(heatmaps)
    maps = heatmaps.detach().float()
    col, row, maxvals = _argmax_cells(maps)
    if blur_kernel:
        maps = _gaussian_blur(maps, blur_kernel, DARK_BLUR_SIGMA)
    log_maps = torch.log(maps.clamp(min=LOG_FLOOR))
    coords = torch.stack([col, row], dim=-1).to(maps.dtype) + _taylor_offsets(log_maps, col, row)
    return coords, maxvals


def _window_offsets(radius: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (dx, dy) offsets of a (2r+1) x (2r+1) window, row-major."""
    steps = torch.arange(-radius, radius + 1, device=like.device)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    return dx.reshape(-1), dy.reshape(-1)


def _quadratic_design(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Columns [1, dx, dy, dx^2, dy^2]: log of an axis-aligned Gaussian is linear in them."""
    dx = dx.double()
    dy = dy.double()
    return torch.stack([torch.ones_like(dx), dx, dy, dx**2, dy**2], dim=-1)


def _fit_window(
    maps: torch.Tensor, width: int, radius: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Floor-corrected (M, H*W) maps -> argmax cell, peak, and the window's values and weights.

    Returns centre (M, 2) (col, row), peak (M,), values (M, P) floored at the threshold,
    weights (M, P) (0 for pixels the fit ignores), with P = (2r+1)^2 in `_window_offsets` order.
    """
    height = maps.shape[-1] // width
    peak, flat_index = maps.max(dim=-1)
    centre = torch.stack([flat_index % width, flat_index // width], dim=-1)
    dx, dy = _window_offsets(radius, maps)
    cols = centre[:, :1] + dx
    rows = centre[:, 1:] + dy
    on_map = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    index = rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)
    values = maps.gather(-1, index).double()
    threshold = (FIT_REL_THRESHOLD * peak).double().clamp(min=LOG_FLOOR).unsqueeze(-1)
    # The 3x3 core always takes part, with values below the threshold read as the threshold
    # ("at most this high"): a one-pixel spike then yields a small sigma, not an unconstrained
    # axis. Only peaks narrower than ~0.9 px have core pixels that low.
    in_core = (dx.abs() <= 1) & (dy.abs() <= 1)
    informative = on_map & ((values > threshold) | in_core)
    values = torch.maximum(values, threshold)
    weights = torch.where(informative, values**2, torch.zeros_like(values))
    return centre, peak, values, weights


def _solve_log_quadratic(values: torch.Tensor, weights: torch.Tensor, radius: int) -> torch.Tensor:
    """Weighted least squares of log(values) on [1, dx, dy, dx^2, dy^2] -> (M, 5) coefficients."""
    dx, dy = _window_offsets(radius, values)
    design = _quadratic_design(dx, dy)
    # Every map shares the design, so all normal matrices come from one (M, P) x (P, 25) matmul.
    normal = (weights @ (design.unsqueeze(-1) * design.unsqueeze(-2)).flatten(-2)).view(-1, 5, 5)
    rhs = (weights * torch.log(values)) @ design
    # A small ridge keeps the solve finite when too few pixels pin down a coefficient
    # (heavily clipped windows); it is negligible against real data.
    ridge = 1e-9 * normal.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-30)
    normal = normal + ridge[:, None, None] * torch.eye(5, dtype=normal.dtype, device=normal.device)
    return torch.linalg.solve(normal, rhs.unsqueeze(-1)).squeeze(-1)


def _gaussian_from_quadratic(
    coef: torch.Tensor, radius: int, max_sigma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset of mu from the window centre (M, 2), sigma (M, 2), amplitude (M,)), all finite."""
    # Curvature c = -1 / (2 sigma^2); c >= 0 (no peak along an axis) maps to the upper bound.
    curvature = coef[:, 3:5].clamp(max=-1.0 / (2 * max_sigma**2))
    sigma = torch.sqrt(-0.5 / curvature).clamp(MIN_FIT_SIGMA, max_sigma)
    offset = (-coef[:, 1:3] / (2 * curvature)).clamp(-radius, radius)
    log_amplitude = coef[:, 0] + (coef[:, 1:3] * offset + curvature * offset**2).sum(-1)
    # exp(80) still fits float32; only absurd extrapolations off the map come near it.
    return offset, sigma, torch.exp(log_amplitude.clamp(max=80.0))


def fit_gaussians(heatmaps: torch.Tensor, radius: int = FIT_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit A * exp(-(x-mu_x)^2/2sx^2 - (y-mu_y)^2/2sy^2) to every map.

    Method: the map's median is removed as the background floor (a joint's blob covers far
    less than half of a map, so this holds up to sigma ~8 on 64 x 48); then
    log(h) = c0 + c1 dx + c2 dy + c3 dx^2 + c4 dy^2 is fitted by weighted least squares on a
    (2r+1)^2 window around the argmax, with weights h^2 (the inverse variance of log(h) under
    additive noise) and pixels off the map or below 5% of the peak left out. The log of a
    Gaussian is exactly this quadratic, so clean renders are recovered exactly, also when the
    border clips the window (mu may then lie off the map).

    heatmaps: (N, K, H, W), any float dtype. Returns float32 params (N, K, 4) = mu_x, mu_y,
    sigma_x, sigma_y (heatmap px) and confidence (N, K) = the fitted peak height A above the
    floor (~1 for a confident unit-peak teacher joint, like mmpose's maxvals; 0 for flat maps).
    Degenerate maps stay finite: mu stays inside the window, sigma in [0.1, max(H, W)] (an
    axis without curvature gets the upper bound), and flat maps return the argmax cell, the
    upper-bound sigma and confidence 0.
    """
    _check_maps(heatmaps)
    n, k, height, width = heatmaps.shape
    maps = heatmaps.detach().float().reshape(n * k, height * width)
    maps = maps - maps.median(dim=-1, keepdim=True).values
    centre, peak, values, weights = _fit_window(maps, width, radius)
    coef = _solve_log_quadratic(values, weights, radius)
    max_sigma = float(max(height, width))
    offset, sigma, amplitude = _gaussian_from_quadratic(coef, radius, max_sigma)

    is_flat = (peak <= FLAT_PEAK).unsqueeze(-1)
    mu = centre.double() + torch.where(is_flat, torch.zeros_like(offset), offset)
    sigma = torch.where(is_flat, torch.full_like(sigma, max_sigma), sigma)
    confidence = torch.where(is_flat.squeeze(-1), torch.zeros_like(amplitude), amplitude)
    params = torch.cat([mu, sigma], dim=-1).float().reshape(n, k, 4)
    return params, confidence.float().reshape(n, k)
