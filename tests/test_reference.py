"""The reference bank (pipeline.method.reference) against slow loops written out here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.method.reference import Reference, ReferenceError


def nearest_by_loop(query: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """(n, d) x (m, d) -> (n,): 1 - cos to the nearest bank row, one pair at a time in float64."""
    out = np.empty(len(query))
    for i, q in enumerate(query.astype(np.float64)):
        out[i] = min(1 - q @ b / (np.linalg.norm(q) * np.linalg.norm(b)) for b in bank.astype(np.float64))
    return out


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 6, 5, generator=g) + 2.0).to(torch.float16).float()  # k 4 images, L 6, d 5


def test_distances_and_leave_one_out_equal_the_loop(tokens):
    ref = Reference.build(tokens)
    assert len(ref.bank) == 24 and ref.info["subsampling"] == "none"
    query = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(1))
    got = ref.distances(query).numpy()
    flat = tokens.reshape(-1, 5).numpy()
    np.testing.assert_allclose(got.ravel(), nearest_by_loop(query.reshape(-1, 5).numpy(), flat), atol=1e-5)
    loo = ref.leave_one_out().numpy()
    for i in range(4):
        others = np.concatenate([tokens[j].numpy() for j in range(4) if j != i])
        np.testing.assert_allclose(loo[i], nearest_by_loop(tokens[i].numpy(), others), atol=1e-5)
    # against the whole bank an image's own patches are at distance 0; left out, they are not
    assert np.abs(ref.distances(tokens[:1]).numpy()).max() < 1e-5 and loo[0].min() > 1e-4


def test_a_coreset_bank_is_bounded_and_leave_one_out_skips_only_the_images_own_patches(tokens):
    ref = Reference.build(tokens, max_patches=7)
    assert len(ref.bank) == 7 and len(set(ref.bank.tolist())) == 7 and "coreset" in ref.info["subsampling"]
    flat = tokens.reshape(-1, 5).numpy()
    query = tokens[2:3] + 0.1
    np.testing.assert_allclose(ref.distances(query).numpy().ravel(),
                               nearest_by_loop(query.reshape(-1, 5).numpy(), flat[ref.bank]), atol=1e-5)
    loo = ref.leave_one_out().numpy()
    keep = ref.bank[ref.bank // 6 != 1]
    np.testing.assert_allclose(loo[1], nearest_by_loop(tokens[1].numpy(), flat[keep]), atol=1e-5)


def test_bad_references_are_refused(tokens):
    with pytest.raises(ReferenceError, match="at least 2"):
        Reference.build(tokens[:1]).leave_one_out()
    with pytest.raises(ReferenceError, match="max-patches"):
        Reference.build(tokens, max_patches=0)
    with pytest.raises(ReferenceError, match="width"):
        Reference.build(tokens).distances(torch.zeros(1, 6, 4))


def test_save_and_load_round_trip_and_refuse_another_detector_or_swapped_tensors(tokens, tmp_path):
    ref = Reference.build(tokens, max_patches=10, sources=["a.png", "b.png", "c.png", "d.png"])
    ref.save(tmp_path, "1" * 64, {"backbone": "x"})
    back = Reference.load(tmp_path, detector_sha256="1" * 64)
    assert torch.equal(back.tokens, tokens) and np.array_equal(back.bank, ref.bank)
    assert back.info["sources"] == ["a.png", "b.png", "c.png", "d.png"] and back.info["n_patches"] == 10
    assert Reference.load(tmp_path / "none", detector_sha256="1" * 64) is None
    with pytest.raises(ReferenceError, match="another detector"):
        Reference.load(tmp_path, detector_sha256="2" * 64)
    Reference.build(tokens + 1).save(tmp_path / "other", "1" * 64, {})
    (tmp_path / "reference.safetensors").write_bytes((tmp_path / "other" / "reference.safetensors").read_bytes())
    with pytest.raises(ReferenceError, match="not the file"):
        Reference.load(tmp_path, detector_sha256="1" * 64)
    info = json.loads((tmp_path / "reference.json").read_text())
    (tmp_path / "reference.json").write_text(json.dumps({**info, "format": "x"}))
    with pytest.raises(ReferenceError, match="format"):
        Reference.load(tmp_path, detector_sha256="1" * 64)
