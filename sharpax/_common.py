"""Helpers shared by the sharpax transformations (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

F32 = jnp.float32
INT32_MAX = int(np.iinfo(np.int32).max)


# --------------------------------------------------------------------------- validation


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _concrete_scalar(value: Any) -> Any:
    """The value as a 0-d NumPy array if it is a concrete real scalar, else None.

    Python/NumPy numbers, 0-d NumPy arrays and concrete (non-traced) 0-d jax arrays
    qualify; tracers (e.g. hyperparameters injected by ``optax.inject_hyperparams``
    inside ``jit``) and arrays of other shapes do not.
    """
    if is_tracer(value):
        return None
    if isinstance(value, (np.ndarray, jax.Array)) and not _is_real(value.dtype):
        return None
    if isinstance(value, (int, float, np.number, np.ndarray, jax.Array)):
        array = np.asarray(value)
        if array.ndim == 0 and _is_real(array.dtype):
            return array
    return None


def _is_real(dtype: Any) -> bool:
    """Integer or floating dtype (bfloat16 included), not bool or complex."""
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def check_int(name: str, value: Any, *, low: int = 0, static: bool = True) -> Any:
    """Checks an integer argument and returns it (as a Python int when concrete).

    Python ints and NumPy integers are accepted and range-checked against
    ``[low, 2**31 - 1]`` (``ValueError``); bools, floats and other types raise
    ``TypeError``. With ``static=False`` an integer jax array (e.g. injected by
    ``optax.inject_hyperparams``) is also accepted and returned unchanged.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value[()]  # a 0-d NumPy integer array: its NumPy integer scalar
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if value < low or value > INT32_MAX:
            raise ValueError(f"{name} must be an int in [{low}, 2**31 - 1], got {value}.")
        return int(value)
    if (
        not static
        and isinstance(value, jax.Array)
        and jnp.ndim(value) == 0
        and jnp.issubdtype(value.dtype, jnp.integer)
    ):
        return value
    hint = ""
    if static and isinstance(value, jax.Array):
        hint = " (a static Python int; under optax.inject_hyperparams list it in static_args)"
    raise TypeError(f"{name} must be an int{hint}, got {value!r} of type {type(value).__name__}.")


def check_positive_int(name: str, value: Any) -> int:
    """A static int >= 1 (Python or NumPy integer), returned as a Python int."""
    return check_int(name, value, low=1)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    schedule: bool = False,
) -> None:
    """Range check of a real hyperparameter; raises TypeError/ValueError naming it.

    Concrete real scalars (Python, NumPy or jax) must be finite (NaN and inf
    raise ``ValueError``) and are checked against ``low`` / ``high``
    (``low_open``: ``value > low``). Booleans, strings, None and other
    non-numbers raise ``TypeError``. Tracers pass (they cannot be checked eagerly),
    and so do callables when ``schedule`` (an optax schedule of the step count).
    """
    if callable(value) and not isinstance(value, jax.Array):
        if schedule:
            return
        raise TypeError(f"{name} must be a number, got the callable {value!r}.")
    if isinstance(value, (bool, np.bool_)) or (
        hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.bool_)
    ):
        raise TypeError(f"{name} must be a number, got the boolean {value!r}.")
    if is_tracer(value):
        return
    array = _concrete_scalar(value)
    if array is None:
        if isinstance(value, (np.ndarray, jax.Array)) and _is_real(value.dtype):
            return  # a non-scalar array: left to the math (e.g. per-device arrays)
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}.")
    if not np.isfinite(array):
        # NaN passes every comparison below (they are all False): reject it by name.
        raise ValueError(f"{name} must be finite, got {value}.")
    too_low = low is not None and (array <= low if low_open else array < low)
    too_high = high is not None and array > high
    if too_low or too_high:
        if low == 0 and high is None:
            raise ValueError(f"{name} must be {'> 0' if low_open else '>= 0'}, got {value}.")
        interval = (
            f"{'(' if low_open else '['}{low if low is not None else '-inf'}, "
            f"{high if high is not None else 'inf'}]"
        )
        raise ValueError(f"{name} must be in {interval}, got {value}.")


