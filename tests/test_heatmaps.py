import math

import numpy as np
import pytest
import torch

from distilpose.heatmaps import (
    decode_heatmaps,
    fit_gaussians,
    render_gaussian_heatmaps,
    render_simulated_heatmaps,
    sample_heatmaps,
)

HEATMAP_SIZE = (64, 48)  # (H, W) of the paper presets
NOISE_FLOOR = 0.003


def random_gaussians(count: int, seed: int, margin: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, count, 2) sub-pixel centres at least `margin` px inside the map, sigmas in [1.5, 3]."""
    generator = torch.Generator().manual_seed(seed)
    height, width = HEATMAP_SIZE
    low = torch.tensor([margin, margin])
    span = torch.tensor([width - 1 - 2 * margin, height - 1 - 2 * margin])
    centres = low + torch.rand(1, count, 2, generator=generator) * span
    sigmas = 1.5 + 1.5 * torch.rand(1, count, 2, generator=generator)
    return centres, sigmas


def fit_errors(heatmaps: torch.Tensor, centres: torch.Tensor, sigmas: torch.Tensor) -> tuple[float, float]:
    params, _ = fit_gaussians(heatmaps)
    mu_error = (params[..., :2] - centres).abs().max().item()
    sigma_error = ((params[..., 2:] - sigmas) / sigmas).abs().max().item()
    return mu_error, sigma_error


# ---------------------------------------------------------------- render


def test_render_gaussian_unit_peak_and_subpixel_values():
    joints = torch.tensor([[[3.0, 2.0], [1.5, 0.0]]])
    maps = render_gaussian_heatmaps(joints, (4, 5), sigma=1.0)
    assert maps.shape == (1, 2, 4, 5)
    assert maps[0, 0, 2, 3].item() == pytest.approx(1.0)
    assert maps[0, 0].max().item() == pytest.approx(1.0)
    # Joint 1 sits between columns 1 and 2: both get exp(-0.5^2 / 2).
    assert maps[0, 1, 0, 1].item() == pytest.approx(math.exp(-0.125), abs=1e-6)
    assert maps[0, 1, 0, 2].item() == pytest.approx(math.exp(-0.125), abs=1e-6)
    assert maps[0, 1, 1, 1].item() == pytest.approx(math.exp(-0.125 - 0.5), abs=1e-6)


def test_render_gaussian_weights_zero_invisible_joints():
    joints = torch.tensor([[[3.0, 2.0], [1.0, 1.0]]])
    maps = render_gaussian_heatmaps(joints, (4, 5), weights=torch.tensor([[1.0, 0.0]]))
    assert maps[0, 0].max().item() == pytest.approx(1.0)
    assert maps[0, 1].abs().sum().item() == 0.0


def test_render_simulated_matches_the_spec_formula():
    generator = torch.Generator().manual_seed(1)
    mu = torch.rand(2, 3, 2, generator=generator) * torch.tensor([6.0, 5.0])
    sigma = 0.5 + torch.rand(2, 3, 2, generator=generator)
    maps = render_simulated_heatmaps(mu, sigma, (5, 6))
    y = torch.arange(5.0).view(5, 1)
    x = torch.arange(6.0).view(1, 6)
    mx, my = mu[..., 0, None, None], mu[..., 1, None, None]
    sx, sy = sigma[..., 0, None, None], sigma[..., 1, None, None]
    expected = torch.exp(-0.5 * ((x - mx) ** 2 / (sx**2 + 1e-9) + (y - my) ** 2 / (sy**2 + 1e-9)))
    torch.testing.assert_close(maps, expected)


def test_render_simulated_gradcheck():
    mu = torch.tensor([[[1.3, 2.2]]], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([[[0.9, 1.4]]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, s: render_simulated_heatmaps(m, s, (4, 3)), (mu, sigma))


# ---------------------------------------------------------------- sample


def test_sample_heatmaps_nearest_cell_and_outside_is_zero():
    maps = (torch.arange(12.0) / 10).view(1, 1, 3, 4).repeat(1, 3, 1, 1)
    coords = torch.tensor([[[0.7, 0.9], [0.0, 0.2], [1.2, -0.3]]])
    # (0.7, 0.9): col round(2.1) = 2, row round(1.8) = 2 -> index 10; (0, 0.2): col 0, row 0.
    values = sample_heatmaps(maps, coords)
    torch.testing.assert_close(values, torch.tensor([[1.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- decode


def test_decode_recovers_subpixel_centres():
    centres, _ = random_gaussians(200, seed=2, margin=8.0)
    maps = render_gaussian_heatmaps(centres, HEATMAP_SIZE, sigma=2.0)
    coords, maxvals = decode_heatmaps(maps)
    assert (coords - centres).abs().max().item() < 0.05
    assert ((maxvals > 0.7) & (maxvals <= 1.0)).all()


def _cv2_kernel(size: int) -> np.ndarray:
    """cv2.getGaussianKernel(size, 0) for size > 7: sigma from the size, normalized."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def mmpose_dark(heatmap: np.ndarray, kernel_size: int = 11) -> tuple[np.ndarray, float]:
    """mmpose 0.x DARK on one (H, W) map in float64, written from its description, loop style.

    argmax (-1, -1 when the max is not positive); zero-pad by (k-1)/2, blur with the 2-D
    kernel g g^T, crop, rescale to the original max; log(max(., 1e-10)); one Taylor step with
    the +-2 px stencil only for 1 < px < W-2 and 1 < py < H-2, whenever det != 0.
    """
    height, width = heatmap.shape
    index = int(np.argmax(heatmap))
    maxval = float(heatmap.flat[index])
    if maxval <= 0:
        return np.array([-1.0, -1.0]), maxval
    px, py = index % width, index // width
    border = (kernel_size - 1) // 2
    padded = np.zeros((height + 2 * border, width + 2 * border))
    padded[border:-border, border:-border] = heatmap
    g = _cv2_kernel(kernel_size)
    blurred = np.zeros((height, width))
    for i in range(kernel_size):
        for j in range(kernel_size):
            blurred += g[i] * g[j] * padded[i : i + height, j : j + width]
    blurred *= maxval / blurred.max()
    h = np.log(np.maximum(blurred, 1e-10))
    coord = np.array([float(px), float(py)])
    if 1 < px < width - 2 and 1 < py < height - 2:
        dx = 0.5 * (h[py, px + 1] - h[py, px - 1])
        dy = 0.5 * (h[py + 1, px] - h[py - 1, px])
        dxx = 0.25 * (h[py, px + 2] - 2 * h[py, px] + h[py, px - 2])
        dyy = 0.25 * (h[py + 2, px] - 2 * h[py, px] + h[py - 2, px])
        dxy = 0.25 * (h[py + 1, px + 1] - h[py - 1, px + 1] - h[py + 1, px - 1] + h[py - 1, px - 1])
        if dxx * dyy - dxy**2 != 0:
            coord -= np.linalg.inv(np.array([[dxx, dxy], [dxy, dyy]])) @ np.array([dx, dy])
    return coord, maxval


