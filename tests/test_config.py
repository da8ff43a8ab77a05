import pytest

from pipeline.config import ConfigError, load_params, parse


def test_repository_params_load():
    params = load_params("params.yaml")
    assert params.backbone.name == "dinov2_vits14"
    assert set(params.datasets) == set(params.synthetic.datasets)
    assert all(d.format == "mvtec" for d in params.datasets.values())
    assert params.data.splits == ("test",)


def test_only_requested_sections_are_built():
    params = parse({"backbone": {"name": "dinov3_vitl16", "layer": 24, "image_size": 448}}, ["backbone"])
    assert params.backbone.layer == 24 and params.extract is None


@pytest.mark.parametrize(
    "raw, sections, key",
    [
        ({"backbone": {"layr": 3}}, ["backbone"], "backbone.layr"),
        ({"extract": {"batch_size": 0}}, ["extract"], "extract.batch_size"),
        ({"extract": {"batch_size": "8"}}, ["extract"], "extract.batch_size"),
        ({"extract": {"batch_size": True}}, ["extract"], "extract.batch_size"),
        ({"backbone": {"layer": 0}}, ["backbone"], "backbone.layer"),
        ({"extract": {"device": "tpu"}}, ["extract"], "extract.device"),
        ({"data": {"splits": ["val"]}}, ["data"], "data.splits"),
        ({"datasets": {"x": {"format": "coco", "root": "d"}}}, ["datasets"], "datasets.x.format"),
        ({"datasets": {"x": {"format": "mvtec"}}}, ["datasets"], "datasets.x.root"),
        ({"datasets": {"x": {"format": "mvtec", "root": "d", "categories": "bottle"}}}, ["datasets"],
         "datasets.x.categories"),
        ({"synthetic": {"test_good": 0}}, ["synthetic"], "synthetic.test_good"),
        ({"backbone": {}, "bakbone": {}}, ["backbone"], "bakbone"),
        ({}, ["sae_typo"], "sae_typo"),
    ],
)
def test_bad_params_name_their_dotted_key(raw, sections, key):
    with pytest.raises(ConfigError) as err:
        parse(raw, sections)
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_lists_become_tuples_and_configs_are_frozen():
    params = parse({"datasets": {"v": {"format": "visa", "root": "/d", "categories": ["pcb1", "pcb2"]}}},
                   ["datasets"])
    assert params.datasets["v"].categories == ("pcb1", "pcb2")
    with pytest.raises(AttributeError):
        params.datasets["v"].root = "elsewhere"


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")
