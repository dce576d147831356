"""Every figure quoted next to a results/<run>.json link in a README is that file's figure.

A README table row that links a chapter's `results/<name>.json` (written by data/results.py
from the run's own metrics.json) must quote, in the cell holding the link, only numbers that
the file holds at the precision shown (0.814 -> a metric that rounds to 0.814; 99.04% -> one
that rounds to 0.9904), and its command cell must be the command stored in the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
READMES = [REPO / "README.md", *sorted(REPO.glob("0*/README.md"))]
RESULT_LINK = re.compile(r"\]\(([^)]*results/[^)]+\.json)\)")
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+)(%?)")


def flat_numbers(value) -> list[float]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, list | tuple):
        return [x for item in value for x in flat_numbers(item)]
    if isinstance(value, dict):
        return [x for item in value.values() for x in flat_numbers(item)]
    return []


def quoted_rows():
    for readme in READMES:
        for line in readme.read_text().splitlines():
            if line.startswith("|") and RESULT_LINK.search(line):
                yield readme, line


def shown(number: str, percent: bool, value: float) -> bool:
    decimals = len(number.split(".")[1])
    return f"{value * 100 if percent else value:.{decimals}f}" == number


def check_row(readme: Path, line: str) -> list[str]:
    """The problems of one table row: in a cell, the numbers before each results link (back
    to the previous link) are that file's; the next cell's k-th command is the k-th file's."""
    problems = []
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    for index, cell in enumerate(cells):
        targets = RESULT_LINK.findall(cell)
        if not targets:
            continue
        texts = RESULT_LINK.split(cell)[:-1][::2]  # the text before each link
        commands = re.findall(r"`(python [^`]+)`", cells[index + 1] if index + 1 < len(cells) else "")
        for k, (target, text) in enumerate(zip(targets, texts, strict=True)):
            path = (readme.parent / target).resolve()
            if not path.is_file():
                problems.append(f"{target}: no such file")
                continue
            record = json.loads(path.read_text())
            values = flat_numbers(record["metrics"])
            # an interval "98.83–99.21%" is in percent when its upper end is
            text = re.sub(r"(\d+\.\d+)–(\d+\.\d+)%", r"\1% \2%", text)
            for number, percent in NUMBER.findall(text):
                if not any(shown(number, bool(percent), v) for v in values):
                    problems.append(f"{number}{percent} is not in {target}")
            stored = re.sub(r" --data-dir \S+", "", record["command"])
            command = commands[k] if len(commands) == len(targets) else (commands or [None])[0]
            if command is not None and command != stored:
                problems.append(f"command {command!r} is not {target}'s {stored!r}")
    return problems


ROWS = list(quoted_rows())


@pytest.mark.parametrize(("readme", "line"), ROWS,
                         ids=[f"{r.parent.name}:{i}" for i, (r, _) in enumerate(ROWS)])
def test_each_quoted_figure_is_its_results_file(readme, line):
    assert not check_row(readme, line)


def test_the_checker_catches_a_wrong_figure_and_a_wrong_command(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run.json").write_text(json.dumps(
        {"command": "python x/train.py --data-dir /d --seed 1",
         "metrics": {"test_accuracy": 0.99041, "test_accuracy_ci95": [0.98829, 0.99214]}}))
    readme = tmp_path / "README.md"
    good = "| x | 99.04% (98.83–99.21%) [결과](results/run.json) | `python x/train.py --seed 1` |"
    assert check_row(readme, good) == []
    assert check_row(readme, good.replace("99.04%", "99.05%")) == ["99.05% is not in results/run.json"]
    assert check_row(readme, good.replace("98.83–99.21%", "98.83–99.22%"))
    assert check_row(readme, good.replace("--seed 1", "--seed 2"))
    assert check_row(readme, good.replace("run.json", "other.json")) == ["results/other.json: no such file"]
    # two runs in one cell: each figure is checked against the file linked after it
    (tmp_path / "results" / "two.json").write_text(json.dumps(
        {"command": "python x/train.py --seed 2", "metrics": {"map50": 0.8312}}))
    both = ("| x | 99.04% [a](results/run.json) / 0.831 [b](results/two.json) | "
            "`python x/train.py --seed 1`, `python x/train.py --seed 2` |")
    assert check_row(readme, both) == []
    assert check_row(readme, both.replace("0.831", "0.832")) == ["0.832 is not in results/two.json"]
    assert check_row(readme, both.replace("--seed 2`", "--seed 3`"))


def test_every_front_page_result_row_has_its_results_file_or_says_why():
    """Rows of the front page's results table link their run's record, or say that the
    figure was recorded before the records existed (to be rerun)."""
    text = (REPO / "README.md").read_text()
    table = text.split("## 결과 요약 (Results)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| [")]
    assert len(rows) == 7
    for row in rows:
        assert RESULT_LINK.search(row) or "기록만 (recorded)" in row, row
