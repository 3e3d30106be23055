"""Training machinery shared by the CLI, the `compare` demo and the benchmark.

Everything sharpness-related goes through sharpax's public API:

* ``sgd``: plain optimizer.
* ``sam`` / ``asam``: ``sharpax.sam`` first in the optax chain; the perturbed
  pass runs the model in train mode but its batch-statistics updates are
  discarded (the clean pass's statistics are kept, as google-research/sam does).
* ``looksam`` / ``vsam``: ``sharpax.looksam`` / ``sharpax.vsam``. By default the
  host dispatches between two compiled step functions (SAM step / reuse step)
  from ``sharpax.upcoming_sam_steps(opt_state)`` (see :func:`next_sam_step`); ``config.dispatch='cond'`` lets the
  transform decide on device with ``lax.cond`` instead (fine on GPU/TPU, very
  slow on XLA:CPU).
* ``saf``: ``sharpax.saf`` per-example logit buffer, trajectory term added to
  the loss, buffer threaded through the step.
* ``mesa``: ``sharpax.mesa`` EMA teacher, evaluated in eval mode.

Data parallelism: ``jax.jit`` over a 1-D mesh named ``'data'``; batches are
sharded along it, the train state is replicated (the SAF buffer can be sharded
along the example axis with ``config.saf.shard_buffer``). Under ``jit`` the
loss is the global-batch mean, so SAM's ascent direction is the global
gradient (synced SAM).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sharpax
from experiments import input_pipeline, models, precision
from experiments.methods import METHODS, ema_decay, make_optimizer, make_trajectory



class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree of arrays (checkpointable).

    ``traj`` holds the SAF buffer (``sharpax.SAFState``), the MESA EMA
    (``sharpax.MESAState``) or an empty dict for the other methods. ``ema``
    holds the model EMA of ``config.model_ema_horizon_epochs`` (a
    ``sharpax.MESAState``, the same EMA as MESA's teacher) or an empty dict;
    MESA's teacher *is* its model EMA (as in the authors' code), so MESA keeps
    it in ``traj`` only.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    traj: Any
    rng: jax.Array
    ema: Any = {}


@dataclasses.dataclass
class Setup:
    """A model, an optimizer and the compiled step functions for one config."""

    config: ml_collections.ConfigDict
    model: Any
    tx: optax.GradientTransformationExtraArgs
    traj: Any  # sharpax.saf(...) / sharpax.mesa(...) / None
    model_ema: Any  # sharpax.mesa(decay) used as a plain EMA of the variables, or None
    mesh: Mesh
    steps_per_epoch: int
    num_classes: int
    num_examples: int  # training-set size: valid SAF ids are [0, num_examples)
    input_shape: tuple[int, ...]
    train_step: Callable[..., tuple[TrainState, dict]]
    eval_step: Callable[..., EvalMetrics]
    # LookSAM/vSAM host dispatch: upcoming decisions read from the state (see next_sam_step).
    plan: list[bool] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float):
    onehot = jax.nn.one_hot(labels, num_classes)
    if smoothing:
        onehot = optax.smooth_labels(onehot, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _plain_loss(task: Callable) -> Callable:
    """``task`` in the signature of sharpax.with_saf / with_mesa's losses, with no term."""

    def loss_fn(params, traj_state, batch, epoch):
        del epoch
        loss, aux = task(params, batch)
        return loss, sharpax.TrajectoryAux(aux=aux, state=traj_state, term=jnp.zeros([]))

    return loss_fn


def trajectory_loss(spec, traj, task, teacher_logits, epoch, teacher: bool):
    """The step's loss ``(params, traj_state, batch, epoch) -> (loss, TrajectoryAux)`` and its epoch.

    SAF and MESA come from ``sharpax.with_saf`` / ``with_mesa`` around the task loss
    (SAF reads the pipeline's ``batch['id']``). ``teacher=False`` (MESA outside its
    active epochs; a static choice of the host) passes a Python epoch outside
    ``[start_epoch, end_epoch)``, which makes ``with_mesa`` skip the teacher's forward
    pass (the term is 0 there anyway).
    """
    if spec.loss == "saf":
        return sharpax.with_saf(task, traj, ids_fn=lambda b: b["id"]), epoch
    if spec.loss == "mesa":
        loss_fn = sharpax.with_mesa(task, traj, teacher_logits)
        if teacher:
            return loss_fn, epoch
        inactive = traj.start_epoch - 1 if traj.start_epoch > 0 else traj.end_epoch
        return loss_fn, inactive
    return _plain_loss(task), epoch


