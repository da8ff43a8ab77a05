import numpy as np
import pytest

from pipeline.features import store
from pipeline.features.store import StoreError, StoreLayout

LAYOUT = StoreLayout(n_images=7, n_tokens=4, dim=3, mask_size=5, chunk_images=3)
ATTRS = {"backbone": "b", "weights_sha256": "abc", "layer": 12, "image_size": 70, "grid": (2, 2), "paths": ["x"] * 7}


def chunk_arrays(layout, chunk, seed=0):
    start, stop = layout.chunk_range(chunk)
    rng = np.random.default_rng(seed + chunk)
    n = stop - start
    return {
        "tokens": rng.standard_normal((n, layout.n_tokens, layout.dim)).astype(np.float16),
        "cls": rng.standard_normal((n, layout.dim)).astype(np.float16),
        "masks": rng.integers(0, 2, (n, layout.mask_size, layout.mask_size), dtype=np.uint8),
        "images": rng.integers(0, 256, (n, layout.mask_size, layout.mask_size, 3), dtype=np.uint8),
        "labels": rng.integers(0, 2, n, dtype=np.uint8),
        "category": np.full(n, chunk, np.int16),
        "defect": np.arange(n, dtype=np.int16),
    }


def write_all(path, layout=LAYOUT, attrs=ATTRS):
    group, pending = store.prepare(path, layout, attrs)
    for c in pending:
        store.write_chunk(group, layout, c, chunk_arrays(layout, c))
    store.finalize(group, path)


def test_layout_chunks_cover_every_image_once():
    ranges = [LAYOUT.chunk_range(c) for c in range(LAYOUT.n_chunks)]
    assert LAYOUT.n_chunks == 3 and ranges == [(0, 3), (3, 6), (6, 7)]


def test_round_trip_and_contract(tmp_path):
    path = tmp_path / "features" / "d"
    write_all(path)
    fs = store.open_store(path, expect={"backbone": "b", "layer": 12, "grid": [2, 2]})
    assert fs.attrs["complete"] is True and fs.attrs["schema"] == store.SCHEMA
    assert fs.tokens.dtype == np.float16 and fs.tokens.shape == (7, 4, 3)
    assert fs.tokens.chunks == (3, 4, 3)  # chunked along N only
    assert fs.masks.dtype == np.uint8 and fs.labels.dtype == np.uint8 and fs.category.dtype == np.int16
    expected = np.concatenate([chunk_arrays(LAYOUT, c)["tokens"] for c in range(3)])
    np.testing.assert_array_equal(fs.tokens[:], expected)
    assert [start for start, _ in fs.iter_chunks([2, 0])] == [6, 0]
    assert "_done" not in fs.group and not list(path.rglob("*.partial"))


def test_reader_refuses_incomplete_store(tmp_path):
    group, _ = store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    store.write_chunk(group, LAYOUT, 0, chunk_arrays(LAYOUT, 0))
    with pytest.raises(StoreError, match="incomplete"):
        store.open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="never written"):
        store.finalize(group, tmp_path / "s")


@pytest.mark.parametrize("key, value", [("backbone", "other"), ("weights_sha256", "def"), ("layer", 11),
                                        ("image_size", 448)])
def test_reader_names_the_disagreeing_attr(tmp_path, key, value):
    write_all(tmp_path / "s")
    with pytest.raises(StoreError, match=f"attr '{key}'"):
        store.open_store(tmp_path / "s", expect={key: value})


def test_missing_store_is_named(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        store.open_store(tmp_path / "nothing")


def test_resume_skips_written_chunks_and_matches(tmp_path):
    path = tmp_path / "s"
    group, pending = store.prepare(path, LAYOUT, ATTRS)
    assert pending == [0, 1, 2]
    store.write_chunk(group, LAYOUT, 1, chunk_arrays(LAYOUT, 1))
    # a half-written chunk 2 (tokens only, no done bit) must be redone
    group["tokens"][6:7] = np.ones((1, 4, 3), np.float16)
    group, pending = store.prepare(path, LAYOUT, ATTRS)
    assert pending == [0, 2]
    for c in pending:
        store.write_chunk(group, LAYOUT, c, chunk_arrays(LAYOUT, c))
    store.finalize(group, path)
    write_all(tmp_path / "ref")
    a, b = store.open_store(path), store.open_store(tmp_path / "ref")
    for name in LAYOUT.shapes():
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])


def test_complete_matching_store_is_kept(tmp_path):
    write_all(tmp_path / "s")
    _, pending = store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    assert pending == []


