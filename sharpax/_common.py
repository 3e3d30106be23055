"""Helpers shared by the sharpax transformations (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


def global_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a pytree, accumulated in float32 whatever the leaf dtype."""
    return optax.tree.norm(optax.tree.cast(tree, jnp.float32))


def check_non_negative(name: str, value: Any) -> None:
    """Raises ValueError for a negative concrete scalar (Python, NumPy or jax array).

    Schedules (callables) and traced values (e.g. hyperparameters injected by
    ``optax.inject_hyperparams`` inside ``jit``) cannot be checked eagerly and pass.
    """
    if callable(value) or isinstance(value, jax.core.Tracer) or isinstance(value, bool):
        return
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - not array-like: let the math fail loudly later
        return
    if array.ndim == 0 and np.issubdtype(array.dtype, np.number) and array < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


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


def value_at(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """Evaluates a constant-or-schedule hyperparameter at step ``count``."""
    return value(count) if callable(value) else value


def maybe_pmean(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


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
) -> Any:
    """SAM's ascent step ε(w).

    Plain (Foret et al. 2021): ε = ρ · g / (‖g‖₂ + eps).
    Adaptive (ASAM, Kwon et al. 2021): T = |w| + η, ε = ρ · T² g / (‖T g‖₂ + eps).
    Norms are global over the pytree and computed in float32; ε has the
    params' dtypes. A zero ``ascent`` gives ε = 0 (no NaN).
    """
    if adaptive:
        scaled = jax.tree.map(
            lambda g, w: (jnp.abs(w.astype(jnp.float32)) + eta) * g.astype(jnp.float32),
            ascent,
            params,
        )
        scale = _safe_scale(rho, global_norm(scaled), eps)
        return jax.tree.map(
            lambda tg, w: (scale * (jnp.abs(w.astype(jnp.float32)) + eta) * tg).astype(w.dtype),
            scaled,
            params,
        )
    scale = _safe_scale(rho, global_norm(ascent), eps)
    return jax.tree.map(
        lambda g, w: (scale * g.astype(jnp.float32)).astype(w.dtype), ascent, params
    )


def add(params: Any, delta: Any) -> Any:
    """params + delta, keeping each param's dtype."""
    return jax.tree.map(lambda w, d: (w + d).astype(w.dtype), params, delta)