# Per-batch test metrics, merged over batches with padded examples (``mask`` 0) excluded:
# clu's masked ``Average`` (a total and an int32 count) rather than hand-summed floats. Built
# with ``Collection.create`` because clu reads the fields from ``__annotations__``, which
# ``from __future__ import annotations`` turns into strings. The per-step *training* metrics
# stay a dict of scalars: the divergence check reads them step by step (run_train_steps).
EvalMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"), accuracy=clu_metrics.Accuracy
)


def make_step_fns(setup_args: dict) -> tuple[Callable, Callable]:
    """Builds ``train_step(state, batch, epoch, sam_step, teacher=True)`` and ``eval_step``.

    ``sam_step`` (static): LookSAM/vSAM's host-dispatched branch, or None.
    ``teacher`` (static, MESA only): False drops the EMA teacher's forward pass,
    valid before ``mesa.start_epoch`` where the MESA term is 0 anyway.
    """
    model = setup_args["model"]
    tx = setup_args["tx"]
    traj = setup_args["traj"]
    model_ema = setup_args.get("model_ema")
    config = setup_args["config"]
    num_classes = setup_args["num_classes"]
    smoothing = config.get("label_smoothing", 0.0)
    method = config.method
    spec = METHODS[method]

    def forward(params, batch_stats, images, rng, train=True):
        logits, new_state = models.apply_model(
            model,
            _variables(params, batch_stats),
            images,
            train=train,
            rngs={"dropout": rng} if train else None,
        )
        return logits, new_state.get("batch_stats", batch_stats)

    def example_losses(params, batch_stats, batch, rng):
        logits, new_stats = forward(params, batch_stats, batch["image"], rng)
        return cross_entropy(logits, batch["label"], num_classes, smoothing), (logits, new_stats)

    def train_step(
        state: TrainState,
        batch: dict,
        epoch: jax.Array,
        sam_step: bool | None,
        teacher: bool = True,
    ):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # float16 loss scaling: every gradient of the step (clean pass, grad_fn, ESAM's
        # loss_fn) runs its backward pass at the optimizer state's scale and comes out
        # unscaled (precision.scaled_backward); without loss scaling, example_losses.
        scale = precision.loss_scale(state.opt_state)
        losses_fn = precision.scaled_backward(example_losses, scale)

        def task(params, b):
            losses, (logits, new_stats) = losses_fn(params, state.batch_stats, b, rng)
            loss = losses.mean()
            return loss, {"loss": loss, "losses": losses, "logits": logits, "batch_stats": new_stats}

        def teacher_logits(ema, b):  # MESA's teacher: the EMA model in eval mode
            return forward(ema["params"], ema.get("batch_stats"), b["image"], rng, train=False)[0]

        loss_fn, epoch_arg = trajectory_loss(spec, traj, task, teacher_logits, epoch, teacher)
        (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.traj, batch, epoch_arg
        )
        loss, logits, new_stats = out.aux["loss"], out.aux["logits"], out.aux["batch_stats"]
        term, new_traj = out.term, out.state

        # The perturbed pass of SAM-type methods: same mini-batch, same loss,
        # train-mode forward, batch-statistics updates discarded.
        def grad_fn(params, *unused):  # optax.contrib.sam also passes its inner step index
            del unused
            return jax.grad(lambda p: losses_fn(p, state.batch_stats, batch, rng)[0].mean())(params)

        extra = {"grad_fn": grad_fn}
        if spec.scheduled:
            extra["sam_step"] = sam_step
        if spec.example_losses:  # ESAM's data selection: per-example losses, same forward
            extra["loss_fn"] = lambda p, b: losses_fn(p, state.batch_stats, b, rng)[0]
            extra["batch"] = batch
            extra["losses"] = jax.lax.stop_gradient(out.aux["losses"])  # saves a forward
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        if spec.loss == "mesa":
            new_traj = traj.update(new_traj, _variables(params, new_stats))
        new_ema = state.ema
        if model_ema is not None:
            new_ema = model_ema.update(state.ema, _variables(params, new_stats))
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        # The update norm: a finite loss with a non-finite update (an overflow in the
        # perturbed pass or the optimizer) is caught at the epoch's one host read.
        metrics = {
            "loss": loss,
            "traj_term": term,
            "accuracy": acc,
            "update_norm": optax.tree.norm(updates),
        }
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=new_stats,
            opt_state=opt_state,
            traj=new_traj,
            rng=state.rng,
            ema=new_ema,
        )
        return new_state, metrics

    def eval_step(state: TrainState, batch: dict) -> EvalMetrics:
        logits, _ = forward(state.params, state.batch_stats, batch["image"], None, train=False)
        loss = cross_entropy(logits, batch["label"], num_classes, 0.0)
        return EvalMetrics.single_from_model_output(
            loss=loss, logits=logits, labels=batch["label"].astype(jnp.int32), mask=batch["mask"]
        )

    return train_step, eval_step


