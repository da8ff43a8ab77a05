import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import check


def write_params(tmp_path, root):
    params = {"datasets": {"tiny": {"format": "mvtec", "root": str(root)}}, "data": {"splits": ["test"]}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_check_lists_counts_per_category_and_defect(mvtec_tree, tmp_path, capsys):
    assert check.main(["--params", str(write_params(tmp_path, mvtec_tree)), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "tiny (mvtec" in out and "14 images, 6 normal, 8 anomalous, 2 categories" in out
    assert "alpha" in out and "test: good 3, scratch 4" in out


def test_check_stops_on_the_first_problem_naming_the_file(mvtec_tree, tmp_path, capsys):
    (mvtec_tree / "beta" / "ground_truth" / "scratch" / "002_mask.png").unlink()
    assert check.main(["--params", str(write_params(tmp_path, mvtec_tree))]) == 1
    assert "002_mask.png" in capsys.readouterr().err


def test_check_refuses_unknown_dataset(mvtec_tree, tmp_path, capsys):
    assert check.main(["--params", str(write_params(tmp_path, mvtec_tree)), "nope"]) == 1
    assert "datasets.nope" in capsys.readouterr().err


def test_check_finds_truncated_images_only_when_decoding(mvtec_tree, tmp_path, capsys):
    victim = mvtec_tree / "alpha" / "test" / "good" / "001.png"
    victim.write_bytes(victim.read_bytes()[:-200])
    params = str(write_params(tmp_path, mvtec_tree))
    assert check.main(["--params", params]) == 0
    assert check.main(["--params", params, "--decode"]) == 1
    assert "001.png" in capsys.readouterr().err


# ----------------------------------------------------------------- masks, pixel modes, OS litter


def test_check_refuses_an_empty_mask_without_decode_unless_allowed(mvtec_tree, tmp_path, capsys):
    victim = mvtec_tree / "beta" / "ground_truth" / "scratch" / "001_mask.png"
    Image.new("L", Image.open(victim).size, 0).save(victim)
    params = write_params(tmp_path, mvtec_tree)
    assert check.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # the tqdm bar of the mask pass comes first
    assert last.startswith("error: ") and "001_mask.png of an anomalous image is empty" in last
    assert "value != 0" in last and "Traceback" not in err
    raw = yaml.safe_load(params.read_text())
    raw["data"]["allow_empty_masks"] = True
    params.write_text(yaml.safe_dump(raw))
    assert check.main(["--params", str(params)]) == 0
    assert check.main(["--params", str(params), "--decode"]) == 0


def test_check_decode_refuses_a_32_bit_image(tmp_path, capsys):
    """Before: an I-mode TIFF decoded all white and check --decode passed it."""
    root = tmp_path / "f"
    (root / "c/test/good").mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 1000, np.int32)).save(root / "c/test/good/deep.tif")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"f": {"format": "folder", "root": str(root)}}}))
    assert check.main(["--params", str(params)]) == 0  # headers only
    assert check.main(["--params", str(params), "--decode"]) == 1
    assert "deep.tif has pixel mode 'I'" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "data:\n  splits: [test]\n", "datasets: {}\n"])
def test_check_fails_on_empty_or_dataset_less_params(tmp_path, capsys, text):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    assert check.main(["--params", str(params)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1


def test_check_yaml_syntax_error_is_one_line(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("datasets: {a: [\n")
    assert check.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {params}, line ") and err.count("\n") == 1


# --------------------------------------------------------------------- labels without masks


def _labels_only_tree(tmp_path):
    """A folder tree whose category ``line`` has test/good and test/dent but no ground_truth/."""
    from tests.conftest import make_mvtec_tree

    root = make_mvtec_tree(tmp_path / "f", categories=("line", "press"))
    for p in sorted((root / "line" / "ground_truth").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "line" / "ground_truth").rmdir()
    return root


def test_check_says_a_category_has_no_masks(tmp_path, capsys):
    root = _labels_only_tree(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"f": {"format": "folder", "root": str(root)}}}))
    for extra in ([], ["--decode"]):
        assert check.main(["--params", str(params), *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("f (folder") and "14 images, 6 normal, 8 anomalous, 2 categories" in lines[0]
        line = next(x for x in lines if x.strip().startswith("line "))
        press = next(x for x in lines if x.strip().startswith("press "))
        assert line.endswith("test: good 3, scratch 4  (no masks: pixel metrics will be null)")
        assert "no masks" not in press


def test_check_refuses_an_aux_dataset_without_masks(tmp_path, capsys):
    root = _labels_only_tree(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"f": {"format": "folder", "root": str(root)}},
                                      "aux_datasets": ["f"]}))
    assert check.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err == (f"error: datasets.f is listed in aux_datasets, but category line of {root} has labels but "
                   "no masks (no ground_truth/ folder): fit_guides needs pixel masks on an auxiliary set; add "
                   "the masks, or use it as a target only (remove it from aux_datasets)")


def test_check_gives_the_predict_hint_for_a_flat_folder(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / f"IMG_{i}.jpg")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"mine": {"format": "folder", "root": str(root)}}}))
    assert check.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no category folders found") and err.count("\n") == 1
    assert "holds images without labels" in err and "python -m pipeline.predict --detector" in err


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_check_on_a_fresh_clone_names_the_generated_sets_and_checks_the_rest(tmp_path, capsys, monkeypatch):
    """Before `dvc repro` has generated the embedded sets, check says where they come from and passes."""
    import shutil

    monkeypatch.chdir(tmp_path)  # dataset roots are relative to the repository root: here, no data/ yet
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    assert check.main(["--params", str(tmp_path / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "synth_a: generated by `dvc repro data@synth_a`" in out and "synth_b" in out


def test_check_names_the_artifact_an_aux_dataset_lacks(mvtec_tree, tmp_path, capsys):
    import shutil

    params = {"datasets": {"mine": {"format": "mvtec", "root": str(mvtec_tree)}}, "aux_datasets": ["mine"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # artifacts for synth_a and synth_b only
    assert check.main(["--params", str(tmp_path / "params.yaml")]) == 0  # the pipeline runs without it
    err = capsys.readouterr().err
    assert "warning" in err and "detector-mine" in err and "artifacts:" in err
