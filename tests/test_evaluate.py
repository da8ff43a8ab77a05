"""The evaluate stage on small hand-built stores: a planted anomaly atom makes learned guides
meaningful, so the metrics, the controls, the nulls and the mismatch errors can all be checked."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.method import guides
from pipeline.evaluation import metrics
from pipeline.method import sae
from pipeline.features import store
from pipeline.files import sha256_file
from pipeline.errors import NonFiniteError, PipelineError
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import export as export_stage
from pipeline.launch import run as stage_run

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

    def chunk(a, b):
        part = rows[a:b]
        return {"tokens": np.stack([r[3] for r in part]).astype(np.float16),
                "cls": np.stack([r[3].mean(0) + r[2] * dictionary[ATOM] for r in part]).astype(np.float16),
                "masks": np.stack([r[4] for r in part]),
                "images": g.integers(0, 256, (len(part), SIZE, SIZE, 3), dtype=np.uint8),
                "labels": np.array([r[2] for r in part], np.uint8),
                "category": np.array([r[1] for r in part], np.int16),
                "defect": np.array([r[2] for r in part], np.int16)}

    return store.write(path, layout, attrs, chunk)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    g = np.random.default_rng(0)
    dictionary = np.linalg.qr(g.standard_normal((D_IN + 16, N_LATENTS)))[0][:D_IN].T  # (32, 24), not unit yet
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    aux = make_store(tmp / "aux", tmp / "aux_root", dictionary, ["a1"], [48], [0.5], 1)
    # target: one regular category and one with no anomalous image at all
    make_store(tmp / "target", tmp / "target_root", dictionary, ["t1", "t2"], [24, 6], [0.5, 0.0], 2)
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
    guides.save(tmp / "guides", codes, {"training": training, "features": provenance,
                                        "sae_sha256": sha256_file(tmp / "sae" / "sae.safetensors"),
                                        "aux_store": fingerprint(aux.attrs)})
    params = {"scoring": {"image_score": "max", "blur_sigma": 1.0},
              "evaluate": {"batch_images": 5, "curve_points": 50, "overlays_per_category": 4, "device": "cpu"}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    export(tmp)
    return tmp


def export(tmp, out="detector", params="params.yaml", guides_dir="guides"):
    """The export stage on the auxiliary store: the detector evaluate scores with."""
    export_stage.main(["--features", str(tmp / "aux"), "--sae", str(tmp / "sae"), "--guides", str(tmp / guides_dir),
                       "--weights", "models/backbones/dinov2_vits14.safetensors", "--out", str(tmp / out),
                       "--params", str(tmp / params)])
    return tmp / out


def fingerprint(attrs):
    """What a guides checkpoint records of its auxiliary store."""
    return {k: attrs.get(k) for k in ("dataset", "inputs_sha256", "weights_sha256", "backbone", "layer", "image_size")}


def run(tmp, target="target", out="report", aux="aux", sae_dir="sae", guides_dir="guides", detector_dir="detector",
        params="params.yaml"):
    evaluate_stage.main(["--target", str(tmp / target), "--aux", str(tmp / aux), "--sae", str(tmp / sae_dir),
                         "--guides", str(tmp / guides_dir), "--detector", str(tmp / detector_dir),
                         "--out", str(tmp / out), "--params", str(tmp / params)])
    return json.loads((tmp / out / "metrics.json").read_text()), json.loads((tmp / out / "per_category.json").read_text())


def test_metrics_contract_controls_and_plots(setup):
    result, per_category = run(setup)
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro"):
        assert 0.0 <= result[key] <= 1.0, key
        assert f"{key}_std" in result  # two seeds
    assert result["n_images"] == 30 and result["n_categories"] == 2
    assert result["backbone"] == "dinov2_vits14" and result["weights_sha256"] == "abc"
    assert set(result["controls"]) == {"untrained_init", "no_sae"}
    # the detector's mean-of-seeds scoring and how the aux threshold transfers, next to the oracle
    assert set(result["seed_ensemble"]) == set(metrics.METRIC_KEYS)
    assert result["aux_threshold"] == json.loads((setup / "detector" / "detector.json").read_text())["threshold"]
    for key in metrics.THRESHOLD_KEYS:
        assert 0.0 <= result[key] <= 1.0, key
        assert per_category["t1"][key] is not None, key
    # t1 is the only category with anomalies: the mean over categories of recall and F1 is t1's
    assert result["image_recall_at_aux_threshold"] == per_category["t1"]["image_recall_at_aux_threshold"]
    assert per_category["t2"]["image_recall_at_aux_threshold"] is None
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


# ----------------------------------------------------------------------------------------------------
# Hostile inputs (non-finite tokens, one-class targets, mismatched inputs, unsafe names)


def copy_store(src_path, dst_path, attrs=None, edit=None):
    """A copy of the store at ``src_path`` with ``attrs`` overridden and ``edit(start, arrays)`` applied
    to each chunk's arrays (in place) before writing."""
    src = store.open_store(src_path)
    layout = store.StoreLayout(src.n_images, GRID * GRID, D_IN, SIZE, src.chunk_images)
    kept = {k: v for k, v in src.attrs.items() if k not in ("schema", "complete")}
    group, pending = store.prepare(dst_path, layout, {**kept, **(attrs or {})})
    for c in pending:
        arrays = src.read(c, list(layout.shapes()))
        if edit:
            edit(layout.chunk_range(c)[0], arrays)
        store.write_chunk(group, layout, c, arrays)
    store.finalize(group, dst_path)
    return dst_path