# ----------------------------------------------------------------------------- setup


def make_mesh(devices=None) -> Mesh:
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def check_hyperparameters(config: ml_collections.ConfigDict) -> None:
    """Rejects, before anything is built or compiled, values that cannot train (ValueError names them).

    A negative or non-finite learning rate, momentum outside [0, 1), a negative or
    non-finite weight decay, label smoothing outside [0, 1), non-positive epochs or batch.
    """
    problems = []

    def number(name, value, ok, want):
        try:
            v = float(value)
        except (TypeError, ValueError):
            problems.append(f"{name} = {value!r} (not a number)")
            return
        if not (np.isfinite(v) and ok(v)):
            problems.append(f"{name} = {value!r} (must be {want})")

    number("learning_rate", config.learning_rate, lambda v: v > 0, "finite and > 0")
    number("momentum", config.get("momentum", 0.0), lambda v: 0 <= v < 1, "in [0, 1)")
    number("weight_decay", config.get("weight_decay", 0.0), lambda v: v >= 0, "finite and >= 0")
    number("label_smoothing", config.get("label_smoothing", 0.0), lambda v: 0 <= v < 1, "in [0, 1)")
    for name in ("num_epochs", "batch_size"):
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} = {value!r} (must be an int >= 1)")
    if problems:
        raise ValueError("config values that cannot train: " + "; ".join(problems))


