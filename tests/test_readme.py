"""Every Python block of the README and of docs/**/*.md runs as written (each file's blocks in
order, in one namespace, as a reader would paste them). A block that only includes a file
(``--8<-- "examples/x.py"``, the documentation site's snippet syntax) shows that file: the
file must exist and compile; the examples themselves are scripts run by hand."""

import pathlib
import re

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
GUIDES = ["getting-started.md", "recurrent.md", "reliability.md"]  # the pages taught by running code


def blocks(path):
    return BLOCK.findall(path.read_text())


def included(code):
    """The files a block includes, or None when it is code to run."""
    lines = [line.strip() for line in code.strip().splitlines()]
    paths = [INCLUDE.match(line) for line in lines]
    return [m.group(1) for m in paths] if lines and all(paths) else None


def test_the_readme_and_the_guides_have_python_blocks():
    # the README's "Use" example, and each guide teaches by code that runs
    assert any("kalnat.fit(" in code for code in blocks(ROOT / "README.md"))
    for name in GUIDES:
        assert len(blocks(ROOT / "docs" / name)) >= 1, name
    assert len(blocks(ROOT / "docs" / "getting-started.md")) >= 5


def test_the_readmes_links_to_the_docs_exist():
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert len(links) >= 5
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README.md links to missing pages: {missing}"


@pytest.mark.parametrize("path", [p for p in FILES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch, capsys):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, code in enumerate(blocks(path)):
        files = included(code)
        if files is not None:
            for f in files:
                compile((ROOT / f).read_text(), f, "exec")
            continue
        try:
            exec(compile(code, f"{path.name}, python block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"{path.name}, python block {i + 1} failed: {type(err).__name__}: {err}\n{code}") from err
        # a result a reader would copy is never NaN (the river regressor's example once printed
        # "nan nan"), unless the block itself works with NaN (a bad row refused, in reliability.md)
        printed = capsys.readouterr().out
        assert re.search(r"\bnan\b", code, re.I) or not re.search(r"\bnan\b", printed, re.I), \
            f"{path.name}, python block {i + 1} printed NaN:\n{printed}"


def test_every_command_and_option_is_in_the_commands_page():
    import click

    from kalnat.cli import cli

    page = (ROOT / "docs" / "cli.md").read_text()
    missing = []
    for name, command in cli.commands.items():
        if f"kalnat {name}" not in page:
            missing.append(f"kalnat {name}")
        for param in command.params:
            if isinstance(param, click.Option):
                missing += [f"kalnat {name} {o}" for o in param.opts + param.secondary_opts if o not in page]
    assert not missing, f"docs/cli.md does not document: {missing}"
