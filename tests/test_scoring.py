import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline import guides, scoring


def vectors(d=4):
    g = torch.zeros(4, d)
    g[guides.NORMAL_LOCAL, 0] = 1.0
    g[guides.ANOMALY_LOCAL, 1] = 1.0
    g[guides.NORMAL_GLOBAL, 2] = 1.0
    g[guides.ANOMALY_GLOBAL, 3] = 1.0
    return g


def test_blur_is_per_image_and_batch_independent():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 4)
    tokens[1] = 0
    tokens[1, :, 0] = 1.0  # image 1 is uniformly normal: its map must stay flat whatever its neighbours
    maps = scoring.anomaly_maps(tokens, vectors(), (4, 4), 16, temperature=0.07, sigma=4)
    alone = [scoring.anomaly_maps(tokens[i : i + 1], vectors(), (4, 4), 16, temperature=0.07, sigma=4)[0] for i in range(3)]
    np.testing.assert_allclose(maps, np.stack(alone), rtol=0, atol=1e-7)
    assert np.ptp(maps[1]) < 1e-6
    # and the blur is scipy's 2-D Gaussian on each unblurred map
    raw = scoring.anomaly_maps(tokens, vectors(), (4, 4), 16, temperature=0.07, sigma=0)
    np.testing.assert_allclose(maps[2], gaussian_filter(raw[2], 4, mode="reflect"), atol=1e-6)


def test_image_score_modes_hand_worked():
    maps = np.array([[[0.0, 0.2], [0.4, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    np.testing.assert_allclose(scoring.image_scores(maps, "max"), [1.0, 0.5])
    # top_mean with fraction 0.5 of 4 pixels = the top 2
    np.testing.assert_allclose(scoring.image_scores(maps, "top_mean", top_fraction=0.5), [0.7, 0.5])
    t = 0.5
    expected = t * np.log(np.mean(np.exp(np.array([0.0, 0.2, 0.4, 1.0]) / t)))
    np.testing.assert_allclose(scoring.image_scores(maps, "lse", lse_temperature=t), [expected, 0.5])
    # lse tends to max as T -> 0
    np.testing.assert_allclose(scoring.image_scores(maps, "lse", lse_temperature=1e-4), [1.0, 0.5], atol=1e-3)
    np.testing.assert_allclose(scoring.image_scores(maps, "global", global_probs=np.array([0.1, 0.9])), [0.1, 0.9])
    with pytest.raises(ValueError, match="image_score"):
        scoring.image_scores(maps, "median")
    with pytest.raises(ValueError, match="global"):
        scoring.image_scores(maps, "global")


def test_global_probability_is_softmax_of_cosines():
    cls = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    p = scoring.global_probability(cls, vectors())
    # image 0: cosines (1/sqrt2, 1/sqrt2) -> 0.5; image 1: cosines (0, 1) -> e / (1 + e)
    np.testing.assert_allclose(p, [0.5, np.e / (1 + np.e)], rtol=1e-6)
