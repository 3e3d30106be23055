"""LookSAM: a SAM step every ``k`` steps, its orthogonal part reused in between."""

from __future__ import annotations

import optax

from sharpax import _common, reuse_rules, schedules
from sharpax.scheduled import _build


def looksam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    k: int = 5,
    alpha: _common.ScalarOrSchedule = 0.7,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: a SAM step every ``k`` steps, its orthogonal part reused in between.

    On steps with ``count % k == 0`` (SAM steps) it returns the SAM gradient
    ``g_s = grad_fn(w + ε)``, ``ε = rho · g / (‖g‖₂ + eps)`` exactly as
    :func:`sharpax.sam`, and caches the part of ``g_s`` orthogonal to the clean
    gradient ``g``::

      g_v = g_s - (<g_s, g> / ‖g‖²) · g

    On the other steps it returns ``g + alpha · (‖g‖ / ‖g_v‖) · g_v`` without
    calling ``grad_fn``. It is :func:`sharpax.scheduled_sam` with
    :func:`sharpax.schedules.every_k` and :func:`sharpax.reuse_rules.orthogonal`. Norms and inner products are global over the pytree
    and computed in float32. With ``k=1`` it is :func:`sharpax.sam`. Zero
    gradients give no NaN: a zero ``g`` gives ``g_v = g_s`` and a zero ``g_v``
    adds nothing.

    ``update(grads, state, params, *, grad_fn, sam_step=None)``: with
    ``sam_step=None`` the step branches on device (``jax.lax.cond`` on
    ``state.sam_due``); with a static ``sam_step=True``/``False`` no conditional
    is traced and ``False`` never calls ``grad_fn`` (``grad_fn`` and ``params``
    may then be omitted). A ``sam_step`` different from ``state.sam_due`` is
    honoured (``num_sam_steps`` and ``g_v`` reflect what was done) and the
    schedule stays ``count % k == 0``.

    The cached ``g_v`` is kept in at least float32 (float32 for bfloat16 /
    float16 params, like MESA's EMA): one float32 copy of the params.

    Data parallel: pass each device's own gradient and a per-device
    ``grad_fn`` (no ``pmean`` inside it) and average the output right after
    the transform with :func:`sharpax.pmean_updates` (see :func:`sharpax.sam`).
    ``axis_name`` averages the ascent gradient exactly as in
    :func:`sharpax.sam`; ``g`` in the projection, ``g_s`` and so ``g_v`` are
    the device's own. On SAM steps the averaged output is the SAM gradient of
    the global batch (with ``axis_name``) or the mean of per-device SAM
    gradients (``axis_name=None``, m-sharpness). On reuse steps each device
    applies LookSAM to its own gradient: the output is
    ``mean_i (g_i + alpha · (‖g_i‖ / ‖g_v,i‖) · g_v,i)``, which is *not*
    single-device LookSAM on the global batch (the projection and the
    ``‖g‖ / ‖g_v‖`` scaling are nonlinear). For exactly the single-device
    computation on the global batch, pass ``pmean``-ed gradients and
    ``pmean`` inside ``grad_fn`` instead (every device then holds the same
    ``g``, ``g_s`` and ``g_v``, at the same communication cost, but without
    per-device ascent). The schedule depends only on ``count``, so all
    devices agree.

    Args:
      rho: neighbourhood radius, a non-negative float or a schedule of ``count``.
      k: a SAM step every ``k`` steps (the first step is one). An int >= 1;
        under ``optax.inject_hyperparams`` it may also be an injected int32
        scalar.
      alpha: weight of the reused direction, a float or a schedule of ``count``.
      eps: added to ``‖g‖`` in ``ε`` so a zero gradient gives ``ε = 0``.
      axis_name: mapped axis over which to average the ascent gradient, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`sharpax.ScheduledSAMState` with an empty
      :class:`sharpax.schedules.EveryKState` and an
      :class:`sharpax.reuse_rules.OrthogonalState` (``state.reuse.g_v``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> loss = lambda w, x: jnp.sum((x * w) ** 2)
      >>> x, params = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0])
      >>> opt = optax.chain(sharpax.looksam(0.05, k=2), optax.sgd(0.1))
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     grads = jax.grad(loss)(params, x)
      ...     updates, state = opt.update(
      ...         grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x))
      ...     params = optax.apply_updates(params, updates)
      >>> print(int(sharpax.num_sam_steps(state)), bool(sharpax.sam_due(state)))
      2 False

    References:
      Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022
    """
    return _build(
        rho,
        schedules.every_k(k),
        reuse_rules.orthogonal(alpha),
        eps=eps,
        axis_name=axis_name,
        owner="looksam",
    )
