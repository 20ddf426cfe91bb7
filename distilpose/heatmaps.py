"""Heatmap maths: render, decode, fit and sample keypoint heatmaps.

Conventions (mmpose): pixel centres sit on integer coordinates,
coordinates are ``(x, y)``, sizes are ``(H, W)``. Every function is vectorized over the
leading ``(N, K)`` batch x joint dimensions and works on CPU float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The teacher's DARK post-processing kernel ("modulate_kernel 11"; sigma 2.0, see blur_sigma).
DARK_BLUR_KERNEL = 11
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
    """The student's simulated heatmaps of L_SH, differentiable in mu and sigma.

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


def blur_sigma(kernel_size: int) -> float:
    """The sigma cv2.GaussianBlur derives from the kernel size when given sigma 0."""
    if kernel_size % 2 != 1 or kernel_size < 9:
        # Below 9, cv2 uses fixed binomial-like tables instead of this formula.
        raise ValueError(f"DARK blur kernel must be odd and >= 9, got {kernel_size}")
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def dark_blur(heatmaps: torch.Tensor, kernel_size: int = DARK_BLUR_KERNEL) -> torch.Tensor:
    """mmpose 0.x DARK modulation: Gaussian blur with zero padding, rescaled to the original max.

    mmpose pads each map with (kernel - 1) / 2 zeros before cv2.GaussianBlur and crops back,
    so mass near the border leaks out instead of being mirrored back in; the blurred map is
    then scaled so its maximum equals the unblurred one.
    """
    n, k, height, width = heatmaps.shape
    sigma = blur_sigma(kernel_size)
    offsets = torch.arange(kernel_size, dtype=heatmaps.dtype, device=heatmaps.device) - kernel_size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad = kernel_size // 2
    maps = heatmaps.reshape(n * k, 1, height, width)
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1), padding=(0, pad))
    maps = F.conv2d(maps, kernel.view(1, 1, -1, 1), padding=(pad, 0))
    maps = maps.reshape(n, k, height, width)
    original_max = heatmaps.amax(dim=(-2, -1), keepdim=True)
    blurred_max = maps.amax(dim=(-2, -1), keepdim=True)
    # mmpose divides unguarded; a blurred map without a positive value has no peak to refine
    # (its log is the floor everywhere), so it stays unscaled instead of turning into inf/nan.
    has_peak = blurred_max > 0
    ratio = original_max / torch.where(has_peak, blurred_max, torch.ones_like(blurred_max))
    return maps * torch.where(has_peak, ratio, torch.ones_like(ratio))


def _taylor_offsets(log_maps: torch.Tensor, col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """mmpose 0.x `_taylor`: one Newton step -H^-1 g of the log map at the integer argmax.

    Derivatives come from central differences, the second ones over +-2 px
    (dxx = (h[x+2] - 2 h[x] + h[x-2]) / 4), so the step is taken only where that stencil is
    on the map: 2 <= x <= W-3 and 2 <= y <= H-3. Any Hessian with a non-zero determinant is
    used and the step is not bounded, as in mmpose.
    """
    height, width = log_maps.shape[-2:]
    flat_maps = log_maps.flatten(-2)
    inside = (col >= 2) & (col <= width - 3) & (row >= 2) & (row <= height - 3)

    def at(dx: int, dy: int) -> torch.Tensor:
        # Clamped indices only feed cells outside `inside`, whose step is discarded.
        index = (row + dy).clamp(0, height - 1) * width + (col + dx).clamp(0, width - 1)
        return flat_maps.gather(-1, index.unsqueeze(-1)).squeeze(-1)

    centre = at(0, 0)
    grad_x = 0.5 * (at(1, 0) - at(-1, 0))
    grad_y = 0.5 * (at(0, 1) - at(0, -1))
    hess_xx = 0.25 * (at(2, 0) - 2 * centre + at(-2, 0))
    hess_yy = 0.25 * (at(0, 2) - 2 * centre + at(0, -2))
    hess_xy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
    det = hess_xx * hess_yy - hess_xy**2
    refine = inside & (det != 0)
    safe_det = torch.where(refine, det, torch.ones_like(det))
    step_x = -(hess_yy * grad_x - hess_xy * grad_y) / safe_det
    step_y = -(hess_xx * grad_y - hess_xy * grad_x) / safe_det
    step = torch.stack([step_x, step_y], dim=-1)
    return torch.where(refine.unsqueeze(-1), step, torch.zeros_like(step))


def decode_heatmaps(heatmaps: torch.Tensor, blur_kernel: int = DARK_BLUR_KERNEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax + DARK sub-pixel refinement exactly as mmpose 0.x decodes (post_process 'unbiased').

    Steps (mmpose ``keypoints_from_heatmaps``, ``_gaussian_blur``, ``_taylor``): integer argmax
    and maximum of the raw map; :func:`dark_blur` (kernel 11, sigma 2, zero padding, rescaled
    to the original max); log of the map floored at 1e-10; one Taylor (Newton) step at the
    argmax, taken only where the +-2 px stencil fits (see :func:`_taylor_offsets`). The log of
    a Gaussian is quadratic, so the step is exact for Gaussian-shaped peaks. A map whose
    maximum is not positive gets the coordinates (-1, -1), as mmpose's ``_get_max_preds``
    marks joints without a peak.

    heatmaps: (N, K, H, W). Returns coords (N, K, 2) heatmap px (x, y) and maxvals (N, K)
    (the raw map's maximum, mmpose's joint confidence).
    """
    _check_maps(heatmaps)
    maps = heatmaps.detach().float()
    col, row, maxvals = _argmax_cells(maps)
    log_maps = torch.log(dark_blur(maps, blur_kernel).clamp(min=LOG_FLOOR))
    coords = torch.stack([col, row], dim=-1).to(maps.dtype) + _taylor_offsets(log_maps, col, row)
    coords = torch.where((maxvals > 0).unsqueeze(-1), coords, torch.full_like(coords, -1.0))
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
