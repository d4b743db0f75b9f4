"""The official 2025 SSIM: foreground mask morphology and the 7x7 box SSIM, against slow references."""

import numpy as np
import pytest
import torch

from recon.metric import (
    BRAIN_THRESHOLD,
    KNEE_THRESHOLD,
    foreground_mask,
    slice_ssim,
    ssim,
    ssim_map,
)

# ---------------------------------------------------------------------------------------------
# Slow, independent references (explicit loops over pixels and windows).


def _ref_filter(m: np.ndarray, op, border: float | None) -> np.ndarray:
    """One 3x3 min/max step. border=None: out-of-image pixels ignored (OpenCV default);
    otherwise they take the value ``border``."""
    h, w = m.shape
    out = np.empty_like(m)
    for i in range(h):
        for j in range(w):
            values = []
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    r, c = i + di, j + dj
                    if 0 <= r < h and 0 <= c < w:
                        values.append(m[r, c])
                    elif border is not None:
                        values.append(border)
            out[i, j] = op(values)
    return out


def _ref_mask(target: np.ndarray, thr: float, zero_border: bool = False) -> np.ndarray:
    m = (target > thr).astype(np.float64)
    border = 0.0 if zero_border else None
    m = _ref_filter(m, min, border)
    for _ in range(15):
        m = _ref_filter(m, max, border)
    for _ in range(14):
        m = _ref_filter(m, min, border)
    return m


def _ref_ssim(x: np.ndarray, y: np.ndarray, data_range: float, ddof: int = 1) -> float:
    """Mean SSIM over all 7x7 windows, with per-window numpy statistics (ddof=1: sample covariance)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, w = x.shape
    values = []
    for i in range(h - 6):
        for j in range(w - 6):
            a = x[i : i + 7, j : j + 7].ravel().astype(np.float64)
            b = y[i : i + 7, j : j + 7].ravel().astype(np.float64)
            ma, mb = a.mean(), b.mean()
            va, vb = a.var(ddof=ddof), b.var(ddof=ddof)
            cab = ((a - ma) * (b - mb)).sum() / (49 - ddof)
            values.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def _random_target(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blobs (some touching the borders), salt noise and values between the two thresholds."""
    img = np.zeros((h, w), np.float32)
    for _ in range(4):
        r0, c0 = rng.integers(-4, h), rng.integers(-4, w)
        dr, dc = rng.integers(1, 14, size=2)
        img[max(r0, 0) : r0 + dr, max(c0, 0) : c0 + dc] = 1e-3
    img[rng.random((h, w)) < 0.03] = 1e-3
    # Foreground for knee (2e-5), background for brain (5e-5): scattered pixels and one block.
    img[rng.random((h, w)) < 0.05] = 3e-5
    r0, c0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
    img[r0 : r0 + 8, c0 : c0 + 8] = np.where(img[r0 : r0 + 8, c0 : c0 + 8] > 0, img[r0 : r0 + 8, c0 : c0 + 8], 3e-5)
    return img


# ---------------------------------------------------------------------------------------------
# Morphology


@pytest.mark.parametrize("seed,shape", [(0, (23, 31)), (1, (40, 36)), (2, (12, 45))])
def test_mask_matches_slow_reference_including_borders(seed, shape):
    rng = np.random.default_rng(seed)
    target = _random_target(rng, *shape)
    for anatomy, thr in (("brain", BRAIN_THRESHOLD), ("knee", KNEE_THRESHOLD)):
        expected = _ref_mask(target, thr)
        got = foreground_mask(target, anatomy)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
    # The two thresholds really select different pixels on this image.
    assert not np.array_equal(_ref_mask(target, BRAIN_THRESHOLD), _ref_mask(target, KNEE_THRESHOLD))


