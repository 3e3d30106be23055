"""Tests of the combinator sharpax.scheduled_sam (any schedule × any reuse rule)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import sharpax
from sharpax import reuse_rules, schedules

# ----------------------------------------------------------------------------- helpers


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def np_grad(p, x, y):
    """Hand-derived float64 gradient of ``mlp_loss`` (independent of jax)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.tanh(x @ p["w1"] + p["b1"])
    r = h @ p["w2"] - y
    dout = 2.0 * r / r.size
    dh = (dout @ p["w2"].T) * (1.0 - h**2)
    return {"b1": dh.sum(0), "w1": x.T @ dh, "w2": h.T @ dout}


def mlp_init(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 1)}
    return {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()}


def mlp_data(steps, batch=8, seed=1, lead=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, *lead, batch, 3)).astype(np.float32)
    scale = rng.exponential(size=(steps, *lead, 1, 1))  # gradient norms vary from step to step
    y = (rng.normal(size=(steps, *lead, batch, 1)) * scale).astype(np.float32)
    return x, y


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in sorted(tree)])


def unflat(vec, like):
    out, i = {}, 0
    for k in sorted(like):
        n = int(np.prod(like[k].shape))
        out[k] = vec[i : i + n].reshape(like[k].shape)
        i += n
    return out


def ae_decisions(s, total_steps, decay=0.9, c_start=1.0, c_end=-1.0):
    """AE-SAM's rule (Jiang et al. 2023) in float64: decisions and relative margins."""
    mu, var, out = 0.0, np.exp(-10.0), []
    for t, st in enumerate(s):
        x = min(t / total_steps, 1.0)
        mu = decay * mu + (1 - decay) * st
        var = decay * var + (1 - decay) * (st - mu) ** 2
        thr = mu + (x * c_end + (1 - x) * c_start) * np.sqrt(var)
        out.append((st >= thr, (st - thr) / st))
    return out


def make_step(opt, sam_step=None, grads_too=False):
    """Jitted MLP step; returns (new params, state, updates, ‖g‖²), and g with ``grads_too=True``."""

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        sq = sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))
        kwargs = {} if sam_step is False else {"grad_fn": lambda p: jax.grad(mlp_loss)(p, x, y)}
        updates, state = opt.update(grads, state, params, sam_step=sam_step, **kwargs)
        out = optax.apply_updates(params, updates), state, updates, sq
        return (*out, grads) if grads_too else out

    return step


def trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def trees_close(a, b, rtol=1e-6, atol=1e-7):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- AE × vSAM reuse


def test_ae_schedule_with_decayed_psf_matches_reference():
    steps, total, rho, lr, decay, max_reuse = 30, 30, 0.1, 0.1, 0.6, 2
    sched = schedules.gradient_norm_adaptive(
        total_steps=total, threshold_start=1.5, threshold_end=0.5
    )
    opt = optax.chain(
        sharpax.scheduled_sam(
            rho, schedule=sched, reuse=reuse_rules.decayed_psf(decay=decay, max_reuse=max_reuse)
        ),
        optax.sgd(lr),
    )
    step = make_step(opt)
    xs, ys = mlp_data(steps, seed=3)
    params = mlp_init()
    state = opt.init(params)
    like = mlp_init()
    rec = []
    for t in range(steps):
        new, state, updates, sq = step(params, state, xs[t], ys[t])
        rec.append((params, updates, float(sq), int(sharpax.num_sam_steps(state))))
        params = new
    ref = ae_decisions(np.array([r[2] for r in rec], np.float64), total, c_start=1.5, c_end=0.5)
    assert min(abs(m) for _, m in ref) > 1e-4  # no near-tie
    did = np.diff([0] + [r[3] for r in rec]).astype(bool)
    np.testing.assert_array_equal(did, [d for d, _ in ref])
    # the sequence exercises every branch: a reuse run longer than max_reuse
    runs = np.diff(np.flatnonzero(np.concatenate([[True], did, [True]]))) - 1
    assert 0 < did.sum() < steps and runs.max() > max_reuse
    psf, weight, left = None, 1.0, 0
    kinds = set()
    for t, (p, updates, sq_t, _) in enumerate(rec):
        w = flat(p)
        g = flat(np_grad(unflat(w, like), xs[t], ys[t]))
        np.testing.assert_allclose(sq_t, g @ g, rtol=1e-5)
        if did[t]:
            g_s = flat(np_grad(unflat(w + rho * g / np.linalg.norm(g), like), xs[t], ys[t]))
            psf, weight, left = g_s - g, 1.0, max_reuse
            d = g_s
            kinds.add("sam")
        elif left > 0:
            weight, left = weight * decay, left - 1
            d = g + weight * psf
            kinds.add("reuse")
        else:
            d = g
            kinds.add("plain")
        np.testing.assert_allclose(flat(updates), -lr * d, rtol=1e-4, atol=1e-6, err_msg=str(t))
    assert kinds == {"sam", "reuse", "plain"}
    np.testing.assert_allclose(float(state[0].reuse.reuse_weight), weight, rtol=1e-6)
    assert int(state[0].reuse.reuse_left) == left


