"""Every Python block of the README and of docs/*.md runs as written (each file's blocks in
order, in one namespace, as a reader would paste them)."""

import pathlib
import re

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path):
    return BLOCK.findall(path.read_text())


def test_the_readme_has_python_blocks():
    assert len(blocks(ROOT / "README.md")) >= 6


@pytest.mark.parametrize("path", [p for p in FILES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, code in enumerate(blocks(path)):
        try:
            exec(compile(code, f"{path.name}, python block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"{path.name}, python block {i + 1} failed: {type(err).__name__}: {err}\n{code}") from err