def setup(
    config: ml_collections.ConfigDict,
    *,
    train_size: int,
    mesh: Mesh | None = None,
) -> Setup:
    check_hyperparameters(config)
    info = input_pipeline.get_dataset_info(config.dataset)
    num_classes = info.num_classes
    input_shape = tuple(info.input_shape)
    mesh = mesh or make_mesh()
    n_dev = mesh.devices.size
    for field in ("batch_size", "eval_batch_size"):
        if config.get(field, config.batch_size) % n_dev:
            raise ValueError(
                f"{field} {config.get(field)} must be divisible by the {n_dev} devices of the mesh"
            )
    steps_per_epoch = train_size // config.batch_size
    if config.get("max_steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    model = models.get_model(config.model, num_classes, **precision.model_kwargs(config))
    stat_mask = None
    if config.method == "vsam" and config.vsam.get("stat_last_tensors", 0):
        stat_mask = models.last_tensors_mask(model, input_shape, config.vsam.stat_last_tensors)
    tx = make_optimizer(config, steps_per_epoch, vsam_stat_mask=stat_mask)
    buffer_rows = train_size
    if config.method == "saf" and config.saf.get("shard_buffer", False):
        # A buffer sharded along the example axis needs a row count divisible by
        # the devices (ImageNet's 1 281 167 is not): pad with rows no id maps to.
        buffer_rows = -(-train_size // n_dev) * n_dev
    traj = make_trajectory(config, buffer_rows, num_classes, steps_per_epoch)
    model_ema = None
    if config.get("model_ema_horizon_epochs", 0.0) and config.method != "mesa":
        decay = ema_decay(
            config.model_ema_horizon_epochs, steps_per_epoch, "model_ema_horizon_epochs"
        )
        model_ema = sharpax.mesa(decay)  # only its EMA (init/update) is used
    args = dict(
        model=model, tx=tx, traj=traj, model_ema=model_ema, config=config, num_classes=num_classes
    )
    train_step, eval_step = make_step_fns(args)

    # keep_unused: a SAM step of LookSAM/vSAM overwrites the cached direction
    # (g_v / psf) without reading it; jit would drop those donated inputs, so their
    # outputs could not reuse the buffers (fresh allocations on every SAM step:
    # 10.1 ms instead of 7.2 ms per ResNet-18 LookSAM SAM step on an H100).
    jit_train = jax.jit(
        train_step,
        static_argnames=("sam_step", "teacher"),
        donate_argnums=(0,),
        keep_unused=True,
    )
    jit_eval = jax.jit(eval_step)
    return Setup(
        config=config,
        model=model,
        tx=tx,
        traj=traj,
        model_ema=model_ema,
        mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        num_classes=num_classes,
        num_examples=train_size,
        input_shape=input_shape,
        train_step=jit_train,
        eval_step=jit_eval,
    )


def state_shardings(s: Setup, state: Any):
    """Replicated everywhere, except the SAF buffer when ``config.saf.shard_buffer``.

    ``state``: a :class:`TrainState` of arrays or of ``jax.ShapeDtypeStruct`` (only
    its tree structure is read).
    """
    replicated = NamedSharding(s.mesh, P())
    shardings = jax.tree.map(lambda _: replicated, state)
    if s.config.method == "saf" and s.config.saf.get("shard_buffer", False):
        example_axis = NamedSharding(s.mesh, P("data"))
        traj = jax.tree.map(lambda _: example_axis, state.traj)
        shardings = shardings._replace(traj=traj)
    return shardings


def init_sample(s: Setup, source, n: int = 256) -> np.ndarray | None:
    """Real inputs to initialise on, for the models that need them (LSQ's step sizes), else None.

    The first ``n`` training examples with eval preprocessing (deterministic), the
    same on every process: the initial state is replicated, so every process must
    initialise on the same inputs (not on its own slice of a batch).
    """
    if getattr(s.model, "quant_bits", None) is None:
        return None
    batch = next(iter(input_pipeline.eval_batches(
        source, n, preprocess=input_pipeline.get_preprocess(s.config.dataset, train=False),
        process_index=0, process_count=1,
    )))  # fmt: skip
    return np.asarray(batch["image"])[np.asarray(batch["mask"], bool)]


def _init_variables(model, input_shape, seed: jax.Array, sample: jax.Array | None):
    """``({'params', 'batch_stats'}, rng key data)`` of a fresh model: the method-independent part.

    ``seed``: ``config.seed`` as a traced int32 (the same key bits as a constant),
    so one compiled init serves every seed. ``sample``: a traced batch of inputs
    for the LSQ models (see :func:`init_sample`), checked beforehand by
    :func:`init_state`, or None.
    """
    init_rng, state_rng = jax.random.split(jax.random.key(seed))
    if sample is None:
        variables = models.init_model(model, init_rng, input_shape)
    else:  # models.init_model's own call; its checks of `sample` need concrete values
        variables = dict(model.init(init_rng, sample, train=False))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return variables, jax.random.key_data(state_rng)  # raw uint32 key data: checkpointable


@functools.lru_cache(maxsize=32)
def _compiled_variables_init(model, input_shape: tuple, replicated: NamedSharding):
    """The jitted :func:`_init_variables` of one model, shared by every method and seed.

    Its compilation (mostly the PRNG of the parameter initialisers: about 3 s for
    a small conv net on XLA:CPU) is then paid once per model and process, and
    once per machine with the persistent compilation cache, not once per run.
    """
    return jax.jit(functools.partial(_init_variables, model, input_shape), out_shardings=replicated)


def _finish_state(s: Setup, variables: dict, rng: jax.Array) -> TrainState:
    """The train state around fresh ``variables``: optimizer state, trajectory loss state, EMA."""
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = s.tx.init(params)
    if s.config.method == "saf":
        traj = s.traj.init()
    elif s.config.method == "mesa":
        traj = s.traj.init(_variables(params, batch_stats))
    else:
        traj = {}
    ema = s.model_ema.init(_variables(params, batch_stats)) if s.model_ema is not None else {}
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        traj=traj,
        rng=rng,
        ema=ema,
    )


def _build_state(s: Setup, sample: jax.Array | None, seed: jax.Array) -> TrainState:
    """The initial train state, traceable: :func:`init_state` runs it as two jits."""
    variables, rng = _init_variables(s.model, s.input_shape, seed, sample)
    return _finish_state(s, variables, rng)


def abstract_state(s: Setup) -> TrainState:
    """The initial state's ``jax.ShapeDtypeStruct`` leaves, each with its sharding; nothing is allocated.

    Shapes and dtypes come from ``jax.eval_shape`` of the same function
    :func:`init_state` compiles, shardings from :func:`state_shardings` (the SAF
    buffer sharded along the example axis under ``config.saf.shard_buffer``). A
    restore target that never builds a concrete state, e.g.::

      manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(training.abstract_state(s)), ...))

    Orbax then reads each leaf straight into its sharding.
    """
    sample = None
    if getattr(s.model, "quant_bits", None) is not None:
        # LSQ: only the values of the init sample depend on data, not the shapes.
        sample = jax.ShapeDtypeStruct((1, *s.input_shape), jnp.float32)
    shapes = jax.eval_shape(functools.partial(_build_state, s), sample, _seed(s))
    return jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        shapes,
        state_shardings(s, shapes),
    )


