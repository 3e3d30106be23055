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

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sharpax
from experiments import input_pipeline, training
from experiments.configs import base

METHODS = (
    "sgd", "sam", "asam", "gsam", "esam", "looksam", "vsam", "vsam_cond", "ae_sam", "ss_sam",
    "msam", "saf", "mesa", "optax_sam",
)  # fmt: skip
# Scheduled methods dispatched from the host: SAM and reuse steps are timed apart.
HOST_SCHEDULED = ("looksam", "vsam", "ss_sam")
TARGETS = {"saf": 0.97, "mesa": 0.85, "vsam": 0.70, "looksam": 0.75, "sam": 0.48}


def make_config(method: str, args) -> object:
    c = base.get_base_config()
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
        base_tx = training.make_optimizer(config, s.steps_per_epoch)
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


def print_table(rows: dict) -> str:
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
        target = r["target_vs_sgd"]
        lines.append(
            f"| {m} | {_ms(r['median_step_s'])} | {_ms(r['effective_step_s'])} | "
            f"{vs:.2f}{extra} | {'≥ %.2f' % target if target else ''} | "
            f"{r.get('measured_sam_fraction', 1.0 if m in ('sam', 'asam', 'gsam', 'esam', 'optax_sam') else 0.0):.2f} | {mem} |"  # noqa: E501
        )
    table = "\n".join(lines)
    print(table)
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--dataset", default="cifar10", help="sets input shape, classes, SAF buffer size")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="steps per method per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--vsam_window", type=int, default=50)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--smoke", action="store_true", help="tiny model and 2x2 steps (for tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.model, args.dataset, args.batch = "mnist1d_mlp", "mnist1d", 16
        args.steps, args.rounds, args.vsam_window = 2, 2, 4
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if "sgd" not in methods:
        methods.insert(0, "sgd")
    train_size = input_pipeline.get_dataset_info(args.dataset).num_train
    runners = {m: Runner(m, args, train_size) for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            runners[m].run(args.steps)
    rows = summarize(runners)
    table = print_table(rows)
    peak = None
    stats = jax.devices()[0].memory_stats()
    if stats:
        peak = stats.get("peak_bytes_in_use")
    result = {
        "date": datetime.date.today().isoformat(),
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