@pytest.mark.parametrize("change", ["attrs", "layout"])
def test_changed_config_starts_afresh(tmp_path, change, caplog):
    write_all(tmp_path / "s")
    attrs = {**ATTRS, "weights_sha256": "new"} if change == "attrs" else ATTRS
    layout = StoreLayout(7, 4, 3, 5, 2) if change == "layout" else LAYOUT
    group, pending = store.prepare(tmp_path / "s", layout, attrs)
    assert pending == list(range(layout.n_chunks))
    assert group.attrs["complete"] is False and not group["tokens"][:].any()
    assert "afresh" in caplog.text


def test_store_without_attrs_is_recreated(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "s"), mode="w", zarr_format=3)  # killed right after creating the group
    _, pending = store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    assert pending == [0, 1, 2]


def test_write_chunk_checks_shapes(tmp_path):
    group, _ = store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    arrays = chunk_arrays(LAYOUT, 2)
    arrays["tokens"] = arrays["tokens"][:, :2]
    with pytest.raises(ValueError, match="tokens has shape"):
        store.write_chunk(group, LAYOUT, 2, arrays)


# ------------------------------------------------------------------------------------------------
# prepare/_create delete only what this pipeline wrote (a group with our `schema`
# attr, a store whose creation was interrupted, or an empty folder) and refuse anything else.


def _tree(path):
    """{relative path: bytes or None for a folder} of everything under ``path``."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_folder_with_a_users_file_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"not a feature store.*1 entr.*NOTES\.txt"):
        store.prepare(out, LAYOUT, ATTRS)
    assert _tree(out) == {"NOTES.txt": b"mine"}


def test_dataset_tree_is_refused_and_kept(tmp_path):
    from tests.conftest import make_mvtec_tree

    tree = make_mvtec_tree(tmp_path / "tree", n_good=1, n_bad=1, size=16)
    before = _tree(tree)
    with pytest.raises(StoreError, match=r"2 entries.*alpha, beta"):
        store.prepare(tree, LAYOUT, ATTRS)
    assert _tree(tree) == before


def test_create_refuses_a_foreign_folder_too(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "NOTES.txt").write_text("mine")
    with pytest.raises(StoreError, match="NOTES.txt"):
        store._create(tmp_path / "out", LAYOUT, ATTRS)
    assert (tmp_path / "out" / "NOTES.txt").read_text() == "mine"


def test_a_file_in_place_of_the_store_is_refused(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(StoreError, match="not a folder"):
        store.prepare(tmp_path / "out", LAYOUT, ATTRS)
    assert (tmp_path / "out").read_text() == "mine"


def test_zarr_group_of_someone_else_is_refused(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "s"), mode="w", zarr_format=3)
    group.attrs["owner"] = "another tool"
    group.create_array("tokens", shape=(2,), dtype="uint8")
    with pytest.raises(StoreError, match="no 'schema' attr"):
        store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    assert dict(zarr.open_group(str(tmp_path / "s"), mode="r").attrs) == {"owner": "another tool"}


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "s").mkdir()
    write_all(tmp_path / "s")
    assert store.open_store(tmp_path / "s").n_images == 7


def _interrupted(path, names):
    """A store whose creation was killed after creating the arrays ``names`` (attrs never written)."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name in names:
        shape, dtype = LAYOUT.shapes()[name]
        group.create_array(name, shape=shape, chunks=(3,) + shape[1:], dtype=dtype, fill_value=0)
    return group


def test_interrupted_creation_with_arrays_is_recreated(tmp_path):
    _interrupted(tmp_path / "s", ["tokens", "cls", "masks"])
    _, pending = store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    assert pending == [0, 1, 2]
    write_all(tmp_path / "s")
    assert store.open_store(tmp_path / "s").attrs["schema"] == store.SCHEMA


@pytest.mark.parametrize("extra", ["file", "array", "chunk"])
def test_interrupted_looking_store_with_anything_more_is_refused(tmp_path, extra):
    group = _interrupted(tmp_path / "s", ["tokens", "cls"])
    if extra == "file":
        (tmp_path / "s" / "NOTES.txt").write_text("mine")
    elif extra == "array":  # an array name that is not the layout's
        group.create_array("embeddings", shape=(2,), dtype="uint8")
    else:  # written data: _create never writes a chunk before the attrs
        group["tokens"][0] = np.ones((4, 3), np.float16)
    before = _tree(tmp_path / "s")
    with pytest.raises(StoreError, match="not a feature store"):
        store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    assert _tree(tmp_path / "s") == before


@pytest.mark.parametrize("schema", [1, store.SCHEMA])
def test_store_of_ours_with_an_old_schema_or_other_attrs_is_recreated(tmp_path, schema, caplog):
    import zarr

    write_all(tmp_path / "s")
    zarr.open_group(str(tmp_path / "s"), mode="r+").attrs.update({"schema": schema, "backbone": "old"})
    group, pending = store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    assert pending == [0, 1, 2] and group.attrs["schema"] == store.SCHEMA and group.attrs["backbone"] == "b"
    assert "afresh" in caplog.text