# ----------------------------------------------------------------------------- equal to SAM


def sam_grads_step(rho):
    """sharpax.sam's output for (params, batch): the already-verified SAM reference."""
    opt = sharpax.sam(rho)

    @jax.jit
    def fn(params, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        out, _ = opt.update(
            grads, opt.init(params), params, grad_fn=lambda p: jax.grad(mlp_loss)(p, x, y)
        )
        return out

    return fn


@pytest.mark.parametrize("sam_step", [None, "host"])
def test_every_k_plain_is_sam_on_sam_steps_and_g_otherwise(sam_step):
    steps, rho, k = 9, 0.1, 3
    opt = sharpax.scheduled_sam(rho, schedule=schedules.every_k(k), reuse=reuse_rules.plain())
    sam_out = sam_grads_step(rho)
    xs, ys = mlp_data(steps)
    params, state = mlp_init(), opt.init(mlp_init())
    steps_by = {b: make_step(opt, b, True) for b in (True, False)} if sam_step else None
    cond = make_step(opt, None, True)
    for t in range(steps):
        step = steps_by[bool(sharpax.sam_due(state))] if sam_step else cond
        new, state, updates, _, g = step(params, state, xs[t], ys[t])
        if t % k == 0:  # separately compiled: equal up to rounding
            trees_close(updates, sam_out(params, xs[t], ys[t]), rtol=1e-5, atol=1e-7)
        else:
            trees_equal(updates, g)
        assert int(state.num_sam_steps) == t // k + 1
        params = new


@pytest.mark.parametrize("path", ["cond", "sam_step_true"])
def test_every_step_plain_equals_sam_bit_for_bit(path):
    steps, rho, lr = 10, 0.1, 0.1
    a = optax.chain(
        sharpax.scheduled_sam(rho, schedule=schedules.every_k(1), reuse=reuse_rules.plain()),
        optax.sgd(lr),
    )
    b = optax.chain(sharpax.sam(rho), optax.sgd(lr))
    step_a = make_step(a, None if path == "cond" else True)
    step_b = make_step(b)
    xs, ys = mlp_data(steps)
    pa, sa = mlp_init(), a.init(mlp_init())
    pb, sb = mlp_init(), b.init(mlp_init())
    for t in range(steps):
        pa, sa, ua, _ = step_a(pa, sa, xs[t], ys[t])
        pb, sb, ub, _ = step_b(pb, sb, xs[t], ys[t])
        trees_equal(ua, ub)
        trees_equal(pa, pb)
    assert int(sharpax.num_sam_steps(sa)) == int(sharpax.num_sam_steps(sb)) == steps


# ----------------------------------------------------------------------------- cond vs host path


@pytest.mark.parametrize(
    "make",
    [
        lambda: (schedules.bernoulli(0.4, seed=5), reuse_rules.orthogonal(0.7)),
        lambda: (
            schedules.variance_adaptive(window=4, blocks=2, warmup_steps=2, sensitivity=(4.0, 4.0)),
            reuse_rules.plain(),
        ),
    ],
    ids=["bernoulli_orthogonal", "variance_adaptive_plain"],
)
def test_cond_path_equals_two_function_host_path(make):
    steps = 16
    sched, reuse = make()
    opt = optax.chain(
        sharpax.scheduled_sam(0.05, schedule=sched, reuse=reuse), optax.sgd(0.1, momentum=0.9)
    )
    cond = make_step(opt)
    host = {True: make_step(opt, True), False: make_step(opt, False)}
    xs, ys = mlp_data(steps, seed=4)
    pa, sa = mlp_init(), opt.init(mlp_init())
    pb, sb = mlp_init(), opt.init(mlp_init())
    did = []
    for t in range(steps):
        due = bool(sharpax.sam_due(sb))
        assert due == bool(sharpax.sam_due(sa))
        did.append(due)
        pa, sa, ua, _ = cond(pa, sa, xs[t], ys[t])
        pb, sb, ub, _ = host[due](pb, sb, xs[t], ys[t])
        trees_close(ua, ub)
        trees_close(pa, pb)
        assert int(sharpax.num_sam_steps(sa)) == int(sharpax.num_sam_steps(sb)) == sum(did)
    assert 0 < sum(did) < steps
    trees_close(sa, sb)


# ----------------------------------------------------------------------------- data parallel

N_DEV = 8


def test_data_parallel_ae_decayed_psf_replicas_agree():
    steps, total, rho, lr = 12, 12, 0.05, 0.1
    inner = sharpax.scheduled_sam(
        rho,
        schedule=schedules.gradient_norm_adaptive(total_steps=total),
        reuse=reuse_rules.decayed_psf(decay=0.7, max_reuse=2),
        axis_name="batch",
    )
    opt = optax.chain(inner, sharpax.pmean_updates("batch"), optax.sgd(lr))
    xs, ys = mlp_data(steps, batch=4, seed=7, lead=(N_DEV,))
    xs = xs * (1.0 + 0.5 * np.arange(N_DEV, dtype=np.float32))[None, :, None, None]

    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)  # this device's own gradient
        updates, state = opt.update(
            grads, state, params, grad_fn=lambda p: jax.grad(mlp_loss)(p, x, y)
        )
        return optax.apply_updates(params, updates), state

    mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("batch",))
    squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
    expand = lambda t: jax.tree.map(lambda a: a[None], t)
    fn = jax.jit(
        jax.shard_map(
            lambda *args: expand(step(*squeeze(args))),
            mesh=mesh,
            in_specs=(P("batch"),) * 4,
            out_specs=(P("batch"), P("batch")),
        )
    )
    rep = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), tree)
    params, state = rep(mlp_init()), rep(opt.init(mlp_init()))

    @jax.jit
    def device_mean_sq_norm(p, x, y):  # s_t = mean_i ‖g_i‖², by hand
        g = jax.vmap(jax.grad(mlp_loss), in_axes=(None, 0, 0))(p, x, y)
        return jnp.mean(
            sum(jnp.sum(leaf**2, axis=tuple(range(1, leaf.ndim))) for leaf in jax.tree.leaves(g))
        )

    sq, counts = [], []
    for t in range(steps):
        sq.append(float(device_mean_sq_norm(squeeze(params), xs[t], ys[t])))
        params, state = fn(params, state, xs[t], ys[t])
        s0 = state[0]
        for name in ("num_sam_steps", "sam_due", "count"):
            v = np.asarray(getattr(s0, name))
            assert np.all(v == v[0]), (t, name)
        for leaf in jax.tree.leaves(s0.schedule):
            v = np.asarray(leaf)
            np.testing.assert_allclose(v, np.broadcast_to(v[:1], v.shape), rtol=1e-6)
        for leaf in jax.tree.leaves(params):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf)[:1].repeat(N_DEV, 0))
        counts.append(int(np.asarray(s0.num_sam_steps)[0]))
    did = np.diff([0] + counts).astype(bool)
    ref = ae_decisions(np.array(sq), total)
    sure = [abs(m) > 1e-4 for _, m in ref]
    np.testing.assert_array_equal(did[sure], np.array([d for d, _ in ref])[sure])
    assert 0 < did.sum() < steps
    # the caches are each device's own
    psf = np.asarray(state[0].reuse.psf["w1"])
    assert np.ptp(psf, axis=0).max() > 0
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- errors