def test_mask_torch_batch_with_mixed_anatomies_matches_reference():
    rng = np.random.default_rng(3)
    batch = np.stack([_random_target(rng, 30, 30) for _ in range(3)])
    anatomies = ["brain", "knee", "brain"]
    got = foreground_mask(torch.from_numpy(batch).double(), anatomies)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == (3, 30, 30)
    for i, anatomy in enumerate(anatomies):
        thr = BRAIN_THRESHOLD if anatomy == "brain" else KNEE_THRESHOLD
        np.testing.assert_array_equal(got[i].numpy(), _ref_mask(batch[i], thr))
    # One anatomy string for the whole batch equals per-slice calls.
    whole = foreground_mask(torch.from_numpy(batch), "knee")
    assert torch.equal(whole[1], foreground_mask(torch.from_numpy(batch[1]), "knee"))


def test_mask_of_a_centred_square_is_the_square():
    # erode 1 shrinks a side-20 square to 18, dilate 15 grows it to 48, erode 14 brings it back
    # to 20: the mask is exactly the square (away from the borders).
    target = np.zeros((64, 64), np.float32)
    target[22:42, 22:42] = 1e-3
    mask = foreground_mask(target, "brain")
    np.testing.assert_array_equal(mask, (target > 0).astype(np.float32))


def test_mask_border_pixels_are_neutral():
    # Square at columns 5..24, rows 22..41. erode 1 -> cols 6..23; dilate 15 -> cols 0..38 (clipped);
    # erode 14 with a neutral border -> cols 0..24: the gap to the border is closed.
    # With a zero border the last erosion would eat 14 columns from the border side: cols 14..24.
    target = np.zeros((64, 64), np.float32)
    target[22:42, 5:25] = 1e-3
    mask = foreground_mask(target, "brain")
    expected = np.zeros((64, 64), np.float32)
    expected[22:42, 0:25] = 1
    np.testing.assert_array_equal(mask, expected)
    # A whole-image foreground stays whole (a zero border would leave a 14-pixel empty frame).
    full = np.full((40, 40), 1e-3, np.float32)
    assert foreground_mask(full, "knee").min() == 1.0
    assert _ref_mask(full, KNEE_THRESHOLD, zero_border=True)[:14].max() == 0.0


def test_mask_removes_isolated_pixels_and_closes_small_holes():
    target = np.zeros((64, 64), np.float32)
    target[5, 5] = 1.0  # isolated pixel: removed by the first erosion
    target[22:42, 22:42] = 1e-3
    target[30:33, 30:33] = 0.0  # 3x3 hole: closed by dilate 15 / erode 14
    mask = foreground_mask(target, "brain")
    assert mask[5, 5] == 0
    assert mask[22:42, 22:42].min() == 1 and mask.sum() == 400


def test_mask_threshold_is_strict_and_anatomy_specific():
    t = np.zeros((64, 64), np.float32)
    t[22:42, 22:42] = np.float32(BRAIN_THRESHOLD)  # equal to the brain threshold: not above it
    assert foreground_mask(t, "brain").sum() == 0
    assert foreground_mask(t, "knee").sum() == 400
    with pytest.raises(ValueError, match="unknown anatomy 'liver'"):
        foreground_mask(t, "liver")
    with pytest.raises(ValueError, match="2 anatomies"):
        foreground_mask(torch.zeros(3, 10, 10), ["brain", "knee"])
    with pytest.raises(ValueError, match="shape"):
        foreground_mask(np.zeros(10, np.float32), "brain")


def test_mask_matches_opencv_when_available():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(20):
        target = _random_target(rng, int(rng.integers(10, 70)), int(rng.integers(10, 70)))
        m = np.zeros(target.shape)
        m[target > BRAIN_THRESHOLD] = 1
        m = cv2.erode(m, kernel, iterations=1)
        m = cv2.dilate(m, kernel, iterations=15)
        m = cv2.erode(m, kernel, iterations=14)
        np.testing.assert_array_equal(foreground_mask(target, "brain"), m)