def test_store_of_a_newer_schema_is_refused_not_downgraded(tmp_path):
    import zarr

    write_all(tmp_path / "s")
    zarr.open_group(str(tmp_path / "s"), mode="r+").attrs["schema"] = store.SCHEMA + 1
    before = _tree(tmp_path / "s")
    with pytest.raises(StoreError, match=f"schema {store.SCHEMA + 1}, newer"):
        store.prepare(tmp_path / "s", LAYOUT, ATTRS)
    assert _tree(tmp_path / "s") == before


def test_write_fills_what_an_unlabelled_set_of_normal_images_holds(tmp_path):
    tokens = np.random.default_rng(0).standard_normal((5, 4, 3)).astype(np.float16)
    layout = store.StoreLayout(5, 4, 3, mask_size=6, chunk_images=2)
    asked = []

    def chunk(a, b):
        asked.append((a, b))
        return {"tokens": tokens[a:b], "labels": np.array([1] * (b - a), np.uint8)}

    attrs = {"dataset": "t", "backbone": "none", "weights_sha256": "0", "layer": -1, "image_size": 6, "grid": [2, 2]}
    got = store.write(tmp_path / "s", layout, attrs, chunk)
    assert asked == [(0, 2), (2, 4), (4, 5)] and got.attrs["complete"] is True
    np.testing.assert_array_equal(got.tokens[:], tokens)
    np.testing.assert_array_equal(got.cls[:], tokens.mean(axis=1))  # the mean patch token
    assert got.labels[:].tolist() == [1] * 5  # given arrays are kept
    assert not got.masks[:].any() and not got.images[:].any() and got.masks.shape == (5, 6, 6)
    assert not got.category[:].any() and not got.defect[:].any()


@pytest.mark.parametrize("array", ["tokens", "cls", "masks", "images", "labels", "category", "defect"])
def test_a_chunk_file_deleted_from_a_complete_store_is_refused_naming_it(tmp_path, array):
    path = tmp_path / "s"
    write_all(path)
    victim = sorted((path / array / "c").rglob("*"))
    victim = [f for f in victim if f.is_file()][1]  # chunk 1 of that array
    rel = victim.relative_to(path).as_posix()
    victim.unlink()
    with pytest.raises(StoreError, match=f"array '{array}': chunk file {rel} is missing"):
        store.open_store(path)
    # prepare sees the damage too and starts afresh instead of calling the store complete
    group, pending = store.prepare(path, LAYOUT, ATTRS)
    assert pending == [0, 1, 2]


def test_a_truncated_chunk_file_is_refused_with_both_sizes(tmp_path):
    path = tmp_path / "s"
    write_all(path)
    victim = next(f for f in sorted((path / "tokens" / "c").rglob("*")) if f.is_file())
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    with pytest.raises(StoreError, match=f"has {size // 2} bytes, {size} when the store was finalized"):
        store.open_store(path)


def test_a_chunk_zarr_never_wrote_is_not_missing(tmp_path):
    # all-zero masks equal the fill value, so zarr writes no chunk file for them: nothing to miss
    layout = store.StoreLayout(4, 2, 3, mask_size=5, chunk_images=2)
    attrs = {"dataset": "t", "backbone": "none", "weights_sha256": "0", "layer": -1, "image_size": 5, "grid": [1, 2]}
    tokens = np.ones((4, 2, 3), np.float16)
    got = store.write(tmp_path / "s", layout, attrs, lambda a, b: {"tokens": tokens[a:b]})
    recorded = got.attrs[store.CHUNK_FILES]
    assert not any(k.startswith("masks/") for k in recorded)
    assert {"tokens/c/0/0/0", "tokens/c/1/0/0"} <= set(recorded)
    assert store.open_store(tmp_path / "s").n_images == 4


def test_a_store_finalized_before_the_chunk_list_existed_still_opens(tmp_path):
    path = tmp_path / "s"
    write_all(path)
    group = store.open_for_writing(path)
    del group.attrs[store.CHUNK_FILES]
    assert store.open_store(path).n_images == 7


def test_a_corrupt_zarr_json_is_one_line(tmp_path):
    path = tmp_path / "s"
    write_all(path)
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    with pytest.raises(StoreError, match="zarr.json cannot be read"):
        store.open_store(path)
    path = tmp_path / "t"
    write_all(path)
    (path / "tokens" / "zarr.json").unlink()
    with pytest.raises(StoreError, match="an array's metadata cannot be read"):
        store.open_store(path)


def test_a_paths_attr_shorter_than_the_store_is_refused(tmp_path):
    path = tmp_path / "s"
    write_all(path, attrs={**ATTRS, "paths": ["x"] * 5})
    with pytest.raises(StoreError, match="attr 'paths' holds 5 entries for 7 images"):
        store.open_store(path)