def init_state(s: Setup, sample: np.ndarray | None = None) -> TrainState:
    """The initial train state; ``sample``: inputs to initialise on (see :func:`init_sample`).

    Built by two jits whose ``out_shardings`` are :func:`state_shardings`:
    the model's variables (one compiled function per model, shared by every method
    and seed: :func:`_compiled_variables_init`), then, with those donated, the rest
    of the state. Every leaf is created in place on its devices (a sharded SAF
    buffer only as its shards), with no full copy on one device or the host. The
    outputs of one computation never share a buffer (XLA copies a value returned
    twice), so the train step can donate every leaf.
    """
    if sample is not None:  # models.init_model's checks of the sample, on its concrete values
        jax.eval_shape(lambda: models.init_model(s.model, jax.random.key(0), s.input_shape, sample))
    shardings = state_shardings(s, jax.eval_shape(functools.partial(_build_state, s), sample, _seed(s)))
    replicated = NamedSharding(s.mesh, P())
    init_variables = _compiled_variables_init(s.model, tuple(s.input_shape), replicated)
    variables, rng = init_variables(_seed(s), sample)
    finish = jax.jit(
        functools.partial(_finish_state, s),
        out_shardings=shardings,
        donate_argnums=(0,),  # the params and batch stats pass through without a copy
    )
    return finish(variables, rng)


def _seed(s: Setup) -> np.ndarray:
    return np.asarray(s.config.seed, np.int32)


def train_iter(
    config: ml_collections.ConfigDict, source, epoch: int, steps: int, start_step: int = 0
) -> Iterator[dict]:
    """This process's batches ``start_step..steps - 1`` of one epoch (deterministic in seed and epoch)."""
    preprocess = input_pipeline.get_preprocess(
        config.dataset,
        train=bool(config.get("augment", True)),
        cutout_size=config.get("cutout", 0),
        cutout_prob=config.get("cutout_prob", 1.0),
    )
    batches = input_pipeline.train_batches(
        source,
        epoch,
        config.batch_size,
        config.seed,
        preprocess=preprocess,
        start_step=start_step,
        num_threads=config.get("data_threads", 0),
    )
    return itertools.islice(batches, steps - start_step)


def eval_iter(config: ml_collections.ConfigDict, source) -> Iterator[dict]:
    """This process's eval batches; padding rows carry ``mask=False``."""
    return input_pipeline.eval_batches(
        source,
        config.get("eval_batch_size", config.batch_size),
        preprocess=input_pipeline.get_preprocess(config.dataset, train=False),
        num_threads=config.get("data_threads", 0),
    )