def check_non_negative(name: str, value: Any, *, schedule: bool = True) -> None:
    """``value >= 0`` for a concrete number; schedules (callables) and tracers pass."""
    check_number(name, value, low=0, schedule=schedule)


def require_grad_fn(grad_fn: Any, owner: str) -> None:
    """Raises a TypeError that shows how to call a transform that needs ``grad_fn``."""
    if grad_fn is None or not callable(grad_fn):
        raise TypeError(
            f"sharpax.{owner} needs the gradient function of the current mini-batch: "
            f"call `opt.update(grads, state, params, grad_fn=grad_fn)` with "
            f"`grad_fn = lambda p: jax.grad(loss_fn)(p, batch)` (same loss and batch "
            f"that produced `grads`); got grad_fn={grad_fn!r}."
        )


def require_params(params: Any, owner: str) -> None:
    if params is None:
        raise ValueError(
            f"sharpax.{owner} needs the current params: call "
            "`opt.update(grads, state, params, grad_fn=grad_fn)`."
        )


def check_same_shapes(tree: Any, like: Any, what: str, owner: str) -> None:
    """Trace-time check of ``tree`` against ``like``: structure, leaf shapes, dtype kinds.

    Without it a leaf of another shape could broadcast silently into the update.
    A leaf must also be floating point where the gradient is (an integer or
    complex leaf is a bug, never a precision choice). Float widths may differ and
    are cast as before: a float32 ``grad_fn`` for bfloat16 gradients, or a
    cache kept in the params' float32 for bfloat16 gradients, is mixed precision.
    The error names the leaf.
    """
    try:
        pairs = jax.tree.map(lambda a, b: (a, b), tree, like)
    except (ValueError, TypeError) as err:
        raise ValueError(f"sharpax.{owner}: {what} must have the structure of the gradients: "
                         f"{err}") from None  # fmt: skip
    for path, (a, b) in jax.tree_util.tree_leaves_with_path(
        pairs, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
    ):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"sharpax.{owner}: {what} at {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(a)}, the gradient there has shape {jnp.shape(b)}."
            )
        da, db = jnp.result_type(a), jnp.result_type(b)
        if jnp.issubdtype(db, jnp.floating) and not jnp.issubdtype(da, jnp.floating):
            raise TypeError(
                f"sharpax.{owner}: {what} at {jax.tree_util.keystr(path)} has dtype {da}, "
                f"the gradient there is {db}: it must be floating point."
            )


# --------------------------------------------------------------------------- math


