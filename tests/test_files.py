"""Files are written whole or not at all."""

import json

import pytest

from acx_ramanujan.files import write_atomically, write_json_atomically, write_text_atomically


def test_writes_replace_the_target_and_leave_no_temporary(tmp_path):
    target = tmp_path / "deep" / "results.json"
    write_json_atomically(target, {"loss": float("nan"), "step": 3})
    write_text_atomically(tmp_path / "card.md", "# card\n")
    assert json.loads(target.read_text().replace("NaN", "null")) == {"loss": None, "step": 3}
    assert (tmp_path / "card.md").read_text() == "# card\n"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["card.md", "results.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "eval_results.json"
    target.write_text("old")

    def half_then_fail(temporary):
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]
