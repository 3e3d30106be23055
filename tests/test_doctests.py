"""Every public docstring example in sharpax (and experiments.stats, models, input_pipeline) runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import sharpax

MODULES = sorted(
    m.name for m in pkgutil.iter_modules(sharpax.__path__, "sharpax.") if not m.name.startswith("sharpax._")
) + ["experiments.stats", "experiments.models", "experiments.input_pipeline", "experiments.lsq"]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