def _border_centres(per_side: int, seed: int) -> torch.Tensor:
    """(1, 4 * per_side, 2) sub-pixel centres within 6 px of the left, right, top, bottom border."""
    rng = np.random.default_rng(seed)
    height, width = HEATMAP_SIZE
    along_x = rng.uniform(0, width - 1, per_side)
    along_y = rng.uniform(0, height - 1, per_side)
    near = rng.uniform(0, 6, (4, per_side))
    centres = [
        np.stack([near[0], along_y], -1),
        np.stack([width - 1 - near[1], along_y], -1),
        np.stack([along_x, near[2]], -1),
        np.stack([along_x, height - 1 - near[3]], -1),
    ]
    return torch.from_numpy(np.concatenate(centres)[None]).float()


def test_decode_matches_mmpose_dark_near_all_borders():
    centres = _border_centres(40, seed=5)
    clean = render_gaussian_heatmaps(centres, HEATMAP_SIZE, sigma=2.0)
    # Teacher outputs are not clean Gaussians: a floor, noise, negative values.
    noise = 0.02 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(6))
    maps = torch.cat([clean, 0.8 * clean + noise - 0.01], dim=1)
    coords, maxvals = decode_heatmaps(maps)
    for k in range(maps.shape[1]):
        expected, expected_max = mmpose_dark(maps[0, k].double().numpy())
        np.testing.assert_allclose(coords[0, k].numpy(), expected, atol=1e-3, err_msg=f"map {k}")
        assert maxvals[0, k].item() == pytest.approx(expected_max)
    # mmpose's kernel for sigma-3 teachers (modulate_kernel 17).
    coords17, _ = decode_heatmaps(maps[:, ::8], blur_kernel=17)
    for k in range(coords17.shape[1]):
        expected, _ = mmpose_dark(maps[0, 8 * k].double().numpy(), kernel_size=17)
        np.testing.assert_allclose(coords17[0, k].numpy(), expected, atol=1e-3, err_msg=f"map {8 * k}, kernel 17")
    # The +-2 px stencil: argmaxes on the two outer rows/columns keep integer coordinates.
    outer = (centres[0] < 1.5).any(-1) | (centres[0, :, 0] > 45.5) | (centres[0, :, 1] > 61.5)
    assert outer.sum() > 10
    torch.testing.assert_close(coords[0, : centres.shape[1]][outer], centres[0][outer].round())


