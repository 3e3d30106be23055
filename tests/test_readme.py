"""The README's code runs as written, and its Flax snippets keep the clean pass's batch statistics."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def snapshots():
    """Runs the README's python blocks in order, as a reader would; the namespace after each."""
    namespace, out = {}, []
    for block in _blocks():
        # A fresh dict per block (seeded with the names so far), so later blocks
        # cannot rebind the globals of functions defined by earlier ones.
        namespace = dict(namespace)
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
        out.append((block, namespace))
    return out


def _after(snapshots, marker):
    return next(ns for block, ns in snapshots if marker in block)


def test_readme_first_lines_are_the_two_commands():
    lines = README.read_text().splitlines()
    commands = [line for line in lines[:6] if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert commands[0].endswith("python -m experiments.compare")
    assert commands[1].endswith("python -m pytest -n 2 tests")
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[all]"' in ci and "python -m pytest -n 2 tests" in ci


def test_quickstart_trains(snapshots):
    ns = _after(snapshots, "def train_step(params, opt_state, batch)")
    assert float(ns["loss"]) < 1e-2
    assert int(ns["opt_state"][0].num_sam_steps) == 100


def _check_bn_snippet(ns, params, stats, opt_state, clean_stats_fn):
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jnp.arange(16) % 10
    new_params, new_stats, _, loss = ns["train_step"](params, stats, opt_state, x, y)
    expected = clean_stats_fn(params, stats, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new_stats, expected)
    assert np.isfinite(float(loss))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_params, params)
    assert any(jax.tree.leaves(changed))


def test_nnx_snippet_keeps_clean_pass_stats(snapshots):
    from flax import nnx

    ns = _after(snapshots, "from flax import nnx")

    def clean_stats(params, stats, x):
        m = ns["nnx"].merge(ns["graphdef"], params, stats, copy=True)
        m(x)  # one clean train-mode forward: what the batch stats must become
        return nnx.state(m, nnx.BatchStat)

    opt = ns["opt"]
    _check_bn_snippet(ns, ns["params"], ns["stats"], opt.init(ns["params"]), clean_stats)


def test_linen_snippet_keeps_clean_pass_stats(snapshots):
    local = _after(snapshots, "import flax.linen as nn")
    model = local["model"]

    def clean_stats(params, stats, x):
        _, mutated = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return mutated["batch_stats"]

    _check_bn_snippet(local, local["params"], local["batch_stats"], local["opt_state"], clean_stats)


def test_shard_map_snippet_matches_full_batch_sam(snapshots):
    local = _after(snapshots, "jax.shard_map")
    loss_fn = local["loss_fn"]
    params = {"w": jnp.ones((3, 1)) * 0.3, "b": jnp.zeros((1,))}
    x = jax.random.normal(jax.random.key(2), (64, 3))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]])
    opt = local["opt"]
    new_params, _ = local["step"](params, opt.init(params), (x, y))
    # Synced SAM on 8 equal shards == SAM on the full batch, written out by hand:
    # ε = ρ g / ‖g‖, w ← w − lr ∇L(w + ε).
    g = jax.grad(loss_fn)(params, (x, y))
    norm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, gw: w + 0.05 * gw / norm, params, g)
    g_sam = jax.grad(loss_fn)(perturbed, (x, y))
    expected = jax.tree.map(lambda w, gs: w - 0.1 * gs, params, g_sam)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_params, expected)


def test_saf_mesa_snippet_fills_the_buffer_and_the_ema(snapshots):
    ns = _after(snapshots, "sharpax.with_saf")
    written = np.asarray(ns["saf_state"].written_epoch)
    # 64 random examples of the 1024 are seen in each of the epochs 0..6; slot e % 4 holds epoch e.
    assert written.max() == 6 and set(np.unique(written)) <= set(range(-1, 7))
    slots = np.arange(4)[None, :]
    assert np.all((written == -1) | (written % 4 == slots))
    assert np.isfinite(float(ns["loss"]))
    # 7 epochs x 2 batches = 14 EMA updates; the slow EMA (decay 0.9998) lags the trained params.
    assert int(ns["mesa_state"].count) == 14
    ema = ns["mesa_state"].ema["params"]
    moved = jax.tree.map(lambda e, p: float(jnp.max(jnp.abs(e - p))), ema, ns["params"])
    assert all(np.isfinite(v) for v in jax.tree.leaves(moved))
    assert max(jax.tree.leaves(moved)) > 0


def test_two_function_vsam_loop_takes_some_but_not_all_sam_steps_and_trains(snapshots):
    ns = _after(snapshots, "sam_step, reuse_step = make_step(True), make_step(False)")
    num_sam = int(ns["sharpax"].num_sam_steps(ns["opt_state"]))
    # 40 steps = 4 windows of 10; at least one SAM step per window, never all of them.
    assert 4 <= num_sam < 40
    assert float(ns["loss_fn"](ns["params"], (ns["x"], ns["y"]))) < 0.5


def test_sharpness_snippet_matches_the_closed_form(snapshots):
    # For a quadratic loss, L(θ+ε) − L(θ) = gᵀε + ½ εᵀHε exactly, and λmax is H's top eigenvalue.
    ns = _after(snapshots, "sharpax.sam_sharpness(batch_loss")
    x, y, p = np.asarray(ns["x"], np.float64), np.asarray(ns["y"], np.float64), ns["params"]
    w, b = np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # θ = (w, b)
    theta = np.concatenate([w[:, 0], b])
    hess = 2 * a.T @ a / len(x)
    g = hess @ theta - 2 * a.T @ y[:, 0] / len(x)
    eps = 0.05 * g / np.linalg.norm(g)
    expected = g @ eps + 0.5 * eps @ hess @ eps
    got = float(ns["sharpax"].sam_sharpness(ns["batch_loss"], p, rho=0.05))
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-6)
    lam = float(ns["sharpax"].hessian_top_eigenvalue(ns["batch_loss"], p, num_iters=50, key=jax.random.key(0)))
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(hess).max(), rtol=1e-3)
    assert ns["curves"].shape == (4, 5)


def test_custom_combination_respects_its_budget(snapshots):
    ns = _after(snapshots, "sharpax.schedules.bounded(")
    sam_steps = int(ns["sharpax"].num_sam_steps(ns["state"]))
    assert 0 < sam_steps <= 0.3 * 200
    assert isinstance(ns["state"][0].reuse, ns["sharpax"].reuse_rules.DecayedPSFState)


def test_check_chain_snippet_passes_sam_first_and_explains_sgd_first(snapshots):
    ns = _after(snapshots, "sharpax.check_chain(")
    assert "SAMState at opt_state[1] ascends against the gradient" in ns["message"]
    assert "optax.chain(sharpax.sam(rho), optax.sgd(lr" in ns["message"]
