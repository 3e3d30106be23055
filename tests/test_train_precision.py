"""The trainer in mixed precision (experiments/precision.py).

Every method runs a couple of steps with bfloat16 activations and params, and with float16
activations, float32 params and dynamic loss scaling; the loss scale's skip of non-finite
steps, its growth and its hand-over to the divergence check; the scaled backward pass
against hand-computed gradients.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_train import tiny_config

from experiments import precision, training

STEPS = 2
PRECISIONS = {"bf16": ("bfloat16", "bfloat16"), "fp16_loss_scaled": ("float16", "float32")}


def precision_config(method, compute, params, **overrides):
    """tiny_config on a 16-unit MLP (fast to compile), 2 steps, the given dtypes."""
    c = tiny_config(method)
    c.model = "mnist1d_mlp"
    c.model_kwargs = ml_collections.ConfigDict({"hidden_sizes": (16,)})
    c.max_steps_per_epoch = STEPS
    c.precision.compute_dtype = compute
    c.precision.param_dtype = params
    for k, v in overrides.items():
        if k in c.precision:
            c.precision[k] = v
        else:
            c[k] = v
    return c


def batches(s, n=STEPS):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.normal(size=(32, *s.input_shape)).astype(np.float32),
            "label": rng.integers(0, s.num_classes, 32).astype(np.int32),
            "id": np.arange(32 * i, 32 * i + 32, dtype=np.int32),
        }
        for i in range(n)
    ]


def setup_and_init(config):
    s = training.setup(config, train_size=64, mesh=training.make_mesh(jax.devices()[:1]))
    return s, training.init_state(s)


@pytest.mark.parametrize("method", training.METHODS)
def test_every_method_trains_in_bf16_and_in_float16_with_loss_scaling(method):
    for name, (compute, params) in PRECISIONS.items():
        s, state = setup_and_init(precision_config(method, compute, params))
        assert s.model.dtype == jnp.dtype(compute)
        assert all(p.dtype == jnp.dtype(params) for p in jax.tree.leaves(state.params))
        new, out = training.run_train_epoch(s, state, batches(s), 0)  # raises on NaN
        assert np.isfinite(out["train_loss"]) and out["train_update_norm"] > 0, (name, out)
        assert all(p.dtype == jnp.dtype(params) for p in jax.tree.leaves(new.params))
        assert bool(training._all_finite(new.params))
        if name == "bf16":  # bfloat16 has float32's range: no loss scaling
            assert "loss_scale" not in out and precision.loss_scale(new.opt_state) is None
            if method in ("sgd", "sam"):  # SGD's momentum is float32 for bf16 params
                trace = optax.tree_utils.tree_get(new.opt_state, "trace")
                assert all(t.dtype == jnp.float32 for t in jax.tree.leaves(trace))
        else:  # at most some steps skipped (an overflow of the scaled backward pass)
            assert 0 <= out["train_skipped_steps"] < STEPS, out
            assert out["loss_scale"] == 2.0**15 / 2 ** out["train_skipped_steps"]


def test_overflowing_steps_are_skipped_and_counted_not_divergence():
    """A scale of 2^100 overflows every float16 backward pass: both steps are skipped
    (zero update, optimizer state unchanged, scale halved each time) and the epoch ends
    normally, its metrics saying so. A non-finite loss is still divergence."""
    c = precision_config("sam", "float16", "float32", loss_scale_init=2.0**100)
    s, state = setup_and_init(c)
    params0 = jax.device_get(state.params)
    opt0 = jax.device_get(state.opt_state)
    new, out = training.run_train_epoch(s, state, batches(s), 0)
    assert out["train_skipped_steps"] == STEPS and out["loss_scale"] == 2.0**98
    assert out["train_update_norm"] == 0.0 and np.isfinite(out["train_loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params), params0)
    inner0, inner = opt0.inner_state, jax.device_get(new.opt_state.inner_state)
    jax.tree.map(np.testing.assert_array_equal, inner, inner0)  # counters, momentum
    assert int(new.step) == STEPS
    good, bad = batches(s)
    bad = bad | {"image": np.full_like(bad["image"], np.nan)}
    with pytest.raises(FloatingPointError, match=r"loss nan.* at step 4 \(step 2 of epoch 2\)"):
        training.run_train_epoch(s, new, [good, bad], 1)


def test_loss_scale_grows_after_period_finite_steps_and_rolls_back_skipped_steps():
    """precision.dynamic_loss_scale around optax.sgd with momentum, fed by hand."""
    tx = precision.dynamic_loss_scale(optax.sgd(1.0, momentum=0.5), init_scale=8.0, period=2)
    params = jnp.zeros(2)
    state = tx.init(params)
    g = jnp.array([1.0, -2.0])
    expected_scales = []
    for t, grads in enumerate([g, g, jnp.array([jnp.inf, 0.0]), g]):
        out, new = tx.update(grads, state, params)
        if t == 2:  # skipped: zero update, momentum as before, scale halved
            np.testing.assert_array_equal(out, [0.0, 0.0])
            np.testing.assert_array_equal(new.inner_state[0].trace, state.inner_state[0].trace)
        else:
            assert np.all(np.isfinite(out)) and np.any(out != 0)
        expected_scales.append(float(new.loss_scale))
        state = new
    assert expected_scales == [8.0, 16.0, 8.0, 8.0]  # x2 after 2 finite steps, /2 on the skip
    assert int(state.skipped_steps) == 1 and int(state.good_steps) == 1
    # At the smallest scale nothing is skipped: the non-finite update comes through.
    tx = precision.dynamic_loss_scale(optax.sgd(1.0), init_scale=1.0)
    out, state = tx.update(jnp.array([jnp.nan, 0.0]), tx.init(params), params)
    assert np.isnan(out[0]) and int(state.skipped_steps) == 0


def test_scaled_backward_recovers_gradients_that_underflow_float16():
    """d/dw of sum(w·1e-4·1e-4) in float16 is 1e-8 < float16's smallest subnormal (6e-8):
    0 unscaled, 1e-8 (within float16's rounding) at scale 2^15, and the same value."""

    def fn(w):
        h = w.astype(jnp.float16) * jnp.float16(1e-4) * jnp.float16(1e-4)
        return jnp.sum(h.astype(jnp.float32))

    w = jnp.ones(3)
    assert np.all(np.asarray(jax.grad(fn)(w)) == 0)
    scaled = precision.scaled_backward(fn, jnp.float32(2.0**15))
    assert float(scaled(w)) == float(fn(w))
    np.testing.assert_allclose(jax.grad(scaled)(w), 1e-8, rtol=2e-3)
    # The gradient of a term added to another output is unscaled as well (SAF's logits).
    two = precision.scaled_backward(lambda w: (fn(w), w * 3.0), jnp.float32(2.0**15))
    grads = jax.grad(lambda w: two(w)[0] + jnp.sum(two(w)[1]))(w)
    np.testing.assert_allclose(grads, 3.0 + 1e-8, rtol=1e-6)


def test_precision_config_errors_name_the_field():
    c = precision_config("sgd", "float8", "float32")
    with pytest.raises(ValueError, match="precision.compute_dtype"):
        training.setup(c, train_size=64)
    c = precision_config("sgd", "bfloat16", "float32", loss_scale="always")
    with pytest.raises(ValueError, match="precision.loss_scale"):
        training.setup(c, train_size=64)
    c = precision_config("sgd", "bfloat16", "float32")
    c.model_kwargs.dtype = "float16"
    with pytest.raises(ValueError, match="contradicts precision.compute_dtype"):
        training.setup(c, train_size=64)
    assert precision.uses_loss_scaling(precision_config("sgd", "float32", "float16"))
    assert not precision.uses_loss_scaling(precision_config("sgd", "bfloat16", "bfloat16"))


def test_a_skipped_step_shifts_the_host_plan_only_until_it_is_read_again():
    """LookSAM (k=3) under the loss scale, dispatched by training.next_sam_step: the first
    (SAM) step overflows and is skipped, so the device's schedule stays at count 0 while the
    host serves the rest of its queue [False, False]; when the queue runs out the host reads
    the plan again and from then on serves exactly the device's sam_due."""
    import types

    import sharpax

    k = 3
    tx = precision.dynamic_loss_scale(
        optax.chain(sharpax.looksam(0.05, k=k), optax.sgd(0.1)), init_scale=8.0, period=100
    )
    config = tiny_config("looksam")
    config.looksam.k = k
    s = types.SimpleNamespace(config=config, plan=[])
    loss = lambda w, x: jnp.mean((x @ w - 1.0) ** 2)
    params, opt_state = jnp.zeros(3), tx.init(jnp.zeros(3))
    host, device, ran_sam = [], [], 0
    for t in range(10):
        due_on_device = bool(sharpax.sam_due(opt_state))
        sam_step = training.next_sam_step(s, types.SimpleNamespace(opt_state=opt_state))
        host.append(sam_step)
        device.append(due_on_device)
        x = jax.random.normal(jax.random.key(t), (8, 3))
        grads = jax.grad(loss)(params, x)
        if t == 0:
            grads = jnp.full_like(grads, jnp.inf)  # the scaled backward pass overflowed
        updates, opt_state = tx.update(
            grads, opt_state, params, grad_fn=lambda p: jax.grad(loss)(p, x), sam_step=sam_step
        )
        params = optax.apply_updates(params, updates)
        ran_sam += sam_step and t != 0
    assert int(opt_state.skipped_steps) == 1 and np.all(np.isfinite(params))
    assert host[:3] == [True, False, False] and device[:2] == [True, True]  # step 1: one ahead
    assert host[3:] == device[3:]  # read again at step 3: in step from there on
    assert int(sharpax.num_sam_steps(opt_state)) == ran_sam  # the state records what ran
