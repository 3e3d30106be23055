"""Every config builds for every method, and the paper values are what docs/configs.md says."""

import importlib
import math
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import configs, input_pipeline, methods, models, training
from experiments.configs import base

CONFIG_FILES = sorted(
    m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "base"
)


def _config(name, arg):
    return importlib.import_module(f"experiments.configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_builds_for_every_method(name):
    for method in training.METHODS:
        c = _config(name, method)
        assert c.method == method
        info = input_pipeline.get_dataset_info(c.dataset)
        if method == "msam" and c.optimizer != "sgd":  # AdamW-MSAM is not implemented
            with pytest.raises(ValueError, match="msam is SGD with heavy-ball momentum"):
                training.setup(c, train_size=info.num_train)
            continue
        if method == "msam":  # the authors' MSAM runs use heavy-ball momentum, not Nesterov
            assert not c.get("nesterov", False)
        # setup builds the model, the optimizer chain, the SAF/MESA objects, the vSAM mask
        # and the jitted steps (nothing is compiled or allocated until called).
        s = training.setup(c, train_size=info.num_train)
        assert s.steps_per_epoch == info.num_train // c.batch_size
        if method == "mesa":
            assert 0.0 < methods.mesa_decay(c, s.steps_per_epoch) < 1.0
    smoke = _config(name, "sam,runlocal")
    assert smoke.num_epochs == 1 and smoke.max_steps_per_epoch == 2


def test_kl_start_epoch_mapping():
    # Paper: e > E_start with e from 1, E_start = 5 -> 0-based epochs >= 5.
    assert base.get_base_config().saf.start_epoch == 5
    assert base.get_base_config().mesa.start_epoch == 5
    # Scripts: epoch > kl_start_epoch with 0-based epochs -> >= kl_start_epoch + 1.
    assert base.official_kl_start(5) == 6
    assert [e for e in range(10) if e > 5] == [e for e in range(10) if e >= base.official_kl_start(5)]


def test_mesa_decay_is_derived_from_a_horizon_in_epochs():
    c = _config("cifar10_resnet18", "mesa")
    assert c.mesa.ema_horizon_epochs == 4.0
    # CIFAR-10, batch 128: 390 steps per epoch -> 1 - 1/1560.
    assert methods.mesa_decay(c, 390) == pytest.approx(1 - 1 / 1560, abs=1e-15)
    # The authors' ImageNet run (batch 1024, 1251 steps per epoch) -> their 0.9998.
    assert methods.mesa_decay(c, 1251) == pytest.approx(0.9998, abs=1e-6)
    # Share of the random initial weights left in the teacher when the term starts
    # (0-based epoch 5): e^{-5/4} ≈ 0.29 whatever the steps per epoch; 0.9998 at
    # CIFAR's 390 steps would leave 68 %.
    d = methods.mesa_decay(c, 390)
    assert d ** (5 * 390) == pytest.approx(math.exp(-5 / 4), rel=1e-3)
    assert 0.9998 ** (5 * 390) == pytest.approx(0.677, abs=1e-3)
    with pytest.raises(ValueError, match="at least one step"):
        methods.ema_decay(0.001, 62, "mesa.ema_horizon_epochs")


def test_asam_has_its_own_radius_and_scales_weights_only():
    assert _config("cifar10_resnet18", "asam").asam.rho == 0.5
    assert _config("cifar100_resnet18", "asam").asam.rho == 1.0
    assert _config("cifar10_wrn28_10", "asam").sam.rho == 0.05  # SAM keeps its own
    params = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2))}, "BatchNorm_0": {"scale": jnp.ones(2),
              "bias": jnp.ones(2)}, "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    mask = models.asam_weights_mask(params)
    assert mask == {"Conv_0": {"kernel": True}, "BatchNorm_0": {"scale": True, "bias": False},
                    "head": {"kernel": True, "bias": False}}


