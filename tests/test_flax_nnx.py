"""NNX + nnx.Optimizer + sharpax.flax.nnx_grad_fn against a hand-written functional SAM step.

The NNX model is Linear -> BatchNorm -> Dropout -> relu -> Linear. Every dropout mask it draws is
recorded (a host callback); the reference is the same network written with explicit parameter
dicts, explicit batch statistics and those explicit masks: the clean pass at w with the clean
mask, the perturbed pass at w + ε with the perturbed mask, SGD with momentum, and the running
statistics of the clean pass only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpax

nnx = pytest.importorskip("flax.nnx")
from sharpax.flax import nnx_grad_fn  # noqa: E402

D_IN, WIDTH, CLASSES, BATCH = 4, 8, 3, 32
RATE, RHO, LR, MOMENTUM, BN_MOMENTUM, BN_EPS = 0.5, 0.05, 0.1, 0.9, 0.99, 1e-5
MASKS = []  # every dropout mask drawn, in order (clean pass, then perturbed pass)


class RecordingDropout(nnx.Module):
    """nnx.Dropout that reports its mask (its input is BatchNorm's output: nonzero almost surely)."""

    def __init__(self, rngs):
        self.drop = nnx.Dropout(RATE, rngs=rngs)

    def __call__(self, x):
        out = self.drop(x)
        jax.debug.callback(lambda m: MASKS.append(np.asarray(m)), out != 0, ordered=True)
        return out


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(D_IN, WIDTH, rngs=rngs)
        self.bn = nnx.BatchNorm(WIDTH, momentum=BN_MOMENTUM, epsilon=BN_EPS, rngs=rngs)
        self.drop = RecordingDropout(rngs)
        self.l2 = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.drop(self.bn(self.l1(x)))))


def nnx_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batch(t):
    x = jax.random.normal(jax.random.key(100 + t), (BATCH, D_IN))
    return x, jnp.arange(BATCH) % CLASSES


# ---- the reference: explicit params, explicit statistics, explicit masks ------------------------


def _params_of(model):
    return {
        "k1": model.l1.kernel[...], "b1": model.l1.bias[...], "scale": model.bn.scale[...],
        "bias": model.bn.bias[...], "k2": model.l2.kernel[...], "b2": model.l2.bias[...],
    }  # fmt: skip


def ref_loss(p, x, y, mask):
    """The network by hand; returns the loss and the batch's mean and (biased) variance."""
    h = x @ p["k1"] + p["b1"]
    mean, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
    h = (h - mean) / jnp.sqrt(var + BN_EPS) * p["scale"] + p["bias"]
    h = jnp.maximum(jnp.where(mask, h / (1 - RATE), 0.0), 0.0)
    logits = h @ p["k2"] + p["b2"]
    logp = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
    return -jnp.mean(logp[jnp.arange(len(y)), y]), (mean, var)


@jax.jit
def ref_sam_step(p, momentum, stats, x, y, clean_mask, perturbed_mask):
    """SAM by hand: ε = ρ g / ‖g‖ at the clean mask, the gradient at w + ε at the perturbed one."""
    g, (mean, var) = jax.grad(ref_loss, has_aux=True)(p, x, y, clean_mask)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in g.values()))
    perturbed = {k: p[k] + RHO * g[k] / norm for k in p}
    g_sam, _ = jax.grad(ref_loss, has_aux=True)(perturbed, x, y, perturbed_mask)
    momentum = {k: MOMENTUM * momentum[k] + g_sam[k] for k in p}
    new_p = {k: p[k] - LR * momentum[k] for k in p}
    new_stats = tuple(BN_MOMENTUM * s + (1 - BN_MOMENTUM) * b for s, b in zip(stats, (mean, var)))
    return new_p, momentum, new_stats


# ---- the NNX recipe --------------------------------------------------------------------------


