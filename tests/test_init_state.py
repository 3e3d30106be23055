"""The train state's start-up: ``training.init_state`` (one jit with out_shardings) against the
eager reference it replaced, buffer aliasing and donation, and ``abstract_state`` as a restore target."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import models, training
from experiments.configs import mnist1d, mnist1d_lsq


def reference_init_state(s, sample=None):
    """The eager init that ``init_state`` replaced (commit d4fdf52), kept as the reference.

    Every part built eagerly on the default device, moved to its sharding with
    ``jax.device_put``, then every leaf copied so that no two leaves share a buffer.
    """
    rng = jax.random.key(s.config.seed)
    init_rng, state_rng = jax.random.split(rng)
    variables = models.init_model(s.model, init_rng, s.input_shape, sample=sample)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    both = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
    opt_state = s.tx.init(params)
    if s.config.method == "saf":
        traj = s.traj.init()
    elif s.config.method == "mesa":
        traj = s.traj.init(both)
    else:
        traj = {}
    ema = s.model_ema.init(both) if s.model_ema is not None else {}
    state = training.TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        traj=traj,
        rng=jax.random.key_data(state_rng),
        ema=ema,
    )
    state = jax.device_put(state, training.state_shardings(s, state))
    return jax.tree.map(lambda x: x.copy(), state)


def tiny(method, *, lsq=False, **overrides):
    c = (mnist1d_lsq if lsq else mnist1d).get_config(method)
    c.num_epochs = 1
    c.batch_size = 32
    c.eval_batch_size = 32
    c.max_steps_per_epoch = 2
    c.saf.start_epoch = 0
    c.mesa.start_epoch = 0
    c.mesa.ema_horizon_epochs = 1.0
    c.vsam.warmup_epochs = 0
    for k, v in overrides.items():
        section, _, field = k.partition("__")
        if field:
            setattr(c[section], field, v)
        else:
            setattr(c, k, v)
    return training.setup(c, train_size=100)  # a mesh of the 8 fake devices


def sample_for(s):
    if getattr(s.model, "quant_bits", None) is None:
        return None
    return np.random.default_rng(0).normal(size=(16, *s.input_shape)).astype(np.float32)


CASES = {
    # vSAM: random state (seeded); AdamW: two moments; a model EMA beside the model.
    "vsam_adamw_ema": dict(method="vsam", optimizer="adamw", model_ema_horizon_epochs=1.0),
    "saf_sharded_bf16": dict(method="saf", saf__shard_buffer=True, saf__dtype="bfloat16"),
    "mesa": dict(method="mesa"),  # its teacher starts as a copy of the variables
    "lsq_sam": dict(method="sam", lsq=True),  # initialised on a sample of inputs
}


def _shard_pointers(tree):
    return [
        shard.data.unsafe_buffer_pointer()
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
    ]


def _assert_abstract_of(abstract, state):
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)


@pytest.mark.parametrize("case", CASES)
def test_init_state_equals_the_eager_reference_leaf_for_leaf_and_abstract_state_its_shapes(case):
    s = tiny(**CASES[case])
    sample = sample_for(s)
    new, ref = training.init_state(s, sample), reference_init_state(s, sample)
    assert jax.tree.structure(new) == jax.tree.structure(ref)
    for (path, a), b in zip(jax.tree.leaves_with_path(new), jax.tree.leaves(ref), strict=True):
        where = jax.tree_util.keystr(path)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), where
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), where
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    if case == "saf_sharded_bf16":  # each device holds only its rows of the buffer
        logits = new.traj.logits
        assert logits.dtype == jnp.bfloat16 and logits.shape[0] == 104  # 100 padded to 8 | rows
        assert {x.data.shape[0] for x in logits.addressable_shards} == {13}
    # No two leaves (nor two shards) share a buffer: the train step donates them all.
    pointers = _shard_pointers(new)
    assert len(set(pointers)) == len(pointers)
    # abstract_state: the same leaves without values (an LSQ model needs no sample for it).
    _assert_abstract_of(training.abstract_state(s), new)


@pytest.mark.parametrize("case", ["saf_sharded_bf16", "mesa"])
def test_a_train_step_donates_every_leaf_of_the_initial_state(case):
    s = tiny(**CASES[case])
    state = training.init_state(s)
    rng = np.random.default_rng(1)
    batch = training.put_batch(s, {
        "image": rng.normal(size=(32, *s.input_shape)).astype(np.float32),
        "label": rng.integers(0, s.num_classes, 32).astype(np.int32),
        "id": rng.permutation(100)[:32].astype(np.int32),
    })  # fmt: skip
    new, metrics = s.train_step(state, batch, jnp.asarray(0), sam_step=None)
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.is_deleted() for x in jax.tree.leaves(state))  # donated, none refused
    assert int(new.step) == 1


def test_the_lsq_sample_is_still_checked():
    s = tiny("sgd", lsq=True)
    with pytest.raises(ValueError, match="sample="):
        training.init_state(s, np.zeros((4, *s.input_shape), np.float32))
    with pytest.raises(ValueError, match="per-example shape"):
        training.init_state(s, np.ones((4, 7), np.float32))


@pytest.mark.parametrize("case", ["saf_sharded_bf16", "mesa"])
def test_restoring_against_the_abstract_state_gives_the_saved_values_and_shardings(case, tmp_path):
    s = tiny(**CASES[case])
    state = training.init_state(s)
    _assert_abstract_of(training.abstract_state(s), state)
    # Values no init produces: a trained state's every leaf perturbed by its own index.
    leaves, treedef = jax.tree.flatten(state)
    leaves = [
        jax.device_put((x + (i + 1) * jnp.ones_like(x)).astype(x.dtype), x.sharding)
        for i, x in enumerate(leaves)
    ]
    saved = jax.tree.unflatten(treedef, leaves)
    expected = jax.device_get(saved)
    with ocp.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(saved)))
        mgr.wait_until_finished()
    with ocp.CheckpointManager(tmp_path) as mgr:
        target = training.abstract_state(s)
        restored = mgr.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    restored = restored["state"]
    assert jax.tree.structure(restored) == treedef
    for (path, r), x, e in zip(
        jax.tree.leaves_with_path(restored), jax.tree.leaves(saved), jax.tree.leaves(expected),
        strict=True,
    ):
        where = jax.tree_util.keystr(path)
        assert r.sharding == x.sharding and r.dtype == x.dtype, where
        np.testing.assert_array_equal(np.asarray(r), e, err_msg=where)
    if case == "saf_sharded_bf16":
        assert restored.traj.logits.sharding.spec == jax.sharding.PartitionSpec("data")
    # No two restored leaves share a buffer (the train step donates them). The shards of
    # one replicated leaf may: on XLA:CPU Orbax's device_put of one host array is zero-copy.
    per_leaf = [set(_shard_pointers(x)) for x in jax.tree.leaves(restored)]
    assert len(set().union(*per_leaf)) == sum(len(p) for p in per_leaf)
