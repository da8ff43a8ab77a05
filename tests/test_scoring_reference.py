"""score_tokens against a plain-numpy/scipy re-implementation of the documented method.

The reference is written from the contract in pipeline/method/scoring.py and guides.py, not by calling
them: per patch, the softmax over the two cosines (token vs normal / anomaly local guide) divided by
the temperature; ``fusion: self_dissimilarity`` multiplies the patch probability by
1 - cos(token, mean token of the image); the (gh, gw) grid is upsampled bilinearly to S x S
(half-pixel centres, ``align_corners`` False, edges clamped); each image is blurred alone with a
Gaussian of σ = blur_sigma pixels (reflect edges). The global probability is the softmax of the two
CLS-to-global-guide cosines, without temperature. Each setting is varied alone so a dropped setting
shows as a mismatch.
"""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline.method import guides
from pipeline.method import scoring


def unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def bilinear(grid_values, size):
    """(gh, gw) -> (size, size), half-pixel centres, source coordinates clamped at 0 and the last cell."""
    gh, gw = grid_values.shape

    def weights(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = weights(gh)
    c0, c1, fc = weights(gw)
    top = grid_values[r0][:, c0] * (1 - fc) + grid_values[r0][:, c1] * fc
    bottom = grid_values[r1][:, c0] * (1 - fc) + grid_values[r1][:, c1] * fc
    return top * (1 - fr)[:, None] + bottom * fr[:, None]


def reference_maps(tokens, guide_vectors, grid, size, temperature, sigma, fusion):
    tokens = tokens.astype(np.float64)
    g = guide_vectors.astype(np.float64)
    out = []
    for image in tokens:
        t = unit(image)
        cos_n = t @ unit(g[guides.NORMAL_LOCAL])
        cos_a = t @ unit(g[guides.ANOMALY_LOCAL])
        p = np.exp(cos_a / temperature) / (np.exp(cos_n / temperature) + np.exp(cos_a / temperature))
        if fusion == "self_dissimilarity":
            p = p * (1 - t @ unit(image.mean(axis=0)))
        m = bilinear(p.reshape(grid), size)
        if sigma > 0:
            m = gaussian_filter(m, sigma, mode="reflect")
        out.append(m)
    return np.stack(out)


def reference_global(cls, guide_vectors):
    c = unit(cls.astype(np.float64))
    g = guide_vectors.astype(np.float64)
    cos_n, cos_a = c @ unit(g[guides.NORMAL_GLOBAL]), c @ unit(g[guides.ANOMALY_GLOBAL])
    return np.exp(cos_a) / (np.exp(cos_n) + np.exp(cos_a))


def case(seed=0, b=3, grid=(3, 5), d=6):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(b, grid[0] * grid[1], d)).astype(np.float32)
    tokens[:, :, 0] += 2.0  # a shared direction, so the mean token is not ~0 and the fusion factor varies
    cls = rng.normal(size=(b, d)).astype(np.float32)
    vectors = rng.normal(size=(4, d)).astype(np.float32)
    return tokens, cls, vectors


SETTINGS = [
    scoring.ScoreSettings(),
    scoring.ScoreSettings(blur_sigma=0.0),
    scoring.ScoreSettings(blur_sigma=1.5),
    scoring.ScoreSettings(temperature=0.5),
    scoring.ScoreSettings(fusion="self_dissimilarity"),
    scoring.ScoreSettings(fusion="self_dissimilarity", blur_sigma=0.0, temperature=0.2),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.fusion}-sigma{s.blur_sigma}-T{s.temperature}")
def test_score_tokens_equals_the_numpy_reference(settings):
    tokens, cls, vectors = case()
    grid, size = (3, 5), 20
    maps, global_probs = scoring.score_tokens(torch.from_numpy(tokens), torch.from_numpy(cls),
                                              torch.from_numpy(vectors), grid, size, settings)
    expected = reference_maps(tokens, vectors, grid, size, settings.temperature, settings.blur_sigma, settings.fusion)
    assert maps.shape == (3, size, size) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(global_probs, reference_global(cls, vectors), rtol=0, atol=1e-6)


def test_the_reference_tells_the_settings_apart():
    """The settings above give maps far apart under the reference, so matching one is not matching all."""
    tokens, _, vectors = case()
    a = reference_maps(tokens, vectors, (3, 5), 20, 0.07, 4.0, "none")
    for other in [(0.07, 0.0, "none"), (0.07, 4.0, "self_dissimilarity"), (0.5, 4.0, "none")]:
        assert np.abs(a - reference_maps(tokens, vectors, (3, 5), 20, *other)).max() > 1e-2


def test_bilinear_reference_hand_worked():
    """A 1 x 2 grid [0, 1] upsampled to 4 pixels: source x = (i + .5)/2 - .5 = -.25, .25, .75, 1.25,
    clamped to [0, 1] -> 0, .25, .75, 1; rows all equal."""
    np.testing.assert_allclose(bilinear(np.array([[0.0, 1.0]]), 4), np.tile([0.0, 0.25, 0.75, 1.0], (4, 1)))


def reference_image_scores(maps, mode, lse_temperature, top_fraction):
    out = []
    for m in maps:
        v = np.sort(m.ravel().astype(np.float64))[::-1]
        if mode == "max":
            out.append(v[0])
        elif mode == "lse":
            out.append(lse_temperature * np.log(np.mean(np.exp(v / lse_temperature))))
        elif mode == "top_mean":
            k = max(1, int(round(top_fraction * v.size)))
            out.append(v[:k].mean())
    return np.array(out)


@pytest.mark.parametrize("settings", [
    scoring.ScoreSettings(image_score="max"),
    scoring.ScoreSettings(image_score="lse", lse_temperature=0.3),
    scoring.ScoreSettings(image_score="lse", lse_temperature=0.05),
    scoring.ScoreSettings(image_score="top_mean", top_fraction=0.25),
    scoring.ScoreSettings(image_score="top_mean", top_fraction=0.05),
], ids=lambda s: f"{s.image_score}-T{s.lse_temperature}-f{s.top_fraction}")
def test_score_images_follows_mode_and_its_parameter(settings):
    rng = np.random.default_rng(3)
    maps = rng.random((4, 10, 10))
    got = scoring.score_images(maps, np.zeros(4), settings)
    expected = reference_image_scores(maps, settings.image_score, settings.lse_temperature, settings.top_fraction)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    by_mode = scoring.scores_by_mode(maps, np.full(4, 0.25), settings)
    np.testing.assert_allclose(by_mode[settings.image_score], expected, rtol=1e-9)
    np.testing.assert_allclose(by_mode["global"], 0.25)


def test_score_images_global_mode_returns_the_global_probabilities():
    maps = np.zeros((3, 4, 4))
    probs = np.array([0.1, 0.7, 0.4])
    got = scoring.score_images(maps, probs, scoring.ScoreSettings(image_score="global"))
    np.testing.assert_allclose(got, probs)
