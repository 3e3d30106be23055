"""Tests of experiments.models: shapes, parameter counts against published figures, BatchNorm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models


def _abstract_init(model, input_shape):
    """Variables as ShapeDtypeStructs: traces init without allocating or compiling."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def _abstract_logits(model, variables, input_shape, batch=2, train=False):
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    if train:
        apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
        return jax.eval_shape(apply, variables, x)[0]
    return jax.eval_shape(functools.partial(model.apply, train=False), variables, x)


# --------------------------------------------------------------------------------------------------
# Parameter counts of the paper models, checked against published figures.
# --------------------------------------------------------------------------------------------------

# (name, kwargs, num_classes, input shape, published count, exact count or None, source).
PUBLISHED = [
    # kuangliu/pytorch-cifar ResNet18 (the CIFAR ResNet-18 of SAM/SAF/vSAM): 11.17M.
    ("resnet18", {"stem": "cifar"}, 10, (32, 32, 3), 11.17e6, 11_173_962, "pytorch-cifar"),
    # torchvision model metadata ("num_params"): resnet50 25,557,032,
    # resnet101 44,549,160, resnet152 60,192,808 (He et al. 2016, v1.5 stride placement);
    # He et al. report 25.6M / 44.5M / 60.2M for 50/101/152.
    ("resnet50", {}, 1000, (224, 224, 3), 25.56e6, 25_557_032, "torchvision"),
    ("resnet101", {}, 1000, (224, 224, 3), 44.55e6, 44_549_160, "torchvision"),
    ("resnet152", {}, 1000, (224, 224, 3), 60.19e6, 60_192_808, "torchvision"),
    # Zagoruyko & Komodakis 2016, Table 4 (CIFAR-10): WRN-28-10 has 36.5M parameters.
    ("wrn28_10", {}, 10, (32, 32, 3), 36.5e6, None, "Zagoruyko & Komodakis"),
    # Han et al. 2017, Table 4: PyramidNet-110 (alpha=270, basic blocks) 28.3M. The
    # authors' block (BN-conv-BN-ReLU-conv-BN, parameter-free shortcuts) counts
    # 28,485,477 here (0.65% above the rounded table figure).
    ("pyramidnet110_270", {}, 10, (32, 32, 3), 28.3e6, None, "Han et al."),
    # Steiner et al. 2021 ("How to train your ViT"), Table: ViT-S/32 22.9M (224x224, 1000
    # classes); timm's vit_small_patch32_224 has 22,878,952.
    ("vit_s32", {}, 1000, (224, 224, 3), 22.9e6, 22_878_952, "Steiner et al. / timm"),
]


@pytest.mark.parametrize(
    "name,kwargs,num_classes,shape,published,exact,source",
    PUBLISHED,
    ids=[f"{p[0]}-{p[2]}" for p in PUBLISHED],
)
def test_param_count_matches_published(name, kwargs, num_classes, shape, published, exact, source):
    del source
    model = models.get_model(name, num_classes, **kwargs)
    variables = _abstract_init(model, shape)
    n = models.count_params(variables)
    assert abs(n - published) / published < 0.01, (name, n, published)
    if exact is not None:
        assert n == exact, (name, n, exact)
    logits = _abstract_logits(model, variables, shape)
    assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32


def _conv(k, cin, cout, bias=False):
    return k * k * cin * cout + (cout if bias else 0)


def _bn(c):
    return 2 * c  # scale and bias; running statistics live in batch_stats.


def test_wrn_and_pyramidnet_counts_match_hand_formula():
    # WRN-28-10, CIFAR-10, 1x1-conv shortcuts (paper): independent count from the paper's layout.
    n, widths = 4, (160, 320, 640)
    ref, cin = _conv(3, 3, 16), 16
    for w in widths:
        for j in range(n):
            ref += _bn(cin) + _conv(3, cin, w) + _bn(w) + _conv(3, w, w)
            ref += _conv(1, cin, w) if cin != w else 0
            cin = w
    ref += _bn(640) + 640 * 10 + 10
    assert ref == 36_479_194
    variables = _abstract_init(models.get_model("wrn28_10", 10), (32, 32, 3))
    assert models.count_params(variables) == ref
    # google-research/sam's variant has parameter-free shortcuts.
    pad = _abstract_init(models.get_model("wrn28_10", 10, shortcut="pad"), (32, 32, 3))
    assert models.count_params(pad) == ref - _conv(1, 16, 160) - _conv(1, 160, 320) - _conv(
        1, 320, 640
    )

    # PyramidNet-110, alpha=270: width grows by 270 / 54 = 5 per block, 16 -> 286.
    channels = [16 + 5 * (k + 1) for k in range(54)]
    assert models.pyramidnet_channels(110, 270) == channels
    ref, cin = _conv(3, 3, 16) + _bn(16), 16
    for c in channels:
        ref += _bn(cin) + _conv(3, cin, c) + _bn(c) + _conv(3, c, c) + _bn(c)
        cin = c
    ref += _bn(286) + 286 * 10 + 10
    variables = _abstract_init(models.get_model("pyramidnet110_270", 10), (32, 32, 3))
    assert models.count_params(variables) == ref == 28_485_477