def declared_outputs(out):
    """Every output path the evaluate stage declares in dvc.yaml, for report folder ``out``."""
    do = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]["evaluate"]["do"]
    entries = [e for kind in ("outs", "metrics", "plots") for e in do.get(kind, [])]
    names = [e if isinstance(e, str) else next(iter(e)) for e in entries]
    assert names, "evaluate declares no outputs"
    prefix = "reports/${key}/"
    assert all(n.startswith(prefix) for n in names), names
    return [out / n[len(prefix):] for n in names]


def strict_json(path):
    """Parse ``path`` as strict JSON: bare NaN / Infinity (which Python's json accepts) fail."""
    def refuse(token):
        raise AssertionError(f"{path}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def inf_target(setup):
    """The target with one Inf in a token of image 27 (category t2, the second one scored)."""
    def edit(start, arrays):
        if start <= 27 < start + len(arrays["tokens"]):
            arrays["tokens"][27 - start, 3, 5] = np.inf
    return copy_store(setup / "target", setup / "target_inf", edit=edit)


def test_inf_token_in_target_names_store_image_and_chunk(setup, inf_target):
    paths = store.open_store(inf_target).attrs["paths"]
    with pytest.raises(NonFiniteError) as err:
        run(setup, target=inf_target.name, out="out_inf")
    message = str(err.value)
    assert str(inf_target) in message and "tokens" in message
    assert "image 27" in message and paths[27] in message and "chunk 3" in message  # chunks of 8 images
    assert files_under(setup / "out_inf") == []  # failed before anything was written


def test_failed_run_leaves_the_previous_report_untouched(setup, inf_target):
    """All or nothing: a run that fails half way (at the second category) writes no file at all."""
    out = setup / "out_previous"
    run(setup, out=out.name)
    before = files_under(out)
    assert Path("overlays/t1.png") in before
    for name in before:
        (out / name).write_bytes(b"previous run")
    with pytest.raises(NonFiniteError):
        run(setup, target=inf_target.name, out=out.name)
    assert files_under(out) == before
    assert all((out / name).read_bytes() == b"previous run" for name in before)


@pytest.mark.parametrize("fraction, absent", [(0.0, "anomalous"), (1.0, "normal")])
def test_one_class_target_exits_0_with_null_metrics_and_every_declared_output(setup, fraction, absent):
    dictionary = sae.load(setup / "sae")[0].dictionary.detach().numpy().astype(np.float64)
    name = f"target_no_{absent}"
    make_store(setup / name, setup / f"{name}_root", dictionary, ["u1", "u2"], [5, 4], [fraction, fraction], 3)
    out = setup / f"out_no_{absent}"
    argv = ["--target", str(setup / name), "--aux", str(setup / "aux"), "--sae", str(setup / "sae"),
            "--guides", str(setup / "guides"), "--detector", str(setup / "detector"), "--out", str(out),
            "--params", str(setup / "params.yaml")]
    stage_run(evaluate_stage.main, argv)  # a PipelineError would exit 1 here; anything else raises

    missing = [str(p) for p in declared_outputs(out) if not p.exists()]
    assert not missing, f"declared outputs not written: {missing}"
    result, per_category = strict_json(out / "metrics.json"), strict_json(out / "per_category.json")
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert result[key] is None and f"no {absent} images" in result["null_reasons"][key]
        assert per_category["u1"][key] is None and f"no {absent} images" in per_category["u1"]["null_reasons"][key]
    image_roc = (out / "plots" / "image_roc.csv").read_text().splitlines()
    assert image_roc == ["fpr,tpr,threshold"]  # header only: the curve is undefined
    assert (out / "plots" / "image_pr.csv").read_text().splitlines() == ["recall,precision,threshold"]
    n = 9  # images, counted as images
    counts = "0 anomalous, 9 normal images" if absent == "anomalous" else "9 anomalous, 0 normal images"
    assert counts in result["null_reasons"]["image_curves"], result["null_reasons"]["image_curves"]
    pixel_rows = (out / "plots" / "pixel_roc.csv").read_text().splitlines()
    if absent == "anomalous":  # no anomalous pixel either: pixel metrics and curves undefined too
        assert result["pixel_auroc"] is None and "pixel_auroc" in result["null_reasons"]
        assert pixel_rows == ["fpr,tpr,threshold"]
        reason = result["null_reasons"]["pixel_curves"]
        assert "0 anomalous" in reason and "normal pixels" in reason and "images" not in reason
    else:  # masks cover part of each image: pixel metrics stay defined
        assert 0 <= result["pixel_auroc"] <= 1 and "pixel_auroc" not in result["null_reasons"]
        assert len(pixel_rows) > 2 and "pixel_curves" not in result["null_reasons"]
    assert result["n_images"] == n
    # what a category's decisions are counted over (the drift check reads them)
    assert (per_category["u1"]["n_images"], per_category["u2"]["n_images"]) == (5, 4)
    assert per_category["u1"]["n_anomalous"] == (5 if absent == "normal" else 0)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["u1.png", "u2.png"]
    # a fresh report folder: the page links the overlays written beside it in the same run
    page = (out / "report.html").read_text()
    assert 'src="overlays/u1.png"' in page and 'src="overlays/u2.png"' in page


def test_guides_fitted_on_another_sae_are_refused(setup):
    other = setup / "sae_other"
    model, dead, config = sae.load(setup / "sae")
    with torch.no_grad():
        model.dictionary[0] = -model.dictionary[0]  # same shape, other content
    sae.save(model, other, dead, extra={k: v for k, v in config.items() if k not in ("d_in", "n_latents", "k", "decoder_bias")})
    recorded = json.loads((setup / "guides" / "config.json").read_text())["sae_sha256"]
    with pytest.raises(PipelineError) as err:
        run(setup, sae_dir=other.name, out="out_other_sae")
    message = str(err.value)
    assert recorded in message and sha256_file(other / "sae.safetensors") in message
    assert str(other) in message and str(setup / "guides") in message
    assert not (setup / "out_other_sae").exists()


@pytest.mark.parametrize("attrs", [{"dataset": "other_aux"}, {"inputs_sha256": "f00d"}])
def test_aux_store_that_is_not_the_guides_dataset_is_refused(setup, attrs):
    key, value = next(iter(attrs.items()))
    other = copy_store(setup / "aux", setup / f"aux_{key}", attrs=attrs)
    with pytest.raises(PipelineError) as err:
        run(setup, aux=other.name, out=f"out_aux_{key}")
    message = str(err.value)
    recorded = fingerprint(store.open_store(setup / "aux").attrs)[key]
    assert key in message and repr(recorded) in message and repr(value) in message and str(other) in message
    assert not (setup / f"out_aux_{key}").exists()


def test_guides_without_provenance_are_refused(setup):
    old = setup / "guides_old"
    codes, config = guides.load(setup / "guides")
    guides.save(old, codes, {k: v for k, v in config.items() if k not in ("rows", "sae_sha256", "aux_store")})
    with pytest.raises(PipelineError, match="sae_sha256 or aux_store.*re-run fit_guides"):
        run(setup, guides_dir=old.name, out="out_old_guides")


@pytest.mark.parametrize("bad", ["../../PWNED", "a/b", ".."])
def test_category_name_cannot_leave_the_overlays_folder(setup, bad):
    tag = {"../../PWNED": "dotdot", "a/b": "slash", "..": "parent"}[bad]
    target = copy_store(setup / "target", setup / f"target_{tag}", attrs={"categories": [bad, "t2"]})
    out = setup / f"pwn_{tag}" / "deep" / "report"
    with pytest.raises(PipelineError) as err:
        run(setup, target=target.name, out=str(out.relative_to(setup)))
    assert repr(bad) in str(err.value)
    assert not list(setup.rglob("PWNED*")) and not list(setup.rglob("b.png"))
    assert files_under(setup / f"pwn_{tag}") == []


# ----------------------------------------------------------------------------------------------------
# Training-free baselines and every image score, against slow references


def slow_baseline_maps(tokens, sigma):
    """tokens (n, L, d) of one category -> {name: maps (n, S, S)} by loops over images and patches."""
    from scipy.ndimage import gaussian_filter
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    n, length, _ = tokens.shape
    patch = {"self_dissimilarity": np.zeros((n, length)), "mutual": np.zeros((n, length))}
    k = max(1, int(0.3 * (n - 1) + 1e-9))
    for i in range(n):
        mean = tokens[i].mean(0)
        for p in range(length):
            patch["self_dissimilarity"][i, p] = 1 - unit[i, p] @ mean / np.linalg.norm(mean)
            others = sorted(min(1 - unit[i, p] @ unit[j, q] for q in range(length)) for j in range(n) if j != i)
            patch["mutual"][i, p] = np.mean(others[:k])
    out = {}
    for name, values in patch.items():
        up = torch.nn.functional.interpolate(torch.tensor(values, dtype=torch.float32).reshape(n, 1, GRID, GRID),
                                             size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()
        out[name] = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect") for m in up])
    return out


def test_baselines_and_image_by_score_equal_a_slow_reference(setup):
    result, per_category = run(setup, out="report_baselines")
    target = store.open_store(setup / "target")
    category = target.category[:]
    want = {name: {} for name in ("self_dissimilarity", "mutual")}
    for ci, cat in enumerate(target.attrs["categories"]):
        rows = np.flatnonzero(category == ci)
        labels, masks = target.labels[rows].astype(int), target.masks[rows]
        for name, maps in slow_baseline_maps(target.tokens[rows].astype(np.float64), sigma=1.0).items():
            got = per_category[cat]["baselines"][name]
            ref = metrics.compute_all(labels, maps.reshape(len(rows), -1).max(1), masks, maps)
            for key in metrics.METRIC_KEYS:
                assert got[key] == pytest.approx(ref[key], abs=2e-4) if ref[key] is not None else got[key] is None
            top = np.sort(maps.reshape(len(rows), -1), axis=1)[:, -max(1, round(0.01 * SIZE * SIZE)):].mean(1)
            if labels.min() != labels.max():
                assert got["image_by_score"]["top_mean"]["image_auroc"] == pytest.approx(metrics.image_auroc(labels, top))
                want[name][cat] = ref
            assert got["image_by_score"]["global"]["image_auroc"] is None
            assert "no CLS guide" in got["null_reasons"]["image_by_score.global"]
    for name, settings in (("self_dissimilarity", "single image"), ("mutual", "batch zero-shot")):
        top = result["baselines"][name]
        assert top["setting"].startswith(settings)
        # t2 has no anomalous image: the mean over categories is t1's; the pixel means cover both
        assert top["image_auroc"] == pytest.approx(want[name]["t1"]["image_auroc"], abs=2e-4)
        assert top["pixel_auroc"] == pytest.approx(per_category["t1"]["baselines"][name]["pixel_auroc"])
        for key in ("image_auroc", "image_ap", "image_f1_max"):  # the configured mode is the top-level one
            assert top["image_by_score"]["max"][key] == top[key]
    # the learned guides: image_by_score is the detector's scoring (mean of the seeds' maps)
    assert set(result["image_by_score"]) == {"max", "lse", "top_mean", "global"}
    assert "seed_ensemble" in result["image_by_score_of"]
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert result["image_by_score"]["max"][key] == result["seed_ensemble"][key]
        for control in ("untrained_init", "no_sae"):
            assert result["controls"][control]["image_by_score"]["max"][key] == result["controls"][control][key]
    assert "image_auroc_std" in result["controls"]["untrained_init"]["image_by_score"]["lse"]  # two seeds
    assert per_category["t1"]["image_by_score"]["max"]["image_auroc"] == per_category["t1"]["seed_ensemble"]["image_auroc"]
    strict_json(setup / "report_baselines" / "metrics.json")


def test_image_by_score_of_a_hand_built_case_where_the_modes_differ():
    from pipeline.evaluation import evaluate as evaluation
    from pipeline.method import scoring
    maps = np.zeros((4, 4, 4), np.float32)
    maps[0, 0, 0] = 1.0             # normal, one hot pixel: max 1.0, top_mean (2 px) 0.5
    maps[1] = 0.1                   # normal
    maps[2, 0, :] = 0.8             # anomalous: max 0.8, top_mean 0.8
    maps[3, 1, :2] = 0.9            # anomalous: max 0.9, top_mean 0.9
    settings = scoring.ScoreSettings(top_fraction=2 / 16, lse_temperature=0.01)
    by_mode = scoring.scores_by_mode(maps, np.array([0.9, 0.2, 0.1, 0.3]), settings)
    got = evaluation.image_by_score(np.array([0, 0, 1, 1]), by_mode)
    assert got["max"]["image_auroc"] == pytest.approx(0.5)        # 0.8, 0.9 vs 1.0, 0.1: 2 of 4 pairs
    assert got["top_mean"]["image_auroc"] == pytest.approx(1.0)   # 0.8, 0.9 vs 0.5, 0.1
    assert got["global"]["image_auroc"] == pytest.approx(0.25)    # 0.1, 0.3 vs 0.9, 0.2: 1 of 4 pairs
    assert got["null_reasons"] == {}
    no_global = evaluation.image_by_score(np.array([0, 0, 1, 1]), scoring.scores_by_mode(maps, None, settings))
    assert no_global["global"] == {"image_auroc": None, "image_ap": None, "image_f1_max": None}
    assert no_global["top_mean"] == got["top_mean"]


def test_global_image_score_leaves_baseline_image_metrics_null_and_mutual_null_for_one_image(setup):
    dictionary = sae.load(setup / "sae")[0].dictionary.detach().numpy().astype(np.float64)
    make_store(setup / "target_solo", setup / "solo_root", dictionary, ["solo", "pair"], [1, 6], [1.0, 0.5], 4)
    params = yaml.safe_load((setup / "params.yaml").read_text())
    params["scoring"]["image_score"] = "global"
    (setup / "params_global.yaml").write_text(yaml.safe_dump(params))
    export(setup, out="detector_global", params="params_global.yaml")
    result, per_category = run(setup, target="target_solo", out="report_global", detector_dir="detector_global",
                               params="params_global.yaml")
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert result["image_by_score"]["global"][key] == result["seed_ensemble"][key]
        for name in ("self_dissimilarity", "mutual"):
            assert result["baselines"][name][key] is None
            assert "no CLS guide" in result["baselines"][name]["null_reasons"][key]
    solo = per_category["solo"]["baselines"]
    assert all(solo["mutual"][k] is None for k in metrics.METRIC_KEYS)
    assert "one image" in solo["mutual"]["null_reasons"]["pixel_auroc"]
    assert solo["self_dissimilarity"]["pixel_auroc"] is not None  # a single-image method needs no other image
    # the mean over categories of mutual is pair's alone
    assert result["baselines"]["mutual"]["pixel_auroc"] == per_category["pair"]["baselines"]["mutual"]["pixel_auroc"]
    strict_json(setup / "report_global" / "metrics.json")
    strict_json(setup / "report_global" / "per_category.json")


def test_guide_sets_live_on_the_device_asked_for_and_equal_a_cpu_reference(setup):
    """The evaluate stage loads the SAE onto its device (dictionary and dead mask there) and builds
    every guide set there. ``untrained_init`` used to take effective() of codes on the CPU times an
    alive mask on the device before moving them, a device mix. ``meta`` stands in for the
    GPU (tests/devices.py): every set must come out on it; on the CPU the sets equal a reference
    built by hand from the same seeds."""
    from pipeline.method import detector
    from pipeline.evaluation import evaluate as evaluation
    from tests.devices import assert_on

    tmp = setup
    model, _, _ = sae.load(tmp / "sae")
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[[5, 9]] = True
    _, vectors = detector.read(tmp / "detector")
    codes, config = guides.load(tmp / "guides")
    training = config["training"]
    aux = store.open_store(tmp / "aux")
    dictionary = model.dictionary.detach()
    meta = torch.device("meta")
    on_meta = evaluation.guide_sets(vectors.to(meta), [0, 1], dictionary.to(meta), dead.to(meta), training, aux, meta)
    assert assert_on(on_meta, meta) == 5  # learned x2, untrained_init x2, no_sae
    on_cpu = evaluation.guide_sets(vectors, [0, 1], dictionary, dead, training, aux, torch.device("cpu"))
    assert_on(on_cpu, "cpu")
    for s in (0, 1):
        init = torch.randn(4, N_LATENTS, generator=torch.Generator().manual_seed(s)) * training["init_std"] + training["init_mean"]
        init = torch.relu(init)
        init[:, [5, 9]] = 0
        torch.testing.assert_close(on_cpu[f"untrained_init/{s}"], init @ dictionary, rtol=0, atol=1e-6)
        assert torch.equal(on_cpu[f"learned/{s}"], vectors[s])


def test_stage_streams_every_category_and_matches_compute_all_on_the_same_maps(setup, monkeypatch):
    """Evaluate never holds a category's maps for the in-memory metrics.compute_all; every
    scored set's pixel metrics come from metrics_stream, and they equal compute_all of the very maps
    and masks the stage streamed (recorded here), to 1e-12. Tiny merge blocks and fan-in 2 make the
    5-image batches several runs, blocks and merge passes."""
    from pipeline.evaluation import metrics_stream

    reference = metrics.compute_all
    refuse = lambda *a, **k: pytest.fail("the stage called the in-memory metrics.compute_all")  # noqa: E731
    monkeypatch.setattr(metrics, "compute_all", refuse)
    monkeypatch.setattr(metrics_stream, "BLOCK_WORDS", 64)
    monkeypatch.setattr(metrics_stream, "FAN_IN", 2)
    add, streamed = metrics_stream.PixelStream.add, metrics_stream.PixelStream.metrics

    def record(self, masks, maps, regions=None):
        # kept on the stream itself: an id() could be reused by the next category's stream
        recorded = self.__dict__.setdefault("_recorded", ([], []))
        recorded[0].append(np.array(masks))
        recorded[1].append(np.array(maps))
        return add(self, masks, maps, regions)

    checked = []

    def compare(self, labels, image_scores, *, has_masks=True):
        out = streamed(self, labels, image_scores, has_masks=has_masks)
        masks, maps = (np.concatenate(a) for a in self._recorded)
        ref = reference(labels, image_scores, masks, maps, has_masks=has_masks)
        assert out["null_reasons"] == ref["null_reasons"]
        for key in metrics.METRIC_KEYS:
            assert out[key] == (None if ref[key] is None else pytest.approx(ref[key], abs=1e-12, rel=0)), key
        checked.append((len(maps), len(self.runs), out["pixel_auroc"] is not None))
        return out

    monkeypatch.setattr(metrics_stream.PixelStream, "add", record)
    monkeypatch.setattr(metrics_stream.PixelStream, "metrics", compare)
    result, per_category = run(setup, out="report_streamed")
    # t1 (24 images: 5 batches) and t2 (6 images, no anomaly); 2 learned + 2 untrained + no_sae + ensemble
    # + 2 baselines + 2 fused = 10 streams each
    assert sorted(n for n, _, _ in checked) == [6] * 10 + [24] * 10
    assert all(runs == (5 if n == 24 else 2) for n, runs, _ in checked)
    assert sum(defined for _, _, defined in checked) == 10  # t2's pixel metrics are null (no anomalous pixel)
    assert 0 < result["pixel_auroc"] <= 1 and per_category["t2"]["pixel_auroc"] is None
    assert not [p for p in (setup / "report_streamed").iterdir() if p.name.startswith(".")]  # run files removed
