import pytest

from pipeline.config import PATCH_SIZES, ConfigError, load_params, parse


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


# ------------------------------------------------------------------- names that become paths


@pytest.mark.parametrize("section, key", [("datasets", "synth a"), ("datasets", ""), ("datasets", "a/b"),
                                          ("datasets", "x;rm"), ("runs", "a to b"), ("runs", "a\tb")])
def test_keys_of_datasets_and_runs_are_plain_names(section, key):
    raw = {"datasets": {"a": {"format": "mvtec", "root": "d/a"}, "b": {"format": "mvtec", "root": "d/b"}},
           "runs": {"a_to_b": {"aux": "a", "target": "b"}}}
    raw[section][key] = raw[section].pop("a" if section == "datasets" else "a_to_b")
    with pytest.raises(ConfigError) as err:
        parse(raw, [section])
    assert str(err.value).startswith(f"{section}.{key}:") and "letters, digits, _ or -" in str(err.value)


def test_plain_keys_pass_and_int_keys_become_strings():
    params = parse({"datasets": {"mvtec-ad_2": {"format": "mvtec", "root": "d"}, 2024: {"format": "visa",
                                                                                      "root": "v"}}},
                   ["datasets"])
    assert set(params.datasets) == {"mvtec-ad_2", "2024"}


def test_synthetic_dataset_names_are_plain_names():
    with pytest.raises(ConfigError, match=r"^synthetic\.datasets\[1\]: 'b c'"):
        parse({"synthetic": {"datasets": ["a", "b c"]}}, ["synthetic"])


@pytest.mark.parametrize("name, size, hint", [("dinov2_vits14", 225, "224 or 238"),
                                              ("dinov3_vitl16", 450, "448 or 464"),
                                              ("openclip_vitl14_336", 20, "14 or 28")])
def test_image_size_must_be_a_multiple_of_the_patch(name, size, hint):
    with pytest.raises(ConfigError, match=rf"^backbone\.image_size: {size} is not a multiple of {name}'s "
                                          rf"patch size \d+ \(e\.g\. {hint}\)"):
        parse({"backbone": {"name": name, "image_size": size}}, ["backbone"])
    ok = size - size % PATCH_SIZES[name]
    assert parse({"backbone": {"name": name, "image_size": ok}}, ["backbone"]).backbone.image_size == ok


def test_patch_size_table_agrees_with_the_registry_and_the_models():
    """The table in config.py avoids importing torch at config time; here it must equal the registry
    and the patch of each real architecture (built on the meta device: no weights, no download)."""
    import open_clip
    import timm
    import torch

    from pipeline.features.backbones import BACKBONES

    assert PATCH_SIZES == {name: spec.patch_size for name, spec in BACKBONES.items()}
    for name, spec in BACKBONES.items():
        if spec.library == "timm":
            with torch.device("meta"):
                model = timm.create_model(spec.model_name, pretrained=False)
            patch = model.patch_embed.patch_size[0]
        else:
            patch = open_clip.get_model_config(spec.model_name)["vision_cfg"]["patch_size"]
        assert patch == PATCH_SIZES[name], name


@pytest.mark.parametrize("text, hint", [("1e-3", "1.0e-3"), ("5E-2", "5.0e-2"), ("2.5e4", "2.5e+4")])
def test_number_read_as_a_string_says_how_to_write_it(tmp_path, text, hint):
    path = tmp_path / "params.yaml"
    path.write_text(f"guides:\n  lr: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_params(path, ["guides"])
    assert str(err.value) == (f"guides.lr: expected a number, got the string {text!r}; YAML reads it as text: "
                              f"write {hint}")
    path.write_text(f"guides:\n  lr: {hint}\n")  # the hint really is a YAML float
    assert load_params(path, ["guides"]).guides.lr == float(text)


def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  splits: [test\n  max_pixels: 10\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line ") and "YAML syntax error" in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_params_file_is_an_error(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"params\.yaml: the params file is empty"):
        load_params(path)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".", "a\\b", "line\nbreak"])
def test_category_names_in_params_are_checked(bad):
    with pytest.raises(ConfigError, match=r"^datasets\.v\.categories\[1\]: category name"):
        parse({"datasets": {"v": {"format": "visa", "root": "r", "categories": ["ok", bad]}}}, ["datasets"])


def test_empty_category_list_is_refused():
    with pytest.raises(ConfigError, match=r"^datasets\.v\.categories: is an empty list"):
        parse({"datasets": {"v": {"format": "visa", "root": "r", "categories": []}}}, ["datasets"])


@pytest.mark.parametrize("root_b, cats_a, cats_b", [
    ("./data/a/", None, None),
    ("data//x/../a", ["p", "q"], ["q", "p"]),
])
def test_run_on_the_same_data_under_two_keys_is_refused(tmp_path, monkeypatch, root_b, cats_a, cats_b):
    monkeypatch.chdir(tmp_path)
    raw = {"datasets": {"a": {"format": "mvtec", "root": "data/a", "categories": cats_a},
                        "b": {"format": "mvtec", "root": root_b, "categories": cats_b}},
           "runs": {"a_to_b": {"aux": "a", "target": "b"}}}
    with pytest.raises(ConfigError, match=r"^runs\.a_to_b: aux 'a' and target 'b' are the same data"):
        parse(raw)
    raw["datasets"]["b"]["root"] = str(tmp_path / "data" / "a")  # absolute spelling of the same root
    with pytest.raises(ConfigError, match=r"same data"):
        parse(raw)