def _recipe(tx):
    model = Net(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    sam_rngs = nnx.Rngs(sam=2)  # the perturbed pass's own stream

    @functools.partial(nnx.jit, static_argnames="sam_step")
    def step(model, optimizer, sam_rngs, x, y, sam_step=None):
        loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
        grad_fn = nnx_grad_fn(model, nnx_loss, x, y, key=sam_rngs.sam())
        optimizer.update(model, grads, grad_fn=grad_fn, sam_step=sam_step)
        return loss

    return model, optimizer, sam_rngs, step


def _run(step, *state, t, **kw):
    MASKS.clear()
    step(*state, *_batch(t), **kw)
    jax.effects_barrier()
    return list(MASKS)


def test_sam_step_equals_the_hand_written_one_and_keeps_clean_statistics():
    model, optimizer, sam_rngs, step = _recipe(optax.chain(sharpax.sam(RHO), optax.sgd(LR, MOMENTUM)))
    p = _params_of(model)
    momentum = jax.tree.map(jnp.zeros_like, p)
    stats = (model.bn.mean[...], model.bn.var[...])
    masks = []
    for t in range(3):
        drawn = _run(step, model, optimizer, sam_rngs, t=t)
        assert len(drawn) == 2  # the clean pass, then the perturbed pass
        masks.append(drawn)
        p, momentum, stats = ref_sam_step(p, momentum, stats, *_batch(t), *drawn)
        for k, v in _params_of(model).items():
            np.testing.assert_allclose(v, p[k], rtol=2e-5, atol=2e-6, err_msg=f"{k} at step {t}")
        # The running statistics are the clean pass's only (the perturbed pass at w + ε has
        # other batch statistics: they would show here).
        np.testing.assert_allclose(model.bn.mean[...], stats[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.bn.var[...], stats[1], rtol=1e-5, atol=1e-6)
    for t, (clean, perturbed) in enumerate(masks):
        # Independent masks at rate 1/2 agree on about half the entries (256 of them).
        assert 0.35 < np.mean(clean == perturbed) < 0.65, t
        if t + 1 < len(masks):
            assert not np.array_equal(perturbed, masks[t + 1][0]), "next clean mask = perturbed mask"
    assert int(sam_rngs.sam.count[...]) == 3
    assert int(model.drop.drop.rngs.count[...]) == 3  # one clean draw per step, none by SAM


def test_clean_masks_are_those_of_training_without_sam():
    # The perturbed pass does not consume the model's stream: the clean masks of a SAM run are
    # step for step those of a plain SGD run from the same seeds.
    sam_run, sgd_run = [], []
    model, optimizer, sam_rngs, step = _recipe(optax.chain(sharpax.sam(RHO), optax.sgd(LR)))
    for t in range(3):
        sam_run.append(_run(step, model, optimizer, sam_rngs, t=t)[0])
    model, optimizer, _, _ = _recipe(optax.sgd(LR))

    @nnx.jit
    def sgd_step(model, optimizer, x, y):
        optimizer.update(model, nnx.grad(nnx_loss)(model, x, y))

    for t in range(3):
        sgd_run.append(_run(sgd_step, model, optimizer, t=t)[0])
    for a, b in zip(sam_run, sgd_run):
        np.testing.assert_array_equal(a, b)


def test_a_copy_without_its_own_stream_reuses_the_next_clean_mask():
    # What the check above catches: a perturbed pass on a plain copy of the model (its dropout
    # stream included) draws, after the clean pass, exactly the next step's clean mask.
    model, optimizer, _, _ = _recipe(optax.chain(sharpax.sam(RHO), optax.sgd(LR)))

    @nnx.jit
    def naive_step(model, optimizer, x, y):
        grads = nnx.grad(nnx_loss)(model, x, y)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        rest = nnx.as_pure(rest)
        grad_fn = jax.grad(lambda p: nnx_loss(nnx.merge(graphdef, p, rest, copy=True), x, y))
        optimizer.update(model, grads, grad_fn=grad_fn)

    first = _run(naive_step, model, optimizer, t=0)
    second = _run(naive_step, model, optimizer, t=1)
    np.testing.assert_array_equal(first[1], second[0])


def test_vsam_with_host_dispatch_equals_the_functional_loop():
    tx = optax.chain(sharpax.vsam(RHO, window=4, blocks=2), optax.sgd(LR, MOMENTUM))
    model, optimizer, sam_rngs, step = _recipe(tx)
    p = _params_of(model)
    opt_state = tx.init(p)

    @functools.partial(jax.jit, static_argnums=6)
    def ref_step(p, opt_state, x, y, clean_mask, perturbed_mask, due):
        grads = jax.grad(lambda q: ref_loss(q, x, y, clean_mask)[0])(p)
        grad_fn = lambda q: jax.grad(lambda r: ref_loss(r, x, y, perturbed_mask)[0])(q)
        updates, opt_state = tx.update(grads, opt_state, p, grad_fn=grad_fn, sam_step=due)
        return optax.apply_updates(p, updates), opt_state

    sam_steps = 0
    for t in range(8):
        # The readers take nnx.Optimizer's state as it is (Variables) or made pure.
        due = bool(sharpax.sam_due(optimizer.opt_state))
        assert due == bool(sharpax.sam_due(nnx.as_pure(optimizer.opt_state)))
        assert due == bool(sharpax.sam_due(opt_state))
        np.testing.assert_array_equal(
            sharpax.upcoming_sam_steps(optimizer.opt_state), sharpax.upcoming_sam_steps(opt_state)
        )
        drawn = _run(step, model, optimizer, sam_rngs, t=t, sam_step=due)
        assert len(drawn) == (2 if due else 1)  # a reuse step never runs grad_fn
        p, opt_state = ref_step(p, opt_state, *_batch(t), drawn[0], drawn[-1], due)
        sam_steps += due
        for k, v in _params_of(model).items():
            np.testing.assert_allclose(v, p[k], rtol=2e-5, atol=2e-6, err_msg=f"{k} at step {t}")
    assert 0 < sam_steps < 8
    assert int(sharpax.num_sam_steps(optimizer.opt_state)) == sam_steps
    assert float(sharpax.sam_rate(optimizer.opt_state)) == float(sharpax.sam_rate(opt_state))


def test_has_aux_and_a_model_without_streams():
    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(D_IN, CLASSES, rngs=rngs)

        def __call__(self, x):
            return self.l1(x)

    model = Plain(nnx.Rngs(0))
    x, y = _batch(0)
    with_aux = lambda m, x, y: (nnx_loss(m, x, y), m(x))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    shifted = jax.tree.map(lambda v: v + 0.1, params)
    got = nnx_grad_fn(model, with_aux, x, y, has_aux=True)(shifted)  # no key needed
    p = {"kernel": shifted["l1"]["kernel"], "bias": shifted["l1"]["bias"]}
    by_hand = jax.grad(
        lambda q: optax.softmax_cross_entropy_with_integer_labels(x @ q["kernel"] + q["bias"], y).mean()
    )(p)
    for k in p:
        np.testing.assert_allclose(got["l1"][k], by_hand[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(model.l1.kernel[...], params["l1"]["kernel"])  # model untouched


def test_dropout_without_a_key_is_an_error_naming_it():
    model = Net(nnx.Rngs(params=0, dropout=1))
    with pytest.raises(ValueError, match=r"random streams \['dropout'\].*key="):
        nnx_grad_fn(model, nnx_loss, *_batch(0))