def test_small_model_counts_match_hand_formula():
    # flax examples/mnist CNN: conv3x3(1->32), conv3x3(32->64), dense(7*7*64->256), dense(256->10).
    ref = _conv(3, 1, 32, True) + _conv(3, 32, 64, True) + (3136 * 256 + 256) + (256 * 10 + 10)
    assert (
        models.count_params(_abstract_init(models.get_model("mnist_cnn", 10), (28, 28, 1))) == ref
    )
    # MNIST-1D CNN (Greydanus 2020): conv1d k5 (1->25), k3 (25->25) x2, linear(5*25 -> 10).
    ref = (5 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (125 * 10 + 10)
    assert ref == 5210
    assert models.count_params(_abstract_init(models.get_model("mnist1d_cnn", 10), (40,))) == ref
    # MNIST-1D MLP: 40 -> 100 -> 100 -> 10.
    ref = (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)
    assert models.count_params(_abstract_init(models.get_model("mnist1d_mlp", 10), (40,))) == ref


# --------------------------------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------------------------------

# Every registered model not already shape-checked at full size in PUBLISHED, on small inputs.
OTHER_SHAPES = [
    ("resnet34", {}, (32, 32, 3)),
    ("vit_s16", {}, (32, 32, 3)),
    ("vit_b32", {}, (32, 32, 3)),
    ("mnist_cnn", {}, (28, 28, 1)),
    ("mnist1d_cnn", {}, (40,)),
    ("mnist1d_mlp", {}, (40,)),
    ("resnet18_lsq", {"stem": "cifar", "quant_bits": 2}, (32, 32, 3)),  # LSQ: tests/test_lsq.py
    ("mnist1d_cnn_lsq", {}, (40,)),
]


def test_registry_lists_every_model():
    checked = {p[0] for p in PUBLISHED} | {n for n, _, _ in OTHER_SHAPES}
    assert checked == set(models.MODEL_NAMES)


@pytest.mark.parametrize("name,kwargs,shape", OTHER_SHAPES, ids=[s[0] for s in OTHER_SHAPES])
def test_output_shapes_other_models(name, kwargs, shape):
    model = models.get_model(name, 7, **kwargs)
    variables = _abstract_init(model, shape)
    logits = _abstract_logits(model, variables, shape, batch=3)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert ("batch_stats" in variables) == name.startswith("resnet")


# Scaled-down versions of the CNN architectures, run for real (jit) in train and eval mode:
# bottleneck blocks with the ImageNet stem, WRN projection shortcuts, PyramidNet padded
# shortcuts, strided stages. The BatchNorm tests run the basic-block CIFAR ResNet, the dropout
# test a ViT and the MNIST-1D test the 1-D CNN; every other model is shape-checked above.
TINY = [
    ("resnet50", {"num_filters": 4, "stage_sizes": (1, 1)}, (16, 16, 3)),
    ("wrn28_10", {"depth": 10, "width": 1}, (8, 8, 3)),
    ("pyramidnet110_270", {"depth": 8, "alpha": 12}, (8, 8, 3)),
]


@pytest.fixture(autouse=True, scope="module")
def _fast_init_compile():
    # Non-partitionable threefry compiles model.init several times faster on CPU; values
    # differ from the default mode but every test here is self-consistent.
    with jax.threefry_partitionable(False):
        yield


@pytest.mark.parametrize("name,kwargs,shape", TINY, ids=[f"{s[0]}-{i}" for i, s in enumerate(TINY)])
def test_tiny_models_run(name, kwargs, shape):
    model = models.get_model(name, 5, **kwargs)
    x = jax.random.normal(jax.random.key(1), (4, *shape))

    @jax.jit  # One compilation for init + both modes keeps the test fast on CPU.
    def run(x):
        variables = model.init(jax.random.key(0), x, train=False)
        train = models.apply_model(model, variables, x, train=True)
        return variables, train, models.apply_model(model, variables, x, train=False)

    variables, (logits, state), (eval_logits, eval_state) = run(x)
    for out in (logits, eval_logits):
        assert out.shape == (4, 5) and out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out)))
    assert set(state) == set(eval_state) == set(variables) - {"params"}


def test_mnist1d_models_accept_2d_and_3d_inputs():
    model = models.get_model("mnist1d_cnn", 10)
    variables = models.init_model(model, jax.random.key(0), (40,))
    x = jax.random.normal(jax.random.key(1), (3, 40))
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(variables, x), apply(variables, x[..., None]), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# BatchNorm: train uses (and records) batch statistics, eval uses the running averages.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_resnet():
    """A 2-stage CIFAR ResNet with 4 filters, its variables, a batch and a jitted apply_model."""
    model = models.get_model("resnet18", 3, stem="cifar", num_filters=4, stage_sizes=(1, 1))
    variables = models.init_model(model, jax.random.key(0), (8, 8, 3))
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3)) * 2.0 + 0.5
    apply = jax.jit(functools.partial(models.apply_model, model), static_argnames="train")
    return model, variables, x, apply


