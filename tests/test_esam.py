"""Tests of sharpax.esam (Du et al., ICLR 2022) against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from scipy import stats

import sharpax
from sharpax.esam import esam

# ----------------------------------------------------------------------------- helpers


def mlp_losses(params, batch):
    """Per-example losses, shape (B,)."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2, axis=-1)


def mlp_loss(params, batch):
    return jnp.mean(mlp_losses(params, batch))


def np_losses(p, x, y):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.tanh(x @ p["w1"] + p["b1"])
    return np.mean((h @ p["w2"] - y) ** 2, axis=-1)


def np_grad(p, x, y):
    """Hand-derived float64 gradient of the mean loss (independent of jax)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.tanh(x @ p["w1"] + p["b1"])
    r = h @ p["w2"] - y
    dout = 2.0 * r / r.size
    dh = (dout @ p["w2"].T) * (1.0 - h**2)
    return {"b1": dh.sum(0), "w1": x.T @ dh, "w2": h.T @ dout}


SHAPES = {"w1": (3, 4), "b1": (4,), "w2": (4, 1)}
KEYS = sorted(SHAPES)  # == jax.tree.leaves order of the params dict


def mlp_init(seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in SHAPES.items()}


def mlp_data(steps, batch=8, seed=1, lead=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, *lead, batch, 3)).astype(np.float32)
    scale = rng.exponential(size=(steps, *lead, 1, 1))
    y = (rng.normal(size=(steps, *lead, batch, 1)) * scale).astype(np.float32)
    return x, y


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in KEYS])


def unflat(vec):
    out, i = {}, 0
    for k in KEYS:
        n = int(np.prod(SHAPES[k]))
        out[k] = vec[i : i + n].reshape(SHAPES[k])
        i += n
    return out


def drawn_mask(seed, count, num_leaves, beta):
    """The documented draw: one uniform per leaf (jax.tree.leaves order) from fold_in(key, count)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), count)
    return np.asarray(jax.random.uniform(key, (num_leaves,)) < beta)


def leaf_mask_vector(mask):
    """Per-leaf bools expanded to the flat parameter vector."""
    return np.concatenate([np.full(int(np.prod(SHAPES[k])), m) for k, m in zip(KEYS, mask)])


def np_epsilon(w, g, rho, beta, mask, eps=1e-12):
    """ESAM's SWP ascent: (rho / beta) · m ⊙ g / (‖m ⊙ g‖ + eps) (0 when m ⊙ g = 0)."""
    mg = leaf_mask_vector(mask) * g
    n = np.linalg.norm(mg)
    return np.zeros_like(w) if n == 0 else (rho / beta) * mg / (n + eps)


def np_sds(w_adv, w, x, y, gamma):
    """SDS: the gradient at w + ε of the mean loss of the k examples whose loss rose most."""
    rise = np_losses(unflat(w_adv), x, y) - np_losses(unflat(w), x, y)
    k = max(1, int(len(rise) * gamma))
    order = np.argsort(-rise)
    if k < len(rise):  # no near-tie at the cut (the selection is well defined in float32)
        assert rise[order[k - 1]] - rise[order[k]] > 1e-5 * np.abs(rise).max()
    idx = np.sort(order[:k])
    return flat(np_grad(unflat(w_adv), x[idx], y[idx])), idx


def assert_close(out, ref, rtol=1e-5, err_msg=""):
    """Elementwise ``rtol``, with an absolute floor of ``rtol · max|ref|`` (float32 cancellations)."""
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max(), err_msg=err_msg)


def trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def make_step(opt, mode="grad_fn", lr=None):
    """Jitted step; ``mode``: 'grad_fn', 'loss_fn' (loss_fn + batch) or 'losses' (+ clean losses).

    With ``lr`` (for a bare ``esam``), the new params are ``params − lr · updates``.
    """

    @jax.jit
    def step(params, state, x, y):
        batch = {"x": x, "y": y}
        grads = jax.grad(mlp_loss)(params, batch)
        if mode == "grad_fn":
            kwargs = {"grad_fn": lambda p: jax.grad(mlp_loss)(p, batch)}
        else:
            kwargs = {"loss_fn": mlp_losses, "batch": batch}
            if mode == "losses":
                kwargs["losses"] = mlp_losses(params, batch)
        updates, state = opt.update(grads, state, params, **kwargs)
        step = updates if lr is None else jax.tree.map(lambda u: -lr * u, updates)
        return optax.apply_updates(params, step), state, updates

    return step


