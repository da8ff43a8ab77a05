import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline.method import guides
from pipeline.method import scoring


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


def slow_fused_patch_scores(tokens, g, temperature):
    """Per patch, by explicit loops: softmax anomaly probability of the two local-guide cosines times
    1 - cos(token, mean token of its image)."""
    b, length, d = tokens.shape
    out = np.zeros((b, length))
    t = tokens.double().numpy()
    normal, anomaly = g[guides.NORMAL_LOCAL].double().numpy(), g[guides.ANOMALY_LOCAL].double().numpy()
    cos = lambda u, v: float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))  # noqa: E731
    for i in range(b):
        mean = t[i].mean(axis=0)
        for j in range(length):
            en, ea = np.exp(cos(t[i, j], normal) / temperature), np.exp(cos(t[i, j], anomaly) / temperature)
            out[i, j] = ea / (en + ea) * (1 - cos(t[i, j], mean))
    return out


def test_fused_map_is_probability_times_self_dissimilarity_by_hand():
    torch.manual_seed(1)
    tokens = torch.randn(3, 16, 5)
    g = torch.randn(4, 5)
    patch = slow_fused_patch_scores(tokens, g, 0.07)
    for sigma in (0, 2.0):
        fused = scoring.anomaly_maps(tokens, g, (4, 4), 12, temperature=0.07, sigma=sigma, fusion="self_dissimilarity")
        up = torch.nn.functional.interpolate(torch.from_numpy(patch).float().reshape(3, 1, 4, 4), size=(12, 12),
                                             mode="bilinear", align_corners=False)[:, 0].numpy()
        want = np.stack([gaussian_filter(m, sigma, mode="reflect") for m in up]) if sigma else up
        assert fused.shape == (3, 12, 12) and fused.dtype == np.float32
        np.testing.assert_allclose(fused, want, rtol=0, atol=1e-6)
    # fusion "none" is the guide probability alone, unchanged by the option
    plain = scoring.anomaly_maps(tokens, g, (4, 4), 12, temperature=0.07, sigma=2.0)
    assert np.array_equal(plain, scoring.anomaly_maps(tokens, g, (4, 4), 12, temperature=0.07, sigma=2.0, fusion="none"))
    assert np.abs(plain - fused).max() > 1e-2


def test_fusion_silences_what_the_whole_image_shares():
    """An image whose patches are all the same token has self-dissimilarity 0 everywhere: its fused map
    is 0 even where the guides call every patch anomalous; one odd patch is the only thing left."""
    g = vectors(5)
    tokens = torch.zeros(2, 16, 5)
    tokens[:, :, 1] = 1.0  # every patch on the anomaly guide
    tokens[1, 5] = torch.tensor([0.0, 1.0, 0.0, 0.0, 3.0])  # image 1: one patch differs (still anomalous)
    plain = scoring.anomaly_maps(tokens, g, (4, 4), 8, temperature=0.07, sigma=0)
    fused = scoring.anomaly_maps(tokens, g, (4, 4), 8, temperature=0.07, sigma=0, fusion="self_dissimilarity")
    assert plain[0].min() > 0.99 and np.abs(fused[0]).max() < 1e-6
    assert fused[1].max() > 0.2 > 10 * np.median(fused[1]) and np.unravel_index(fused[1].argmax(), (8, 8)) in {(2, 2), (2, 3), (3, 2), (3, 3)}


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="fusion must be one of none, self_dissimilarity"):
        scoring.anomaly_maps(torch.zeros(1, 4, 4), vectors(4), (2, 2), 4, temperature=0.07, sigma=0, fusion="sum")


def slow_score_tokens(tokens, cls, vectors, grid, size, *, temperature, sigma, fusion):
    """score_tokens from its documented steps in float64 numpy, one image and one patch at a time:
    softmax of the cosines to the two local guides / τ, times 1 − cos(token, image mean) with the
    self_dissimilarity fusion, bilinear upsampling (align_corners False), the per-image blur; and the
    softmax of the CLS cosines to the two global guides."""
    t, c, g = (x.double().numpy() for x in (tokens, cls, vectors))
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    gu = unit(g)
    maps, probs = [], []
    for b in range(len(t)):
        patch = np.zeros(t.shape[1])
        mean = t[b].mean(0)
        for p in range(t.shape[1]):
            u = unit(t[b, p])
            cn, ca = u @ gu[guides.NORMAL_LOCAL], u @ gu[guides.ANOMALY_LOCAL]
            patch[p] = np.exp(ca / temperature) / (np.exp(cn / temperature) + np.exp(ca / temperature))
            if fusion == "self_dissimilarity":
                patch[p] *= 1 - u @ unit(mean)
        up = torch.nn.functional.interpolate(torch.tensor(patch).reshape(1, 1, *grid), size=(size, size),
                                             mode="bilinear", align_corners=False)[0, 0].numpy()
        maps.append(gaussian_filter(up, sigma=sigma, mode="reflect") if sigma > 0 else up)
        cu = unit(c[b])
        cn, ca = cu @ gu[guides.NORMAL_GLOBAL], cu @ gu[guides.ANOMALY_GLOBAL]
        probs.append(np.exp(ca) / (np.exp(cn) + np.exp(ca)))
    return np.stack(maps), np.array(probs)


@pytest.mark.parametrize("fusion", ["none", "self_dissimilarity"])
@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_score_tokens_equals_its_documented_steps_for_every_fusion_and_blur(fusion, sigma):
    """Each setting must reach the map: a score_tokens that ignored ``fusion`` or the blur would match
    only one of these four references."""
    g = torch.Generator().manual_seed(3)
    tokens, cls, vectors = torch.randn(2, 9, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(4, 6, generator=g)
    settings = scoring.ScoreSettings(temperature=0.2, blur_sigma=sigma, fusion=fusion)
    maps, global_probs = scoring.score_tokens(tokens, cls, vectors, (3, 3), 12, settings)
    want_maps, want_probs = slow_score_tokens(tokens, cls, vectors, (3, 3), 12, temperature=0.2, sigma=sigma,
                                              fusion=fusion)
    np.testing.assert_allclose(maps, want_maps, atol=1e-5)
    np.testing.assert_allclose(global_probs, want_probs, atol=1e-5)
