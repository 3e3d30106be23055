"""Bad input raises by name: NaN/inf hyperparameters (comparisons with NaN are False), and a
grad_fn output or cached direction of another shape (it would broadcast into the update)."""

import math
import re

import jax.numpy as jnp
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


SAM_TYPE = {  # the transforms that call grad_fn, with a SAM step on their first update
    "sam": lambda: sharpax.sam(0.05),
    "looksam": lambda: sharpax.looksam(0.05),
    "vsam": lambda: sharpax.vsam(0.05, window=4, blocks=2),
    "gsam": lambda: sharpax.gsam(0.05, alpha=0.1),
    "esam": lambda: sharpax.esam(0.05, beta=1.0, gamma=1.0),
    "ae_sam": lambda: sharpax.ae_sam(0.05, total_steps=10),
    "ss_sam": lambda: sharpax.ss_sam(0.05, probability=1.0),
}


def _mismatch_cases():

    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    wrong = {"a": jnp.ones((1, 3)), "b": jnp.ones((2, 2))}  # would broadcast silently
    return params, wrong


@pytest.mark.parametrize(
    "make", ["sam", "looksam", "vsam", "gsam", "esam", "ae_sam", "ss_sam"], ids=str
)
def test_grad_fn_output_of_another_shape_raises_naming_the_leaf(make):

    params, wrong = _mismatch_cases()
    opt = SAM_TYPE[make]()
    kwargs = {"grad_fn": lambda p: wrong}
    if make in ("looksam", "vsam", "ss_sam", "ae_sam"):
        kwargs["sam_step"] = True
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"\['a'\].*\(1, 3\)"):
        opt.update(params, state, params, **kwargs)


@pytest.mark.parametrize("make", ["looksam", "vsam"])
def test_reuse_step_cache_of_another_shape_raises_naming_the_leaf(make):
    params, wrong = _mismatch_cases()
    opt = getattr(sharpax, make)(0.05)
    state = opt.init(wrong)  # the cache was built for other params
    with pytest.raises(ValueError, match=r"\['a'\]"):
        opt.update(params, state, params, sam_step=False)


@pytest.mark.parametrize("make", ["sam", "looksam", "vsam", "gsam", "esam"])
def test_grad_fn_output_that_is_not_floating_point_raises_naming_the_leaf(make):
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    opt = SAM_TYPE[make]()
    wrong = {"a": jnp.ones(3), "b": jnp.ones((2, 2), jnp.int32)}  # e.g. an argmax, not a gradient
    kwargs = {"grad_fn": lambda p: wrong}
    if make in ("looksam", "vsam"):
        kwargs["sam_step"] = True
    with pytest.raises(TypeError, match=r"\['b'\].*int32"):
        opt.update(params, opt.init(params), params, **kwargs)


def test_a_float32_grad_fn_for_bfloat16_gradients_is_mixed_precision_not_an_error():
    params = {"a": jnp.ones(3, jnp.bfloat16)}
    opt = sharpax.sam(0.05)
    out, _ = opt.update(
        params, opt.init(params), params, grad_fn=lambda p: {"a": jnp.full(3, 2.0, jnp.float32)}
    )
    assert out["a"].dtype == jnp.bfloat16 and float(out["a"][0]) == 2.0
