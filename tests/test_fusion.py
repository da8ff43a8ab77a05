"""The batch signal cached per target and fused with the guides: a hand-worked rule, slow references
for the cached scores and the fused maps, and the stage's equality with and without the cache."""

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline.evaluation import evaluate as evaluation
from pipeline.evaluation import metrics, target_scores
from pipeline.features import store
from pipeline.method import detector, fusion
from pipeline.method import guides as G
from pipeline.stages import neighbours as neighbours_stage
from tests.test_evaluate import GRID, SIZE, run, setup  # noqa: F401  (setup: a fixture)


def test_standardised_mean_by_hand_and_its_invariance_to_each_signals_scale():
    a = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3, population std sqrt(3.5)
    b = torch.tensor([[4.0, 4.0, 0.0, 0.0]])  # mean 2, std 2: z = 1, 1, -1, -1
    za = (np.array([1.0, 2.0, 3.0, 6.0]) - 3) / np.sqrt(3.5)
    np.testing.assert_allclose(fusion.standardised_mean(a, b).numpy()[0], (za + [1, 1, -1, -1]) / 2, atol=1e-6)
    # a constant signal adds nothing; an affine change of any signal changes nothing
    np.testing.assert_allclose(fusion.standardised_mean(a, torch.full_like(a, 5.0)).numpy()[0], za / 2, atol=1e-6)
    np.testing.assert_allclose(fusion.standardised_mean(100 * a + 7, b).numpy(), fusion.standardised_mean(a, b).numpy(),
                               atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        fusion.standardised_mean(a, b[:, :3])


def test_the_decision_leaves_the_guide_out_and_keeps_the_sets_statistics():
    p = torch.tensor([[0.5, 0.9, 0.1, 0.99]])
    d1 = torch.tensor([[0.1, 0.2, 0.3, 0.6]])  # mean 0.3, std sqrt(0.035)
    d2 = torch.tensor([[4.0, 4.0, 0.0, 0.0]])  # mean 2, std 2
    z1 = (np.array([0.1, 0.2, 0.3, 0.6]) - 0.3) / np.sqrt(0.035)
    np.testing.assert_allclose(fusion.decision(p, d1, d2).numpy()[0], (z1 + [1, 1, -1, -1]) / 2, atol=1e-5)
    # another guide changes the map, never the decision
    assert not torch.allclose(fusion.fuse(p, d1, d2), fusion.fuse(1 - p, d1, d2))
    np.testing.assert_array_equal(fusion.decision(1 - p, d1, d2).numpy(), fusion.decision(p, d1, d2).numpy())
    # statistics of another set: the distances' entries are used, the guide's skipped (as fuse takes them)
    stats = [(123.0, 45.0), (0.0, 0.5), (1.0, 4.0)]
    np.testing.assert_allclose(fusion.decision(p, d1, d2, stats=stats).numpy()[0],
                               (d1.numpy()[0] / 0.5 + (d2.numpy()[0] - 1) / 4) / 2, atol=1e-6)
    np.testing.assert_allclose(fusion.decision(None, d1, stats=[(0.0, 0.5)]).numpy()[0], d1.numpy()[0] / 0.5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="2 statistics for 3 signals"):
        fusion.decision(p, d1, d2, stats=stats[1:])
    with pytest.raises(ValueError, match="at least one distance"):
        fusion.decision(p)


def test_fuse_takes_the_guide_probability_as_its_logit():
    p = torch.tensor([[0.5, 0.9, 0.1, 0.99]])
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    logit = np.log(p.numpy() / (1 - p.numpy()))  # 0, 2.197, -2.197, 4.595
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    np.testing.assert_allclose(fusion.fuse(p, d).numpy(), (z(logit) + z(d.numpy())) / 2, atol=1e-5)
    np.testing.assert_allclose(fusion.fuse(p, d, probability=False).numpy(), (z(p.numpy()) + z(d.numpy())) / 2,
                               atol=1e-5)


@pytest.fixture(scope="module")
def cached(setup):  # noqa: F811
    neighbours_stage.main(["--target", str(setup / "target"), "--out", str(setup / "neighbours"),
                           "--params", str(setup / "params.yaml")])
    return setup / "neighbours"


def test_cached_mutual_scores_equal_the_definition_per_category(setup, cached):  # noqa: F811
    target = store.open_store(setup / "target")
    arrays, info = target_scores.load(cached, target)
    assert info["precision"] == "float32" and info["one_image_categories"] == []
    category = target.category[:]
    for ci in range(len(target.attrs["categories"])):
        rows = np.flatnonzero(category == ci)
        tokens = target.tokens[rows].astype(np.float64)
        unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        n, length = len(rows), tokens.shape[1]
        k = max(1, int(0.3 * (n - 1) + 1e-9))
        want = np.array([[np.mean(sorted(min(1 - unit[i, p] @ unit[j, q] for q in range(length))
                                         for j in range(n) if j != i)[:k]) for p in range(length)] for i in range(n)])
        np.testing.assert_allclose(arrays["mutual"][rows], want, atol=1e-5)


def test_scores_of_another_store_are_refused(setup, cached, tmp_path):  # noqa: F811
    from tests.test_evaluate import copy_store
    other = copy_store(setup / "target", tmp_path / "other", attrs={"inputs_sha256": "another"})
    with pytest.raises(target_scores.TargetScoresError, match="another store"):
        target_scores.load(cached, store.open_store(other))
    with pytest.raises(target_scores.TargetScoresError, match="neighbours stage"):
        target_scores.load(tmp_path / "none", store.open_store(other))


def slow_fused_maps(setup, rows, decision=False):  # noqa: F811
    """guides+batch maps of one category: each seed's patch probability softmax(cos / τ) from plain numpy,
    their mean, its logit and the slow mutual scores each standardised over the category's patches and
    averaged, bilinear upsampling and the per-image blur. ``decision``: the maps the image scores come
    from instead, the standardised mutual scores alone."""
    target = store.open_store(setup / "target")
    det = detector.Detector.load(setup / "detector", with_backbone=False)
    tokens = target.tokens[rows].astype(np.float64)
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    probs = []
    for v in det.vectors.numpy().astype(np.float64):
        g = v / np.linalg.norm(v, axis=-1, keepdims=True)
        cos_n, cos_a = unit @ g[G.NORMAL_LOCAL], unit @ g[G.ANOMALY_LOCAL]
        probs.append(1 / (1 + np.exp((cos_n - cos_a) / det.settings.temperature)))
    guide = np.mean(probs, axis=0)
    logit = np.log(guide / (1 - guide))
    n, length, _ = tokens.shape
    k = max(1, int(0.3 * (n - 1) + 1e-9))
    batch = np.array([[np.mean(sorted(min(1 - unit[i, p] @ unit[j, q] for q in range(length))
                                      for j in range(n) if j != i)[:k]) for p in range(length)] for i in range(n)])
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731  over the category's patches
    fused = z(batch) if decision else (z(logit) + z(batch)) / 2
    up = torch.nn.functional.interpolate(torch.tensor(fused, dtype=torch.float32).reshape(n, 1, GRID, GRID),
                                         size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.stack([gaussian_filter(m, sigma=det.settings.blur_sigma, mode="reflect") for m in up])


def test_fused_maps_equal_a_slow_reference(setup, cached):  # noqa: F811
    target = store.open_store(setup / "target")
    rows = np.flatnonzero(target.category[:] == target.attrs["categories"].index("t1"))
    det = detector.Detector.load(setup / "detector", with_backbone=False)
    vectors = {**evaluation.learned_sets(det.vectors, det.seeds),
               "no_sae/0": evaluation.no_sae_guides(store.open_store(setup / "aux"), torch.device("cpu"))}
    got = {}
    sink = lambda i, maps: [got.setdefault(name, []).append(m) for name, m in maps.items()]  # noqa: E731
    mutual = target_scores.load(cached, target)[0]["mutual"][rows]
    evaluation.fused_rows(target, int(rows[0]), int(rows[-1]) + 1, vectors, det.settings, 5, torch.device("cpu"),
                          mutual, sink=sink)
    np.testing.assert_allclose(np.concatenate(got["guides+batch"]), slow_fused_maps(setup, rows), atol=1e-5)
    assert np.abs(np.concatenate(got["no_sae+batch"]) - np.concatenate(got["guides+batch"])).max() > 1e-3


def test_guides_plus_batch_metrics_and_the_cache_changes_nothing(setup, cached):  # noqa: F811
    result, per_category = run(setup, out="report_fused")
    target = store.open_store(setup / "target")
    rows = np.flatnonzero(target.category[:] == target.attrs["categories"].index("t1"))
    maps, decided = slow_fused_maps(setup, rows), slow_fused_maps(setup, rows, decision=True)
    labels, masks = target.labels[rows].astype(int), target.masks[rows]
    # pixels from the fused map, the image score from the batch distances alone
    ref = metrics.compute_all(labels, decided.reshape(len(rows), -1).max(1), masks, maps)
    got = per_category["t1"]["fused"]["guides+batch"]
    for key in metrics.METRIC_KEYS:
        assert got[key] == pytest.approx(ref[key], abs=2e-4), key
    assert got["image_by_score"]["global"]["image_auroc"] is None
    assert result["fused"]["guides+batch"]["setting"].startswith("the detector's guide map")
    assert set(result["fused"]) == {"guides+batch", "no_sae+batch"}
    # the control is fused the same way, from its own guide map: a different scoring
    assert per_category["t1"]["fused"]["no_sae+batch"]["pixel_auroc"] != got["pixel_auroc"]
    # with the batch scores read from the neighbours stage, every number is the same
    from pipeline.stages import evaluate as evaluate_stage
    evaluate_stage.main(["--target", str(setup / "target"), "--aux", str(setup / "aux"), "--sae", str(setup / "sae"),
                         "--guides", str(setup / "guides"), "--detector", str(setup / "detector"),
                         "--neighbours", str(cached), "--out", str(setup / "report_cached"),
                         "--params", str(setup / "params.yaml")])
    cached_result = json.loads((setup / "report_cached" / "metrics.json").read_text())
    assert result.pop("few_shot") == {}  # the few-shot protocol needs the neighbours stage's draws
    few_shot = cached_result.pop("few_shot")
    assert cached_result == result
    assert set(few_shot) == {"k=1", "k=4", "k=16"}
    assert few_shot["k=16"]["k_used"] == {"t1": 6, "t2": 3}  # half of 12 and of 6 good images


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_few_shot_reference_scores_and_metrics_equal_a_slow_reference(setup, cached):  # noqa: F811
    target = store.open_store(setup / "target")
    arrays, info = target_scores.load(cached, target)
    rows = np.flatnonzero(target.category[:] == target.attrs["categories"].index("t1"))
    tokens = unit_rows(target.tokens[:].astype(np.float64))
    labels = target.labels[:]
    assert info["reference"]["pool"] == {"t1": "test/good", "t2": "test/good"}  # no train/good store given
    for k in (1, 4):
        for d, drawn in enumerate(info["reference"]["images"][str(k)]["t1"]):
            refs = [target.attrs["paths"].index(p) for p in drawn]
            assert len(refs) == k and all(labels[r] == 0 for r in refs)  # k good images of t1
            bank = tokens[refs].reshape(-1, tokens.shape[-1])
            got = arrays[f"reference/{k}"][d]
            for i in rows:
                if i in refs:
                    assert np.isnan(got[i]).all()  # a reference is never scored
                else:
                    np.testing.assert_allclose(got[i], (1 - tokens[i] @ bank.T).min(axis=1), atol=1e-5)
    # the draws differ by seed, and the same seed draws the same images on every run
    draws = info["reference"]["images"]["4"]["t1"]
    assert len(draws) == 3 and len({tuple(r) for r in draws}) > 1
    assert target_scores.compute_reference(target, [4], [0, 1, 2])[1]["images"]["4"]["t1"] == draws

    from pipeline.stages import evaluate as evaluate_stage
    out = setup / "report_few_shot"
    evaluate_stage.main(["--target", str(setup / "target"), "--aux", str(setup / "aux"), "--sae", str(setup / "sae"),
                         "--guides", str(setup / "guides"), "--detector", str(setup / "detector"),
                         "--neighbours", str(cached), "--out", str(out), "--params", str(setup / "params.yaml")])
    per_category = json.loads((out / "per_category.json").read_text())
    result = json.loads((out / "metrics.json").read_text())
    # reference alone for k = 4: each draw's maps from the slow scores, metrics on the images left
    want = []
    for d, drawn in enumerate(info["reference"]["images"]["4"]["t1"]):
        refs = [target.attrs["paths"].index(p) for p in drawn]
        keep = np.array([i for i in rows if i not in refs])
        bank = tokens[refs].reshape(-1, tokens.shape[-1])
        patch = np.stack([(1 - tokens[i] @ bank.T).min(axis=1) for i in keep])
        up = torch.nn.functional.interpolate(torch.tensor(patch, dtype=torch.float32).reshape(len(keep), 1, GRID, GRID),
                                             size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()
        maps = np.stack([gaussian_filter(m, sigma=1.0, mode="reflect") for m in up])
        want.append(metrics.compute_all(labels[keep].astype(int), maps.reshape(len(keep), -1).max(1),
                                        target.masks[keep], maps))
    got = per_category["t1"]["few_shot"]["k=4"]["reference"]
    for key in metrics.METRIC_KEYS:
        values = [w[key] for w in want]
        assert got[key] == pytest.approx(np.mean(values), abs=2e-4), key
        assert got[f"{key}_std"] == pytest.approx(np.std(values, ddof=1), abs=2e-4), key
    # t2 has no anomalous image: the mean over categories of the image metrics is t1's, per draw
    assert result["few_shot"]["k=4"]["reference"]["image_auroc"] == pytest.approx(got["image_auroc"])
    assert set(result["few_shot"]["k=4"]) >= {"reference", "guides+reference", "guides+reference+batch",
                                              "no_sae+reference", "k_used", "draws"}


def test_a_capped_reference_bank_scores_against_the_coreset_of_each_draw(setup, cached):  # noqa: F811
    from pipeline.method import neighbours

    target = store.open_store(setup / "target")
    full, info = target_scores.compute_reference(target, [4], [0])
    capped, capped_info = target_scores.compute_reference(target, [4], [0], max_patches=5)
    assert capped_info["max_patches"] == 5 and info["max_patches"] is None
    assert capped_info["images"] == info["images"]  # the same draws, only the bank is smaller
    tokens = target.tokens[:].astype(np.float32)
    rows = np.flatnonzero(target.category[:] == target.attrs["categories"].index("t1"))
    refs = [target.attrs["paths"].index(p) for p in info["images"]["4"]["t1"][0]]
    patches = tokens[refs].reshape(-1, tokens.shape[-1])
    keep = neighbours.coreset(patches, 5)
    units, bank = unit_rows(tokens.astype(np.float64)), unit_rows(patches[keep].astype(np.float64))
    for i in rows:
        if i not in refs:
            np.testing.assert_allclose(capped[4][0, i], (1 - units[i] @ bank.T).min(axis=1), atol=1e-5)
    scored = [i for i in rows if i not in refs]
    assert (capped[4][0, scored] >= full[4][0, scored] - 1e-6).all()  # fewer patches: never nearer
    assert (capped[4][0, scored] > full[4][0, scored] + 1e-4).any()


def write_pool(path, target, category, n, seed, held=None):
    """A train/good store of ``target``'s dataset: ``n`` normal images of ``category`` (random tokens),
    of which it holds those of ``held`` (default all), as stage normals keeps only the drawable ones."""
    g = np.random.default_rng(seed)
    held = list(range(n)) if held is None else held
    length, dim = target.tokens.shape[1:]
    tokens = g.standard_normal((n, length, dim)).astype(np.float16)[held]
    size = target.masks.shape[-1]
    attrs = {**{k: target.attrs[k] for k in ("dataset", "root", "backbone", "weights_sha256", "layer", "image_size",
                                             "grid", "defects")},
             "splits": ["train"], "categories": [category], "paths": [f"{category}/train/good/{i:03d}.png" for i in held],
             "train_good_counts": {category: n}, "train_good_drawn": {category: held},
             "train_good_missing": {"t2": "no train/good images: the reference is drawn from test/good"}}

    def chunk(a, b):
        return {"tokens": tokens[a:b], "cls": tokens[a:b].mean(1), "masks": np.zeros((b - a, size, size), np.uint8),
                "labels": np.zeros(b - a, np.uint8), "category": np.zeros(b - a, np.int16),
                "defect": np.zeros(b - a, np.int16)}

    store.write(path, store.StoreLayout(len(held), length, dim, size, 8), attrs, chunk)
    return store.open_store(path), tokens


def test_references_from_the_train_pool_score_every_test_image(setup, tmp_path):  # noqa: F811
    target = store.open_store(setup / "target")
    pool, pool_tokens = write_pool(tmp_path / "normals", target, "t1", 5, seed=3)
    got_pool, missing = target_scores.open_pool(tmp_path / "normals", target)
    assert got_pool.n_images == 5 and missing == {"t2": "no train/good images: the reference is drawn from test/good"}
    scores, info = target_scores.compute_reference(target, [1, 4, 16], [0, 1, 2], pool=got_pool)
    assert info["pool"] == {"t1": "train/good", "t2": "test/good"}
    # t1: k capped at the pool's 5 images; t2 (6 good images, no pool): at half of them, as before
    assert {k: info["k_used"][k]["t1"] for k in ("1", "4", "16")} == {"1": 1, "4": 4, "16": 5}
    assert {k: info["k_used"][k]["t2"] for k in ("1", "4", "16")} == {"1": 1, "4": 3, "16": 3}
    rows = np.flatnonzero(target.category[:] == target.attrs["categories"].index("t1"))
    units = unit_rows(target.tokens[:].astype(np.float64))
    bank_units = unit_rows(pool_tokens.astype(np.float64))
    for d, drawn in enumerate(info["images"]["4"]["t1"]):
        assert len(set(drawn)) == 4 and all(p.startswith("t1/train/good/") for p in drawn)
        picked = [int(p.split("/")[-1][:3]) for p in drawn]
        bank = bank_units[picked].reshape(-1, units.shape[-1])
        for i in rows:  # every test image is scored: none of them is a reference
            np.testing.assert_allclose(scores[4][d, i], (1 - units[i] @ bank.T).min(axis=1), atol=1e-5)
    # t2 still draws from its test/good images, which stay unscored in their draw
    t2 = np.flatnonzero(target.category[:] == target.attrs["categories"].index("t2"))
    for d, drawn in enumerate(info["images"]["4"]["t2"]):
        refs = [target.attrs["paths"].index(p) for p in drawn]
        assert set(refs) <= set(t2) and np.isnan(scores[4][d, refs]).all()
        assert not np.isnan(scores[4][d, [i for i in t2 if i not in refs]]).any()

    # the stage with --normals writes exactly these scores
    neighbours_stage.main(["--target", str(setup / "target"), "--normals", str(tmp_path / "normals"),
                           "--out", str(tmp_path / "neighbours"), "--params", str(setup / "params.yaml")])
    arrays, written = target_scores.load(tmp_path / "neighbours", target)
    assert written["reference"]["pool"] == info["pool"] and written["reference"]["images"] == info["images"]
    np.testing.assert_array_equal(arrays["reference/4"], scores[4])
    # the references' own signals, for the rule threshold: each against the others, and against t1's images
    assert "normals/4/t2/reference" not in arrays  # t2's references are rows of the target
    n_t1 = len(rows)
    keep = int(0.3 * n_t1)  # the mutual rule's ⌊0.3 · n⌋ smallest of the n distances
    for d, drawn in enumerate(info["images"]["4"]["t1"]):
        picked = [int(p.split("/")[-1][:3]) for p in drawn]
        for a, i in enumerate(picked):
            others = bank_units[[j for j in picked if j != i]].reshape(-1, units.shape[-1])
            np.testing.assert_allclose(arrays["normals/4/t1/reference"][d, a], (1 - bank_units[i] @ others.T).min(axis=1),
                                       atol=1e-5)
            per_image = np.stack([(1 - bank_units[i] @ units[j].T).min(axis=1) for j in rows], axis=1)
            np.testing.assert_allclose(arrays["normals/4/t1/batch"][d, a], np.sort(per_image, axis=1)[:, :keep].mean(1),
                                       atol=1e-5)
    assert np.isnan(arrays["normals/1/t1/reference"]).all()  # one reference: no other to score against

    # evaluate takes them: the rule threshold of a train/good draw is set, and every t1 image is scored
    from pipeline.stages import evaluate as evaluate_stage
    out = tmp_path / "report"
    evaluate_stage.main(["--target", str(setup / "target"), "--aux", str(setup / "aux"), "--sae", str(setup / "sae"),
                         "--guides", str(setup / "guides"), "--detector", str(setup / "detector"),
                         "--neighbours", str(tmp_path / "neighbours"), "--out", str(out),
                         "--params", str(setup / "params.yaml")])
    t1 = json.loads((out / "per_category.json").read_text())["t1"]["few_shot"]
    for mode in ("reference", "guides+reference+batch"):
        assert t1["k=4"][mode]["image_f1_at_rule_threshold"] is not None, mode
    assert t1["k=1"]["reference"]["image_f1_at_rule_threshold"] is None
    assert t1["k=16"]["k_used"] == 5


def test_a_pool_or_an_absent_record_of_another_dataset_is_refused(setup, tmp_path):  # noqa: F811
    target = store.open_store(setup / "target")
    write_pool(tmp_path / "normals", target, "t1", 2, seed=0)
    other = store.open_store(setup / "aux")
    with pytest.raises(target_scores.TargetScoresError, match="dataset"):
        target_scores.open_pool(tmp_path / "normals", other)
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / store.NORMALS_ABSENT).write_text(json.dumps(
        {"format": store.NORMALS_ABSENT_FORMAT, "dataset": "aux", "categories": {"a1": "none"}}))
    assert target_scores.open_pool(tmp_path / "absent", other) == (None, {"a1": "none"})
    with pytest.raises(target_scores.TargetScoresError, match="normals record of dataset 'target'"):
        target_scores.open_pool(tmp_path / "absent", target)


def test_a_pool_holding_the_drawable_images_draws_over_the_whole_train_list(setup, tmp_path):  # noqa: F811
    from pipeline.method import neighbours

    target = store.open_store(setup / "target")
    full, _ = write_pool(tmp_path / "full", target, "t1", 9, seed=5)
    picked = sorted({int(i) for pick in neighbours.draws(9, 2, [0, 1]) for i in pick})
    assert len(picked) < 9  # the seeds leave some of the 9 undrawn
    subset, _ = write_pool(tmp_path / "subset", target, "t1", 9, seed=5, held=picked)
    want, want_info = target_scores.compute_reference(target, [2], [0, 1], pool=full)
    got, got_info = target_scores.compute_reference(target, [2], [0, 1], pool=subset)
    assert got_info["images"] == want_info["images"]  # the same paths drawn from the same list of 9
    np.testing.assert_array_equal(got[2], want[2])
    with pytest.raises(target_scores.TargetScoresError, match="re-run stage normals@target"):
        target_scores.compute_reference(target, [2, 4], [0, 1], pool=subset)  # k=4 picks images it lacks