def test_errors():
    sched, reuse = schedules.every_k(2), reuse_rules.plain()
    with pytest.raises(TypeError, match="schedule"):
        sharpax.scheduled_sam(schedule=reuse, reuse=reuse)
    with pytest.raises(TypeError, match="reuse"):
        sharpax.scheduled_sam(schedule=sched, reuse=sched)
    with pytest.raises(TypeError, match="schedule"):
        sharpax.scheduled_sam(schedule=lambda t: True, reuse=reuse)
    with pytest.raises(ValueError, match="rho"):
        sharpax.scheduled_sam(-0.1, schedule=sched, reuse=reuse)
    opt = sharpax.scheduled_sam(schedule=sched, reuse=reuse)
    params = jnp.ones(2)
    state = opt.init(params)
    for bad in (jnp.asarray(True), 1, np.bool_(True), "yes"):
        with pytest.raises(TypeError, match="sam_step"):
            opt.update(params, state, params, grad_fn=lambda p: p, sam_step=bad)
    for kwargs in ({}, {"sam_step": True}, {"grad_fn": None}, {"grad_fn": 3.0}):
        with pytest.raises(TypeError, match="grad_fn"):
            opt.update(params, state, params, **kwargs)
    # a reuse step needs no grad_fn
    out, _ = opt.update(params, state, params, sam_step=False)
    np.testing.assert_array_equal(np.asarray(out), np.ones(2))


# ----------------------------------------------------------------------------- SS-SAM


def test_ss_sam_probability_one_is_sam_and_zero_is_sgd():
    steps, rho, lr = 8, 0.1, 0.1
    xs, ys = mlp_data(steps)
    one = optax.chain(sharpax.ss_sam(rho, probability=1.0), optax.sgd(lr))
    ref = optax.chain(sharpax.sam(rho), optax.sgd(lr))
    zero = sharpax.ss_sam(rho, probability=0.0)  # alone: its output is the gradient itself
    step_one, step_ref, step_zero = make_step(one), make_step(ref), make_step(zero, None, True)
    pa, sa = mlp_init(), one.init(mlp_init())
    pb, sb = mlp_init(), ref.init(mlp_init())
    pc, sc = mlp_init(), zero.init(mlp_init())
    for t in range(steps):
        pa, sa, ua, _ = step_one(pa, sa, xs[t], ys[t])
        pb, sb, ub, _ = step_ref(pb, sb, xs[t], ys[t])
        trees_equal(ua, ub)
        trees_equal(pa, pb)
        _, sc, uc, _, g = step_zero(pc, sc, xs[t], ys[t])
        trees_equal(uc, g)
        pc = jax.tree.map(lambda w, u: w - lr * u, pc, uc)
    assert int(sharpax.num_sam_steps(sa)) == steps
    assert int(sharpax.num_sam_steps(sc)) == 0
