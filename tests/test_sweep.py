import json

import numpy as np

from pipeline.cli import sweep


def state(rev, name, n_latents, k, image, pixel, experiments=None, layer=12):
    return {
        "rev": rev, "name": name, "error": None, "experiments": experiments,
        "data": {"rev": rev, "params": {"params.yaml": {"data": {"sae": {"n_latents": n_latents, "k": k},
                                                                 "backbone": {"layer": layer}}}},
                 "metrics": {"reports/a_to_b/metrics.json": {"data": {
                     "image_auroc": image, "pixel_auroc": pixel,
                     "controls": {"no_sae": {"image_auroc": image / 2, "pixel_auroc": pixel / 2}}}},
                             "reports/a/sae.json": {"data": {"fvu": 0.1}}}},
    }


EXP_SHOW = [
    state("workspace", None, 2048, 32, 0.70, 0.90),
    state("abc1234", "main", 2048, 32, 0.70, 0.90, experiments=[
        {"executor": None, "name": None, "revs": [state("e1", "exp-1", 2048, 16, 0.60, 0.80)]},
        {"executor": None, "name": None, "revs": [state("e2", "exp-2", 4096, 16, 0.50, 0.70)]},
        {"executor": None, "name": None, "revs": [state("e3", "exp-3", 4096, 32, 0.40, 0.60)]},
        {"executor": None, "name": None, "revs": [state("e4", "exp-4", 4096, 32, 0.60, 0.80)]},
        # another experiment on another layer: not part of the sae grid
        {"executor": None, "name": None, "revs": [state("e5", "layer-9", 4096, 16, 0.99, 0.99, layer=9)]},
        # still running: dvc shows the base commit's metrics for it, which must not count
        {"executor": {"state": "running"}, "name": "busy", "revs": [state("e6", "busy", 2048, 16, 0.70, 0.90)]},
    ]),
]


def test_grid_from_exp_show(tmp_path):
    exps = list(sweep.experiments(EXP_SHOW))
    runs, left_out = sweep.table(exps, "sae.k", "sae.n_latents", baseline=exps[0]["params"])
    rows = runs["a_to_b"]
    assert len(rows) == 5  # workspace (its commit, main, has the same result: once) and four experiments
    assert left_out == [("layer-9", "backbone.layer")]
    xs, ys, grid, count = sweep.heatmap_grid(rows, "sae.k", "sae.n_latents", "pixel_auroc")
    assert xs == [16, 32] and ys == [2048, 4096]
    # (2048, 32): workspace = main, 0.90; (4096, 32): mean of 0.60 and 0.80
    np.testing.assert_allclose(grid, [[0.80, 0.90], [0.70, 0.70]])
    assert count.tolist() == [[1, 1], [1, 2]]
    # without a baseline every experiment counts: (4096, 16) becomes the mean of 0.70 and 0.99
    everything, none_left = sweep.table(exps, "sae.k", "sae.n_latents")
    assert none_left == [] and len(everything["a_to_b"]) == 6
    np.testing.assert_allclose(sweep.heatmap_grid(everything["a_to_b"], "sae.k", "sae.n_latents", "pixel_auroc")[2][1, 0],
                               (0.70 + 0.99) / 2)


def test_command_writes_csv_and_png(tmp_path, capsys):
    (tmp_path / "exp.json").write_text(json.dumps(EXP_SHOW))
    assert sweep.main(["--json", str(tmp_path / "exp.json"), "--out", str(tmp_path / "sweep")]) == 0
    csv_rows = (tmp_path / "sweep" / "a_to_b.csv").read_text().splitlines()
    assert csv_rows[0] == ("experiment,sae.k,sae.n_latents,image_auroc,pixel_auroc,"
                           "no_sae_image_auroc,no_sae_pixel_auroc") and len(csv_rows) == 6
    assert csv_rows[1] == "workspace,32,2048,0.7,0.9,0.35,0.45"
    assert (tmp_path / "sweep" / "a_to_b.png").stat().st_size > 1000
    assert "left out 1 experiment(s)" in capsys.readouterr().out
    assert sweep.main(["--json", str(tmp_path / "exp.json"), "--out", str(tmp_path / "all"), "--all"]) == 0
    assert len((tmp_path / "all" / "a_to_b.csv").read_text().splitlines()) == 7


def test_no_matching_experiment_is_an_error(tmp_path, capsys):
    (tmp_path / "exp.json").write_text(json.dumps(EXP_SHOW))
    assert sweep.main(["--json", str(tmp_path / "exp.json"), "--x", "guides.lr"]) == 1
    assert "guides.lr" in capsys.readouterr().err
