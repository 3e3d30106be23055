"""Every public transform rejects a NaN or infinite hyperparameter by name (comparisons with NaN are False)."""

import math
import re

import pytest

import sharpax

BAD = [math.nan, math.inf, -math.inf]

CASES = {
    "sam rho": lambda v: sharpax.sam(v),
    "sam eta": lambda v: sharpax.sam(0.05, adaptive=True, eta=v),
    "looksam alpha": lambda v: sharpax.looksam(0.05, alpha=v),
    "vsam rho": lambda v: sharpax.vsam(v),
    "vsam max_rate": lambda v: sharpax.vsam(0.05, max_rate=v),
    "vsam reuse_decay": lambda v: sharpax.vsam(0.05, reuse_decay=v),
    "vsam sensitivity[0]": lambda v: sharpax.vsam(0.05, sensitivity=(v, 0.1)),
    "gsam alpha": lambda v: sharpax.gsam(0.05, alpha=v),
    "esam beta": lambda v: sharpax.esam(0.05, beta=v),
    "ae_sam decay": lambda v: sharpax.ae_sam(0.05, total_steps=10, decay=v),
    "ss_sam probability": lambda v: sharpax.ss_sam(0.05, probability=v),
    "msam rho": lambda v: sharpax.msam(0.1, rho=v),
    "msam learning_rate": lambda v: sharpax.msam(v),
    "saf temperature": lambda v: sharpax.saf(10, 2, temperature=v),
    "saf weight": lambda v: sharpax.saf(10, 2, weight=v),
    "mesa decay": lambda v: sharpax.mesa(v),
    "mesa temperature": lambda v: sharpax.mesa(0.9, temperature=v),
    "bounded max_fraction": lambda v: sharpax.schedules.bounded(
        sharpax.schedules.every_k(2), max_fraction=v
    ),
}


@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_non_finite_hyperparameters_raise_naming_the_argument(case, value):
    name = case.split(" ", 1)[1]
    with pytest.raises(ValueError, match=re.escape(name)):
        CASES[case](value)
