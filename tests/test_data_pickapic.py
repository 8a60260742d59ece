"""The pickapic_v2 builder on a small parquet made here: kept rows, winner order, skipped bad input."""
import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image


def _jpg(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


ROWS = [  # caption, jpg_0 colour, jpg_1 colour, label_0
    dict(caption="a cat", jpg_0=_jpg((250, 0, 0)), jpg_1=_jpg((0, 250, 0)), label_0=1.0, label_1=0.0,
         image_0_uid="u0", image_1_uid="u1"),
    dict(caption="a dog", jpg_0=_jpg((250, 0, 0)), jpg_1=_jpg((0, 0, 250)), label_0=0.0, label_1=1.0,
         image_0_uid="u2", image_1_uid="u3"),
    dict(caption="a tie", jpg_0=_jpg((9, 9, 9)), jpg_1=_jpg((99, 99, 99)), label_0=0.5, label_1=0.5,
         image_0_uid="u4", image_1_uid="u5"),
    dict(caption="corrupt", jpg_0=_jpg((9, 9, 9))[:60], jpg_1=_jpg((99, 99, 99)), label_0=1.0, label_1=0.0,
         image_0_uid="u6", image_1_uid="u7"),
    dict(caption="", jpg_0=_jpg((9, 9, 9)), jpg_1=_jpg((99, 99, 99)), label_0=1.0, label_1=0.0,
         image_0_uid="u8", image_1_uid="u9"),
    dict(caption="a bird", jpg_0=_jpg((0, 0, 250)), jpg_1=_jpg((250, 250, 250)), label_0=0.0, label_1=1.0,
         image_0_uid="u10", image_1_uid="u11"),
]


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pickapic_parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), d / "train-00000-of-00003-abc.parquet")
    no_jpg1 = [{k: v for k, v in ROWS[0].items() if k != "jpg_1"}]
    pq.write_table(pa.Table.from_pylist(no_jpg1), d / "train-00001-of-00003-abc.parquet")
    (d / "train-00002-of-00003-abc.parquet").write_bytes(b"this is not parquet")
    sub = d / "data"
    sub.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), sub / "test_unique-00000-of-00001-x.parquet")
    (d / "README.md").write_text("not a shard")
    return d


@pytest.fixture(scope="module")
def built(parquet_dir, tmp_path_factory):
    from jaxpref.data import build_pickapic

    return build_pickapic(parquet_dir, tmp_path_factory.mktemp("tfds"), resolution=16)


def _decode(b):
    return np.asarray(Image.open(io.BytesIO(b)))


def test_builder_keeps_exactly_the_good_rows_winner_first(built, capsys):
    from jaxpref.data import open_source

    assert built.builder_config.name == "resolution16"
    src = open_source("pickapic_v2/resolution16", "train", pathlib.Path(built.data_dir).parents[2])
    got = sorted((src[i] for i in range(len(src))), key=lambda e: e["caption"])
    assert [e["caption"] for e in got] == [b"a bird", b"a cat", b"a dog"]
    expect = {b"a cat": ("u0", "u1", 0, (250, 0, 0)), b"a dog": ("u3", "u2", 1, (0, 0, 250)),
              b"a bird": ("u11", "u10", 1, (250, 250, 250))}
    for e in got:
        uid0, uid1, swapped, winner_rgb = expect[e["caption"]]
        assert (e["image_0_uid"].decode(), e["image_1_uid"].decode(), e["swapped"]) == (uid0, uid1, swapped)
        assert (e["label_0"], e["label_1"]) == (1.0, 0.0)
        assert np.isnan(e["reward_0"]) and np.isnan(e["reward_1"])
        im = _decode(e["jpg_0"])
        assert im.shape == (16, 16, 3)  # resized shorter side + center crop
        np.testing.assert_allclose(im.reshape(-1, 3).mean(0), winner_rgb, atol=6)
    assert src.kind == "pairs"
    test = open_source("pickapic_v2/resolution16", "test_unique", pathlib.Path(built.data_dir).parents[2])
    assert len(test) == 2


def test_builder_reports_skips_and_ties(built):
    report = json.loads((pathlib.Path(built.data_dir) / "build_report_train.json").read_text())
    assert report["kept"] == 3
    assert report["dropped"] == {"ties": 1}
    skipped = {(s["file"], s["row"], s["reason"].split(":")[0]) for s in report["skipped"]}
    assert skipped == {
        ("train-00000-of-00003-abc.parquet", 3, "corrupt image"),
        ("train-00000-of-00003-abc.parquet", 4, "empty caption"),
        ("train-00001-of-00003-abc.parquet", None, "missing column"),
        ("train-00002-of-00003-abc.parquet", None, "unreadable parquet"),
    }
    assert report["summary"].startswith("pickapic_v2/resolution16[train]: kept 3; dropped 1 ties; skipped 2 rows and 2 files")


