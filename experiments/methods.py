"""The methods as the trainer builds them: the optax chain per method and the trajectory losses.

``METHODS`` says how the trainer runs each method (:class:`Method`); :func:`make_optimizer`
builds the chain (the sharpax transform first, then SGD/AdamW with the learning-rate schedule
and weight decay, under the loss scale where float16 needs it); :func:`make_trajectory` builds
SAF's buffer or MESA's EMA teacher. Everything sharpness-related is sharpax's public API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

import sharpax
from experiments import models, precision



def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
    total = config.num_epochs * steps_per_epoch
    warmup = int(config.get("warmup_epochs", 0) * steps_per_epoch)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if config.lr_schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}")
    if warmup:
        return optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, warmup, max(total, warmup + 1)
        )
    return optax.cosine_decay_schedule(config.learning_rate, max(total, 1))


def _decay_mask(config: ml_collections.ConfigDict):
    """None (decay every parameter) or timm's ``filter_bias_and_bn``: no decay on 1-D tensors."""
    if config.get("weight_decay_on_1d", True):
        return None
    return lambda params: jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    *,
    vsam_stat_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The base optimizer, with the method's sharpax transform first in the chain.

    ``vsam_stat_mask``: the ``stat_mask`` of ``sharpax.vsam`` (see
    ``models.last_tensors_mask``; :func:`experiments.training.setup` builds it from
    ``config.vsam.stat_last_tensors``). With float16 loss scaling
    (``config.precision``) the whole optimizer is wrapped in
    ``precision.dynamic_loss_scale`` (skips non-finite steps).
    """
    return precision.with_loss_scaling(
        config, _method_optimizer(config, steps_per_epoch, vsam_stat_mask)
    )


def _method_optimizer(config, steps_per_epoch, vsam_stat_mask):
    lr = learning_rate_schedule(config, steps_per_epoch)
    acc_dtype = precision.state_dtype(config)  # float32 momentum for half-precision params
    if config.optimizer == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=_decay_mask(config)),
            optax.sgd(lr, momentum=config.momentum, nesterov=config.get("nesterov", False),
                      accumulator_dtype=acc_dtype),
        )  # fmt: skip
    elif config.optimizer == "adamw":
        base = optax.chain(
            optax.clip_by_global_norm(config.get("grad_clip", 1.0)),
            optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=config.weight_decay,
                        mu_dtype=acc_dtype),
        )  # fmt: skip
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")

    method = config.method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    spec = METHODS[method]
    if spec.front is None:
        return base
    if method == "msam":  # MSAM is the base optimizer itself (its momentum is the ascent)
        return spec.front(config, steps_per_epoch, vsam_stat_mask)
    return optax.chain(spec.front(config, steps_per_epoch, vsam_stat_mask), base)


# One builder per method of the sharpax front of the chain, ``(config, steps_per_epoch,
# vsam_stat_mask) -> transform``.


def _sam_front(config, steps_per_epoch, stat_mask):
    return sharpax.sam(config.sam.rho)


def _asam_front(config, steps_per_epoch, stat_mask):
    a = config.asam
    if a.scale not in ("weights", "all"):
        raise ValueError(f"asam.scale must be 'weights' or 'all', got {a.scale!r}")
    mask = models.asam_weights_mask if a.scale == "weights" else None
    return sharpax.sam(a.rho, adaptive=True, eta=a.eta, adaptive_mask=mask)


def _looksam_front(config, steps_per_epoch, stat_mask):
    return sharpax.looksam(config.sam.rho, k=config.looksam.k, alpha=config.looksam.alpha)


def _vsam_front(config, steps_per_epoch, stat_mask):
    v = config.vsam
    return sharpax.vsam(
        config.sam.rho,
        window=v.window,
        blocks=v.blocks,
        max_rate=v.max_rate,
        sensitivity=tuple(v.sensitivity),
        reuse_decay=v.reuse_decay,
        max_reuse=v.max_reuse,
        warmup_steps=round(v.warmup_epochs * steps_per_epoch),
        stat_mask=stat_mask,
        seed=config.seed,
    )


def _ae_sam_front(config, steps_per_epoch, stat_mask):
    a = config.ae_sam
    return sharpax.ae_sam(
        config.sam.rho,
        total_steps=max(config.num_epochs * steps_per_epoch, 1),
        decay=a.decay,
        threshold_start=a.threshold_start,
        threshold_end=a.threshold_end,
        lookahead_alpha=a.get("lookahead_alpha"),
        lagged=a.lagged,
    )


def _ss_sam_front(config, steps_per_epoch, stat_mask):
    s = config.ss_sam
    total = max(config.num_epochs * steps_per_epoch, 1)
    probability = sharpax.schedules.probability_ramp(s.p_start, s.p_end, total, shape=s.shape)
    return sharpax.ss_sam(config.sam.rho, probability=probability, seed=config.seed)


def _msam_front(config, steps_per_epoch, stat_mask):
    if config.optimizer != "sgd" or config.get("nesterov", False):
        raise ValueError("msam is SGD with heavy-ball momentum: it needs optimizer='sgd' and "
                         f"nesterov=False, got {config.optimizer!r}, {config.get('nesterov')}.")  # fmt: skip
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask(config)),
        sharpax.msam(
            learning_rate_schedule(config, steps_per_epoch),
            rho=config.msam.rho,
            momentum=config.momentum,
        ),
    )


def _gsam_front(config, steps_per_epoch, stat_mask):
    g = config.gsam
    rho = sharpax.gsam_rho_schedule(
        learning_rate_schedule(config, steps_per_epoch),
        rho_max=g.rho_max,
        rho_min=g.rho_min,
        lr_max=config.learning_rate,
        lr_min=0.0,  # the configs' schedules decay to 0
    )
    return sharpax.gsam(rho, alpha=g.alpha, adaptive=g.adaptive)


def _esam_front(config, steps_per_epoch, stat_mask):
    e = config.esam
    return sharpax.esam(config.sam.rho, beta=e.beta, gamma=e.gamma, seed=config.seed)


class Method(NamedTuple):
    """How the trainer runs a method.

    ``front``: builder of the sharpax transform first in the chain (None: the base
    optimizer alone; for msam the whole optimizer). ``scheduled``: a
    ``sharpax.scheduled_sam`` preset (takes ``sam_step``). ``host_dispatch``: its
    decisions are known before the step, so the host can dispatch two compiled steps.
    ``second_pass``: it runs ``grad_fn`` (counts SAM steps). ``loss``: None, 'saf' or
    'mesa' (a trajectory term in the loss). ``perturbed_params``: the params in the
    state are MSAM's perturbed ones (evaluate at ``sharpax.msam_unperturbed_params``).
    ``example_losses``: the front also takes ``loss_fn`` / ``batch`` / ``losses``
    (per-example losses, ESAM's data selection).
    """

    front: Callable | None = None
    scheduled: bool = False
    host_dispatch: bool = False
    second_pass: bool = False
    loss: str | None = None
    perturbed_params: bool = False
    example_losses: bool = False


METHODS: dict[str, Method] = {
    "sgd": Method(),
    "sam": Method(_sam_front, second_pass=True),
    "asam": Method(_asam_front, second_pass=True),
    "looksam": Method(_looksam_front, scheduled=True, host_dispatch=True, second_pass=True),
    "vsam": Method(_vsam_front, scheduled=True, host_dispatch=True, second_pass=True),
    # AE-SAM decides from the step's own gradient norm: on device (lax.cond), unless lagged.
    "ae_sam": Method(_ae_sam_front, scheduled=True, second_pass=True),
    "ss_sam": Method(_ss_sam_front, scheduled=True, host_dispatch=True, second_pass=True),
    "msam": Method(_msam_front, perturbed_params=True),
    "gsam": Method(_gsam_front, second_pass=True),
    "esam": Method(_esam_front, second_pass=True, example_losses=True),
    "saf": Method(loss="saf"),
    "mesa": Method(loss="mesa"),
}


def ema_decay(horizon_epochs: float, steps_per_epoch: int, what: str) -> float:
    """An EMA's decay from its horizon in epochs: ``1 − 1 / (horizon · steps_per_epoch)``.

    An EMA with decay ``d`` averages over about ``1 / (1 − d)`` steps; a horizon
    in epochs keeps that span the same when the batch size or the dataset (so
    the steps per epoch) changes. The SAF/MESA authors' 0.9998 is a horizon of
    5000 steps, 4.0 epochs of their ImageNet recipe (1251 steps per epoch).
    """
    if not horizon_epochs > 0:
        raise ValueError(f"{what} must be positive, got {horizon_epochs!r}.")
    steps = horizon_epochs * steps_per_epoch
    if steps < 1:
        raise ValueError(
            f"{what} = {horizon_epochs} epochs is {steps:.2f} steps at {steps_per_epoch} steps "
            "per epoch: an EMA needs a horizon of at least one step."
        )
    return 1.0 - 1.0 / steps


def mesa_decay(config: ml_collections.ConfigDict, steps_per_epoch: int) -> float:
    """MESA's EMA decay from ``config.mesa.ema_horizon_epochs`` (see :func:`ema_decay`)."""
    return ema_decay(config.mesa.ema_horizon_epochs, steps_per_epoch, "mesa.ema_horizon_epochs")


def make_trajectory(
    config: ml_collections.ConfigDict, num_examples: int, num_classes: int, steps_per_epoch: int
):
    if config.method == "saf":
        s = config.saf
        return sharpax.saf(
            num_examples,
            num_classes,
            lag=s.lag,
            start_epoch=s.start_epoch,
            end_epoch=s.get("end_epoch"),
            temperature=s.temperature,
            weight=s.weight,
            dtype=jnp.dtype(s.dtype),
        )
    if config.method == "mesa":
        m = config.mesa
        return sharpax.mesa(
            mesa_decay(config, steps_per_epoch),
            start_epoch=m.start_epoch,
            end_epoch=m.get("end_epoch"),
            temperature=m.temperature,
            weight=m.weight,
        )
    return None
