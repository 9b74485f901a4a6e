"""Writing a folder a stage owns as a whole: all of the new content or none of it."""

import pytest

from pipeline.io import staged_folder


def test_the_folder_ends_up_holding_exactly_the_staged_files(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "stale.pte").write_text("old program")
    (folder / "m.fp32.xml").write_text("old")
    with staged_folder(folder) as staging:
        (staging / "m.fp32.xml").write_text("new")
        (staging / "m.fp32.card.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == ["m.fp32.card.json", "m.fp32.xml"]
    assert (folder / "m.fp32.xml").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_a_failure_leaves_the_folder_as_it_was(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "m.fp32.xml").write_text("old")
    with pytest.raises(RuntimeError, match="gate failed"), staged_folder(folder) as staging:
        (staging / "m.fp32.xml").write_text("new")
        raise RuntimeError("gate failed")
    assert [(p.name, p.read_text()) for p in folder.iterdir()] == [("m.fp32.xml", "old")]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_nothing_staged_empties_the_folder_and_creates_a_missing_one(tmp_path):
    with staged_folder(tmp_path / "new" / "out"):
        pass
    assert list((tmp_path / "new" / "out").iterdir()) == []
