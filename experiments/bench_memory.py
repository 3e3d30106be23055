r"""Start-up, restore and step memory of the SAF ImageNet train state (not a test).

  python -m experiments.bench_memory                    # 1/8 of ImageNet's rows, 8 fake CPU devices
  python -m experiments.bench_memory --rows 1281167     # the full buffer: 10.3 GB (the old init ~3x)
  python -m experiments.bench_memory --rows 20000 --phases init_old,init_new   # seconds

The config is ``configs/imagenet_resnet50.py:saf`` (bfloat16 buffer of ``lag + 1 = 4``
slots x 1000 classes per example, sharded along the example axis, model EMA,
Nesterov SGD) with a tiny CNN instead of the ResNet (``--features``, ``--hidden``)
and a small batch, so the SAF buffer is nearly the whole state. ``--rows``
training examples (ImageNet: 1 281 167; the buffer pads them to a multiple of the
devices).

Each phase runs in a fresh subprocess with ``--devices`` fake CPU devices
(``XLA_FLAGS`` set before jax is imported), so no phase sees another's buffers:

* ``init_old``: the eager init this module keeps as :func:`eager_init_state` (every
  leaf built on the default device, ``device_put`` to its sharding, every leaf copied).
* ``init_new``: ``training.init_state`` (two ``jit``\ s with ``out_shardings``: the model's
  variables, then the rest of the state with those donated).
* ``restore_old``: the resume path of ``train.py`` before ``abstract_state``: a
  concrete eager init, then ``StandardRestore(state)``.
* ``restore_new``: ``StandardRestore(training.abstract_state(s))``.
* ``step``: ``--steps`` train steps after ``init_state`` (one warm-up step first,
  which compiles); the table gives the highest peak of the timed steps (the
  state, what the init and the compilation left resident, and the step's
  transient buffers), the JSON also the transient alone (``step_transient``).

The measure: the devices' ``peak_bytes_in_use`` where the backend reports
``memory_stats()`` (GPU/TPU; one process per phase, so the peak is the phase's,
except ``step``, whose peak includes its init's). XLA:CPU reports none; its
"device" buffers are host memory, so the measure is the process's resident set:
the kernel's high-water mark ``VmHWM`` reset just before the phase by writing 5 to
``/proc/self/clear_refs``, minus ``VmRSS`` after the imports and ``setup`` (for
``step``: before its init, so the state is in the peak, as on a device). It counts
the host side of the phase too (XLA compilation, Orbax's read buffers). The
state's size is the sum of its leaves' ``nbytes`` over all their device shards
(a replicated leaf counts once per device, as it is stored).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

from absl import flags

from experiments import cli

PHASES = ("init_old", "init_new", "restore_old", "restore_new", "step")
IMAGENET_ROWS = 1_281_167


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """bench_memory's flags (absl, as every experiments/ program; see experiments/cli.py)."""
    del argv  # no config flag

    def define(kind, name, default, help_string):
        getattr(flags, f"DEFINE_{kind}")(name, default, help_string, flag_values=fv)

    define("integer", "rows", IMAGENET_ROWS // 8,
           f"Training examples (SAF buffer rows); ImageNet: {IMAGENET_ROWS}.")  # fmt: skip
    define("integer", "devices", 8, "Fake CPU devices (ignored off CPU).")
    define("integer", "batch", 32, "Global batch of the step phase.")
    define("integer", "steps", 3, "Timed steps of the step phase.")
    define("string", "features", "4,4", "The tiny CNN's conv channels.")
    define("integer", "hidden", 4, "The tiny CNN's hidden width.")
    define("string", "phases", ",".join(PHASES), f"Comma-separated, of {', '.join(PHASES)}.")
    define("string", "ckpt_dir", "", "Checkpoint of the restore phases (default: a temp dir).")
    define("string", "out", "runs/bench_memory", "The table and its JSON go here.")
    define("string", "phase", "", "Internal: run this one phase in this process.")


def parse_args(argv=None):
    """The command line (without the program name) as a namespace of flag values."""
    fv = cli.parse("experiments.bench_memory", __doc__, define_flags, argv, config_flag=None)
    args = types.SimpleNamespace(
        **{name: fv[name].value for name in fv if name not in ("flagfile", "undefok")}
    )
    for name in ("rows", "devices", "batch", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}={getattr(args, name)}: must be >= 1")
    unknown = set(_phases(args)) - set(PHASES)
    if unknown:
        raise SystemExit(f"--phases: unknown phases {sorted(unknown)}; choose from {PHASES}")
    return args