# ----------------------------------------------------------------------------- reduces to SAM


@pytest.mark.parametrize(
    "rho", [0.1, optax.linear_schedule(0.3, 0.01, 10)], ids=["constant", "schedule"]
)
def test_beta_gamma_one_equals_sam_bit_for_bit(rho):
    steps, lr = 10, 0.1
    a = optax.chain(esam(rho, beta=1.0, gamma=1.0), optax.sgd(lr))
    b = optax.chain(sharpax.sam(rho), optax.sgd(lr))
    step_a, step_b = make_step(a), make_step(b)
    xs, ys = mlp_data(steps)
    pa, sa = mlp_init(), a.init(mlp_init())
    pb, sb = mlp_init(), b.init(mlp_init())
    for t in range(steps):
        pa, sa, ua = step_a(pa, sa, xs[t], ys[t])
        pb, sb, ub = step_b(pb, sb, xs[t], ys[t])
        trees_equal(ua, ub)
        trees_equal(pa, pb)
    assert int(sa[0].count) == int(sa[0].num_sam_steps) == steps


def test_gamma_one_with_loss_fn_is_full_batch_gradient_at_perturbed_point():
    rho, steps = 0.3, 3
    opt = esam(rho, beta=1.0, gamma=1.0)
    step = make_step(opt, mode="loss_fn", lr=0.1)
    xs, ys = mlp_data(steps, batch=16, seed=3)
    params, state = mlp_init(1), opt.init(mlp_init(1))
    for t in range(steps):
        w = flat(params)
        g = flat(np_grad(params, xs[t], ys[t]))
        w_adv = w + rho * g / np.linalg.norm(g)
        expected = flat(np_grad(unflat(w_adv), xs[t], ys[t]))
        params, state, updates = step(params, state, xs[t], ys[t])
        assert_close(flat(updates), expected)
        assert np.linalg.norm(expected - g) > 1e-2 * np.linalg.norm(g)


# ----------------------------------------------------------------------------- SWP


def test_swp_matches_reference_with_documented_mask():
    rho, beta, seed, steps = 0.4, 0.5, 3, 12
    opt = esam(rho, beta=beta, gamma=1.0, seed=seed)
    step = make_step(opt, lr=0.1)
    xs, ys = mlp_data(steps, seed=2)
    params = mlp_init(2)
    state = opt.init(params)
    assert len(jax.tree.leaves(params)) == len(KEYS)
    masks = set()
    for t in range(steps):
        mask = drawn_mask(seed, t, len(KEYS), beta)
        masks.add(tuple(mask))
        w = flat(params)
        g = flat(np_grad(params, xs[t], ys[t]))
        e = np_epsilon(w, g, rho, beta, mask)
        if mask.any():
            np.testing.assert_allclose(np.linalg.norm(e), rho / beta, rtol=1e-9)
        expected = flat(np_grad(unflat(w + e), xs[t], ys[t]))
        new, state, updates = step(params, state, xs[t], ys[t])
        assert_close(flat(updates), expected, err_msg=f"{t} {mask}")
        # the (documented) mask matters: the full perturbation gives something else
        if 0 < mask.sum() < len(mask):
            full = np_epsilon(w, g, rho, 1.0, np.ones(len(KEYS), bool))
            alt = flat(np_grad(unflat(w + full), xs[t], ys[t]))
            assert np.linalg.norm(alt - expected) > 1e-3 * np.linalg.norm(expected)
        params = new
    assert int(state.count) == steps
    assert any(0 < sum(m) < len(m) for m in masks)  # partial masks were exercised


def quadratic_setup(num_leaves):
    """loss = ½‖w‖²: grad_fn(w) = w, so the output minus g is exactly ε (per leaf)."""
    rng = np.random.default_rng(11)
    params = {
        f"p{i:02d}": jnp.asarray(rng.normal(size=(2,)) + 3.0, jnp.float32)
        for i in range(num_leaves)
    }
    return params


