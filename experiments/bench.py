r"""Step-time benchmark of every method, side by side in one process (not a test).

  python -m experiments.bench                                  # CIFAR ResNet-18 shapes, batch 128
  python -m experiments.bench --model mnist1d_cnn --dataset mnist1d --batch 128   # small, for CPU
  python -m experiments.bench --smoke                          # seconds; used by the tests

Methods: SGD, SAM, ASAM, GSAM, ESAM (beta 0.6, gamma 0.5), LookSAM (k=5), vSAM (two-function host dispatch, and
the on-device ``lax.cond`` path for contrast), AE-SAM (``lax.cond``: it decides
from the step's own gradient norm), SS-SAM (p = 0.5, host dispatch), MSAM, SAF,
MESA and ``optax.contrib.sam(opaque_mode=True)`` configured as plain SAM. All step
functions are compiled first; then ``--rounds`` rounds each run ``--steps``
steps of every method in turn (interleaved, so machine noise hits all methods
alike). Reported: median step time, throughput relative to SGD, the measured
SAM-step fraction, XLA's compiled memory footprint of the step (arguments +
temporaries + outputs), device peak memory where the backend reports it, and the SAF
buffer's bytes at the dataset's full size.

For vSAM, LookSAM and SS-SAM the reuse steps and SAM steps are timed separately (median each; each
round also times ``max(2, steps // 5)`` forced SAM steps on a throw-away copy
of the state, since the schedule itself may take only one in a short run);
its throughput is given at the SAM fraction its schedule produced in this run
*and* at a fixed 30 % fraction (the operating point the targets refer to):
``t = f · t_sam + (1 − f) · t_reuse``. LookSAM's effective time is
``(t_sam + (k − 1) · t_reuse) / k``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

import sharpax
from experiments import cli, input_pipeline, training
from experiments.configs import base
from experiments.methods import make_optimizer

METHODS = (
    "sgd", "sam", "asam", "gsam", "esam", "looksam", "vsam", "vsam_cond", "ae_sam", "ss_sam",
    "msam", "saf", "mesa", "optax_sam",
)  # fmt: skip
# Scheduled methods dispatched from the host: SAM and reuse steps are timed apart.
HOST_SCHEDULED = ("looksam", "vsam", "ss_sam")
TARGETS = {"saf": 0.97, "mesa": 0.85, "vsam": 0.70, "looksam": 0.75, "sam": 0.48}


def make_config(method: str, args) -> object:
    c = args.config.copy_and_resolve_references()  # the base config with --config.* overrides
    c.dataset = args.dataset
    c.model = args.model
    c.batch_size = args.batch
    c.num_epochs = 1
    c.seed = 0
    c.method = {"vsam_cond": "vsam", "optax_sam": "sgd"}.get(method, method)
    c.dispatch = "cond" if method == "vsam_cond" else "host"
    c.saf.start_epoch = 0
    c.mesa.start_epoch = 0
    c.vsam.window = args.vsam_window
    c.vsam.warmup_epochs = 0  # time the schedule's own SAM and reuse steps, not a warm-up
    c.vsam.blocks = 5 if args.vsam_window % 10 == 0 else 2
    return c


def build(method: str, args, train_size: int):
    config = make_config(method, args)
    s = training.setup(config, train_size=train_size)
    if method == "optax_sam":
        # optax's SAM in opaque mode: the adversarial optimizer is normalized SGD
        # with step rho, so the perturbation is rho * g / ||g||; sync_period=2
        # means one adversarial step then one outer step per update call.
        base_tx = make_optimizer(config, s.steps_per_epoch)
        tx = optax.contrib.sam(
            base_tx,
            optax.chain(optax.contrib.normalize(), optax.sgd(config.sam.rho)),
            sync_period=2,
            opaque_mode=True,
        )
        train_step, eval_step = training.make_step_fns(
            dict(model=s.model, tx=tx, traj=None, config=config, num_classes=s.num_classes)
        )
        s.tx = tx
        s.train_step = jax.jit(
            train_step,
            static_argnames=("sam_step", "teacher"),
            donate_argnums=(0,),
            keep_unused=True,
        )
    return config, s


def synthetic_batch(s: training.Setup, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(batch, *s.input_shape)).astype(np.float32),
        "label": rng.integers(0, s.num_classes, size=(batch,)).astype(np.int32),
        "id": rng.permutation(batch).astype(np.int32),
    }


def compiled_bytes(s: training.Setup, state, batch, sam_step) -> int | None:
    try:
        lowered = s.train_step.lower(state, batch, jnp.asarray(0, jnp.int32), sam_step=sam_step)
        m = lowered.compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is backend dependent
        return None


class Runner:
    """One method's state, batch and step dispatch; times steps by kind."""

    def __init__(self, method, args, train_size):
        self.method = method
        self.config, self.s = build(method, args, train_size)
        host_batch = synthetic_batch(self.s, args.batch)
        quantized = getattr(self.s.model, "quant_bits", None) is not None
        self.state = training.init_state(self.s, host_batch["image"] if quantized else None)
        self.batch = training.put_batch(self.s, host_batch)
        self.epoch = jnp.asarray(self.config.saf.start_epoch + 10, jnp.int32)
        self.times = {"all": [], True: [], False: []}
        self.sam_due_sequence = []
        kinds = [None]
        if method in HOST_SCHEDULED:
            kinds = [True, False]
        self.memory = {str(k): compiled_bytes(self.s, self.state, self.batch, k) for k in kinds}
        for k in kinds:  # compile and warm up each step function
            self.step(k)
        jax.block_until_ready(self.state)

    def step(self, sam_step):
        self.state, metrics = self.s.train_step(self.state, self.batch, self.epoch, sam_step=sam_step)
        return metrics

    def run(self, n: int):
        for _ in range(n):
            sam_step = training.next_sam_step(self.s, self.state)
            t0 = time.perf_counter()
            self.step(sam_step)
            jax.block_until_ready(self.state.params)
            dt = time.perf_counter() - t0
            self.times["all"].append(dt)
            if sam_step is not None:
                self.times[sam_step].append(dt)
                self.sam_due_sequence.append(sam_step)
        if self.method == "vsam":
            # vSAM's own schedule may take a single SAM step in a whole run; time
            # a few forced SAM steps too, so t_sam is a median, not one sample.
            # They run on a throw-away copy of the state, so the schedule (and
            # the host's queue of its decisions) is left exactly as it was.
            scratch = jax.tree.map(jnp.copy, self.state)
            for _ in range(max(2, n // 5)):
                jax.block_until_ready(scratch)
                t0 = time.perf_counter()
                scratch, _ = self.s.train_step(scratch, self.batch, self.epoch, sam_step=True)
                jax.block_until_ready(scratch.params)
                self.times[True].append(time.perf_counter() - t0)
            del scratch


def summarize(runners: dict) -> dict:
    out = {}
    sgd_t = statistics.median(runners["sgd"].times["all"]) if "sgd" in runners else None
    for m, r in runners.items():
        med = statistics.median(r.times["all"])
        row = {"median_step_s": med}
        if m in HOST_SCHEDULED and r.times[True] and r.times[False]:
            t_sam = statistics.median(r.times[True])
            t_reuse = statistics.median(r.times[False])
            frac = float(np.mean(r.sam_due_sequence))
            row.update(t_sam_step_s=t_sam, t_reuse_step_s=t_reuse, measured_sam_fraction=frac)
            if m == "looksam":
                k = r.config.looksam.k
                row["effective_step_s"] = (t_sam + (k - 1) * t_reuse) / k
            else:
                row["effective_step_s"] = frac * t_sam + (1 - frac) * t_reuse
                row["step_s_at_30pct"] = 0.3 * t_sam + 0.7 * t_reuse
        elif m in ("vsam_cond", "ae_sam"):  # on-device lax.cond decisions
            count = int(jax.device_get(sharpax.num_sam_steps(r.state.opt_state)))
            total = int(jax.device_get(r.state.step))
            row["measured_sam_fraction"] = count / max(total, 1)
            row["effective_step_s"] = statistics.mean(r.times["all"])
        else:
            row["effective_step_s"] = med
        if sgd_t:
            row["throughput_vs_sgd"] = sgd_t / row["effective_step_s"]
            if "step_s_at_30pct" in row:
                row["throughput_vs_sgd_at_30pct"] = sgd_t / row["step_s_at_30pct"]
        row["compiled_step_bytes"] = r.memory
        if m == "saf":
            row["saf_buffer_bytes"] = int(r.s.traj.nbytes)
        row["target_vs_sgd"] = TARGETS.get(m)
        out[m] = row
    return out


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def print_table(rows: dict, smoke: bool = False) -> str:
    """The results as a Markdown table (printed); ``smoke``: no targets column values, a note first."""
    lines = [
        "| method | median step (ms) | effective step (ms) | vs SGD | target | SAM fraction | compiled step memory (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        vs = r.get("throughput_vs_sgd", float("nan"))
        extra = ""
        if "throughput_vs_sgd_at_30pct" in r:
            extra = f" ({r['throughput_vs_sgd_at_30pct']:.2f} at 30 %)"
        mem = ", ".join(
            f"{v / 2**20:.1f}" for v in r["compiled_step_bytes"].values() if v is not None
        )
        target = None if smoke else r["target_vs_sgd"]
        lines.append(
            f"| {m} | {_ms(r['median_step_s'])} | {_ms(r['effective_step_s'])} | "
            f"{vs:.2f}{extra} | {'≥ %.2f' % target if target else ''} | "
            f"{r.get('measured_sam_fraction', 1.0 if m in ('sam', 'asam', 'gsam', 'esam', 'optax_sam') else 0.0):.2f} | {mem} |"  # noqa: E501
        )
    table = "\n".join(([SMOKE_NOTE, ""] if smoke else []) + lines)
    print(table)
    return table


SMOKE = {"model": "mnist1d_mlp", "dataset": "mnist1d", "batch": 16, "steps": 2, "rounds": 2, "vsam_window": 4}
SMOKE_NOTE = (
    "Smoke run (--smoke): a tiny MLP, 2 rounds of 2 steps per method. It tests that every "
    "method's step compiles and runs; its times, ratios and memory mean nothing (none is "
    "comparable with the targets)."
)


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """bench's flags (absl, as every experiments/ program; see experiments/cli.py)."""
    def define(kind, name, default, help_string):
        getattr(flags, f"DEFINE_{kind}")(name, default, help_string, flag_values=fv)

    define("string", "model", "resnet18", "Model of experiments/models.py.")
    define("string", "dataset", "cifar10", "Sets input shape, classes and the SAF buffer size.")
    define("integer", "batch", 128, "Global batch size.")
    define("integer", "steps", 10, "Steps per method per round.")
    define("integer", "rounds", 5, "Rounds; each runs every method in turn (interleaved).")
    define("string", "methods", ",".join(METHODS), "Comma-separated methods; SGD is always run.")
    define("integer", "vsam_window", 50, "vSAM's window (steps).")
    define("string", "out", "runs/bench", "The JSON of the results goes here.")
    define("bool", "smoke", False, "A test of the code path: " + SMOKE_NOTE.split(": ", 1)[1])
    define(
        "string", "compile_cache",
        os.path.join(input_pipeline.default_cache_dir(), "jax_compilation_cache"),
        "JAX persistent compilation cache: the step compiled for the memory analysis is not "
        "compiled again for the timing, and reruns reuse both ('' disables it).",
    )  # fmt: skip
    config_flags.DEFINE_config_dict(
        "config", base.get_base_config(), "The methods' hyperparameters "
        "(experiments/configs/base.py), e.g. --config.looksam.k=10 --config.sam.rho=0.1.",
        flag_values=fv, sys_argv=argv,
    )  # fmt: skip


def parse_args(argv=None):
    """The command line (without the program name) as flag values; smoke sizes applied."""
    fv = cli.parse("experiments.bench", __doc__, define_flags, argv)
    args = {name: fv[name].value for name in fv if name not in ("flagfile", "undefok")}
    if args["smoke"]:
        args |= SMOKE
    for name in ("batch", "steps", "rounds", "vsam_window"):
        if args[name] < 1:
            raise SystemExit(f"--{name}={args[name]}: must be >= 1")
    methods = cli.split_list(args["methods"], "methods")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown methods {sorted(unknown)}; choose from {METHODS}")
    args["methods"] = methods if "sgd" in methods else ["sgd", *methods]
    args["config_overrides"] = dict(config_flags.get_override_values(fv["config"]))
    return types.SimpleNamespace(**args)


def main(argv=None) -> dict:
    """Runs the benchmark for the command line ``argv`` (without the program name)."""
    args = parse_args(argv)
    # A smoke run's figures mean nothing: compile it with XLA's optimisations off (~30 % less
    # compile time per step function).
    options = {"jax_disable_most_optimizations": True} if args.smoke else {}
    with cli.jax_config(args.compile_cache, **options):
        return _run(args)


def _run(args) -> dict:
    methods = args.methods
    print(
        f"bench: {len(methods)} methods, {args.model} on {args.dataset} shapes, batch {args.batch}, "
        f"{args.rounds} rounds of {args.steps} steps" + (" — smoke run, figures not meaningful" if args.smoke else ""),
        flush=True,
    )
    train_size = input_pipeline.get_dataset_info(args.dataset).num_train
    t0 = time.perf_counter()
    runners = {}
    for i, m in enumerate(methods):
        runners[m] = Runner(m, args, train_size)
        print(f"  compiled {m} ({i + 1}/{len(methods)}, {time.perf_counter() - t0:.0f} s)", flush=True)
    for k in range(args.rounds):
        for m in methods:
            runners[m].run(args.steps)
        print(f"  round {k + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = summarize(runners)
    table = print_table(rows, smoke=args.smoke)
    peak = None
    stats = jax.devices()[0].memory_stats()
    if stats:
        peak = stats.get("peak_bytes_in_use")
    result = {
        "date": datetime.date.today().isoformat(),
        "smoke": args.smoke,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "num_devices": jax.device_count(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {"jax": jax.__version__, "optax": optax.__version__},
        "model": args.model,
        "dataset": args.dataset,
        "batch": args.batch,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "config_overrides": args.config_overrides,
        "device_peak_bytes": peak,
        "results": rows,
        "table": table,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_{args.model}_{args.batch}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
