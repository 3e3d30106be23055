"""MSAM: SAM's perturbation taken along the optimizer's momentum, with no second pass."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpax import _common

_F32 = _common.F32


class MSAMState(NamedTuple):
    """State of :func:`msam`.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far (the learning-rate
        and ``rho`` schedules are evaluated at it).
      momentum: pytree like the params, the heavy-ball buffer ``v`` (at least
        float32 leaves).
      perturbation_scale: float32 scalar ``f = rho / (‖v‖₂ + eps)`` of the
        perturbation now in the params: the params the optimizer returns are
        ``w̃ = w − f · v``, the unperturbed weights are ``w = w̃ + f · v``
        (0 before the first update: ``w̃ = w``; after an update with zero
        momentum it is ``rho / eps`` and ``f · v = 0``).
    """

    count: jax.Array
    momentum: optax.Updates
    perturbation_scale: jax.Array


def msam(
    learning_rate: _common.ScalarOrSchedule,
    *,
    rho: _common.ScalarOrSchedule = 3.0,
    momentum: float = 0.9,
    eps: float = 1e-12,
) -> optax.GradientTransformation:
    r"""Momentum-SAM: SGD with heavy-ball momentum, gradients taken at ``w − rho · v / ‖v‖``.

    MSAM replaces SAM's ascent step (a second forward-backward pass) by a step
    along the negative momentum, which the optimizer already has. It is a full
    optimizer (like ``optax.sgd``), used alone or after
    ``optax.add_decayed_weights``; it needs no ``grad_fn``. **The params it
    produces are the perturbed weights** ``w̃``: train by computing the
    gradient at the params you hold, as for plain SGD. With ``d`` that
    gradient (plus any chained weight decay, which therefore sees ``w̃`` as in
    the authors' code), one step is::

      w     = w̃ + f · v                  # undo the last perturbation (f = 0 at first)
      v     ← momentum · v + d
      w     ← w − lr · v
      f     ← rho / (‖v‖₂ + eps)
      w̃     = w − f · v                  # the params returned for the next step

    as a single update ``f_old · v_old − lr · v − f · v``. **Evaluate at**
    ``w``: :func:`msam_unperturbed_params` (``params + f · v``). Batch-norm
    statistics gathered in training come from ``w̃`` (the authors recompute
    them at ``w`` with one extra forward epoch). With ``rho = 0`` it is
    ``optax.sgd(learning_rate, momentum)`` (tested).

    Deviations from the authors' code (MarlonBecker/MSAM, ``optimizer/msam.py``):
    the scale ``f = rho_t / (‖v‖ + eps)`` is stored and undone exactly (theirs
    undoes with the *current* rho and the old ``1/‖v‖``, which differs when
    rho changes, as their AdamW variant avoids); weight decay is left to
    ``optax.add_decayed_weights`` in the chain; the update is applied as one
    sum instead of three in-place steps (rounding differs in the last bits);
    the momentum buffer is kept in at least float32. Nesterov, which their
    class accepts but does not use, is not offered.

    Args:
      learning_rate: a float or an optax schedule of the step.
      rho: perturbation radius, a float >= 0 or a schedule (the paper's runs
        use 3 with SGD; SAM's 0.05 is far too small here).
      momentum: heavy-ball coefficient in [0, 1).
      eps: added to ``‖v‖`` so a zero momentum gives no perturbation.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`MSAMState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> opt = sharpax.msam(0.1, rho=0.1)
      >>> params = jnp.zeros(2)
      >>> state = opt.init(params)
      >>> for _ in range(100):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> w = sharpax.msam_unperturbed_params(params, state)
      >>> print(round(float(jnp.linalg.norm(w - params)), 4))  # the params are w - rho v/|v|
      0.1

    References:
      Becker, Altrock and Risse, `Momentum-SAM: Sharpness Aware Minimization
      without Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024
      (code: https://github.com/MarlonBecker/MSAM)
    """
    _common.check_number("learning_rate", learning_rate, schedule=True)
    _common.check_non_negative("rho", rho)
    _common.check_number("momentum", momentum, low=0.0, high=1.0)
    _common.check_non_negative("eps", eps, schedule=False)

    def init_fn(params: optax.Params) -> MSAMState:
        return MSAMState(
            count=jnp.zeros([], jnp.int32),
            momentum=_common.zeros_f32_like(params),
            perturbation_scale=jnp.zeros([], _F32),
        )

    def update_fn(updates, state, params=None):
        del params
        lr = _common.value_at(learning_rate, state.count)
        rho_t = _common.value_at(rho, state.count)
        old_v, old_f = state.momentum, state.perturbation_scale
        v = jax.tree.map(lambda m, d: momentum * m + d.astype(m.dtype), old_v, updates)
        f = (rho_t / (_common.global_norm(v) + eps)).astype(_F32)

        def step(d, m_old, m):
            return (old_f * m_old - lr * m - f * m).astype(d.dtype)

        new_updates = jax.tree.map(step, updates, old_v, v)
        return new_updates, MSAMState(optax.safe_increment(state.count), v, f)

    return optax.GradientTransformation(init_fn, update_fn)


def _find_msam_state(opt_state: Any) -> MSAMState:
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MSAMState))
        if isinstance(s, MSAMState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"sharpax.msam_unperturbed_params needs an optimizer state holding exactly one "
            f"sharpax.msam state, found {len(found)}."
        )
    return found[0]


def msam_unperturbed_params(params: optax.Params, opt_state: Any) -> optax.Params:
    """The weights MSAM's perturbed params stand for: ``w = w̃ + f · v`` (evaluate at these).

    Args:
      params: the params produced by training with :func:`msam` (``w̃``).
      opt_state: the optimizer state, holding one :class:`MSAMState` anywhere
        (``optax.chain``, ``optax.inject_hyperparams``, ...).

    Returns:
      The unperturbed params, in the params' dtypes. Training continues from
      ``params``, not from these.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> state = sharpax.msam(0.1).init(jnp.zeros(2))
      >>> print(sharpax.msam_unperturbed_params(jnp.ones(2), state).tolist())
      [1.0, 1.0]
    """
    state = _find_msam_state(opt_state)
    f = state.perturbation_scale
    return jax.tree.map(
        lambda w, m: (w.astype(m.dtype) + f * m).astype(w.dtype), params, state.momentum
    )
