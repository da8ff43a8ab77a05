import shutil
from pathlib import Path

from pipeline.cli import preset
from pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_paper_preset_replaces_datasets_and_merges_sections(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert preset.main([str(ROOT / "configs" / "paper.yaml"), "--params", str(params)]) == 0
    p = load_params(params)
    assert set(p.datasets) == {"mvtec_ad", "visa"} and p.datasets["visa"].format == "visa"
    assert set(p.runs) == {"visa_to_mvtec_ad", "mvtec_ad_to_visa"} and p.synthetic.datasets == ()
    assert p.aux_datasets == ("visa", "mvtec_ad")  # replaced whole, not merged with synth_a, synth_b
    assert (p.backbone.name, p.backbone.layer, p.backbone.image_size) == ("dinov3_vitl16", 24, 448)
    assert (p.sae.n_latents, p.sae.k, p.sae.epochs, p.sae.dead_tokens) == (4096, 32, 50, 10_000_000)
    assert (p.guides.epochs, p.guides.ema_decay) == (15, 0.999)
    assert p.sae.lr == 1e-3 and p.scoring.blur_sigma == 4.0  # untouched keys are kept
    assert "# Parameters of every stage" in params.read_text()  # comments survive


def test_bad_preset_changes_nothing(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    (tmp_path / "bad.yaml").write_text("sae:\n  n_latent: 4096\n")
    assert preset.main([str(tmp_path / "bad.yaml"), "--params", str(params)]) == 1
    assert "sae.n_latent" in capsys.readouterr().err and params.read_text() == before


def test_mvtec_visa_preset_is_valid(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert preset.main([str(ROOT / "configs" / "mvtec_visa.yaml"), "--params", str(params)]) == 0
    assert load_params(params).backbone.name == "dinov2_vits14"


# The paper's values (SPG, arXiv 2604.02871; the bracketed values of pipeline/config.py), written out
# here rather than read from config.py so that an edit of a default, of params.yaml or of a preset that
# moves a real-data preset away from the paper fails this test instead of drifting silently.
PAPER_SAE = {"n_latents": 4096, "k": 32, "k_aux": 512, "auxk_coef": 1 / 32, "dead_tokens": 10_000_000,
             "lr": 1e-3, "betas": (0.5, 0.999), "batch_images": 16, "epochs": 50, "decoder_bias": False}
PAPER_GUIDES = {"variant": "l1", "l1_coef": 1e-3, "init_mean": 0.1, "init_std": 0.01, "temperature": 0.07,
                "focal_gamma": 2.0, "lr": 1e-2, "betas": (0.5, 0.999), "batch_images": 8, "epochs": 15,
                "ema_decay": 0.999}
PAPER_BACKBONE = {"name": "dinov3_vitl16", "layer": 24, "image_size": 448}


def _applied(tmp_path, name):
    """The params.yaml of this repository with configs/<name>.yaml applied, loaded."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert preset.main([str(ROOT / "configs" / f"{name}.yaml"), "--params", str(params)]) == 0
    return load_params(params)


def _differing(section, expected):
    return {key: (getattr(section, key), value) for key, value in expected.items()
            if getattr(section, key) != value}


def test_paper_preset_carries_every_paper_value(tmp_path):
    p = _applied(tmp_path, "paper")
    assert _differing(p.backbone, PAPER_BACKBONE) == {}
    assert _differing(p.sae, PAPER_SAE) == {}
    assert _differing(p.guides, PAPER_GUIDES) == {}
    assert len(p.guides.seeds) == 3  # three guide seeds, reported as mean and std


def test_mvtec_visa_preset_carries_the_paper_sae_and_guides_with_the_default_backbone(tmp_path):
    """The real-data preset differs from the paper in its backbone only (stated in the preset and the
    README): DINOv2 ViT-S/14 at 224 px, so that it runs offline on CPU."""
    p = _applied(tmp_path, "mvtec_visa")
    assert _differing(p.sae, PAPER_SAE) == {}
    assert _differing(p.guides, PAPER_GUIDES) == {}
    assert (p.backbone.name, p.backbone.layer, p.backbone.image_size) == ("dinov2_vits14", -1, 224)


def test_preset_whose_runs_miss_aux_datasets_is_refused_naming_the_run(tmp_path, capsys):
    """A preset written before aux_datasets existed (runs, no aux_datasets) changes nothing and says
    what to add."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    (tmp_path / "old.yaml").write_text("datasets:\n  m: {format: mvtec, root: data/m}\n"
                                       "  v: {format: visa, root: data/v}\n"
                                       "runs:\n  v_to_m: {aux: v, target: m}\n")
    assert preset.main([str(tmp_path / "old.yaml"), "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'old.yaml'} replaces runs but sets no aux_datasets; add " \
                  "`aux_datasets: [v]` (every aux of its runs)\n"
    assert params.read_text() == before


SHARED_DATA = ROOT.parent / "shared" / "data"


def test_real_preset_fits_only_on_embedded_sets_and_reads_shared_data(tmp_path):
    """configs/real.yaml: the real sets are targets only (never an aux, so never fitted on), their roots
    are ../shared/data (never copied into the repository), and every embedded run stays beside them."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert preset.main([str(ROOT / "configs" / "real.yaml"), "--params", str(params)]) == 0
    p = load_params(params)
    real, embedded = {"kolektorsdd", "bsdata"}, {"synth_a", "synth_b", "synth_c"}
    assert real <= set(p.datasets) and set(p.aux_datasets) == embedded == set(p.synthetic.datasets)
    assert all(run.aux not in real for run in p.runs.values())
    assert {run.target for run in p.runs.values()} == real | {"synth_a", "synth_b"}
    # every embedded aux scores every real target; synth_c scores both other embedded sets
    assert {(r.aux, r.target) for r in p.runs.values()} >= {(a, t) for a in embedded for t in real}
    assert {(r.aux, r.target) for r in p.runs.values() if r.aux == "synth_c"} == {
        ("synth_c", t) for t in real | {"synth_a", "synth_b"}}
    for name in real:
        assert p.datasets[name].root == f"../shared/data/{name}" and p.datasets[name].format == "folder"


def test_tiled_preset_tiles_only_the_real_targets_and_fits_only_on_embedded_sets(tmp_path):
    """configs/real_tiled.yaml: kolektorsdd and bsdata get tile 224 (the backbone's input size), are no
    run's aux, and the embedded sets keep scoring each other untiled."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert preset.main([str(ROOT / "configs" / "real_tiled.yaml"), "--params", str(params)]) == 0
    p = load_params(params)
    real = {"kolektorsdd", "bsdata"}
    assert {n: d.tile for n, d in p.datasets.items()} == {"synth_a": None, "synth_b": None, "kolektorsdd": 224,
                                                          "bsdata": 224}
    assert all(d.tile in (None, p.backbone.image_size) for d in p.datasets.values())
    assert all(run.aux not in real for run in p.runs.values()) and set(p.aux_datasets) == {"synth_a", "synth_b"}
    assert {(r.aux, r.target) for r in p.runs.values()} == {
        (a, t) for a in ("synth_a", "synth_b") for t in real | {"synth_a", "synth_b"} if a != t}


def test_real_preset_datasets_pass_check_where_shared_data_is_present(tmp_path, capsys):
    """Where ../shared/data exists (the project's machines and CI), `check` reads both real sets with the
    counts their SOURCE.md gives; elsewhere the test says why it cannot run."""
    import pytest

    from pipeline.cli import check

    if not (SHARED_DATA / "kolektorsdd").is_dir() or not (SHARED_DATA / "bsdata").is_dir():
        pytest.skip(f"{SHARED_DATA} does not hold kolektorsdd and bsdata (they are not in the repository)")
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert preset.main([str(ROOT / "configs" / "real.yaml"), "--params", str(params)]) == 0
    text = params.read_text().replace("../shared/data", str(SHARED_DATA))  # the roots are relative to the repo
    params.write_text(text)
    capsys.readouterr()
    assert check.main(["kolektorsdd", "bsdata", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "383 images, 333 normal, 50 anomalous" in out and "394 images, 0 normal, 394 anomalous" in out


def test_a_null_or_scalar_section_is_refused_and_changes_nothing(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    for text, where in (("sae:\n", "sae"), ("guides: 3\n", "guides"), ("runs:\n", "runs")):
        (tmp_path / "p.yaml").write_text(text)
        assert preset.main([str(tmp_path / "p.yaml"), "--params", str(params)]) == 1
        err = capsys.readouterr().err
        assert f"section {where!r}" in err and str(tmp_path / "p.yaml") in err
        assert params.read_text() == before