def test_vsam_statistics_use_the_last_ten_tensors_in_layer_order():
    c = _config("vsam_cifar100_resnet18", "vsam")
    assert c.vsam.stat_last_tensors == 10
    model = models.get_model(c.model, 100, **dict(c.model_kwargs))
    params = jax.eval_shape(lambda: models.init_model(model, jax.random.key(0), (32, 32, 3)))["params"]
    mask = models.last_tensors_mask(model, (32, 32, 3), 10)(params)
    chosen = sorted(
        "/".join(str(k.key) for k in path)
        for path, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m
    )
    # The authors' choice for their CIFAR ResNet-18 (model.parameters() order): the shortcut
    # BatchNorm of layer4.0, both convs and BatchNorms of layer4.1, the classifier.
    assert chosen == sorted([
        "BasicBlock_6/proj_bn/scale", "BasicBlock_6/proj_bn/bias",
        "BasicBlock_7/Conv_0/kernel", "BasicBlock_7/BatchNorm_0/scale",
        "BasicBlock_7/BatchNorm_0/bias", "BasicBlock_7/Conv_1/kernel",
        "BasicBlock_7/BatchNorm_1/scale", "BasicBlock_7/BatchNorm_1/bias",
        "head/kernel", "head/bias",
    ])
    # Sorted-key flattening would have picked other tensors: the order matters.
    flat = ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert sorted(flat[-10:]) != chosen
    with pytest.raises(ValueError, match="num_tensors"):
        models.last_tensors_mask(model, (32, 32, 3), 10_000)


def test_vsam_recipe_values():
    c = _config("vsam_cifar10_resnet18", "vsam")
    assert (c.learning_rate, c.weight_decay, c.label_smoothing, c.cutout, c.cutout_prob) == (
        0.05, 1e-3, 0.1, 16, 0.5)
    assert (c.batch_size, c.num_epochs, c.momentum, c.nesterov) == (128, 200, 0.9, False)
    assert (c.vsam.window, c.vsam.blocks, c.vsam.warmup_epochs) == (50, 5, 3)


def test_imagenet_recipe_values_and_weight_decay_mask():
    c = _config("imagenet_resnet50", "saf")
    assert (c.batch_size, c.learning_rate, c.num_epochs) == (4096, 1.4, 90)  # paper, Sec. 4.1
    assert c.nesterov and not c.weight_decay_on_1d and c.label_smoothing == 0.1
    assert c.model_ema_horizon_epochs == 4.0 and c.saf.lag == 3
    # No decay on 1-D tensors (biases, BatchNorm): timm's filter_bias_and_bn.
    c.learning_rate, c.momentum, c.weight_decay, c.warmup_epochs = 1.0, 0.0, 0.5, 0
    c.lr_schedule = "constant"
    tx = methods.make_optimizer(c, 10)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5 * np.ones((2, 2)))
    np.testing.assert_array_equal(updates["bias"], np.zeros(2))
    assert isinstance(tx, optax.GradientTransformation)


def test_scale_to_run_keeps_each_fraction_of_training():
    c = _config("mnist1d", "sgd")
    f = c.num_epochs / base.PAPER_EPOCHS  # 20 / 200
    assert f == 0.1
    assert c.saf.start_epoch == math.ceil(0.1 * 5) == 1
    assert c.saf.lag == math.ceil(0.1 * 3) == 1
    assert c.mesa.start_epoch == 1
    assert c.vsam.warmup_epochs == math.ceil(0.1 * 3) == 1
    assert c.mesa.ema_horizon_epochs == pytest.approx(0.1 * 4.0)
    assert c.vsam.window == 4 * c.vsam.blocks == 20
    # MESA's decay for this run: 62 steps per epoch.
    assert methods.mesa_decay(c, 62) == pytest.approx(1 - 1 / (0.4 * 62))


def _tiny(method, **overrides):
    c = _config("mnist1d", method)
    c.num_epochs, c.batch_size, c.max_steps_per_epoch = 1, 32, 5
    c.saf.start_epoch = c.mesa.start_epoch = 0
    for k, v in overrides.items():
        c[k] = v
    return c


def test_model_ema_is_evaluated_beside_the_model(tmp_path):
    from experiments import train

    for method in ("sgd", "mesa"):
        config = _tiny(method, model_ema_horizon_epochs=1.0)
        rows = train.train_and_evaluate(config, str(tmp_path / method), progress=False)
        assert 0.0 <= rows[0]["test_accuracy_ema"] <= 1.0
        assert np.isfinite(rows[0]["test_loss_ema"])
    rows = train.train_and_evaluate(_tiny("sgd"), str(tmp_path / "off"), progress=False)
    assert "test_accuracy_ema" not in rows[0]
    # The flip set of the config's label noise is written beside the metrics.
    import json

    with open(tmp_path / "off" / "label_noise.json") as f:
        noise = json.load(f)
    assert noise["rate"] == 0.3 and len(noise["flipped_ids"]) == 1200
