"""Every Python block of the README and of docs/**/*.md runs as written (each file's blocks in
order, in one namespace, as a reader would paste them). A block that only includes a file
(``--8<-- "examples/x.py"``, the documentation site's snippet syntax) shows that file: the
file must exist and compile; the examples themselves are scripts run by hand."""

import importlib
import pathlib
import re
import shlex
import sys

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


#: The files whose statistical tests are marked slow.
SLOW_FILES = ("test_efficiency", "test_sklearn", "test_families", "test_stability", "test_structured", "test_recurrent",
              "test_recurrent_reliability", "test_diagonal", "test_noise_units", "test_variance_bound",
              "test_regression_default")


def test_the_slow_statistical_tests_are_marked_and_the_readmes_command_runs_them():
    """``slow`` is a registered mark (with ``--strict-markers`` a misspelt one is an error) that
    the configured options do not deselect: ``python -m pytest`` (the README's command, CI's)
    runs those tests, and ``-m "not slow"`` leaves them out of a quick run. Each file above marks
    its statistical tests."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11 on) the project's options, not this run's
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "slow" in [line.split(":")[0].strip() for line in options["markers"]]
    addopts = shlex.split(options["addopts"])
    assert "--strict-markers" in addopts
    assert not any(a == "-m" or (a.startswith("-m") and not a.startswith("--")) for a in addopts), addopts
    for name in SLOW_FILES:
        module = sys.modules.get(name) or importlib.import_module(name)
        marked = [fn for fn in vars(module).values()
                  if callable(fn) and any(m.name == "slow" for m in getattr(fn, "pytestmark", []))]
        assert marked, f"tests/{name}.py marks no test slow"