def put_batch(s: Setup, batch: dict) -> dict:
    """Per-process numpy batch -> global array sharded along the mesh's data axis."""
    sharding = NamedSharding(s.mesh, P("data"))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def next_sam_step(s: Setup, state: TrainState) -> bool | None:
    """Host-side dispatch for LookSAM/vSAM: which of the two compiled steps runs next.

    Reads ``sharpax.upcoming_sam_steps`` (vSAM: the rest of the current window's
    plan, one device-to-host read per window; LookSAM: the next decision, which
    after a SAM step implies the next ``k - 1`` reuse steps) and serves
    decisions from that queue. ``None`` (decide on device) for the other
    methods and for ``config.dispatch == 'cond'``.
    """
    spec = METHODS[s.config.method]
    if s.config.method == "ae_sam" and s.config.ae_sam.lagged:
        spec = spec._replace(host_dispatch=True)
    if not spec.host_dispatch or s.config.get("dispatch", "host") == "cond":
        return None
    if not s.plan:
        upcoming = [bool(d) for d in sharpax.upcoming_sam_steps(state.opt_state)]
        if s.config.method == "looksam" and upcoming == [True]:
            # LookSAM's schedule is periodic: a SAM step is followed by k - 1 reuse
            # steps, so one device-to-host read serves k steps.
            upcoming += [False] * (s.config.looksam.k - 1)
        s.plan.extend(upcoming)
    return s.plan.pop(0)


METRIC_KEYS = ("loss", "accuracy", "traj_term", "update_norm")


def run_train_steps(
    s: Setup,
    state: TrainState,
    batches: Iterator[dict],
    epoch: int,
    progress: Callable[[dict], None] | None = None,
    stop: Callable[[int], bool] | None = None,
) -> tuple[TrainState, list[dict]]:
    """Runs the steps of ``batches`` (part or all of ``epoch``); returns the state and per-step metrics.

    ``stop(step)``: asked on the host after each step with the number of steps
    done in all (``state.step``, no device read); True ends the loop early (a
    SIGTERM checkpoint). ``progress(metrics)``: called every 10 steps.

    Raises:
      FloatingPointError: a step's loss or update norm, or the parameters at the
        end, are not finite. The message names the first such step (global and
        within the 1-based epoch). Checked at the one device-to-host read of the
        metrics at the end, so no step waits on the host; nothing of these steps
        has been evaluated or checkpointed yet.
    """
    pending = []
    first_step = int(jax.device_get(state.step))  # global index of the first step here
    epoch_arr = jnp.asarray(epoch, jnp.int32)
    # MESA: the teacher's forward pass only while its term is on ([start_epoch, end_epoch)).
    teacher = s.config.method != "mesa" or s.traj.active(epoch)
    for batch in batches:
        if s.config.method == "saf":
            # Host boundary: ids outside the real training set raise, never clamp
            # (checked against the true size, not the padded buffer).
            sharpax.check_example_ids(batch["id"], s.num_examples)
        sam_step = next_sam_step(s, state)
        state, metrics = s.train_step(
            state, put_batch(s, batch), epoch_arr, sam_step=sam_step, teacher=teacher
        )
        pending.append(metrics)
        if progress is not None and (len(pending) % 10 == 0):
            m = jax.device_get(pending[-1])
            progress({k: float(v) for k, v in m.items()})
        if stop is not None and stop(first_step + len(pending)):
            break
    host = jax.device_get(pending)
    _check_finite(s, host, state, epoch, first_step, steps_per_epoch=s.steps_per_epoch)
    return state, host


def add_metrics(sums: dict | None, host: list[dict]) -> dict:
    """Adds per-step metrics to running sums (``{key: float, 'steps': int}``; None: from zero)."""
    sums = dict(sums) if sums else {k: 0.0 for k in METRIC_KEYS} | {"steps": 0}
    for m in host:
        for k in METRIC_KEYS:
            sums[k] += float(m[k])
        sums["steps"] += 1
    return sums