def test_batchnorm_train_updates_running_stats_from_batch(small_resnet):
    _, variables, x, apply = small_resnet
    _, state = apply(variables, x, train=True)
    # Independent reference: the stem conv by hand, then PyTorch-style running averages
    # new = 0.9 * old + 0.1 * batch statistic (init: mean 0, var 1; biased batch variance).
    kernel = variables["params"]["stem_conv"]["kernel"]
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = np.asarray(y, np.float64)
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    stem = state["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(stem["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stem["var"], 0.9 * 1.0 + 0.1 * var, rtol=1e-4, atol=1e-6)
    # Every BN layer's statistics moved; eval leaves them alone.
    old_leaves = jax.tree.leaves(variables["batch_stats"])
    assert len(old_leaves) == len(jax.tree.leaves(state)) > 4
    for old, new in zip(old_leaves, jax.tree.leaves(state)):
        assert not np.allclose(old, new)
    _, eval_state = apply(variables, x, train=False)
    for old, new in zip(old_leaves, jax.tree.leaves(eval_state)):
        np.testing.assert_array_equal(old, new)


def test_batchnorm_eval_is_per_example_train_is_per_batch(small_resnet):
    _, variables, x, apply = small_resnet
    eval_full, _ = apply(variables, x, train=False)
    eval_first, _ = apply(variables, x[:2], train=False)
    np.testing.assert_allclose(eval_full[:2], eval_first, rtol=1e-5, atol=1e-5)
    train_full, _ = apply(variables, x, train=True)
    train_first, _ = apply(variables, x[:2], train=True)
    assert not np.allclose(train_full[:2], train_first, atol=1e-4)
    # After many train-mode passes over one batch the running averages converge to that
    # batch's statistics (0.9^150 < 1e-6), so eval mode then equals train mode on it.
    for _ in range(150):
        _, state = apply(variables, x, train=True)
        variables = {"params": variables["params"], **state}
    eval_logits, _ = apply(variables, x, train=False)
    np.testing.assert_allclose(eval_logits, train_full, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# dtype, dropout, errors.
# --------------------------------------------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_params_and_logits():
    for name, shape in [
        ("resnet50", (64, 64, 3)),
        ("wrn28_10", (32, 32, 3)),
        ("vit_s32", (64, 64, 3)),
    ]:
        model = models.get_model(name, 10, dtype=jnp.bfloat16)
        variables = _abstract_init(model, shape)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables)), name
        x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        train = functools.partial(models.apply_model, model, train=True)
        logits, state = jax.eval_shape(train, variables, x)
        assert logits.dtype == jnp.float32, name
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state)), name


def test_dropout_needs_rng_and_is_off_in_eval():
    model = models.get_model(
        "vit_s32",
        4,
        patch_size=4,
        hidden_size=8,
        depth=1,
        num_heads=2,
        mlp_dim=16,
        dropout_rate=0.5,
    )
    variables = models.init_model(model, jax.random.key(0), (8, 8, 3))
    head = variables["params"]["head"]
    head["kernel"] = jnp.ones_like(head["kernel"])  # The ViT head is zero-initialised.
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    # Eval mode ignores the dropout rng (same output for any key, and without one)
    # and equals a dropout-free model's train-mode output.
    c = apply(variables, x, train=False, rngs={"dropout": jax.random.key(1)})
    d = apply(variables, x, train=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(c, d)
    np.testing.assert_array_equal(c, apply(variables, x, train=False))
    no_dropout = model.clone(dropout_rate=0.0)
    np.testing.assert_allclose(c, no_dropout.apply(variables, x, train=True), rtol=1e-6, atol=1e-6)
    # Train mode needs the rng.
    with pytest.raises(Exception, match="dropout"):
        apply(variables, x, train=True)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.get_model("resnet19", 10)
    with pytest.raises(ValueError, match="num_classes"):
        models.get_model("resnet18", 0)
    with pytest.raises(TypeError, match="resnet18"):
        models.get_model("resnet18", 10, widht=2)
    with pytest.raises(ValueError, match="stem"):
        _abstract_init(models.get_model("resnet18", 10, stem="tiny"), (32, 32, 3))
    with pytest.raises(ValueError, match="6n \\+ 4"):
        _abstract_init(models.get_model("wrn28_10", 10, depth=27), (32, 32, 3))
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.pyramidnet_channels(100, 270)
    with pytest.raises(ValueError, match="patch_size"):
        _abstract_init(models.get_model("vit_s32", 10), (48, 48, 3))
    with pytest.raises(ValueError, match="input_shape"):
        models.init_model(models.get_model("mnist1d_mlp", 10), jax.random.key(0), (0,))
