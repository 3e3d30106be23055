"""LSQ (Esser et al., ICLR 2020): the quantizer and its two gradients against the paper's equations,
the quantized layers' step sizes, and quantization-aware training with SGD, SAM and vSAM."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lsq, models, train
from experiments.configs import mnist1d_lsq


def paper_quantize(v, s, q_n, q_p):
    """Eq. 1-2: round(clip(v/s, -Q_N, Q_P)) * s, in float64."""
    return np.round(np.clip(v / s, -q_n, q_p)) * s


def paper_grad_s(v, s, q_n, q_p):
    """Eq. 3: d v_hat / d s elementwise: -v/s + round(v/s) inside, -Q_N / Q_P at the ends."""
    r = v / s
    return np.where(r <= -q_n, -q_n, np.where(r >= q_p, q_p, -r + np.round(r)))


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False)])
def test_quantizer_values_and_both_gradients_follow_the_paper(bits, signed):
    q_n, q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert lsq.quant_range(bits, signed) == (q_n, q_p)
    s = 0.37
    # Hand-made inputs: inside the range, at both clipping ends and beyond, off rounding ties.
    v = np.array([-9.1, -q_n * s - 0.05, -0.8, -0.3, 0.04, 0.3, 0.61, q_p * s + 0.05, 7.7]) * 1.0
    v = v.astype(np.float32).astype(np.float64)
    got = np.asarray(lsq.lsq_quantize(jnp.asarray(v, jnp.float32), s, bits=bits, signed=signed))
    np.testing.assert_allclose(
        got, paper_quantize(v, np.float32(s), q_n, q_p), rtol=1e-6, atol=1e-7
    )

    weights = np.linspace(0.5, 1.5, v.size)  # d/dx of sum(weights * v_hat)
    f = lambda x, st: jnp.sum(
        jnp.asarray(weights, jnp.float32) * lsq.lsq_quantize(x, st, bits=bits, signed=signed)
    )
    gx, gs = jax.grad(f, argnums=(0, 1))(jnp.asarray(v, jnp.float32), jnp.float32(s))
    r = v / np.float32(s)
    inside = (r > -q_n) & (r < q_p)
    np.testing.assert_array_equal(np.asarray(gx), np.where(inside, weights, 0.0).astype(np.float32))
    expected_s = np.sum(weights * paper_grad_s(v, np.float32(s), q_n, q_p)) / math.sqrt(
        v.size * q_p
    )
    np.testing.assert_allclose(float(gs), expected_s, rtol=1e-5)


def test_gradient_scale_uses_the_given_number_of_elements():
    x = jnp.array([0.2, 0.9, -3.0])
    g_default = jax.grad(lambda s: lsq.lsq_quantize(x, s, bits=2, signed=True).sum())(1.0)
    g_100 = jax.grad(lambda s: lsq.lsq_quantize(x, s, bits=2, signed=True, num_elements=100).sum())(
        1.0
    )
    np.testing.assert_allclose(float(g_default) / float(g_100), math.sqrt(100 / 3), rtol=1e-6)


@pytest.mark.parametrize("bad", [1, 17, 2.0, True])
def test_bad_bit_widths_raise(bad):
    with pytest.raises(ValueError, match="bits"):
        lsq.lsq_quantize(jnp.ones(3), 1.0, bits=bad, signed=True)


def test_layers_start_from_the_papers_step_sizes_and_need_real_data():
    model = models.get_model("mnist1d_cnn_lsq", 10, quant_bits=3)
    sample = np.random.default_rng(0).normal(size=(16, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="sample="):
        models.init_model(model, jax.random.key(0), (40,))
    variables = models.init_model(model, jax.random.key(0), (40,), sample=sample)
    params = variables["params"]
    assert "LSQConvGeneral_0" not in params["Conv_0"] and "LSQConvGeneral_0" not in params["head"]
    # The quantized conv's input is ReLU(first conv(sample)): rebuild it to check the init rule.
    conv0 = params["Conv_0"]
    x = jnp.asarray(sample)[..., None]
    h = jax.lax.conv_general_dilated(
        x, conv0["kernel"], (2,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")
    )
    h = np.asarray(jax.nn.relu(h + conv0["bias"]), np.float64)
    q = params["Conv_1"]["LSQConvGeneral_0"]
    np.testing.assert_allclose(
        float(q["act_step"]), 2 * np.mean(np.abs(h)) / math.sqrt(7), rtol=1e-4
    )
    w = np.asarray(params["Conv_1"]["kernel"], np.float64)
    np.testing.assert_allclose(
        float(q["weight_step"]), 2 * np.mean(np.abs(w)) / math.sqrt(3), rtol=1e-5
    )
    # Both step sizes are learned: the loss has a non-zero gradient for each.
    loss = lambda p: jnp.sum(model.apply({"params": p}, sample) ** 2)
    g = jax.grad(loss)(params)["Conv_1"]["LSQConvGeneral_0"]
    assert float(g["act_step"]) != 0.0 and float(g["weight_step"]) != 0.0


def test_quantized_forward_uses_quantized_weights():
    """The layer's output equals a float conv on hand-quantized inputs and kernel."""
    model = models.get_model("mnist1d_cnn_lsq", 10, quant_bits=2)
    sample = np.random.default_rng(1).normal(size=(4, 40)).astype(np.float32)
    params = models.init_model(model, jax.random.key(1), (40,), sample=sample)["params"]
    conv1 = params["Conv_1"]
    q = conv1["LSQConvGeneral_0"]
    x = np.random.default_rng(2).uniform(0, 2, size=(4, 20, 25)).astype(np.float32)
    layer = lsq.quantized_conv(2)(25, (3,), (2,), padding=((1, 1),))
    out = layer.apply({"params": conv1}, jnp.asarray(x))
    xq = paper_quantize(x.astype(np.float64), float(q["act_step"]), 0, 3)
    wq = paper_quantize(np.asarray(conv1["kernel"], np.float64), float(q["weight_step"]), 2, 1)
    ref = jax.lax.conv_general_dilated(
        jnp.asarray(xq, jnp.float32), jnp.asarray(wq, jnp.float32), (2,), ((1, 1),),
        dimension_numbers=("NWC", "WIO", "NWC"),
    ) + conv1["bias"]  # fmt: skip
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["sgd", "sam", "vsam"])
def test_quantization_aware_training_runs_with_each_method(method, tmp_path):
    c = mnist1d_lsq.get_config(method)
    c.model_kwargs.quant_bits = 2
    c.num_epochs = 1
    c.batch_size = 32
    c.max_steps_per_epoch = 6
    c.vsam.warmup_epochs = 0
    c.vsam.window = 4
    c.vsam.blocks = 2
    rows = train.train_and_evaluate(c, str(tmp_path), progress=False)
    assert np.isfinite(rows[0]["train_loss"]) and 0.0 <= rows[0]["test_accuracy"] <= 1.0
    if method != "sgd":
        assert 0.0 < rows[0]["sam_step_fraction"] <= 1.0