def test_decode_maps_without_a_positive_peak_as_mmpose():
    maps = torch.zeros(1, 3, *HEATMAP_SIZE)
    maps[0, 1] = -0.5
    maps[0, 2] = 0.5  # flat: argmax is the first cell, a border cell
    coords, maxvals = decode_heatmaps(maps)
    torch.testing.assert_close(coords[0], torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]]))
    torch.testing.assert_close(maxvals[0], torch.tensor([0.0, -0.5, 0.5]))


# ---------------------------------------------------------------- fit


def test_fit_recovers_clean_gaussians():
    centres, sigmas = random_gaussians(500, seed=3)
    maps = render_simulated_heatmaps(centres, sigmas, HEATMAP_SIZE)
    mu_error, sigma_error = fit_errors(maps, centres, sigmas)
    assert mu_error < 0.05
    assert sigma_error < 0.03
    _, confidence = fit_gaussians(maps)
    torch.testing.assert_close(confidence, torch.ones_like(confidence), atol=1e-3, rtol=0)


@pytest.mark.parametrize("noise", ["none", "uniform-floor", "gaussian"])
def test_fit_recovers_low_peak_noisy_gaussians(noise):
    centres, sigmas = random_gaussians(500, seed=4)
    generator = torch.Generator().manual_seed(5)
    peaks = 0.3 + 0.6 * torch.rand(1, 500, generator=generator)
    maps = render_simulated_heatmaps(centres, sigmas, HEATMAP_SIZE) * peaks[..., None, None]
    if noise == "uniform-floor":
        maps = maps + NOISE_FLOOR * torch.rand(maps.shape, generator=generator)
    elif noise == "gaussian":
        maps = maps + NOISE_FLOOR * torch.randn(maps.shape, generator=generator)
    mu_error, sigma_error = fit_errors(maps, centres, sigmas)
    assert mu_error < 0.05
    assert sigma_error < 0.03
    _, confidence = fit_gaussians(maps)
    assert (confidence - peaks).abs().max().item() < 0.02


def test_fit_border_clipped_gaussians():
    centres = torch.tensor([[[-1.0, 30.0], [0.0, 0.0], [47.0, 63.0], [49.0, 65.0], [24.0, 64.5]]])
    maps = render_gaussian_heatmaps(centres, HEATMAP_SIZE, sigma=2.0)
    params, confidence = fit_gaussians(maps)
    assert torch.isfinite(params).all() and torch.isfinite(confidence).all()
    # The log-quadratic model extrapolates, so even centres off the map are recovered.
    torch.testing.assert_close(params[..., :2], centres, atol=0.05, rtol=0)
    torch.testing.assert_close(params[..., 2:], torch.full_like(centres, 2.0), atol=0.06, rtol=0)


def test_fit_degenerate_maps_are_finite():
    generator = torch.Generator().manual_seed(6)
    maps = torch.zeros(1, 5, *HEATMAP_SIZE)
    maps[0, 1] = 0.5  # constant
    maps[0, 2] = NOISE_FLOOR * torch.rand(HEATMAP_SIZE, generator=generator)  # noise only
    maps[0, 3, 10, 10] = 1.0  # one-pixel spike
    maps[0, 4] = -torch.rand(HEATMAP_SIZE, generator=generator)  # negative
    params, confidence = fit_gaussians(maps)
    assert torch.isfinite(params).all() and torch.isfinite(confidence).all()
    assert (params[..., 2:] > 0).all()
    torch.testing.assert_close(confidence[0, :2], torch.zeros(2))
    assert confidence[0, 2].item() < 0.01
    # A spike is narrower than any Gaussian the window can resolve: small sigma, on the cell.
    torch.testing.assert_close(params[0, 3, :2], torch.tensor([10.0, 10.0]))
    assert (params[0, 3, 2:] < 1.0).all()


def test_fit_accepts_fp16_heatmaps():
    centres, sigmas = random_gaussians(17, seed=7)
    maps = render_simulated_heatmaps(centres, sigmas, HEATMAP_SIZE).half()
    params, confidence = fit_gaussians(maps)
    assert params.dtype == torch.float32 and confidence.dtype == torch.float32
    assert fit_errors(maps, centres, sigmas)[0] < 0.05