@pytest.mark.parametrize("change", [{"format": "folder"}, {"root": "data/b"}, {"categories": ["p"]}])
def test_runs_on_different_data_pass(change):
    raw = {"datasets": {"a": {"format": "mvtec", "root": "data/a", "categories": ["p", "q"]},
                        "b": {"format": "mvtec", "root": "data/a", "categories": ["p", "q"], **change}},
           "runs": {"a_to_b": {"aux": "a", "target": "b"}}, "aux_datasets": ["a"]}
    assert parse(raw).runs["a_to_b"].target == "b"


def test_allow_empty_masks_defaults_off_and_is_in_params_yaml():
    assert parse({}, ["data"]).data.allow_empty_masks is False
    assert load_params("params.yaml", ["data"]).data.allow_empty_masks is False
    assert parse({"data": {"allow_empty_masks": True}}, ["data"]).data.allow_empty_masks is True


# --------------------------------------------------------------------- which datasets are fitted


def _two_datasets(**extra):
    return {"datasets": {"a": {"format": "mvtec", "root": "d/a"}, "b": {"format": "folder", "root": "d/b"}},
            "runs": {"a_to_b": {"aux": "a", "target": "b"}}, **extra}


def test_aux_datasets_is_parsed_and_may_list_a_dataset_no_run_uses():
    """b is fitted for predict only: allowed."""
    params = parse(_two_datasets(aux_datasets=["a", "b"]))
    assert params.aux_datasets == ("a", "b")
    assert load_params("params.yaml").aux_datasets == ("synth_a", "synth_b")


@pytest.mark.parametrize("aux, message", [
    (["a", "c"], r"^aux_datasets\[1\]: 'c' is not a key of datasets \(a, b\)$"),
    (["a", "a"], r"^aux_datasets\[1\]: 'a' is listed twice; list each dataset once$"),
    (["a", "b c"], r"^aux_datasets\[1\]: 'b c' is not a dataset key"),
    ("a", r"^aux_datasets: expected a list of dataset keys, got 'a'$"),
    ({"a": 1}, r"^aux_datasets: expected a list"),
])
def test_bad_aux_datasets_name_the_entry(aux, message):
    with pytest.raises(ConfigError, match=message):
        parse(_two_datasets(aux_datasets=aux))


@pytest.mark.parametrize("aux, listed", [(None, "none"), ([], "none"), (["b"], "b")])
def test_every_aux_of_runs_must_be_in_aux_datasets(aux, listed):
    raw = _two_datasets() if aux is None else _two_datasets(aux_datasets=aux)
    with pytest.raises(ConfigError) as err:
        parse(raw)
    add = ", ".join([*(aux or []), "a"])
    assert str(err.value) == (f"runs.a_to_b.aux: 'a' is not listed in aux_datasets (listed: {listed}); add it "
                              f"(aux_datasets: [{add}]) so that its train_sae and fit_guides stages exist")


def test_aux_datasets_is_checked_only_with_the_sections_it_relates_to():
    """A stage that parses only its own section is not failed by another section's cross-check."""
    raw = _two_datasets(aux_datasets=["zzz"])
    assert parse(raw, ["runs"]).runs["a_to_b"].aux == "a"
    assert parse(raw, ["aux_datasets"]).aux_datasets == ("zzz",)
    with pytest.raises(ConfigError, match=r"^aux_datasets\[0\]: 'zzz' is not a key of datasets"):
        parse(raw, ["datasets", "aux_datasets"])


def test_scoring_fusion_is_one_of_the_named_rules():
    assert parse({"scoring": {"fusion": "self_dissimilarity"}}, ["scoring"]).scoring.fusion == "self_dissimilarity"
    assert parse({"scoring": {}}, ["scoring"]).scoring.fusion == "none"
    with pytest.raises(ConfigError, match=r"^scoring\.fusion: 'product' is not one of none, self_dissimilarity"):
        parse({"scoring": {"fusion": "product"}}, ["scoring"])


@pytest.mark.parametrize("key", ["image_score", "lse_temperature", "top_fraction", "fusion", "blur_sigma"])
def test_a_scoring_key_left_under_evaluate_says_where_it_moved(key):
    with pytest.raises(ConfigError, match=rf"^evaluate\.{key}: this key has moved to scoring\.{key} "):
        parse({"evaluate": {key: 1}}, ["evaluate"])
    # an unknown key that never lived there is still just unknown
    with pytest.raises(ConfigError, match=r"^evaluate\.blur: unknown key"):
        parse({"evaluate": {"blur": 1}}, ["evaluate"])


@pytest.mark.parametrize("key,value", [("sae.lr", ".inf"), ("scoring.blur_sigma", ".nan"),
                                       ("guides.temperature", "-.inf"), ("guides.l1_coef", ".nan")])
def test_a_non_finite_number_is_refused_naming_its_key(tmp_path, key, value):
    section, name = key.split(".")
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{key}: .*finite"):
        load_params(path, [section])


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("sae:\n  k: 64\n  lr: 0.001\n  k: 32\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'k'.*line 2.*line 4"):
        load_params(path, ["sae"])
    (tmp_path / "ok.yaml").write_text("sae:\n  lr: 0.002\nguides:\n  lr: 0.02\n")  # one name in two sections
    p = load_params(tmp_path / "ok.yaml", ["sae", "guides"])
    assert (p.sae.lr, p.guides.lr) == (0.002, 0.02)
