"""experiments/quickstart.ipynb executes top to bottom (so the Colab quickstart never rots), and its
install cell installs from what a user has: $SHARPAX_WHEEL, the checkout around it, an uploaded wheel."""

import importlib.util
import pathlib
import subprocess
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "quickstart.ipynb"


def test_quickstart_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    text = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "sharpax from " in text, text  # the install cell found sharpax importable
    for method in ("sgd", "sam", "vsam", "saf", "mesa"):
        assert f"{method}: test accuracy" in text, text
    images = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, "the notebook's plot produced no figure"


def test_notebook_has_no_placeholder_urls():
    text = NOTEBOOK.read_text()
    assert "github.com" not in text and "SHARPAX_REPO" not in text


@pytest.fixture
def without_sharpax(monkeypatch):
    """The install cell's view of an environment without sharpax; returns the pip commands it runs."""
    real = importlib.util.find_spec
    commands = []

    def find_spec(name, *args, **kwargs):  # sharpax "appears" once pip was called
        return None if name == "sharpax" and not commands else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, **kwargs: commands.append(cmd))
    monkeypatch.delenv("SHARPAX_WHEEL", raising=False)
    return commands


def _run_install_cell():
    cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
    assert "pip" in cell.source
    exec(compile(cell.source, "install cell", "exec"), {})  # noqa: S102 - our own notebook


def _pip(target):
    return [sys.executable, "-m", "pip", "install", "-q", f"{target}[experiments]"]


def test_install_cell_uses_the_checkout_it_lives_in(without_sharpax, monkeypatch):
    monkeypatch.chdir(ROOT / "experiments")  # where Jupyter starts the kernel
    _run_install_cell()
    assert without_sharpax == [_pip(ROOT)]


def test_install_cell_uses_an_uploaded_wheel_or_sharpax_wheel(without_sharpax, monkeypatch, tmp_path):
    uploaded = tmp_path / "sharpax-0.1.0-py3-none-any.whl"
    uploaded.write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # outside any checkout, e.g. Colab's /content
    _run_install_cell()
    assert without_sharpax == [_pip(uploaded)]
    # $SHARPAX_WHEEL wins, also inside a checkout; a wrong path is an error, not a silent fallback.
    without_sharpax.clear()
    monkeypatch.chdir(ROOT / "experiments")
    monkeypatch.setenv("SHARPAX_WHEEL", str(uploaded))
    _run_install_cell()
    assert without_sharpax == [_pip(uploaded)]
    without_sharpax.clear()
    monkeypatch.setenv("SHARPAX_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match="missing.whl is not a file"):
        _run_install_cell()
    assert without_sharpax == []


def test_install_cell_without_a_source_says_what_to_do(without_sharpax, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=r"python -m build.*SHARPAX_WHEEL.*pip install"):
        _run_install_cell()
    assert without_sharpax == []
