import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.method import guides
from pipeline.method.guides import GuideCodes


def planted(n_images=64, n_latents=32, d=40, grid=4, size=16, atom=20, seed=0):
    """Normal patches mix atoms 0-15; anomalous patches also carry atom ``atom``. Returns the
    dictionary and a read(chunk) over chunks of 16 images (tokens, cls, masks, labels).
    Atoms are orthonormal, so no other atom can stand in for the planted one."""
    g = np.random.default_rng(seed)
    dictionary = np.linalg.qr(g.standard_normal((d, n_latents)))[0].T  # (n_latents, d) orthonormal rows
    length = grid * grid
    coef = np.zeros((n_images, length, n_latents))
    for i in range(n_images):
        for p in range(length):
            coef[i, p, g.choice(16, 3, replace=False)] = g.uniform(0.5, 1.5, 3)
    patch_mask = np.zeros((n_images, grid, grid), np.uint8)
    labels = np.zeros(n_images, np.uint8)
    for i in range(n_images // 2, n_images):  # the second half are anomalous
        y, x = g.integers(0, grid - 1, 2)
        patch_mask[i, y : y + 2, x : x + 1] = 1
        labels[i] = 1
    coef[:, :, atom] += 2.0 * patch_mask.reshape(n_images, length)
    tokens = (coef @ dictionary).astype(np.float16)
    masks = patch_mask.repeat(size // grid, axis=1).repeat(size // grid, axis=2)
    cls = tokens.mean(axis=1) + labels[:, None] * dictionary[atom].astype(np.float16)
    data = {"tokens": tokens, "cls": cls, "masks": masks, "labels": labels}
    read = lambda c: {k: v[c * 16 : (c + 1) * 16] for k, v in data.items()}  # noqa: E731
    return torch.tensor(dictionary, dtype=torch.float32), read, n_images // 16, data


def test_planted_anomaly_atom_is_found():
    dictionary, read, n_chunks, data = planted()
    result = guides.fit(read, n_chunks, dictionary, None, (4, 4), lr=1e-2, epochs=30, ema_decay=0.9, seed=0)
    codes = result.codes
    assert int(codes[guides.ANOMALY_LOCAL].argmax()) == 20
    g = guides.guide_vectors(codes, dictionary)
    tokens = torch.tensor(data["tokens"], dtype=torch.float32)
    probs = guides.local_probabilities(tokens, g[guides.NORMAL_LOCAL], g[guides.ANOMALY_LOCAL], (4, 4), 16)
    auroc = roc_auc_score(data["masks"].ravel(), probs[:, 1].numpy().ravel())
    assert auroc > 0.95


def test_only_codes_are_trained_and_dictionary_is_untouched():
    dictionary, read, n_chunks, _ = planted(n_images=32)
    dictionary.requires_grad_(True)  # as the SAE's parameter would be, were it passed as it is
    before = dictionary.detach().clone()
    init = GuideCodes(32, generator=torch.Generator().manual_seed(0)).effective().detach()
    result = guides.fit(read, n_chunks, dictionary, None, (4, 4), epochs=2, ema_decay=0.0, seed=0)
    # the tensor passed in: bit-identical and never part of a backward pass
    assert torch.equal(dictionary.detach(), before) and dictionary.grad is None
    # the codes did train (decay 0: the saved codes are the last iterate)
    assert (result.codes - init).abs().max() > 1e-2
    # and the dictionary fit used stayed the one given (a trained copy would change these): the final
    # terms fit reports are those of its codes through the untouched dictionary
    again = guides.evaluate_terms(read, n_chunks, result.codes, before, (4, 4), temperature=0.07, gamma=2.0,
                                  l1_coef=1e-3)
    assert again.keys() == result.final_terms.keys()
    for key, value in again.items():
        assert result.final_terms[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_guide_loss_hand_worked():
    # d = 2, dictionary = identity, so each guide vector is its code row.
    dictionary = torch.eye(2)
    codes = torch.tensor([[0.0, 2.0],   # normal_global  -> direction (0, 1)
                          [3.0, 0.0],   # anomaly_global -> direction (1, 0)
                          [1.0, 0.0],   # normal_local   -> (1, 0)
                          [0.0, 1.0]])  # anomaly_local  -> (0, 1)
    # one image, grid 2x2 = output 2x2 (bilinear at scale 1 is the identity); patches in row-major order:
    # (1, 0) normal-like, (0, 1) anomaly-like, (1, 1) in between, (2, 0) normal-like
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]])
    masks = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.uint8)
    cls, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    # temperature 1/ln 3: a cosine gap of 1 gives softmax 3/4 vs 1/4
    total, terms = guides.guide_loss(codes, dictionary, tokens, cls, masks, labels, (2, 2),
                                     temperature=1 / np.log(3), gamma=2.0, l1_coef=0.5)
    # anomaly channel A = [1/4, 3/4; 1/2, 1/4], normal N = 1 - A, mask M = [0, 1; 1, 0]
    # focal: p_t = 3/4, 3/4, 1/2, 3/4 -> mean of -(1 - p_t)^2 ln p_t
    focal = (3 * (1 / 16) * np.log(4 / 3) + (1 / 4) * np.log(2)) / 4
    # dice(A, M): ΣA·M = 5/4, ΣA = 7/4, ΣM = 2 -> 1 - (5/2 + 1) / (7/4 + 2 + 1) = 5/19
    # dice(N, 1 - M): ΣN·(1-M) = 3/2, ΣN = 9/4, Σ(1-M) = 2 -> 1 - (3 + 1) / (9/4 + 2 + 1) = 5/21
    #   (dice(N, M) would be 11/21, dice(A, 1 - M) 11/19)
    # global: cls cosines to (normal (0, 1), anomaly (1, 0)) = logits (0, 1), label 1 -> ln(1 + e^-1)
    #   (the global rows swapped would give ln(1 + e))
    # l1: 0.5 * mean |c| = 0.5 * (2 + 3 + 1 + 1) / 8
    expected = {"focal": focal, "dice_anomaly": 5 / 19, "dice_normal": 5 / 21,
                "global_ce": np.log(1 + np.exp(-1.0)), "l1": 0.5 * 7 / 8}
    assert terms.keys() == expected.keys()
    for key, value in expected.items():
        assert terms[key] == pytest.approx(value, rel=1e-5), key
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-5)