def value_at(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """Evaluates a constant-or-schedule hyperparameter at step ``count``."""
    return value(count) if callable(value) else value


def maybe_pmean(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def global_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a pytree, accumulated in float32 whatever the leaf dtype."""
    return optax.tree.norm(optax.tree.cast(tree, F32))


def vdot32(a: Any, b: Any) -> jax.Array:
    """Pytree inner product computed in float32 (leaves cast first)."""
    return jnp.asarray(optax.tree.vdot(optax.tree.cast(a, F32), optax.tree.cast(b, F32)), F32)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0 (no NaN, also in gradients)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def at_least_f32(dtype: Any) -> Any:
    """The dtype promoted to at least float32 (bf16/f16 -> f32, f64 stays f64)."""
    return jnp.promote_types(dtype, F32)


def zeros_f32_like(params: Any) -> Any:
    """Zeros like ``params`` with at-least-float32 leaves, each a separate buffer."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), at_least_f32(jnp.result_type(p))), params)


def resolve_mask(mask: Any, params: Any, owner: str, name: str) -> Any:
    """``mask`` (a pytree of Python bools like ``params``, or a function of the params) or None."""
    if mask is None:
        return None
    mask = mask(params) if callable(mask) else mask
    try:
        leaves = jax.tree.leaves(jax.tree.map(lambda m, _: m, mask, params))
    except ValueError as err:
        raise ValueError(
            f"sharpax.{owner}: {name} must have the structure of the params with a Python bool "
            f"per leaf: {err}"
        ) from None
    if not all(isinstance(m, (bool, np.bool_)) for m in leaves):
        raise TypeError(
            f"sharpax.{owner}: {name} leaves must be Python bools (static), got "
            f"{[type(m).__name__ for m in leaves]}."
        )
    return mask


def _safe_scale(rho: Any, norm: jax.Array, eps: Any) -> jax.Array:
    """rho / (norm + eps), and 0 for a zero norm even when eps underflows (float16 hyperparams)."""
    positive = norm > 0
    return jnp.where(positive, rho / (jnp.where(positive, norm, 1.0) + eps), 0.0)


def perturbation(
    ascent: Any,
    params: Any,
    rho: jax.Array | float,
    *,
    adaptive: bool = False,
    eta: jax.Array | float = 0.01,
    eps: jax.Array | float = 1e-12,
    adaptive_mask: Any = None,
) -> Any:
    """SAM's ascent step ε(w).

    Plain (Foret et al. 2021): ε = ρ · g / (‖g‖₂ + eps).
    Adaptive (ASAM, Kwon et al. 2021): T = |w| + η, ε = ρ · T² g / (‖T g‖₂ + eps);
    leaves where ``adaptive_mask`` (a resolved pytree of bools, or None for all
    leaves) is False get T = 1. Norms are global over the pytree and computed in
    float32; ε has the params' dtypes. A zero ``ascent`` gives ε = 0 (no NaN).
    """
    if adaptive:
        if adaptive_mask is None:
            adaptive_mask = jax.tree.map(lambda _: True, params)

        def t_times(x, w, m):  # T · x, with T = 1 on leaves outside the mask
            return x * (jnp.abs(w.astype(F32)) + eta) if m else x

        scaled = jax.tree.map(
            lambda g, w, m: t_times(g.astype(F32), w, m), ascent, params, adaptive_mask
        )
        scale = _safe_scale(rho, global_norm(scaled), eps)
        # (scale · T) · (T g): the same order of operations as before the mask existed.
        return jax.tree.map(
            lambda tg, w, m: (t_times(scale, w, m) * tg).astype(w.dtype),
            scaled,
            params,
            adaptive_mask,
        )
    scale = _safe_scale(rho, global_norm(ascent), eps)
    return jax.tree.map(lambda g, w: (scale * g.astype(F32)).astype(w.dtype), ascent, params)


def sam_gradient(
    grads: Any,
    params: Any,
    grad_fn: Callable[[Any], Any],
    rho: jax.Array | float,
    *,
    adaptive: bool = False,
    eta: jax.Array | float = 0.01,
    eps: jax.Array | float = 1e-12,
    axis_name: str | None = None,
    adaptive_mask: Any = None,
    owner: str = "sam",
) -> Any:
    """The SAM gradient ``grad_fn(w + ε)`` in the dtypes of ``grads``.

    ``ε`` is :func:`perturbation` of the ascent gradient: ``grads`` itself, or its
    ``pmean`` over ``axis_name`` (all devices then share one ``ε``). The returned
    gradient is ``grad_fn``'s output, never averaged here. Shared by
    :func:`sharpax.sam`, :func:`sharpax.looksam` and :func:`sharpax.vsam`.
    """
    ascent = maybe_pmean(grads, axis_name)
    eps_tree = perturbation(
        ascent, params, rho, adaptive=adaptive, eta=eta, eps=eps, adaptive_mask=adaptive_mask
    )
    g_s = grad_fn(optax.apply_updates(params, eps_tree))
    check_same_shapes(g_s, grads, "grad_fn's output", owner)
    return optax.tree.cast_like(g_s, grads)