def _phases(args) -> list[str]:
    return [x.strip() for x in args.phases.split(",") if x.strip()]


# ----------------------------------------------------------------------------- one phase (child)


class Meter:
    """Peak memory of a phase: device ``peak_bytes_in_use`` if reported, else the resident set."""

    def __init__(self):
        import jax

        self.devices = jax.local_devices()
        self.device = all(d.memory_stats() for d in self.devices)
        if not self.device and not os.access("/proc/self/clear_refs", os.W_OK):
            raise SystemExit("no device memory_stats() and no /proc/self/clear_refs to reset VmHWM")
        self.name = "device peak_bytes_in_use" if self.device else "host RSS (VmHWM - VmRSS before)"
        self.base = self.current()

    def current(self) -> int:
        if self.device:
            return sum(d.memory_stats()["bytes_in_use"] for d in self.devices)
        return _proc_status("VmRSS")

    def reset(self) -> None:
        """Starts a new peak (resident set only; a device's peak is the process's)."""
        if not self.device:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        """The peak since :meth:`reset` (device: since the start), minus the base."""
        if self.device:
            return sum(d.memory_stats()["peak_bytes_in_use"] for d in self.devices) - self.base
        return _proc_status("VmHWM") - self.base


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_setup(args):
    from experiments import training
    from experiments.configs import imagenet_resnet50

    c = imagenet_resnet50.get_config("saf")
    c.model = "mnist_cnn"
    c.model_kwargs = {"features": tuple(int(f) for f in args.features.split(",")), "hidden": args.hidden}
    c.batch_size = c.eval_batch_size = args.batch
    return training.setup(c, train_size=args.rows)


def eager_init_state(s):
    """The init ``training.init_state`` replaced (commit d4fdf52): eager, device_put, copy."""
    import jax
    import jax.numpy as jnp

    from experiments import models, training

    init_rng, state_rng = jax.random.split(jax.random.key(s.config.seed))
    variables = models.init_model(s.model, init_rng, s.input_shape)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    both = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
    state = training.TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=s.tx.init(params),
        traj=s.traj.init(),
        rng=jax.random.key_data(state_rng),
        ema=s.model_ema.init(both) if s.model_ema is not None else {},
    )
    state = jax.device_put(state, training.state_shardings(s, state))
    return jax.tree.map(lambda x: x.copy(), state)


def _stored_bytes(state) -> int:
    import jax

    return sum(sh.data.nbytes for x in jax.tree.leaves(state) for sh in x.addressable_shards)


def _restore(s, ckpt_dir: str, target):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(ckpt_dir) as mgr:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        return mgr.restore(mgr.latest_step(), args=args)["state"]


def _save(ckpt_dir: str, state) -> None:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(ckpt_dir) as mgr:
        mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        mgr.wait_until_finished()


def _batch(s, batch: int):
    import numpy as np

    from experiments import training

    rng = np.random.default_rng(0)
    return training.put_batch(s, {
        "image": rng.normal(size=(batch, *s.input_shape)).astype(np.float32),
        "label": rng.integers(0, s.num_classes, batch).astype(np.int32),
        "id": rng.choice(s.num_examples, batch, replace=False).astype(np.int32),
    })  # fmt: skip