def test_swp_selection_frequency_is_beta():
    num_leaves, n_steps, beta, rho, seed = 12, 600, 0.3, 0.5, 7
    opt = esam(rho, beta=beta, gamma=1.0, seed=seed)
    params = quadratic_setup(num_leaves)
    state0 = opt.init(params)

    def update_at(count):
        state = state0._replace(count=count)
        out, _ = opt.update(params, state, params, grad_fn=lambda p: p)
        return out

    outs = jax.jit(jax.vmap(update_at))(jnp.arange(n_steps, dtype=jnp.int32))
    leaves = [np.asarray(v, np.float64) for v in jax.tree.leaves(outs)]  # (n_steps, 2) each
    w = [np.asarray(v, np.float64) for v in jax.tree.leaves(params)]
    eps_leaf = np.stack([leaf - wi for leaf, wi in zip(leaves, w)], axis=1)  # (n, L, 2)
    selected = np.linalg.norm(eps_leaf, axis=-1) > 1e-4  # per step, per tensor
    # the empirical mask is the documented draw
    drawn = np.stack([drawn_mask(seed, t, num_leaves, beta) for t in range(n_steps)])
    np.testing.assert_array_equal(selected, drawn)
    # frequency per tensor ≈ beta (two-sided, Bonferroni over the tensors)
    lo, hi = stats.binom.interval(1 - 1e-3 / num_leaves, n_steps, beta)
    freq = selected.sum(0)
    assert np.all((lo <= freq) & (freq <= hi)), (freq, lo, hi)
    # masks vary across steps and across tensors
    assert 0 < selected.mean() < 1 and len({tuple(r) for r in selected}) > n_steps // 4
    # ‖ε‖ = rho / beta whenever something is selected, and ε ∝ g on the selected tensors
    any_sel = selected.any(1)
    norms = np.linalg.norm(eps_leaf.reshape(n_steps, -1), axis=1)
    np.testing.assert_allclose(norms[any_sel], rho / beta, rtol=1e-5)
    wv = np.stack(w)  # (L, 2); here g = w
    for t in np.flatnonzero(any_sel)[:20]:
        m = selected[t][:, None]
        ref = (rho / beta) * m * wv / np.linalg.norm(m * wv)
        np.testing.assert_allclose(eps_leaf[t], ref, rtol=2e-4, atol=2e-5)
    # nothing selected: ε = 0, the output is g itself
    none = np.flatnonzero(~any_sel)
    assert len(none) > 0
    for t in none:
        for leaf, wi in zip(leaves, w):
            np.testing.assert_array_equal(leaf[t], wi)


def test_swp_no_tensor_selected_gives_clean_gradient():
    rho, beta, seed = 0.5, 0.1, 0
    count = next(t for t in range(1000) if not drawn_mask(seed, t, len(KEYS), beta).any())
    opt = esam(rho, beta=beta, gamma=1.0, seed=seed)
    xs, ys = mlp_data(1, seed=5)
    params = mlp_init(4)
    state = opt.init(params)._replace(count=jnp.asarray(count, jnp.int32))
    _, state, updates = make_step(opt)(params, state, xs[0], ys[0])
    assert_close(flat(updates), flat(np_grad(params, xs[0], ys[0])))
    assert int(state.count) == count + 1


# ----------------------------------------------------------------------------- SDS


@pytest.mark.parametrize(
    "beta,gamma,seed", [(1.0, 0.5, 0), (1.0, 0.3, 0), (0.6, 0.5, 4), (1.0, 0.01, 0)]
)
def test_sds_matches_reference(beta, gamma, seed):
    rho, steps, batch = 0.5, 4, 16
    opt = optax.chain(esam(rho, beta=beta, gamma=gamma, seed=seed), optax.sgd(0.1))
    step = make_step(opt, mode="loss_fn")
    step_losses = make_step(opt, mode="losses")
    xs, ys = mlp_data(steps, batch=batch, seed=6)
    params = mlp_init(3)
    state = opt.init(params)
    for t in range(steps):
        mask = drawn_mask(seed, t, len(KEYS), beta) if beta < 1 else np.ones(len(KEYS), bool)
        w = flat(params)
        g = flat(np_grad(params, xs[t], ys[t]))
        w_adv = w + np_epsilon(w, g, rho, beta, mask)
        expected, idx = np_sds(w_adv, w, xs[t], ys[t], gamma)
        assert len(idx) == max(1, int(batch * gamma))
        full = flat(np_grad(unflat(w_adv), xs[t], ys[t]))
        assert np.linalg.norm(full - expected) > 1e-3 * np.linalg.norm(full)
        new, new_state, updates = step(params, state, xs[t], ys[t])
        assert_close(flat(updates), -0.1 * expected, err_msg=str(t))
        # the clean per-example losses passed in: same result
        _, _, updates2 = step_losses(params, state, xs[t], ys[t])
        assert_close(flat(updates2), flat(updates), rtol=1e-6)
        params, state = new, new_state
    assert int(state[0].num_sam_steps) == steps