def test_dead_latents_stay_zero_and_codes_nonnegative():
    dictionary, read, n_chunks, _ = planted(n_images=32)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 20, 31]] = True
    result = guides.fit(read, n_chunks, dictionary, dead, (4, 4), epochs=3, seed=0)
    assert (result.codes[:, dead] == 0).all() and (result.codes >= 0).all()
    assert (result.codes[:, ~dead] > 0).any()


def test_topk_keeps_at_most_guide_topk_and_passes_gradient_straight_through():
    model = GuideCodes(50, variant="topk", guide_topk=5, generator=torch.Generator().manual_seed(0))
    c = model.effective()
    assert ((c > 0).sum(dim=1) <= 5).all()
    c.sum().backward()
    # straight-through: every positive code gets the identity gradient, selected or not
    assert torch.equal(model.codes.grad, (model.codes > 0).float())
    dictionary, read, n_chunks, _ = planted(n_images=32)
    result = guides.fit(read, n_chunks, dictionary, None, (4, 4), variant="topk", guide_topk=4, epochs=2, seed=0)
    assert ((result.codes > 0).sum(dim=1) <= 4).all()


def test_init_distribution():
    model = GuideCodes(20000, generator=torch.Generator().manual_seed(0))
    assert model.codes.shape == (4, 20000)
    assert model.codes.mean().item() == pytest.approx(0.1, abs=1e-3)
    assert model.codes.std().item() == pytest.approx(0.01, rel=0.02)


def test_ema_matches_hand_computation():
    ema = torch.tensor([1.0, 2.0])
    for value in ([3.0, 2.0], [0.0, 4.0]):
        guides.ema_update_(ema, torch.tensor(value), 0.9)
    # step 1: 0.9*[1,2] + 0.1*[3,2] = [1.2, 2.0]; step 2: 0.9*[1.2,2] + 0.1*[0,4] = [1.08, 2.2]
    torch.testing.assert_close(ema, torch.tensor([1.08, 2.2]))


def test_fit_saves_the_ema_of_the_codes(monkeypatch):
    """With decay 0 the EMA is the last iterate; with decay close to 1 it stays at the init."""
    dictionary, read, n_chunks, _ = planted(n_images=32)
    init = GuideCodes(32, generator=torch.Generator().manual_seed(0)).effective().detach()
    frozen = guides.fit(read, n_chunks, dictionary, None, (4, 4), epochs=2, ema_decay=0.999999, seed=0)
    torch.testing.assert_close(frozen.codes, init, atol=1e-4, rtol=0)
    last = guides.fit(read, n_chunks, dictionary, None, (4, 4), epochs=2, ema_decay=0.0, seed=0)
    assert not torch.allclose(last.codes, init, atol=1e-3)