@pytest.mark.gpu
def test_mask_and_ssim_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(8)
    t = torch.from_numpy(np.stack([_random_target(rng, 64, 64) for _ in range(4)]))
    assert torch.equal(foreground_mask(t.cuda(), "knee").cpu(), foreground_mask(t, "knee"))
    r = t + 1e-4 * torch.rand(t.shape, generator=torch.Generator().manual_seed(0))
    s_gpu = ssim(r.cuda(), t.cuda(), torch.full((4,), 1e-3, device="cuda")).cpu()
    torch.testing.assert_close(s_gpu, ssim(r, t, 1e-3), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SSIM


def test_identical_images_score_exactly_one():
    rng = np.random.default_rng(0)
    target = _random_target(rng, 48, 48) + np.float32(1e-4) * rng.random((48, 48), dtype=np.float32)
    assert slice_ssim(target, target, float(target.max()), "brain") == 1.0
    assert slice_ssim(torch.from_numpy(target), target, 1e-3, "knee") == 1.0


def test_constant_offset_on_an_all_foreground_image():
    # Target = a everywhere (all foreground, mask = 1), recon = a + c. Every window has zero variance:
    #   S = (2 a (a + c) + C1) / (a^2 + (a + c)^2 + C1) * (0 + C2) / (0 + C2),   C1 = (0.01 L)^2.
    # a = 1, c = 0.1, L = 1: S = (2.2 + 1e-4) / (2.21 + 1e-4) = 2.2001 / 2.2101.
    target = np.ones((20, 20), np.float64)
    x = torch.from_numpy(target + 0.1)[None]
    y = torch.from_numpy(target)[None]
    assert float(ssim(x, y, 1.0)) == pytest.approx(2.2001 / 2.2101, rel=1e-9)
    # slice_ssim runs in float32 like the official script. There var = E[x^2] - E[x]^2 cancels to
    # about 1e-7 instead of 0, which is not small against C2 = 9e-4 when intensities are near L:
    # the official float32 metric carries that error too (~3e-4 here), so only a loose check.
    assert slice_ssim(target + 0.1, target, 1.0, "brain") == pytest.approx(2.2001 / 2.2101, abs=1e-3)


def _square_offset_expected(n: int, lo: int, hi: int, a: float, c: float, L: float, cov_norm: float) -> float:
    """Mean SSIM of x = (a + c) * S, y = a * S, S = indicator of the square [lo, hi]^2 in an n x n image.

    A window whose overlap with the square is k of 49 pixels (p = k / 49) has
        mu_x = p (a + c), mu_y = p a,
        var_x = f p (1 - p) (a + c)^2, var_y = f p (1 - p) a^2, cov = f p (1 - p) a (a + c),
    with f = cov_norm (49/48 for the sample covariance), so
        S(p) = (2 p^2 a (a + c) + C1)(2 f p (1 - p) a (a + c) + C2)
               / ((p^2 ((a + c)^2 + a^2) + C1)(f p (1 - p) ((a + c)^2 + a^2) + C2)),
    and S(0) = 1 (both windows all zero). k = (rows overlap) x (columns overlap).
    """
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    overlap = [max(0, min(i + 6, hi) - max(i, lo) + 1) for i in range(n - 6)]
    total = 0.0
    for r in overlap:
        for q in overlap:
            p = r * q / 49
            num = (2 * p * p * a * (a + c) + c1) * (2 * cov_norm * p * (1 - p) * a * (a + c) + c2)
            den = (p * p * ((a + c) ** 2 + a * a) + c1) * (cov_norm * p * (1 - p) * ((a + c) ** 2 + a * a) + c2)
            total += num / den
    return total / (n - 6) ** 2


def test_constant_offset_inside_the_foreground_matches_the_analytic_value():
    # L above the image maximum keeps C2 comparable with the edge windows' variances, so that
    # the 49/48 factor changes the score by about 7e-6 (with L = a it would be ~1e-7).
    n, lo, hi, a, c, L = 64, 22, 41, 1e-3, 2e-4, 1e-2
    target = np.zeros((n, n), np.float64)
    target[lo : hi + 1, lo : hi + 1] = a
    mask = foreground_mask(target, "brain")  # the square itself (see the test above)
    recon = target + c * mask
    background = 5.0 * np.ones_like(target) * (1 - mask)  # garbage outside the mask is masked away
    expected = _square_offset_expected(n, lo, hi, a, c, L, 49 / 48)
    wrong_factor = _square_offset_expected(n, lo, hi, a, c, L, 1.0)
    assert abs(expected - wrong_factor) > 5e-6  # the 49/48 factor is visible in this case
    x = torch.from_numpy((recon + background) * mask)[None]
    y = torch.from_numpy(target * mask)[None]
    assert float(ssim(x, y, L)) == pytest.approx(expected, abs=1e-10)
    # slice_ssim (float32 like the official script) masks by itself.
    assert slice_ssim(recon + background, target, L, "brain") == pytest.approx(expected, abs=1e-5)


def test_ssim_matches_per_window_sample_statistics():
    rng = np.random.default_rng(5)
    # Intensities well below L so that the window variances are comparable with C2 = (0.03 L)^2.
    x = 0.05 * rng.random((2, 15, 17))
    y = np.clip(x + 0.02 * rng.standard_normal(x.shape), 0, None)
    got = ssim(torch.from_numpy(x), torch.from_numpy(y), torch.tensor([1.0, 1.5], dtype=torch.float64))
    for i, L in enumerate((1.0, 1.5)):
        sample = _ref_ssim(x[i], y[i], L, ddof=1)
        population = _ref_ssim(x[i], y[i], L, ddof=0)
        assert float(got[i]) == pytest.approx(sample, abs=1e-12)
        assert abs(sample - population) > 1e-3  # a 1.0 instead of 49/48 would fail above


def test_ssim_map_shape_valid_convolution_and_float32():
    x = torch.rand(3, 1, 20, 24)
    m = ssim_map(x, x * 0.9, 1.0)
    assert m.shape == (3, 14, 18) and m.dtype == torch.float32
    assert ssim(x[:, 0], x[:, 0] * 0.9, 1.0).shape == (3,)
    # A (B,) data range equals per-slice scalar calls.
    dr = torch.tensor([0.5, 1.0, 2.0])
    batched = ssim(x, x * 0.9, dr)
    for i in range(3):
        torch.testing.assert_close(batched[i], ssim(x[i : i + 1], x[i : i + 1] * 0.9, float(dr[i]))[0])


def test_ssim_is_differentiable():
    x = torch.rand(1, 10, 10, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 10, 10, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ssim(a, y, 1.0), (x,))


@pytest.mark.parametrize(
    "x,y,dr,message",
    [
        (torch.rand(2, 10, 10), torch.rand(2, 10, 11), 1.0, "same shape"),
        (torch.rand(10, 10), torch.rand(10, 10), 1.0, r"\(B, H, W\)"),
        (torch.rand(2, 2, 10, 10), torch.rand(2, 2, 10, 10), 1.0, r"\(B, 1, H, W\)"),
        (torch.ones(1, 10, 10, dtype=torch.int32), torch.ones(1, 10, 10, dtype=torch.int32), 1.0, "floating"),
        (torch.rand(1, 6, 10), torch.rand(1, 6, 10), 1.0, "at least 7x7"),
        (torch.rand(1, 10, 10), torch.rand(1, 10, 10, dtype=torch.float64), 1.0, "one dtype"),
        (torch.rand(1, 10, 10), torch.rand(1, 10, 10), 0.0, "data_range must be > 0"),
        (torch.rand(2, 10, 10), torch.rand(2, 10, 10), torch.ones(3), r"shape \(2,\)"),
    ],
)
def test_ssim_bad_input(x, y, dr, message):
    with pytest.raises(ValueError, match=message):
        ssim(x, y, dr)


def test_slice_ssim_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        slice_ssim(np.zeros((10, 10)), np.zeros((10, 12)), 1.0, "brain")
    with pytest.raises(ValueError, match=r"recon of shape \(H, W\)"):
        slice_ssim(np.zeros((1, 10, 10)), np.zeros((10, 10)), 1.0, "brain")