def test_sds_jit_and_eager_agree():
    opt = esam(0.4, beta=0.6, gamma=0.5, seed=1)
    xs, ys = mlp_data(1, batch=12, seed=8)
    batch = {"x": jnp.asarray(xs[0]), "y": jnp.asarray(ys[0])}
    params = mlp_init(5)
    state = opt.init(params)

    def upd(params, state):
        grads = jax.grad(mlp_loss)(params, batch)
        return opt.update(grads, state, params, loss_fn=mlp_losses, batch=batch)

    eager, s_eager = upd(params, state)
    jitted, s_jit = jax.jit(upd)(params, state)
    assert_close(flat(jitted), flat(eager), rtol=1e-6)
    trees_equal(s_eager, s_jit)


def test_sds_shape_errors():
    opt = esam(0.1, beta=1.0, gamma=0.5)
    xs, ys = mlp_data(1, batch=8)
    batch = {"x": jnp.asarray(xs[0]), "y": jnp.asarray(ys[0])}
    params = mlp_init()
    state = opt.init(params)
    grads = jax.grad(mlp_loss)(params, batch)
    bad_fns = [
        lambda p, b: mlp_losses(p, b)[:, None],  # (B, 1)
        mlp_loss,  # scalar mean
        lambda p, b: mlp_losses(p, b)[:5],  # (5,)
    ]
    for fn in bad_fns:
        with pytest.raises(ValueError, match=r"shape \(8,\)"):
            opt.update(grads, state, params, loss_fn=fn, batch=batch)
    for bad in (jnp.zeros(7), jnp.zeros((8, 1)), jnp.zeros(())):
        with pytest.raises(ValueError, match=r"losses.*shape \(8,\)"):
            opt.update(grads, state, params, loss_fn=mlp_losses, batch=batch, losses=bad)


def test_missing_inputs_raise():
    params = mlp_init()
    xs, ys = mlp_data(1, batch=8)
    batch = {"x": jnp.asarray(xs[0]), "y": jnp.asarray(ys[0])}
    grads = jax.grad(mlp_loss)(params, batch)
    grad_fn = lambda p: jax.grad(mlp_loss)(p, batch)
    sds = esam(0.1, gamma=0.5)
    state = sds.init(params)
    for kwargs in (
        {},
        {"grad_fn": grad_fn},
        {"loss_fn": mlp_losses},
        {"batch": batch},
        {"grad_fn": grad_fn, "batch": batch},
    ):
        with pytest.raises(TypeError, match="loss_fn"):
            sds.update(grads, state, params, **kwargs)
    with pytest.raises(TypeError, match="loss_fn"):
        sds.update(grads, state, params, loss_fn=3.0, batch=batch)
    plain = esam(0.1, beta=0.5, gamma=1.0)
    state = plain.init(params)
    for kwargs in ({}, {"grad_fn": None}, {"loss_fn": mlp_losses}, {"batch": batch}):
        with pytest.raises(TypeError, match="grad_fn"):
            plain.update(grads, state, params, **kwargs)
    with pytest.raises(ValueError, match="params"):
        plain.update(grads, state, None, grad_fn=grad_fn)


def test_bad_arguments_raise():
    for kwargs, err, name in [
        ({"rho": -0.1}, ValueError, "rho"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": 1.5}, ValueError, "beta"),
        ({"beta": "half"}, TypeError, "beta"),
        ({"gamma": 0.0}, ValueError, "gamma"),
        ({"gamma": -0.5}, ValueError, "gamma"),
        ({"gamma": 1.01}, ValueError, "gamma"),
        ({"gamma": True}, TypeError, "gamma"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"eps": -1.0}, ValueError, "eps"),
    ]:
        with pytest.raises(err, match=name):
            esam(**kwargs)


