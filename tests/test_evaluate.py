"""The evaluate stage on small hand-built stores: a planted anomaly atom makes learned guides
meaningful, so the metrics, the controls, the nulls and the mismatch errors can all be checked."""

import json

import numpy as np
import pytest
import torch
import yaml

from pipeline import guides, sae, store
from pipeline.stages import evaluate as evaluate_stage

D_IN, N_LATENTS, GRID, SIZE, ATOM = 24, 32, 4, 16, 20
ATTRS = {"backbone": "dinov2_vits14", "weights_sha256": "abc", "layer": 12, "image_size": SIZE, "grid": [GRID, GRID]}


def make_store(path, root, dictionary, categories, n_per_category, anomalous_fractions, seed):
    """Tokens mixing atoms 0-15; anomalous images carry atom ATOM in a 2x1 patch block (its mask)."""
    g = np.random.default_rng(seed)
    rows = []
    for ci, (cat, n, fraction) in enumerate(zip(categories, n_per_category, anomalous_fractions)):
        for i in range(n):
            coef = np.zeros((GRID * GRID, N_LATENTS))
            for p in range(GRID * GRID):
                coef[p, g.choice(16, 3, replace=False)] = g.uniform(0.5, 1.5, 3)
            mask = np.zeros((GRID, GRID), np.uint8)
            label = int(i >= n * (1 - fraction))
            if label:
                y, x = g.integers(0, GRID - 1, 2)
                mask[y : y + 2, x] = 1
                coef[:, ATOM] += 2.0 * mask.ravel()
            tokens = coef @ dictionary
            rows.append((cat, ci, label, tokens, mask.repeat(SIZE // GRID, 0).repeat(SIZE // GRID, 1)))
    # no image files: evaluate draws its overlays from the store's own ``images`` array
    relpaths = [f"{cat}/test/{'bad' if label else 'good'}/{j:03d}.png" for j, (cat, _, label, _, _) in enumerate(rows)]
    layout = store.StoreLayout(len(rows), GRID * GRID, D_IN, SIZE, 8)
    attrs = {**ATTRS, "dataset": path.name, "root": str(root), "paths": relpaths, "categories": list(categories),
             "defects": ["good", "bad"]}
    group, pending = store.prepare(path, layout, attrs)
    for c in pending:
        a, b = layout.chunk_range(c)
        part = rows[a:b]
        store.write_chunk(group, layout, c, {
            "tokens": np.stack([r[3] for r in part]).astype(np.float16),
            "cls": np.stack([r[3].mean(0) + r[2] * dictionary[ATOM] for r in part]).astype(np.float16),
            "masks": np.stack([r[4] for r in part]),
            "images": g.integers(0, 256, (len(part), SIZE, SIZE, 3), dtype=np.uint8),
            "labels": np.array([r[2] for r in part], np.uint8),
            "category": np.array([r[1] for r in part], np.int16),
            "defect": np.array([r[2] for r in part], np.int16),
        })
    store.finalize(group, path)
    return store.open_store(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    g = np.random.default_rng(0)
    dictionary = np.linalg.qr(g.standard_normal((D_IN + 16, N_LATENTS)))[0][:D_IN].T  # (32, 24), not unit yet
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    aux = make_store(tmp / "aux", tmp / "aux_root", dictionary, ["a1"], [48], [0.5], 1)
    # target: one regular category and one with no anomalous image at all
    target = make_store(tmp / "target", tmp / "target_root", dictionary, ["t1", "t2"], [24, 6], [0.5, 0.0], 2)
    model = sae.TopKSAE(D_IN, N_LATENTS, 4)
    with torch.no_grad():
        model.dictionary.copy_(torch.tensor(dictionary, dtype=torch.float32))
        model.encoder.copy_(model.dictionary)
    provenance = {**ATTRS, "dataset": "aux"}
    sae.save(model, tmp / "sae", torch.zeros(N_LATENTS, dtype=torch.bool), extra={"features": provenance})
    read = lambda c: aux.read(c, ("tokens", "cls", "masks", "labels"))  # noqa: E731
    training = {"variant": "l1", "guide_topk": 32, "init_mean": 0.1, "init_std": 0.01, "temperature": 0.07, "seeds": [0, 1]}
    codes = torch.stack([guides.fit(read, aux.n_chunks, model.dictionary.detach(), None, (GRID, GRID), lr=1e-2,
                                    epochs=20, ema_decay=0.9, seed=s).codes for s in (0, 1)])
    guides.save(tmp / "guides", codes, {"training": training, "features": provenance})
    params = {"evaluate": {"image_score": "max", "blur_sigma": 1.0, "batch_images": 5, "curve_points": 50,
                           "overlays_per_category": 4, "device": "cpu"}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp


def run(tmp, target="target", out="report"):
    evaluate_stage.main(["--target", str(tmp / target), "--aux", str(tmp / "aux"), "--sae", str(tmp / "sae"),
                         "--guides", str(tmp / "guides"), "--out", str(tmp / out), "--params", str(tmp / "params.yaml")])
    return json.loads((tmp / out / "metrics.json").read_text()), json.loads((tmp / out / "per_category.json").read_text())


def test_metrics_contract_controls_and_plots(setup):
    result, per_category = run(setup)
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro"):
        assert 0.0 <= result[key] <= 1.0, key
        assert f"{key}_std" in result  # two seeds
    assert result["n_images"] == 30 and result["n_categories"] == 2
    assert result["backbone"] == "dinov2_vits14" and result["weights_sha256"] == "abc"
    assert set(result["controls"]) == {"untrained_init", "no_sae"}
    # the planted atom is found: learned guides segment the anomalies far better than untrained ones
    assert result["pixel_auroc"] > 0.95
    assert result["pixel_auroc"] > result["controls"]["untrained_init"]["pixel_auroc"] + 0.1
    assert set(per_category) == {"t1", "t2"}
    for name in ("roc_pr.png", "per_category.png", "overlays/t1.png", "plots/image_roc.csv", "plots/pixel_pr.csv"):
        assert (setup / "report" / name).is_file(), name
    rows = (setup / "report" / "plots" / "pixel_roc.csv").read_text().splitlines()
    assert rows[0].startswith("fpr,tpr") and 2 < len(rows) <= 51


def test_category_without_anomalies_reports_null_with_reason(setup):
    _, per_category = run(setup)
    t2 = per_category["t2"]
    assert t2["image_auroc"] is None and t2["pixel_auroc"] is None
    assert "image_auroc" in t2["null_reasons"] and "anomal" in t2["null_reasons"]["image_auroc"]
    assert per_category["t1"]["image_auroc"] is not None


@pytest.mark.parametrize("attr, value", [("backbone", "dinov3_vitl16"), ("layer", 11), ("image_size", 32)])
def test_target_from_another_extraction_is_refused(setup, attr, value):
    bad = setup / f"bad_{attr}"
    src = store.open_store(setup / "target")
    layout = store.StoreLayout(src.n_images, GRID * GRID, D_IN, SIZE, src.chunk_images)
    group, pending = store.prepare(bad, layout, {**{k: v for k, v in src.attrs.items() if k not in ("schema", "complete")}, attr: value})
    for c in pending:
        store.write_chunk(group, layout, c, src.read(c, list(layout.shapes())))
    store.finalize(group, bad)
    with pytest.raises(store.StoreError, match=f"attr '{attr}'"):
        run(setup, target=bad.name, out=f"out_{attr}")
