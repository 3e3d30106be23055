"""ESAM: SAM with a random subset of weights perturbed and the second pass on the sharpest examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpax import _common

_F32 = _common.F32


class ESAMState(NamedTuple):
    """State of :func:`esam`.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far.
      num_sam_steps: int32 scalar, steps that ran the perturbed pass (all of them).
      key: uint32 ``[2]`` PRNG key; step ``t`` draws its weight mask from ``fold_in(key, t)``.
    """

    count: jax.Array
    num_sam_steps: jax.Array
    key: jax.Array


def _swp_perturbation(ascent, params, rho, beta, eps, key):
    """ε for a per-tensor Bernoulli(beta) mask: ``(rho / beta) · m ⊙ g / (‖m ⊙ g‖ + eps)``."""
    leaves, treedef = jax.tree.flatten(ascent)
    keep = jax.random.uniform(key, (len(leaves),)) < beta
    masked = treedef.unflatten(
        [jnp.where(keep[i], g.astype(_F32), 0.0) for i, g in enumerate(leaves)]
    )
    return _common.perturbation(masked, params, rho / beta, eps=eps)


def _selected(batch: Any, scores: jax.Array, fraction: float) -> Any:
    """The ``max(1, int(B · fraction))`` examples of ``batch`` with the largest ``scores``."""
    size = scores.shape[0]
    k = max(1, int(size * fraction))
    _, idx = jax.lax.top_k(scores, k)
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch)


def _check_losses(losses: Any, batch_size: int, what: str) -> jax.Array:
    if jnp.ndim(losses) != 1 or jnp.shape(losses)[0] != batch_size:
        raise ValueError(
            f"sharpax.esam: {what} must be per-example losses of shape ({batch_size},), got shape "
            f"{jnp.shape(losses)}."
        )
    return jnp.asarray(losses, _F32)


def _sds_gradient(loss_fn, batch, losses, params, perturbed, gamma):
    """SDS: the gradient at ``w + ε`` of the mean loss over the examples whose loss rose most."""
    size = jax.tree.leaves(batch)[0].shape[0]
    clean = loss_fn(params, batch) if losses is None else losses
    clean = _check_losses(clean, size, "losses" if losses is not None else "loss_fn's output")
    rise = _check_losses(loss_fn(perturbed, batch), size, "loss_fn's output") - clean
    subset = _selected(batch, jax.lax.stop_gradient(rise), gamma)
    return jax.grad(lambda p: jnp.mean(loss_fn(p, subset)))(perturbed)


def esam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    beta: float = 0.6,
    gamma: float = 0.5,
    seed: int = 0,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ESAM: Stochastic Weight Perturbation and Sharpness-sensitive Data Selection.

    * **SWP**: each step, every parameter tensor is perturbed with probability
      ``beta`` (one draw per tensor, as the authors' code does):
      ``ε = (rho / beta) · m ⊙ g / (‖m ⊙ g‖₂ + eps)``. Every tensor then gets
      the gradient at ``w + ε``.
    * **SDS** (``gamma < 1``): with per-example losses ``L_i``, the second pass
      runs only on the ``max(1, int(B · gamma))`` examples with the largest
      ``L_i(w + ε) − L_i(w)``: the update is the gradient at ``w + ε`` of their
      mean loss.

    ``update(grads, state, params, *, grad_fn=None, loss_fn=None, batch=None,
    losses=None)``. ``grads`` is the clean gradient of the mean loss, as for
    :func:`sharpax.sam`. SDS needs ``loss_fn(params, batch) -> (B,)``
    per-example losses and the ``batch`` (a pytree with a leading example
    axis); ``losses``, the clean per-example losses you already have from the
    clean pass, saves one forward. With ``gamma = 1`` it needs only
    ``grad_fn`` (or ``loss_fn`` and ``batch``). ``beta = gamma = 1`` with
    ``grad_fn`` is :func:`sharpax.sam` exactly (tested bit for bit).

    Cost per step beyond the clean forward-backward: with SDS one forward of
    the batch at ``w`` (none if ``losses`` is given), one at ``w + ε``, and a
    forward-backward of ``gamma · B`` examples; without SDS SAM's second
    forward-backward. SWP saves no compute here: the mask is drawn on device
    each step, so XLA still computes every weight gradient (the authors skip
    the unselected tensors' weight gradients in PyTorch).

    Deviations from the authors' code (dydjw9/Efficient_SAM, ``utils/Esam.py``):
    SDS keeps exactly ``int(B · gamma)`` examples (theirs keeps those strictly
    above the k-th largest rise, usually ``k − 1``); the mask is drawn for the
    current step from a JAX key (theirs, with Python's ``random``, at the end of
    the previous step); ``eps = 1e-12`` as in :func:`sharpax.sam` (theirs
    1e-7); their no-grad forward at ``w + ε`` also runs when ``gamma = 1``.

    Data parallel: as :func:`sharpax.sam` (per-device gradients, per-device
    ``grad_fn`` / ``loss_fn``, :func:`sharpax.pmean_updates` after); each device
    selects its own examples (as the authors' workers do) and all devices draw
    the same mask (same ``seed``).

    Args:
      rho: neighbourhood radius, a float >= 0 or a schedule of the step.
      beta: probability that a tensor is perturbed, in (0, 1].
      gamma: fraction of the batch in the second pass, in (0, 1].
      seed: seed of the mask's PRNG key.
      eps: added to ``‖m ⊙ g‖`` in ``ε``.
      axis_name: mapped axis over which to average the ascent gradient, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`ESAMState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> def losses(w, batch):                       # per-example losses, shape (B,)
      ...     return (batch["x"] @ w - batch["y"]) ** 2
      >>> batch = {"x": jnp.eye(4, 2), "y": jnp.array([1.0, -1.0, 0.5, 0.0])}
      >>> w = jnp.zeros(2)
      >>> opt = optax.chain(sharpax.esam(0.05, beta=1.0, gamma=0.5), optax.sgd(0.1))
      >>> state = opt.init(w)
      >>> grads = jax.grad(lambda p: jnp.mean(losses(p, batch)))(w)
      >>> updates, state = opt.update(grads, state, w, loss_fn=losses, batch=batch)
      >>> print([round(float(u), 3) for u in updates])  # the 2 sharpest examples, at w + eps
      [0.104, -0.104]

    References:
      Du et al., `Efficient Sharpness-aware Minimization for Improved Training of
      Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022 (code:
      https://github.com/dydjw9/Efficient_SAM)
    """
    _common.check_non_negative("rho", rho)
    _common.check_number("beta", beta, low=0.0, high=1.0, low_open=True)
    _common.check_number("gamma", gamma, low=0.0, high=1.0, low_open=True)
    _common.check_non_negative("eps", eps, schedule=False)
    seed = _common.check_int("seed", seed, low=0)
    use_swp, use_sds = float(beta) < 1.0, float(gamma) < 1.0

    def init_fn(params: optax.Params) -> ESAMState:
        del params
        zero = jnp.zeros([], jnp.int32)
        return ESAMState(zero, jnp.zeros([], jnp.int32), jax.random.PRNGKey(seed))

    def update_fn(
        updates, state, params=None, *, grad_fn=None, loss_fn=None, batch=None, losses=None,
        **extra_args,
    ):  # fmt: skip
        del extra_args
        _common.require_params(params, "esam")
        _require_inputs(use_sds, grad_fn, loss_fn, batch)
        rho_t = _common.value_at(rho, state.count)
        ascent = _common.maybe_pmean(updates, axis_name)
        if use_swp:
            key = jax.random.fold_in(state.key, state.count)
            eps_tree = _swp_perturbation(ascent, params, rho_t, beta, eps, key)
        else:
            eps_tree = _common.perturbation(ascent, params, rho_t, eps=eps)
        perturbed = optax.apply_updates(params, eps_tree)
        if use_sds:
            g_s = _sds_gradient(loss_fn, batch, losses, params, perturbed, gamma)
        elif grad_fn is not None:
            g_s = grad_fn(perturbed)
            _common.check_same_shapes(g_s, updates, "grad_fn's output", "esam")
        else:
            g_s = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(perturbed)
        new_state = ESAMState(
            optax.safe_increment(state.count), optax.safe_increment(state.num_sam_steps), state.key
        )
        return optax.tree.cast_like(g_s, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _require_inputs(use_sds: bool, grad_fn: Any, loss_fn: Callable | None, batch: Any) -> None:
    """SDS needs ``loss_fn`` and ``batch``; otherwise ``grad_fn`` or both (errors say how to call)."""
    has_losses = loss_fn is not None and batch is not None
    if use_sds and not has_losses:
        raise TypeError(
            "sharpax.esam with gamma < 1 (data selection) needs per-example losses: call "
            "`opt.update(grads, state, params, loss_fn=loss_fn, batch=batch)` with "
            "`loss_fn(params, batch) -> losses of shape (B,)`; "
            f"got loss_fn={loss_fn!r}, batch={'given' if batch is not None else None}."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"sharpax.esam: loss_fn must be a function, got {loss_fn!r}.")
    if not use_sds and not has_losses:
        _common.require_grad_fn(grad_fn, "esam")
