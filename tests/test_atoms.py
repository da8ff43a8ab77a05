"""The atoms behind a score (pipeline/method/atoms.py, pipeline/evaluation/atom_report.py, predict --explain).

- The decomposition: each atom's share sums back to the local anomaly logit, checked against the
  probability the scoring code computes (sigmoid of the logit), and the score direction's weights and
  concentration against values worked by hand.
- The category rule on hand-made firing counts.
- A planted auxiliary set: one atom is a defect direction present only in one category's anomalous
  patches, another one present in every category's; the report ranks the first first and calls it
  specific, the second general, and its gallery holds only the planted patches.
- predict --explain on the real detector path (random DINOv2 at 28 px) with an atom planted on one
  image's token: the explanation of that image names the atom first and sums back to its logit.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import predict as P
from pipeline.data.images import load_image
from pipeline.evaluation import atom_report
from pipeline.features import store
from pipeline.method import atoms as A
from pipeline.method import detector, guides, sae
from pipeline.files import sha256_file
from pipeline.stages import atoms as atoms_stage
from pipeline.stages import export as export_stage
from tests.test_detector import setup, write_params  # noqa: F401  (setup is the module fixture)


def test_shares_sum_to_the_logit_of_the_scoring_probability():
    g = torch.Generator().manual_seed(0)
    n_latents, d = 40, 12
    dictionary = F.normalize(torch.randn(n_latents, d, generator=g), dim=-1)
    codes = torch.rand(4, n_latents, generator=g) * (torch.rand(4, n_latents, generator=g) < 0.4)
    tokens = torch.randn(9, d, generator=g) * 3
    tau = 0.07
    shares = A.contributions(tokens, A.direction_weights(codes, dictionary), dictionary, tau)
    vectors = guides.guide_vectors(codes, dictionary)
    p = guides.patch_probabilities(tokens[None].double(), vectors[guides.NORMAL_LOCAL].double(),
                                   vectors[guides.ANOMALY_LOCAL].double(), tau)[0, :, 1]
    logit = torch.log(p / (1 - p))
    assert shares.shape == (9, n_latents)
    assert torch.allclose(shares.sum(dim=1), logit, atol=1e-5, rtol=0)
    assert torch.allclose(A.logits(tokens, codes, dictionary, tau), logit, atol=1e-5, rtol=0)


def test_direction_weights_and_concentration_by_hand():
    dictionary = torch.eye(3)
    codes = torch.zeros(4, 3)
    codes[guides.ANOMALY_LOCAL] = torch.tensor([3.0, 4.0, 0.0])  # |g_a| = 5
    codes[guides.NORMAL_LOCAL] = torch.tensor([0.0, 0.0, 2.0])  # |g_n| = 2
    w = A.direction_weights(codes, dictionary)
    assert torch.allclose(w, torch.tensor([0.6, 0.8, -1.0], dtype=torch.float64))
    c = A.concentration(w, tops=(1, 2, 3))
    assert c == pytest.approx({"top_1": 1.0 / 2.4, "top_2": 1.8 / 2.4, "top_3": 1.0})
    assert A.top_atoms(w, 2) == [2, 1]
    assert A.active_atoms(codes) == {"normal_global": 0, "anomaly_global": 0, "normal_local": 1, "anomaly_local": 2}


def test_kind_rule_on_counts():
    assert A.kind_of({"a": 9, "b": 1, "c": 0})["kind"] == "specific"
    spread = A.kind_of({"a": 5, "b": 5, "c": 5})
    assert spread["kind"] == "general" and spread["normalised_entropy"] == pytest.approx(1.0)
    two = A.kind_of({"a": 1, "b": 1, "c": 0})  # entropy log 2 / log 3 = 0.63: neither
    assert two["kind"] == "mixed" and two["normalised_entropy"] == pytest.approx(math.log(2) / math.log(3))
    assert A.kind_of({"a": 0, "b": 0})["kind"] == "silent"


GRID, SIZE, DIM, N_LATENTS = (4, 4), 16, 24, 30
SPECIFIC, GENERAL = 0, 1


def planted_store(tmp_path):
    """Three categories of 6 images (3 normal, 3 anomalous with a 2 x 2-patch defect). Tokens are noise;
    a defect patch adds 4·v (atom GENERAL) in every category and 5·u (atom SPECIFIC) in category c0."""
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(1)
    dictionary = F.normalize(torch.randn(N_LATENTS, DIM, generator=g), dim=-1)
    u, v = dictionary[SPECIFIC].numpy(), dictionary[GENERAL].numpy()
    n = 18
    tokens = (0.3 * rng.standard_normal((n, 16, DIM))).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    labels = np.zeros(n, np.uint8)
    category = np.repeat(np.arange(3), 6).astype(np.int16)
    planted = []
    for i in range(n):
        if i % 6 >= 3:
            labels[i] = 1
            r, c = rng.integers(0, 3, 2)
            masks[i, 4 * r:4 * r + 8, 4 * c:4 * c + 8] = 1
            for pr in (r, r + 1):
                for pc in (c, c + 1):
                    p = pr * 4 + pc
                    tokens[i, p] += 4 * v + (5 * u if category[i] == 0 else 0)
                    if category[i] == 0:
                        planted.append((i, int(p)))
    layout = store.StoreLayout(n_images=n, n_tokens=16, dim=DIM, mask_size=SIZE, chunk_images=6)
    attrs = {"backbone": "b", "weights_sha256": "w", "layer": 1, "image_size": SIZE, "grid": list(GRID),
             "categories": ["c0", "c1", "c2"], "dataset": "planted", "paths": [f"{i}.png" for i in range(n)]}
    aux = store.write(tmp_path / "aux", layout, attrs,
                      lambda a, b: {"tokens": tokens[a:b].astype(np.float16), "masks": masks[a:b],
                                    "labels": labels[a:b], "category": category[a:b],
                                    "images": np.full((b - a, SIZE, SIZE, 3), 128, np.uint8)})
    model = sae.TopKSAE(DIM, N_LATENTS, 2)
    with torch.no_grad():
        model.dictionary.copy_(dictionary)
        model.encoder.copy_(dictionary)
    codes = torch.zeros(2, 4, N_LATENTS)
    codes[:, guides.ANOMALY_LOCAL, SPECIFIC] = 2.0
    codes[:, guides.ANOMALY_LOCAL, GENERAL] = 1.0
    codes[:, guides.NORMAL_LOCAL, 5:] = torch.rand(2, N_LATENTS - 5, generator=g) * 0.2
    return aux, model, codes, set(planted)


def test_the_report_ranks_the_planted_atom_first_and_tells_its_kind(tmp_path):
    aux, model, codes, planted = planted_store(tmp_path)
    result = atom_report.write(tmp_path / "atoms", tmp_path / "atoms.json", aux, model, codes, [0, 1], n_top=4,
                               gallery=6)
    top = result["top_atoms"]
    assert [t["atom"] for t in top[:2]] == [SPECIFIC, GENERAL]
    assert top[0]["kind"] == "specific" and top[0]["category_shares"]["c0"] >= A.SPECIFIC_SHARE
    assert top[1]["kind"] == "general"
    assert top[0]["fires"]["c0"]["anomalous_rate"] == 1.0 and top[0]["fires"]["c1"]["anomalous"] <= 1
    stats = atom_report.atom_statistics(aux, model, [SPECIFIC], gallery=6)
    assert {(image, patch) for _, image, patch in stats[SPECIFIC]["gallery"]} <= planted
    # the summary on disk is what was returned, and each reported atom has its gallery
    assert json.loads((tmp_path / "atoms.json").read_text())["top_atoms"][0]["atom"] == SPECIFIC
    assert sorted(p.name for p in (tmp_path / "atoms").iterdir()) == sorted(f"atom_{t['atom']}.png" for t in top)
    weights = A.direction_weights(codes[0], model.dictionary.detach())
    assert result["concentration"]["per_seed"][0] == pytest.approx(A.concentration(weights))


def test_detector_atoms_round_trip_and_refuse_another_detectors(tmp_path):
    g = torch.Generator().manual_seed(0)
    dictionary = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    codes = torch.rand(2, 4, 20, generator=g) * (torch.rand(2, 4, 20, generator=g) < 0.3)
    atoms = A.DetectorAtoms.from_codes(codes, dictionary)
    assert set(atoms.index.tolist()) == set(torch.nonzero(codes.sum(dim=(0, 1))).ravel().tolist())
    vectors = torch.stack([guides.guide_vectors(c, dictionary) for c in codes])
    atoms.save(tmp_path)
    loaded = A.DetectorAtoms.load(tmp_path, vectors)
    assert torch.equal(loaded.index, atoms.index) and torch.allclose(loaded.vectors(), vectors, atol=1e-6)
    with pytest.raises(A.AtomsError, match="not the atoms of this detector"):
        A.DetectorAtoms.load(tmp_path, vectors * 1.5)
    assert A.DetectorAtoms.load(tmp_path / "none", vectors) is None


def test_explain_image_checks_its_shapes():
    atoms = A.DetectorAtoms(torch.arange(3), torch.eye(3), torch.rand(1, 4, 3))
    with pytest.raises(ValueError, match="expected"):
        A.explain_image(atoms, torch.rand(5, 3), torch.rand(5), (2, 2), 0.07)


PLANT, IMAGE, PATCH = 7, 3, 2  # atom 7: image 3's patch-2 token (the first anomalous image of alpha; a 2 x 2 grid)


def planted_detector(tmp, weights, dictionary):
    """SAE and guides whose anomaly-local guide is one atom, planted as the centred token of IMAGE's
    PATCH in the target store; the normal-local guide is spread thinly over 40 other atoms."""
    target = store.open_store(tmp / "target")
    aux = store.open_store(tmp / "aux")
    tokens = target.tokens[:].astype(np.float32)
    planted = torch.from_numpy(tokens[IMAGE, PATCH] - tokens.reshape(-1, tokens.shape[-1]).mean(axis=0))
    dictionary = dictionary.clone()
    dictionary[PLANT] = F.normalize(planted, dim=0)
    n_latents, d = dictionary.shape
    model = sae.TopKSAE(d, n_latents, 8)
    with torch.no_grad():
        model.dictionary.copy_(dictionary)
        model.encoder.copy_(dictionary)
    provenance = {k: aux.attrs[k] for k in ("backbone", "weights_sha256", "layer", "image_size", "dataset")}
    sae.save(model, tmp / "sae_planted", torch.zeros(n_latents, dtype=torch.bool), extra={"features": provenance})
    g = torch.Generator().manual_seed(3)
    codes = torch.zeros(4, n_latents)
    codes[:, PLANT + 1: PLANT + 41] = torch.rand(4, 40, generator=g) * 0.05
    codes[guides.ANOMALY_LOCAL] = 0.0
    codes[guides.ANOMALY_LOCAL, PLANT] = 1.0
    codes = torch.stack([codes, codes])  # two identical seeds: the mean map is each seed's map
    training = {"variant": "l1", "guide_topk": 32, "init_mean": 0.1, "init_std": 0.01, "temperature": 0.07,
                "seeds": [0, 1]}
    guides.save(tmp / "guides_planted", codes, {"training": training, "features": provenance,
                                                "sae_sha256": sha256_file(tmp / "sae_planted" / "sae.safetensors"),
                                                "aux_store": guides.store_fingerprint(aux.attrs)})
    out = tmp / "planted" / "detector"
    export_stage.main(["--features", str(tmp / "aux"), "--sae", str(tmp / "sae_planted"), "--guides",
                       str(tmp / "guides_planted"), "--weights", str(weights), "--out", str(out),
                       "--params", str(write_params(tmp, "max"))])
    return out, target


def test_predict_explain_names_the_planted_atom(setup):  # noqa: F811
    tmp, weights, _, dictionary = setup
    folder, target = planted_detector(tmp, weights, dictionary)
    det = detector.Detector.load(folder)
    assert det.atoms is not None and PLANT in det.atoms.index.tolist()
    files = [tmp / "target_tree" / p for p in target.attrs["paths"][:7]]
    out = tmp / "explained"
    summary = P.predict_files(files, det, out, P.Options(explain=True, threshold=-1.0, batch_size=3))
    assert summary["n_anomalous"] == 7  # every image flagged, so every one explained
    parts = P.relative_names(files)[IMAGE]
    explained = json.loads(P.output_path(out / "explanations", parts, ".json").read_text())
    assert explained["image"] == str(files[IMAGE])
    assert explained["atoms"][0]["atom"] == PLANT and explained["atoms"][0]["share"] > 0
    peak = explained["peak"]
    assert peak["sum_of_shares"] == pytest.approx(peak["logit"], abs=1e-5)
    # the logit is the one of the probability the scoring code gives at that patch (in float64: the
    # planted patch's probability is within 1e-5 of 1)
    tokens, _ = det.features([load_image(files[IMAGE], 10**7)])
    vectors = det.vectors[0].double()
    prob = guides.patch_probabilities(tokens.double(), vectors[guides.NORMAL_LOCAL], vectors[guides.ANOMALY_LOCAL],
                                      det.settings.temperature)[0, peak["patch"]]
    assert peak["logit"] == pytest.approx(math.log(prob[1] / prob[0]), abs=1e-5)
    assert peak["guide_signal"] == pytest.approx(float(prob[1]), abs=1e-6)
    assert P.output_path(out / "explanations", parts, ".png").stat().st_size > 0
    assert len(list((out / "explanations").rglob("*.json"))) == 7


def test_predict_explain_refuses_a_detector_without_atoms(setup, tmp_path):  # noqa: F811
    tmp, weights, _, dictionary = setup
    folder, target = planted_detector(tmp, weights, dictionary)
    det = detector.Detector.load(folder)
    det.atoms = None
    with pytest.raises(P.PredictError, match="no atoms"):
        P.predict_files([tmp / "target_tree" / target.attrs["paths"][0]], det, tmp_path / "out",
                        P.Options(explain=True))
    assert not (tmp_path / "out").exists()


def test_the_atoms_stage_reports_the_atoms_of_largest_weight(setup, tmp_path):  # noqa: F811
    tmp, _, codes, dictionary = setup
    atoms_stage.main(["--features", str(tmp / "aux"), "--sae", str(tmp / "sae"), "--guides", str(tmp / "guides"),
                      "--out", str(tmp_path / "atoms"), "--summary", str(tmp_path / "atoms.json"), "--top", "3",
                      "--gallery", "2"])
    result = json.loads((tmp_path / "atoms.json").read_text())
    # the weights by the formula, written out atom by atom
    d = dictionary.double()
    mean_w = torch.zeros(len(d), dtype=torch.float64)
    for c in codes.double():
        a, n = c[guides.ANOMALY_LOCAL], c[guides.NORMAL_LOCAL]
        norm_a, norm_n = (a @ d).norm(), (n @ d).norm()
        for j in range(len(d)):
            mean_w[j] += (a[j] / norm_a - n[j] / norm_n) / len(codes)
    want = sorted(range(len(d)), key=lambda j: -abs(float(mean_w[j])))[:3]
    assert [t["atom"] for t in result["top_atoms"]] == want
    assert result["seeds"] == [int(s) for s in json.loads((tmp / "guides" / "config.json").read_text())["training"]["seeds"]]