def test_focal_loss_hand_worked():
    probs = torch.tensor([[[[0.8]], [[0.2]]], [[[0.3]], [[0.7]]]])  # (B=2, 2, 1, 1): normal, anomaly
    mask = torch.tensor([[[0]], [[1]]])
    # p_t = 0.8 and 0.7: mean of -(0.2)^2 ln 0.8 and -(0.3)^2 ln 0.7
    expected = (-(0.2**2) * np.log(0.8) - (0.3**2) * np.log(0.7)) / 2
    assert guides.focal_loss(probs, mask, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert guides.focal_loss(probs, mask, 0.0).item() == pytest.approx(-(np.log(0.8) + np.log(0.7)) / 2, rel=1e-6)


def test_dice_loss_hand_worked():
    pred = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # intersection 1.5, sums 1.5 + 2, smooth 1: 1 - (3 + 1) / (3.5 + 1)
    assert guides.dice_loss(pred, target).item() == pytest.approx(1 - 4 / 4.5)
    assert guides.dice_loss(target, target, smooth=0).item() == pytest.approx(0.0)


def test_global_ce_hand_worked():
    logits = torch.tensor([[0.5, -0.5]])
    expected = -np.log(np.exp(-0.5) / (np.exp(0.5) + np.exp(-0.5)))
    assert guides.global_ce(logits, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-6)


def test_l1_penalty_and_local_probabilities_hand_worked():
    assert guides.l1_penalty(torch.tensor([[1.0, -3.0], [0.0, 2.0]])).item() == pytest.approx(1.5)
    normal, anomaly = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, 0.0]]])  # grid 2x2
    probs = guides.local_probabilities(tokens, normal, anomaly, (2, 2), 2, temperature=0.5)
    # patch (0,1): cosines (0, 1) -> anomaly prob = 1 / (1 + e^-2); patch (1,0): equal cosines -> 0.5
    assert probs[0, 1, 0, 1].item() == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-6)
    assert probs[0, 1, 1, 0].item() == pytest.approx(0.5)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 2, 2))


def test_save_load_round_trip(tmp_path):
    codes = torch.rand(3, 4, 10)
    guides.save(tmp_path / "g", codes, {"training": {"seeds": [0, 1, 2]}})
    loaded, config = guides.load(tmp_path / "g")
    assert torch.equal(loaded, codes) and config["rows"] == list(guides.ROWS)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "g" / "guides.safetensors"))["codes"], codes[0])


def test_save_refuses_non_finite_codes_and_keeps_the_old_checkpoint(tmp_path):
    from pipeline.errors import NonFiniteError

    good = torch.rand(2, 4, 10)
    guides.save(tmp_path / "g", good, {"training": {"seeds": [0, 1]}})
    before = {p.name: p.read_bytes() for p in (tmp_path / "g").iterdir()}
    bad = good.clone()
    bad[1, guides.ANOMALY_LOCAL, 7] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to save.*'anomaly_local' \(row 3\), latent 7"):
        guides.save(tmp_path / "g", bad, {"training": {"seeds": [0, 1]}})
    assert {p.name: p.read_bytes() for p in (tmp_path / "g").iterdir()} == before


def test_load_refuses_a_checkpoint_with_non_finite_codes(tmp_path):
    import json

    from safetensors.torch import save_file

    from pipeline.errors import NonFiniteError

    codes = torch.rand(1, 4, 10)
    codes[0, guides.NORMAL_GLOBAL, 2] = float("inf")
    (tmp_path / "g").mkdir()
    save_file({"codes": codes[0].clone(), "codes_per_seed": codes}, str(tmp_path / "g" / "guides.safetensors"))
    (tmp_path / "g" / "config.json").write_text(json.dumps({"training": {"seeds": [0]}}))
    with pytest.raises(NonFiniteError, match=r"guides\.safetensors.*'normal_global' \(row 0\), latent 2"):
        guides.load(tmp_path / "g")


# ----------------------------------------------------------------------------------------------------
# Devices. ``meta`` stands in for a second device on CPU-only machines: see tests/devices.py.


def test_guide_codes_keep_codes_and_dead_mask_on_one_device():
    """An SAE loaded onto a GPU gives a GPU dead mask: GuideCodes kept its codes on the CPU and only
    the alive buffer on the mask's device, so effective() combined two devices. Both now live on the
    mask's device, with the same initial codes as a CPU build (drawn on the CPU, then moved)."""
    from tests.devices import assert_on

    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7]] = True
    on_meta = GuideCodes(32, dead.to("meta"), generator=torch.Generator().manual_seed(0))
    assert_on(on_meta, "meta")
    assert_on(on_meta.effective(), "meta")
    on_cpu = GuideCodes(32, dead, generator=torch.Generator().manual_seed(0))
    assert_on(on_cpu, "cpu")
    plain = GuideCodes(32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(on_cpu.codes, plain.codes)
    expected = torch.relu(plain.codes.detach()).clone()
    expected[:, [3, 7]] = 0
    assert torch.equal(on_cpu.effective().detach(), expected)
