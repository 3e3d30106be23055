"""SS-SAM / RST: SAM steps drawn at random with a scheduled probability."""

from __future__ import annotations

import optax

from sharpax import _common, reuse_rules, schedules
from sharpax.scheduled import _build


def ss_sam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    probability: _common.ScalarOrSchedule = 0.5,
    seed: int = 0,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SS-SAM / RST: each step is a SAM step with probability ``p(t)``, else an SGD step.

    :func:`sharpax.scheduled_sam` with :func:`sharpax.schedules.bernoulli` and
    :func:`sharpax.reuse_rules.plain`. ``probability`` is a constant or a
    schedule of the step, e.g. :func:`sharpax.schedules.probability_ramp`
    (constant, linear, cosine, step: the families the paper studies). The
    expected cost is ``1 + mean_t p(t)`` forward-backward passes per step. The
    draws depend only on the step index and ``seed``, so the host knows each
    decision in advance and every device takes the same one.

    Deviations: the authors' code was not available; the Bernoulli trials come
    from ``fold_in(PRNGKey(seed), step)``. G-RST's rescaling is not implemented.

    Args:
      rho: neighbourhood radius, a non-negative float or a schedule of ``count``.
      probability: SAM-step probability in [0, 1], or a schedule of the step.
      seed: seed of the draws (same on every device).
      eps: added to ``‖g‖`` in ``ε`` so a zero gradient gives ``ε = 0``.
      axis_name: mapped axis over which to average the ascent gradient, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`sharpax.ScheduledSAMState`.

    Examples:
      >>> import jax.numpy as jnp, optax, sharpax
      >>> opt = sharpax.ss_sam(0.05, probability=1.0)
      >>> print(bool(sharpax.sam_due(opt.init(jnp.zeros(2)))))
      True

    References:
      Zhao, Zhang and Hu, `Randomized Sharpness-Aware Training for Boosting
      Computational Efficiency in Deep Learning <https://arxiv.org/abs/2203.09962>`_,
      2022 (first titled "SS-SAM: Stochastic Scheduled Sharpness-Aware
      Minimization for Efficiently Training Deep Neural Networks")
    """
    schedule = schedules.bernoulli(probability, seed=seed)
    return _build(rho, schedule, reuse_rules.plain(), eps=eps, axis_name=axis_name, owner="ss_sam")