def epoch_metrics(sums: dict) -> dict:
    """``train_<key>`` means and ``train_steps`` of :func:`add_metrics` sums."""
    n = sums["steps"]
    return {f"train_{k}": sums[k] / max(n, 1) for k in METRIC_KEYS} | {"train_steps": n}


def run_train_epoch(
    s: Setup,
    state: TrainState,
    batches: Iterator[dict],
    epoch: int,
    progress: Callable[[dict], None] | None = None,
) -> tuple[TrainState, dict]:
    """One epoch (:func:`run_train_steps`); returns the new state and host-side epoch metrics.

    Steps skipped by float16 loss scaling (an overflow of the scaled backward
    pass) have a zero update and are not divergence: they are counted in
    ``train_skipped_steps``, beside the final ``loss_scale`` (see
    :mod:`experiments.precision`).
    """
    skipped_before = precision.skipped_steps(state.opt_state) or 0
    state, host = run_train_steps(s, state, batches, epoch, progress)
    out = epoch_metrics(add_metrics(None, host))
    out |= precision.loss_scale_metrics(state.opt_state, skipped_before)
    return state, out


def _check_finite(
    s: Setup, host: list[dict], state: TrainState, epoch: int, first_step: int, steps_per_epoch: int
):
    """Raises FloatingPointError naming the first step whose loss or update is not finite."""
    # The epoch's step of global step g (1-based): epochs start at multiples of steps_per_epoch.
    in_epoch = first_step - epoch * steps_per_epoch
    for i, m in enumerate(host):
        bad = [k for k in ("loss", "update_norm") if not np.isfinite(float(m[k]))]
        if bad:
            what = " and ".join(f"{k} {float(m[k])}" for k in bad)
            raise FloatingPointError(
                f"{s.config.method}: {what} at step {first_step + i + 1} (step "
                f"{in_epoch + i + 1} of epoch {epoch + 1}); the run diverged. Nothing after "
                "the last checkpoint was evaluated or checkpointed."
            )
    if not bool(_all_finite(state.params)):  # e.g. a finite but overflowing update
        raise FloatingPointError(
            f"{s.config.method}: the parameters are not finite after step "
            f"{first_step + len(host)} (epoch {epoch + 1}); the run diverged."
        )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def evaluation_state(s: Setup, state: TrainState) -> TrainState:
    """The state to evaluate: MSAM's params moved back to the unperturbed weights."""
    if METHODS[s.config.method].perturbed_params:
        return state._replace(params=sharpax.msam_unperturbed_params(state.params, state.opt_state))
    return state


def evaluate(s: Setup, state: TrainState, batches: Iterator[dict]) -> dict:
    """``test_loss`` and ``test_accuracy`` over ``batches``, padding (``mask`` 0) excluded."""
    state = evaluation_state(s, state)
    outs = jax.device_get([s.eval_step(state, put_batch(s, b)) for b in batches])
    if not outs:
        raise ValueError(f"{s.config.method}: evaluation got no batches (an empty test split?).")
    total = functools.reduce(EvalMetrics.merge, outs).compute()
    return {f"test_{k}": float(v) for k, v in total.items()}


def ema_variables(s: Setup, state: TrainState) -> dict | None:
    """The model EMA's variables (MESA's teacher, or the model EMA of the config), or None."""
    if s.config.method == "mesa":
        return state.traj.ema
    if s.model_ema is not None:
        return state.ema.ema
    return None


def evaluate_ema(s: Setup, state: TrainState, batches: Iterator[dict]) -> dict:
    """:func:`evaluate` of the model EMA (keys suffixed ``_ema``); ``{}`` without one."""
    ema = ema_variables(s, state)
    if ema is None:
        return {}
    ema_state = state._replace(params=ema["params"], batch_stats=ema.get("batch_stats", {}))
    return {f"{k}_ema": v for k, v in evaluate(s, ema_state, batches).items()}


def num_sam_steps(state: TrainState, method: str) -> int:
    if not METHODS[method].second_pass:
        return 0
    return int(jax.device_get(sharpax.num_sam_steps(state.opt_state)))
