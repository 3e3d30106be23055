"""sharpax.check_chain: the common mis-compositions raise a ValueError naming the fix; correct ones pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpax

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2), "s": jnp.zeros(())}
SGD = optax.sgd(0.1, momentum=0.9)


# --------------------------------------------------------------------------- correct usages


CORRECT = {
    "sam": (optax.chain(sharpax.sam(0.05), SGD), "SAMState at opt_state[0]"),
    "asam": (optax.chain(sharpax.sam(0.5, adaptive=True, eta=0.0), SGD), "SAMState at opt_state[0]"),
    "asam_mask_adamw": (
        optax.chain(
            sharpax.sam(0.5, adaptive=True, adaptive_mask={"w": True, "b": False, "s": False}),
            optax.adamw(1e-3, weight_decay=0.1),
        ),
        "SAMState at opt_state[0]",
    ),
    "looksam": (optax.chain(sharpax.looksam(0.05, k=5), SGD), "ScheduledSAMState at opt_state[0]"),
    "vsam": (optax.chain(sharpax.vsam(0.05), SGD), "ScheduledSAMState at opt_state[0]"),
    "ae_sam": (optax.chain(sharpax.ae_sam(0.05, total_steps=10), SGD), "ScheduledSAMState at opt_state[0]"),
    "ss_sam": (optax.chain(sharpax.ss_sam(0.05, probability=0.1), SGD), "ScheduledSAMState at opt_state[0]"),
    "gsam": (optax.chain(sharpax.gsam(0.05, alpha=0.5), SGD), "GSAMState at opt_state[0]"),
    "gsam_adaptive": (optax.chain(sharpax.gsam(0.05, alpha=0.5, adaptive=True), SGD), "GSAMState at opt_state[0]"),
    "esam_swp_sds": (optax.chain(sharpax.esam(0.05, beta=0.5, gamma=0.5), SGD), "ESAMState at opt_state[0]"),
    "msam": (sharpax.msam(0.1, rho=3.0), "MSAMState at opt_state"),
    "decay_then_msam": (optax.chain(optax.add_decayed_weights(5e-4), sharpax.msam(0.1)), "MSAMState at opt_state[1]"),
    "injected": (
        optax.chain(optax.inject_hyperparams(sharpax.sam)(rho=0.05), SGD),
        "SAMState at opt_state[0].inner_state",
    ),
    "clip_before": (
        optax.chain(optax.clip_by_global_norm(1e-4), sharpax.sam(0.05), SGD),  # clips the probe
        "SAMState at opt_state[1]",
    ),
    "zero_nans_before": (optax.chain(optax.zero_nans(), sharpax.sam(0.05), SGD), "SAMState at opt_state[1]"),
    "positive_scale_before": (optax.chain(optax.scale(3.0), sharpax.sam(0.05), SGD), "SAMState at opt_state[1]"),
    "decay_after": (
        optax.chain(sharpax.sam(0.05), optax.add_decayed_weights(0.5), SGD),
        "SAMState at opt_state[0]",
    ),
    "accumulate_after": (
        optax.chain(sharpax.sam(0.05), optax.MultiSteps(SGD, 4).gradient_transformation()),
        "SAMState at opt_state[0]",
    ),
    "warmup_from_zero": (
        optax.chain(sharpax.sam(0.05), optax.sgd(optax.linear_schedule(0.0, 0.1, 10))),
        "SAMState at opt_state[0]",
    ),
    "apply_if_finite": (
        optax.apply_if_finite(optax.chain(sharpax.sam(0.05), SGD), 3),
        "SAMState at opt_state.inner_state[0]",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_compositions_pass_and_name_the_state(name):
    tx, where = CORRECT[name]
    assert sharpax.check_chain(tx, PARAMS) == (where,)


def test_no_sharpax_transform_is_nothing_to_report():
    assert sharpax.check_chain(optax.adam(1e-3), PARAMS) == ()


def test_abstract_and_low_precision_params():
    abstract = jax.eval_shape(lambda: {"k": jnp.zeros((4, 3), jnp.bfloat16), "n": jnp.zeros((), jnp.int32)})
    assert sharpax.check_chain(optax.chain(sharpax.sam(0.05), SGD), abstract) == ("SAMState at opt_state[0]",)
    with pytest.raises(ValueError, match="ascends against the gradient"):
        sharpax.check_chain(optax.chain(optax.sgd(0.1), sharpax.sam(0.05)), abstract)


def test_data_parallel_chain_needs_and_takes_the_axis_name():
    tx = optax.chain(sharpax.sam(0.05, axis_name="batch"), sharpax.pmean_updates("batch"), SGD)
    with pytest.raises(ValueError, match=r"axis_name=\.\.\."):
        sharpax.check_chain(tx, PARAMS)
    assert sharpax.check_chain(tx, PARAMS, axis_name="batch") == ("SAMState at opt_state[0]",)
    bad = optax.chain(optax.sgd(0.1), sharpax.sam(0.05, axis_name="batch"), sharpax.pmean_updates("batch"))
    with pytest.raises(ValueError, match="ascends against the gradient"):
        sharpax.check_chain(bad, PARAMS, axis_name="batch")


def test_extra_args_are_forwarded_and_probe_args_refused():
    tx = optax.chain(sharpax.sam(0.05), SGD, optax.contrib.reduce_on_plateau())
    assert sharpax.check_chain(tx, PARAMS, value=jnp.float32(1.0)) == ("SAMState at opt_state[0]",)
    with pytest.raises(TypeError, match="supplied by the probe"):
        sharpax.check_chain(tx, PARAMS, grad_fn=lambda p: p)
    with pytest.raises(TypeError, match="GradientTransformation"):
        sharpax.check_chain(sharpax.sam, PARAMS)


# --------------------------------------------------------------------------- misuses


def _loss(w):  # an ill-conditioned quadratic, minimum 0 at w = 0
    return 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w**2)


def _train(tx, steps=5):
    w = jnp.array([1.0, 0.3])
    state = tx.init(w)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(_loss)(w), state, w, grad_fn=jax.grad(_loss))
        w = optax.apply_updates(w, updates)
    return float(_loss(w))


def test_the_issue_example_really_climbs_and_is_caught():
    start = float(_loss(jnp.array([1.0, 0.3])))
    # sgd before sam: the ascent goes along -g and the raw perturbed gradient is *added* to w.
    wrong = optax.chain(optax.sgd(0.01), sharpax.sam(0.05))
    assert _train(wrong) > 10 * start
    assert _train(optax.chain(sharpax.sam(0.05), optax.sgd(0.01))) < start
    with pytest.raises(ValueError, match=r"ascends against the gradient.*optax\.chain\(sharpax\.sam\(rho\)"):
        sharpax.check_chain(wrong, {"w": jnp.zeros(2)})


@pytest.mark.parametrize(
    "prefix",
    [optax.sgd(0.1), optax.sgd(0.1, momentum=0.9), optax.adam(1e-3), optax.adamw(1e-3), optax.scale(-0.5)],
    ids=["sgd", "momentum", "adam", "adamw", "negative_scale"],
)
def test_descent_transform_before_sam(prefix):
    with pytest.raises(ValueError, match="ascends against the gradient on the first update"):
        sharpax.check_chain(optax.chain(prefix, sharpax.sam(0.05)), PARAMS)


@pytest.mark.parametrize(
    ("prefix", "when"),
    [
        (optax.scale_by_adam(), "first"),  # ε along sign(g) at step 0
        (optax.add_decayed_weights(5e-4), "first"),  # ε along g + wd · w
        (optax.clip(1.5e-3), "first"),  # per coordinate: clips the probe's 2e-3 and 3e-3 entries
        (optax.add_noise(0.01, 0.55, 0), "first"),
        (optax.trace(0.9), "second"),  # the same as g at step 0, g2 + 0.9 g1 at step 1
        (optax.ema(0.9, debias=False), "second"),  # (1 - 0.9) g at step 0
    ],
    ids=["scale_by_adam", "weight_decay", "clip", "noise", "trace", "ema"],
)
def test_direction_changing_transform_before_sam(prefix, when):
    tx = optax.chain(prefix, sharpax.sam(0.05), optax.scale(-0.1))
    with pytest.raises(ValueError, match=f"(does not receive the gradient|ascends against).*{when} update"):
        sharpax.check_chain(tx, PARAMS)


@pytest.mark.parametrize(
    ("front", "state"),
    [
        (sharpax.looksam(0.05, k=5), "ScheduledSAMState"),
        (sharpax.vsam(0.05), "ScheduledSAMState"),
        (sharpax.gsam(0.05, alpha=0.3), "GSAMState"),
        (sharpax.esam(0.05, beta=0.5, gamma=0.5), "ESAMState"),
    ],
    ids=["looksam", "vsam", "gsam", "esam"],
)
def test_every_sam_type_transform_after_an_optimizer_is_caught(front, state):
    with pytest.raises(ValueError, match=rf"{state} at opt_state\[1\] ascends against the gradient"):
        sharpax.check_chain(optax.chain(optax.adam(1e-3), front), PARAMS)


@pytest.mark.parametrize("wrap", ["plain", "injected"])
def test_multisteps_around_sam_explains_the_fix(wrap):
    inner = optax.chain(sharpax.sam(0.05), SGD)
    tx = optax.MultiSteps(inner, 4)
    if wrap == "injected":
        tx = optax.chain(optax.identity(), optax.MultiSteps(optax.chain(sharpax.looksam(0.05), SGD), 2))
    with pytest.raises(ValueError, match=r"inside optax\.MultiSteps.*gradient_transformation\(\)"):
        sharpax.check_chain(tx, PARAMS)


def test_multisteps_around_msam_is_large_batch_msam_and_passes():
    # MSAM takes no grad_fn: MultiSteps averages the micro-gradients at the same w̃.
    assert sharpax.check_chain(optax.MultiSteps(sharpax.msam(0.1), 2), PARAMS) == (
        "MSAMState at opt_state.inner_opt_state",
    )


@pytest.mark.parametrize(
    "tx",
    [optax.chain(sharpax.sam(0.05)), sharpax.looksam(0.05), optax.chain(sharpax.msam(0.1), optax.sgd(0.1))],
    ids=["sam_alone", "looksam_alone", "msam_then_sgd"],
)
def test_uphill_first_update(tx):
    with pytest.raises(ValueError, match=r"first update goes uphill.*put the optimizer after it"):
        sharpax.check_chain(tx, PARAMS)


def test_warmup_before_sam_is_caught_by_the_uphill_check():
    # lr = 0 at step 0 hides the sign flip from the ascent (ε = 0); the update is the raw gradient.
    tx = optax.chain(optax.sgd(optax.linear_schedule(0.0, 0.1, 10)), sharpax.sam(0.05))
    with pytest.raises(ValueError, match="first update goes uphill"):
        sharpax.check_chain(tx, PARAMS)


def test_two_sharpax_transforms():
    with pytest.raises(ValueError, match=r"holds 2 sharpax transformations \(SAMState at opt_state\[0\], "):
        sharpax.check_chain(optax.chain(sharpax.sam(0.05), sharpax.looksam(0.05), SGD), PARAMS)


def test_sam_inside_masked_sees_part_of_the_params():
    tx = optax.chain(optax.masked(sharpax.sam(0.05), {"w": True, "b": False, "s": False}), SGD)
    with pytest.raises(ValueError, match=r"another structure than the params.*optax\.masked"):
        sharpax.check_chain(tx, PARAMS)


def test_probe_reads_the_ascent_exactly():
    # The recorded points are w + ε with ε = rho · g / ‖g‖ (checked against a hand computation),
    # so the verdicts rest on the actual perturbation, not on the state's type.
    from sharpax import guards

    w, g1, _ = guards._probe_params_and_grads(PARAMS)
    probe = guards._Probe(optax.with_extra_args_support(optax.chain(sharpax.sam(0.05), SGD)), w, None, {})
    tx_state = optax.chain(sharpax.sam(0.05), SGD).init(w)
    _, _, calls = probe.step(g1, tx_state)
    (point,) = calls
    g = {k: np.asarray(v, np.float64) for k, v in g1.items()}
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    for k in g:
        np.testing.assert_allclose(point[k] - np.asarray(w[k]), 0.05 * g[k] / norm, atol=1e-7)