def run_phase(args) -> dict:
    """Runs ``args.phase`` in this (fresh) process; returns its measurements."""
    import jax
    import jax.numpy as jnp

    from experiments import training

    s = make_setup(args)
    meter = Meter()
    meter.reset()
    t0 = time.perf_counter()
    out = {"phase": args.phase, "measure": meter.name}
    if args.phase in ("init_old", "init_new"):
        init = eager_init_state if args.phase == "init_old" else training.init_state
        state = jax.block_until_ready(init(s))
        out["peak"] = meter.peak()
        if args.phase == "init_new" and args.ckpt_dir:
            _save(args.ckpt_dir, state)  # for the restore phases; not measured
    elif args.phase == "restore_old":
        state = jax.block_until_ready(_restore(s, args.ckpt_dir, eager_init_state(s)))
        out["peak"] = meter.peak()
    elif args.phase == "restore_new":
        state = jax.block_until_ready(_restore(s, args.ckpt_dir, training.abstract_state(s)))
        out["peak"] = meter.peak()
    elif args.phase == "step":
        state = training.init_state(s)
        batch = _batch(s, args.batch)
        epoch = jnp.asarray(s.config.saf.start_epoch + s.config.saf.lag, jnp.int32)  # term on
        state, _ = jax.block_until_ready(s.train_step(state, batch, epoch, sam_step=None))  # compiles
        out["peak_first_step"] = meter.peak()
        peaks, transients = [], []
        for _ in range(args.steps):
            meter.reset()
            before = meter.current() - meter.base
            state, metrics = jax.block_until_ready(s.train_step(state, batch, epoch, sam_step=None))
            peaks.append(meter.peak())
            transients.append(peaks[-1] - before)
        out["peak"], out["step_peaks"] = max(peaks), peaks
        out["step_transient"] = max(transients)  # above what was resident before the step
        out["loss"] = float(metrics["loss"])
    else:
        raise ValueError(f"unknown phase {args.phase!r}")
    out["seconds"] = time.perf_counter() - t0
    out["state_bytes"] = _stored_bytes(state)
    out["state_nbytes"] = sum(x.nbytes for x in jax.tree.leaves(state))
    out["buffer_shape"] = list(state.traj.logits.shape)
    out["buffer_dtype"] = str(state.traj.logits.dtype)
    out["buffer_shards"] = len(state.traj.logits.addressable_shards)
    out["backend"], out["num_devices"] = jax.default_backend(), jax.device_count()
    return out


# ----------------------------------------------------------------------------- driver (parent)


def _child(args, phase: str) -> dict:
    env = dict(os.environ)
    xla = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*xla, f"--xla_force_host_platform_device_count={args.devices}"])
    passed = {"phase": phase, **{k: getattr(args, k) for k in
                                 ("rows", "batch", "steps", "features", "hidden", "ckpt_dir")}}  # fmt: skip
    cmd = [sys.executable, "-m", "experiments.bench_memory", *(f"--{k}={v}" for k, v in passed.items())]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if proc.returncode:
        raise RuntimeError(f"phase {phase} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


LABELS = {
    "init_old": "init, old (eager + device_put + copy)",
    "init_new": "init, new (jit with out_shardings)",
    "restore_old": "restore, old (eager init + StandardRestore(state))",
    "restore_new": "restore, new (StandardRestore(abstract_state))",
    "step": "train step (peak of the timed steps, state included)",
}


def format_table(rows: list[dict]) -> str:
    gib = 2**30
    lines = [
        "| phase | peak (GiB) | peak / state | peak - state (GiB) | measure |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        peak, state = r["peak"], r["state_bytes"]
        lines.append(
            f"| {LABELS[r['phase']]} | {peak / gib:.3f} | {peak / state:.3f} | "
            f"{(peak - state) / gib:.3f} | {r['measure']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return {}
    phases = _phases(args)
    tmp = None
    if not args.ckpt_dir and any(p.startswith("restore") for p in phases):
        tmp = args.ckpt_dir = tempfile.mkdtemp(prefix="bench_memory_ckpt_")
    try:
        if any(p.startswith("restore") for p in phases) and "init_new" not in phases:
            phases.insert(0, "init_new")  # it saves the checkpoint they read
        rows = [_child(args, p) for p in phases]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    first = rows[0]
    header = (
        f"SAF buffer {tuple(first['buffer_shape'])} {first['buffer_dtype']} in {first['buffer_shards']} "
        f"shards ({args.rows} rows = {args.rows / IMAGENET_ROWS:.4g} of ImageNet's {IMAGENET_ROWS}); "
        f"state {first['state_bytes'] / 2**30:.3f} GiB stored ({first['state_nbytes'] / 2**30:.3f} "
        f"GiB of leaf nbytes); {first['backend']}, {first['num_devices']} devices."
    )
    table = header + "\n\n" + format_table(rows)
    print(table)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k not in ("phase", "ckpt_dir")},
        "rows": rows,
        "table": table,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_memory_{args.rows}")
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {stem}.md, {stem}.json")
    return result


if __name__ == "__main__":
    main()