# ----------------------------------------------------------------------------- data parallel

N_DEV = 8


def shard(step_fn, n_out):
    mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("batch",))
    squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
    expand = lambda t: jax.tree.map(lambda a: a[None], t)
    return jax.jit(
        jax.shard_map(
            lambda *args: expand(step_fn(*squeeze(args))),
            mesh=mesh,
            in_specs=(P("batch"),) * 4,
            out_specs=(P("batch"),) * n_out,
        )
    )


def rep(tree):
    return jax.tree.map(lambda a: jnp.stack([a] * N_DEV), tree)


def test_data_parallel_shared_ascent_matches_reference():
    rho, beta, gamma, seed, lr, steps, batch = 0.4, 0.6, 0.5, 2, 0.1, 3, 8
    opt = optax.chain(
        esam(rho, beta=beta, gamma=gamma, seed=seed, axis_name="batch"),
        sharpax.pmean_updates("batch"),
        optax.sgd(lr),
    )

    def step(params, state, x, y):
        b = {"x": x, "y": y}
        grads = jax.grad(mlp_loss)(params, b)  # this device's own gradient
        updates, state = opt.update(grads, state, params, loss_fn=mlp_losses, batch=b)
        return optax.apply_updates(params, updates), state, updates

    fn = shard(step, 3)
    xs, ys = mlp_data(steps, batch=batch, seed=9, lead=(N_DEV,))
    xs = xs * (1.0 + 0.3 * np.arange(N_DEV, dtype=np.float32))[None, :, None, None]
    params, state = rep(mlp_init(6)), rep(opt.init(mlp_init(6)))
    for t in range(steps):
        w = flat(jax.tree.map(lambda a: a[0], params))
        g_bar = np.mean([flat(np_grad(unflat(w), xs[t, i], ys[t, i])) for i in range(N_DEV)], 0)
        w_adv = w + np_epsilon(w, g_bar, rho, beta, drawn_mask(seed, t, len(KEYS), beta))
        d = np.mean([np_sds(w_adv, w, xs[t, i], ys[t, i], gamma)[0] for i in range(N_DEV)], 0)
        params, state, updates = fn(params, state, xs[t], ys[t])
        for i in range(N_DEV):
            out = flat(jax.tree.map(lambda a, i=i: a[i], updates))
            assert_close(out, -lr * d, err_msg=f"{t} {i}")
        for leaf in jax.tree.leaves(params):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf)[:1].repeat(N_DEV, 0))
    s0 = state[0]
    for leaf in (s0.count, s0.key):
        v = np.asarray(leaf)
        assert np.all(v == v[:1])


def test_data_parallel_devices_draw_the_same_mask():
    """Identical per-device batches, per-device ascent, no averaging: outputs equal bit for bit."""
    rho, beta, seed, steps = 0.5, 0.5, 5, 6
    opt = esam(rho, beta=beta, gamma=0.5, seed=seed)

    def step(params, state, x, y):
        b = {"x": x, "y": y}
        grads = jax.grad(mlp_loss)(params, b)
        updates, state = opt.update(grads, state, params, loss_fn=mlp_losses, batch=b)
        return jax.tree.map(lambda p, u: p - 0.1 * u, params, updates), state, updates

    fn = shard(step, 3)
    xs, ys = mlp_data(steps, batch=8, seed=10)
    params, state = rep(mlp_init(7)), rep(opt.init(mlp_init(7)))
    masks = set()
    for t in range(steps):
        x, y = np.stack([xs[t]] * N_DEV), np.stack([ys[t]] * N_DEV)
        mask = drawn_mask(seed, t, len(KEYS), beta)
        masks.add(tuple(mask))
        w = flat(jax.tree.map(lambda a: a[0], params))
        g = flat(np_grad(unflat(w), xs[t], ys[t]))
        expected, _ = np_sds(w + np_epsilon(w, g, rho, beta, mask), w, xs[t], ys[t], 0.5)
        params, state, updates = fn(params, state, x, y)
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf)[:1].repeat(N_DEV, 0))
        assert_close(flat(jax.tree.map(lambda a: a[0], updates)), expected, err_msg=str(t))
    assert len(masks) > 1  # the mask changed over the steps
