import yaml

from pipeline import check


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
