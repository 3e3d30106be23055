"""A debug check of how the sharpax transformations sit in an optax optimizer: :func:`check_chain`.

The SAM-type transformations (:func:`sharpax.sam`, :func:`sharpax.gsam`,
:func:`sharpax.esam` and :func:`sharpax.scheduled_sam` with its presets
:func:`sharpax.looksam`, :func:`sharpax.vsam`, :func:`sharpax.ae_sam`,
:func:`sharpax.ss_sam`) map a *gradient* to a gradient and must come first in
a chain; :func:`sharpax.msam` is a whole optimizer. Composed the wrong way they
still run, silently: ``optax.chain(optax.sgd(0.1), sharpax.sam(0.05))`` ascends
along ``-g`` and returns the raw perturbed gradient as the update (the loss
climbs), and ``optax.MultiSteps(optax.chain(sharpax.sam(rho), opt), k)`` is not
SAM on the large batch. :func:`check_chain` finds such compositions before
training, by looking at the optimizer state and by pushing two known gradients
through the optimizer with a recording ``grad_fn``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpax import _common
from sharpax.esam import ESAMState
from sharpax.gsam import GSAMState
from sharpax.msam import MSAMState
from sharpax.sam import SAMState
from sharpax.scheduled import ScheduledSAMState

# States of the transformations that call grad_fn(w + ε) and must see the raw gradient.
_ASCENT_STATES = (SAMState, ScheduledSAMState, GSAMState, ESAMState)
_SHARPAX_STATES = (*_ASCENT_STATES, MSAMState)
_PROBE_ARGS = ("grad_fn", "loss_fn", "batch", "losses", "sam_step")
_SUPPORT = 3  # probe gradients are nonzero in the first 3 entries of each (flattened) leaf only
_SCALE = 1e-3  # probe gradient entries are ±1e-3 · (1, 2, 3): small against weight decay · |w| = wd
_RTOL = 1e-3  # relative tolerance of "ε is a positive multiple of g" (f32 math inside the transform)
_FIX_ORDER = (
    "Put the SAM-type transform first and the optimizer after it, e.g. "
    "`optax.chain(sharpax.sam(rho), optax.sgd(lr, momentum=0.9))`; only transforms that keep the "
    "gradient's direction (optax.clip_by_global_norm, optax.zero_nans) may come before it."
)


class _Found(NamedTuple):
    path: str  # e.g. "opt_state[0]" or "opt_state.inner_state"
    state: Any
    ancestors: tuple[Any, ...]


def check_chain(
    tx: optax.GradientTransformation,
    params: Any,
    *,
    axis_name: str | None = None,
    **extra_args: Any,
) -> tuple[str, ...]:
    r"""Raises a ``ValueError`` that explains the fix if sharpax transforms are mis-composed.

    A debug check to call once before training: it allocates one optimizer
    state for ``params``' shapes and compiles one update (about 10 s for 38 M
    float32 params on 2 CPU cores). It checks that

    * every SAM-type transformation (``sam``, ``gsam``, ``esam``,
      ``scheduled_sam`` and its presets ``looksam``, ``vsam``, ``ae_sam``,
      ``ss_sam``) receives the gradient unchanged up to a positive factor:
      anything before it in a chain (``optax.sgd``, Adam or momentum
      statistics, weight decay, noise, per-coordinate clipping) only bends the
      ascent direction ``ε``, and its effect on the update is lost, because the
      transform returns ``grad_fn``'s raw gradient. ``optax.clip_by_global_norm``
      and ``optax.zero_nans`` before it pass;
    * no SAM-type transformation sits inside ``optax.MultiSteps`` (see below);
    * the optimizer holds at most one sharpax transformation, and ``grad_fn``
      receives the full params (not inside ``optax.masked`` /
      ``optax.multi_transform``);
    * the first update is not uphill: ``<update, g> <= 0`` for a probe gradient
      ``g`` (a SAM-type transform last in the chain returns a gradient, not an
      update; ``sharpax.msam``, a whole optimizer, followed by another one).

    It pushes two probe gradients through ``tx`` (from ``tx.init``, at probe
    params of ``params``' structure and shapes, floating leaves in at least
    float32; ``params`` may be abstract, e.g. from ``jax.eval_shape``) with a
    recording ``grad_fn`` and ``sam_step=True`` (so LookSAM-type schedules take
    their SAM branch), and reads each ascent ``ε`` off the points ``grad_fn`` is
    called at. Leaves with a single element cannot show a change of direction,
    only of sign; a radius that is 0 at steps 0 and 1 (a ``rho`` warm-up) leaves
    the ascent unchecked.

    ``MultiSteps``: wrapping the whole chain,
    ``optax.MultiSteps(optax.chain(sharpax.sam(rho), opt), k)``, runs the inner
    update, and so ``grad_fn``, on every micro-step with the running mean of the
    micro-batch gradients as ascent direction, and keeps only the last
    micro-step's result: the perturbed gradient of the last micro-batch alone,
    at twice the cost of each micro-step. Accumulate *after* SAM instead:
    ``optax.chain(sharpax.sam(rho), optax.MultiSteps(opt, k).gradient_transformation())``
    with ``grad_fn`` of each micro-batch (each micro-batch's SAM gradient,
    averaged).

    Args:
      tx: the optimizer, e.g. ``optax.chain(sharpax.sam(0.05), optax.sgd(0.1))``.
      params: the params (or ``jax.ShapeDtypeStruct`` leaves); only their
        structure, shapes and dtypes are used.
      axis_name: if ``tx`` averages over a mapped axis (``sam(axis_name=...)``,
        :func:`sharpax.pmean_updates`), its name: the probe then runs under
        ``jax.vmap`` over that axis with one member.
      **extra_args: further keyword arguments that ``tx.update`` needs (e.g.
        ``value=`` for ``optax.contrib.reduce_on_plateau``); ``grad_fn``,
        ``loss_fn``, ``batch``, ``losses`` and ``sam_step`` are the probe's.

    Returns:
      Where the sharpax states are in ``tx``'s state, e.g.
      ``('SAMState at opt_state[0]',)`` (empty if there are none).

    Raises:
      ValueError: on a mis-composition, with what to write instead.

    Examples:
      >>> import jax.numpy as jnp, optax, sharpax
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> sharpax.check_chain(optax.chain(sharpax.sam(0.05), optax.sgd(0.1)), params)
      ('SAMState at opt_state[0]',)
      >>> try:
      ...     sharpax.check_chain(optax.chain(optax.sgd(0.1), sharpax.sam(0.05)), params)
      ... except ValueError as err:
      ...     print(str(err)[:75])
      sharpax.check_chain: SAMState at opt_state[1] ascends against the gradient
    """
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"sharpax.check_chain: tx must be an optax GradientTransformation, got {tx!r}.")
    clash = sorted(set(extra_args) & set(_PROBE_ARGS))
    if clash:
        raise TypeError(f"sharpax.check_chain: {clash} are supplied by the probe; do not pass them.")
    w, g1, g2 = _probe_params_and_grads(params)
    tx = optax.with_extra_args_support(tx)
    state = jax.jit(tx.init)(w)
    found = _find_states(state)
    _check_structure(found)
    probe = _Probe(tx, w, axis_name, extra_args)
    update, state, calls = probe.step(g1, state)
    _check_ascents(found, calls, w, g1, step=0)
    _check_descent(found, update, g1)
    _, _, calls = probe.step(g2, state)
    _check_ascents(found, calls, w, g2, step=1)
    return tuple(f"{type(f.state).__name__} at {f.path}" for f in found)


# --------------------------------------------------------------------------- probe inputs


def _probe_params_and_grads(params: Any) -> tuple[Any, Any, Any]:
    """Probe params ``w`` and two probe gradients with ``params``' structure and shapes.

    Floating leaves (in at least float32): ``g1`` has ``s · (1, -2, 3)`` in the first (up to
    three) entries and zeros elsewhere, ``g2`` has ``s · (-2, 3, 1)`` there (not parallel to
    ``g1``), and ``w = sign(g1)`` there, ``1`` elsewhere: ``|w| = 1`` everywhere, so the
    adaptive (ASAM-type) scalings ``|w| + eta`` are constant in each leaf, and
    ``<w, g1> > 0``, so weight decay after SAM cannot turn the first update uphill. Other
    leaves are zeros and are not checked.
    """
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
        raise ValueError("sharpax.check_chain: params has no leaves.")
    w, g1, g2 = [], [], []
    for leaf in leaves:
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
        dtype = jnp.result_type(leaf)
        size = int(np.prod(shape))
        if not jnp.issubdtype(dtype, jnp.floating):
            for out in (w, g1, g2):
                out.append(jnp.zeros(shape, dtype))
            continue
        dtype = np.dtype(_common.at_least_f32(dtype))
        k = min(size, _SUPPORT)
        base, a, b = np.ones(size, dtype), np.zeros(size, dtype), np.zeros(size, dtype)
        a[:k], b[:k] = _SCALE * np.array([1.0, -2.0, 3.0])[:k], _SCALE * np.array([-2.0, 3.0, 1.0])[:k]
        base[:k] = np.sign(a[:k])
        for out, x in ((w, base), (g1, a), (g2, b)):
            out.append(jnp.asarray(x.reshape(shape)))
    return tuple(treedef.unflatten(x) for x in (w, g1, g2))


class _Probe:
    """Runs ``tx.update`` with a ``grad_fn`` (and ESAM's ``loss_fn``) that records where it is called.

    The update is jitted once (one compilation, not one per primitive) and reused for both steps.
    """

    def __init__(self, tx, w, axis_name, extra_args):
        self.w, self.axis_name, self.calls = w, axis_name, []
        treedef = jax.tree.structure(w)

        def record(p):
            if jax.tree.structure(p) != treedef:
                raise ValueError(
                    "sharpax.check_chain: grad_fn was called with a pytree of another structure "
                    f"than the params ({jax.tree.structure(p)} instead of {treedef}): the "
                    "SAM-type transform sees only part of the params (inside optax.masked or "
                    f"optax.multi_transform?), but grad_fn needs all of them. {_FIX_ORDER}"
                )
            jax.debug.callback(lambda q: self.calls.append(jax.tree.map(np.asarray, q)), p)

        def run(g, state):
            def grad_fn(p):  # the gradient of the linear loss <g, p>: g wherever it is called
                record(p)
                # Non-floating leaves: zeros in float32 (a transform before SAM may have
                # turned their gradient into floats; an integer grad_fn output is refused).
                return jax.tree.map(
                    lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32),
                    g,
                )

            def loss_fn(p, batch):  # per-example losses <g, p>, for ESAM's sharpest-examples pass
                record(p)
                return jnp.ones_like(batch) * _common.vdot32(g, p)

            probe_args = dict(grad_fn=grad_fn, loss_fn=loss_fn, batch=jnp.ones(4), sam_step=True)
            return tx.update(g, state, w, **probe_args, **extra_args)

        def run_mapped(g, state):  # as one member of the mapped axis
            batched = jax.tree.map(lambda x: x[None], (g, state))
            out = jax.vmap(run, axis_name=axis_name)(*batched)
            return jax.tree.map(lambda x: x[0], out)

        self._run = jax.jit(run if axis_name is None else run_mapped)

    def step(self, g: Any, state: Any) -> tuple[Any, Any, list[Any]]:
        """``(update, new_state, points grad_fn / loss_fn were called at)``."""
        self.calls = []
        try:
            update, state = self._run(g, state)
        except NameError as err:
            if "axis name" not in str(err):
                raise
            raise ValueError(
                "sharpax.check_chain: tx averages over a mapped axis that is not bound here "
                f"({err}); pass that axis: `sharpax.check_chain(tx, params, axis_name=...)`."
            ) from err
        jax.effects_barrier()
        return update, state, self.calls


# --------------------------------------------------------------------------- checks


def _find_states(state: Any) -> list[_Found]:
    """The sharpax states in an optimizer state, with their paths and enclosing states."""
    found: list[_Found] = []

    def visit(node, path, ancestors):
        if isinstance(node, _SHARPAX_STATES):
            found.append(_Found("opt_state" + jax.tree_util.keystr(path), node, ancestors))
            return
        children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
        for key, child in children:
            if key:  # () when node is itself a leaf
                visit(child, path + key, (*ancestors, node))

    visit(state, (), ())
    return found


def _check_structure(found: list[_Found]) -> None:
    """MultiSteps around a SAM-type transform, or more than one sharpax transform."""
    for f in found:
        if isinstance(f.state, _ASCENT_STATES) and any(
            isinstance(a, optax.MultiStepsState) for a in f.ancestors
        ):
            raise ValueError(
                f"sharpax.check_chain: {type(f.state).__name__} at {f.path} is inside "
                "optax.MultiSteps. MultiSteps accumulates the gradients, but it runs the inner "
                "update, and so the perturbed pass grad_fn(w + ε), on every micro-step, with "
                "the running mean of the micro-batch gradients as ascent direction, and keeps "
                "only the last micro-step's result: the perturbed gradient of the last "
                "micro-batch alone, not SAM on the large batch. Accumulate after SAM instead: "
                "`optax.chain(sharpax.sam(rho), optax.MultiSteps(opt, k)"
                ".gradient_transformation())`, with grad_fn of each micro-batch (every "
                "micro-batch gets its own SAM gradient; MultiSteps averages them)."
            )
    if len(found) > 1:
        where = ", ".join(f"{type(f.state).__name__} at {f.path}" for f in found)
        raise ValueError(
            f"sharpax.check_chain: tx holds {len(found)} sharpax transformations ({where}); "
            "use one: each SAM-type transform runs its own perturbed pass, and sharpax.msam is "
            "a whole optimizer."
        )


def _ascent_owner(found: list[_Found]) -> str:
    ascents = [f for f in found if isinstance(f.state, _ASCENT_STATES)]
    if ascents:
        return f"{type(ascents[0].state).__name__} at {ascents[0].path}"
    return "the transform that calls grad_fn"


def _check_ascents(found, calls, w, g, *, step: int) -> None:
    """Each point grad_fn was called at is ``w + ε`` with ``ε`` a positive multiple of ``g`` per leaf."""
    owner = _ascent_owner(found)
    w_leaves = jax.tree.leaves(w)
    g_leaves = jax.tree.leaves(g)
    when = "first update" if step == 0 else "second update (a stateful transform before it)"
    for point in calls:  # the structure is checked by _Probe when grad_fn is called
        verdict = _compare(jax.tree.leaves(point), w_leaves, g_leaves)
        if verdict == "against":
            raise ValueError(
                f"sharpax.check_chain: {owner} ascends against the gradient on the {when}: a "
                "transform before it (optax.sgd, optax.adam, optax.scale(-lr), ...) turns the "
                "gradient into a descent update, so the perturbation goes downhill, and that "
                "transform's effect on the update is lost, because the SAM-type transform "
                f"returns grad_fn's raw gradient (the loss climbs). {_FIX_ORDER}"
            )
        if verdict == "bent":
            raise ValueError(
                f"sharpax.check_chain: {owner} does not receive the gradient on the {when}: a "
                "transform before it (momentum, Adam statistics, weight decay, noise, "
                "per-coordinate clipping, ...) changes the gradient's direction. Only the ascent "
                "ε sees that change; the update does not, because the SAM-type transform "
                f"returns grad_fn's raw gradient. {_FIX_ORDER}"
            )


def _compare(points: list[Any], w_leaves: list[Any], g_leaves: list[Any]) -> str:
    """'ok', 'against' (ε = c·g with c < 0) or 'bent' (ε not a multiple of g) over the leaves.

    ``ε = point − w``. On a leaf's support (its first entries, where ``g ≠ 0``) it is computed
    in float64, exact up to the rounding of ``w + ε`` (two spacings of the point); elsewhere
    ``w = 1`` and ``g = 0``, so ``ε = point − 1`` must be rounding only. Per leaf,
    ``c = <ε, g> / <g, g>`` and the residual ``ε − c·g`` must be within that rounding plus
    ``_RTOL · |c| · max|g|``. A leaf whose ε is all rounding says nothing; an exactly
    unperturbed point (ESAM's clean loss evaluation) passes.
    """
    verdicts = []
    for p, w0, g in zip(points, w_leaves, g_leaves):
        p = np.asarray(p).ravel()
        if not np.issubdtype(p.dtype, np.floating) or p.size == 0:
            continue
        g = np.asarray(g, np.float64).ravel()[:_SUPPORT]
        k = g.size
        eps = p[:k].astype(np.float64) - np.asarray(w0).ravel()[:k].astype(np.float64)
        off = float(np.max(np.abs(p[k:] - p.dtype.type(1)), initial=0.0))
        noise = 2 * float(np.spacing(np.max(np.abs(p)).astype(p.dtype)))
        gg = float(g @ g)
        c = float(eps @ g) / gg if gg > 0 else 0.0
        signal = abs(c) * float(np.max(np.abs(g), initial=0.0))
        if max(float(np.max(np.abs(eps - c * g), initial=0.0)), off) > noise + _RTOL * signal:
            verdicts.append("bent")
        elif signal > 100 * noise:
            verdicts.append("against" if c < 0 else "ok")
    if "against" in verdicts:
        return "against"
    return "bent" if "bent" in verdicts else "ok"


def _check_descent(found: list[_Found], update: Any, g: Any) -> None:
    """The first update must not point uphill along the probe gradient (cosine > _RTOL)."""
    u = [np.asarray(x).ravel() for x in jax.tree.leaves(update)]
    gv = [np.asarray(x, np.float64).ravel()[:_SUPPORT] for x in jax.tree.leaves(g)]  # 0 after
    uu = sum(float(np.vdot(a, a)) for a in u) if len(u) == len(gv) else np.nan
    if not np.isfinite(uu):
        raise ValueError(
            "sharpax.check_chain: the first update is not a finite pytree like the params: "
            f"{jax.tree.map(jnp.shape, update)}."
        )
    dot = sum(float(a[: b.size].astype(np.float64) @ b) for a, b in zip(u, gv))
    norms = np.sqrt(uu * sum(float(b @ b) for b in gv))
    if norms > 0 and dot > _RTOL * norms:
        names = ", ".join(f"{type(f.state).__name__} at {f.path}" for f in found) or "none"
        raise ValueError(
            "sharpax.check_chain: the first update goes uphill along the probe gradient g "
            f"(cosine(update, g) = {dot / norms:.2f} > 0), and optax applies params + updates: "
            "the transformation that turns gradients into descent steps is missing or reversed "
            f"(sharpax transformations found: {names}). A SAM-type transform returns a "
            "gradient, not an update: put the optimizer after it, "
            "`optax.chain(sharpax.sam(rho), optax.sgd(lr))`; sharpax.msam is already a whole "
            "optimizer: put no other optimizer after it."
        )