def test_keep_ties_and_original_order(parquet_dir, tmp_path):
    from jaxpref.data import build_pickapic, open_source

    b = build_pickapic(parquet_dir, tmp_path, resolution=None, drop_ties=False, winner_first=False, splits=["train"])
    # A build with other settings is its own dataset; reading the default names what the data_dir holds.
    with pytest.raises(ValueError) as missing:
        open_source("pickapic_v2", "train", tmp_path)
    from jaxpref import console   # the command's one line (300 characters) still names the build
    assert f"holds pickapic_v2/{b.builder_config.name}, not pickapic_v2/default" in console.one_line(missing.value)
    src = open_source(f"pickapic_v2/{b.builder_config.name}", "train", tmp_path)
    by_cap = {src[i]["caption"]: src[i] for i in range(len(src))}
    assert set(by_cap) == {b"a cat", b"a dog", b"a tie", b"a bird"}
    assert by_cap[b"a tie"]["label_0"] == 0.5 and by_cap[b"a dog"]["label_0"] == 0.0
    assert by_cap[b"a dog"]["jpg_0"] == ROWS[1]["jpg_0"]  # original bytes kept without resolution


def test_no_parquet_files_is_a_clear_error(tmp_path):
    from jaxpref.data import build_pickapic

    with pytest.raises(ValueError, match="no parquet shards under"):
        build_pickapic(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="is not a folder"):
        build_pickapic(tmp_path / "missing", tmp_path / "out")


def _records(data_dir, split="train"):
    from jaxpref.data import open_source

    src = open_source("pickapic_v2/resolution16_splitstrain", split, data_dir)
    as_bytes = lambda v: v if isinstance(v, bytes) else np.asarray(v).tobytes()  # noqa: E731 - NaN == NaN here
    return sorted(tuple((k, as_bytes(v)) for k, v in sorted(src[i].items())) for i in range(len(src)))


def test_from_a_hub_dataset_cache_builds_what_the_local_folder_builds(tmp_path, monkeypatch):
    """--source=org/name reads the shards of a hub dataset repository from the Hugging Face cache (here built by the
    test, offline; the repo keeps its shards under data/ as yuvalkirstain/pickapic_v2 does): the same dataset as
    from a folder of the same files; --max_shards takes the first shards only, and is never mistaken for the full
    build."""
    import hub_cache
    from jaxpref.data import build_pickapic, pickapic

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    shards = {}
    for i, rows in enumerate((ROWS[:3], ROWS[3:])):
        path = tmp_path / "local" / f"train-0000{i}-of-00002-abc.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        shards[f"data/{path.name}"] = path
    test_shard = tmp_path / "local" / "test_unique-00000-of-00001-x.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), test_shard)
    hub_cache.add_repo(tmp_path / "hf_home", "someorg/pickapic_v2", {**shards, "README.md": b"card",
                                                                     f"data/{test_shard.name}": test_shard},
                       repo_type="dataset")

    said = []
    build_pickapic("someorg/pickapic_v2", tmp_path / "from_hub", resolution=16, splits=["train"], announce=said.append)
    build_pickapic(tmp_path / "local", tmp_path / "from_folder", resolution=16, splits=["train"])
    from_hub = _records(tmp_path / "from_hub")
    assert from_hub == _records(tmp_path / "from_folder") and len(from_hub) == 3   # a cat, a dog, a bird
    assert said[0].startswith("pickapic_v2 from someorg/pickapic_v2: train 2 of 2 shards (")

    build_pickapic("someorg/pickapic_v2", tmp_path / "slice", resolution=16, splits=["train"], max_shards=1)
    first = pickapic.shards_by_split([shards["data/train-00000-of-00002-abc.parquet"]], ["train"])
    build_pickapic(first["train"][0].parent, tmp_path / "slice_folder", resolution=16, splits=["train"], max_shards=1)
    assert _records(tmp_path / "slice") == _records(tmp_path / "slice_folder") and len(_records(tmp_path / "slice")) == 2
    with pytest.raises(ValueError, match="built with max_shards=1, not None"):
        build_pickapic("someorg/pickapic_v2", tmp_path / "slice", resolution=16, splits=["train"])
    with pytest.raises(ValueError, match=r"^--source='someorg/not-cached': .*HF_HUB_OFFLINE=0"):
        build_pickapic("someorg/not-cached", tmp_path / "none", resolution=16, splits=["train"])


def test_the_command_names_a_split_the_source_lacks(parquet_dir, tmp_path, capsys):
    """The source holds train and test_unique shards only: the build says validation_unique is missing."""
    from jaxpref.data import pickapic

    pickapic.main([f"--source={parquet_dir}", f"--data_dir={tmp_path}", "--resolution=16"])
    out = capsys.readouterr().out
    assert "pickapic_v2/resolution16: {'train': 3, 'test_unique': 2}" in out, out
    assert "no shards of ['validation_unique']" in out, out
