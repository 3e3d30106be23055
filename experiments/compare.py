r"""The main demo: every method, same seeds and budget, the gain each keeps and what it costs.

  python -m experiments.compare                       # MNIST-1D, 30 % label noise, 3 seeds
  python -m experiments.compare --clean               # the same without label noise
  python -m experiments.compare --config experiments/configs/cifar10_cnn_noisy.py \
      --config.data_dir=../shared/data/tfds
  python -m experiments.compare --methods sgd,sam,saf --seeds 0,1,2,3,4 --out runs/cmp
  python -m experiments.compare --config.num_epochs=5 --config.looksam.alpha=0.1
  python -m experiments.compare --smoke               # a test of the code path (under a minute)

For each method it trains the task's config (``--config experiments/configs/<task>.py``,
with any ``--config.<field>=<value>`` applied to every method's config; default ``mnist1d``: MNIST-1D with 30 % of the training labels flipped, where
SAM beats SGD) with identical seeds, epochs, batch size, learning rate and rho
(no per-method tuning), and records per epoch training loss, test accuracy and
the SAM sharpness ``L(θ + ρ g/‖g‖) − L(θ)`` on a fixed batch of training data;
at the end the Hessian's top eigenvalue, loss-landscape curves under Gaussian
perturbations and the extra memory each method holds.

The report's table gives, per method, over the seeds (:mod:`experiments.stats`):
the test accuracy with its 95 % Student-t interval; the gain over SGD with its
Welch interval and Welch's one-sided p-value of "better than SGD"; the **share
of SAM's gain** the method keeps, ``(acc − acc_sgd) / (acc_sam − acc_sgd)``,
with Fieller's interval; and the cost, the step time relative to SGD's (per
seed: median epoch time after the first, compiling, epoch, input pipeline
excluded, over SGD's of the same seed in this process; mean and t interval over
seeds) and the SAM-step fraction. Sentences under the table are generated from
it: whether SAM's gain is significant, and which methods keep little of it.
Writes ``report.md``, ``metrics.json`` (``runs[]`` with every run's method,
seed, accuracy and history; ``env.label_noise`` with the flip set) and PNG
plots, among them ``gain_vs_cost.png`` (gain over SGD against step cost, vSAM
Fig. 1 style) to ``--out``, and TensorBoard event files per run to
``--out/tensorboard/<method>_seed<k>`` (``tensorboard --logdir <out>/tensorboard``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags
from tqdm.auto import tqdm

import sharpax
from experiments import cli, input_pipeline, metric_writers, models, stats, training

DEFAULT_METHODS = ("sgd", "sam", "looksam", "vsam", "saf", "mesa")
DEFAULT_SEEDS = "0,1,2"
SMOKE_SEEDS = "0,1"  # two seeds: the smallest sample the table's intervals are defined for
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# The task's config file supplies model and recipe (`--config`; CIFAR ResNet-18 is slow on a
# CPU: pass --config.num_epochs). compare sets these two fields itself, per run.
SET_BY_COMPARE = {"method": "--methods", "seed": "--seeds"}
DIAG_BATCH = 512
LANDSCAPE_SCALES = (0.0, 0.02, 0.04, 0.07, 0.1, 0.15)


def tree_bytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def extra_memory_bytes(method: str, state: training.TrainState) -> int:
    """Bytes a method keeps beyond SGD's state (params, batch stats, momentum).

    SAM-type methods hold one perturbed copy of the params during a step; LookSAM,
    vSAM and AE-LookSAM also cache one gradient-sized direction; SAF holds its
    logit buffer; MESA an EMA copy of the variables; MSAM nothing (its perturbation
    is along SGD's own momentum, applied in place).
    """
    params = tree_bytes(state.params)
    spec = training.METHODS[method]
    if spec.scheduled:  # the perturbed copy plus the reuse rule's cache (none for plain)
        return params + tree_bytes(optax.tree_utils.tree_get(state.opt_state, "reuse"))
    if spec.second_pass:
        return params
    if spec.loss is not None:
        return tree_bytes(state.traj)
    return 0  # SGD; MSAM's momentum is SGD's


def diagnostics_loss(model, num_classes: int, batch_stats, batch: dict):
    """loss(params) on a fixed batch, eval-mode batch statistics: what sharpness is measured on."""

    def loss_fn(params):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, _ = models.apply_model(model, variables, batch["image"], train=False)
        return training.cross_entropy(logits, batch["label"], num_classes, 0.0).mean()

    return loss_fn


# The diagnostics are jitted at module level with the (hashable) Flax model static, so every
# method and seed of a task reuses one trace of each (a fresh closure per run would be traced
# and lowered again each time: most of a smoke run's time).
_DIAG_STATIC = ("model", "num_classes")


@functools.partial(jax.jit, static_argnames=_DIAG_STATIC)
def sharpness(params, batch_stats, batch, rho, *, model, num_classes):
    """SAM sharpness ``L(θ + ρ g/‖g‖) − L(θ)`` on ``batch``."""
    loss_fn = diagnostics_loss(model, num_classes, batch_stats, batch)
    return sharpax.sam_sharpness(loss_fn, params, rho)


@functools.partial(jax.jit, static_argnames=(*_DIAG_STATIC, "num_iters"))
def top_eigenvalue(params, batch_stats, batch, key, *, model, num_classes, num_iters):
    """The Hessian's top eigenvalue on ``batch`` by ``num_iters`` power iterations."""
    loss_fn = diagnostics_loss(model, num_classes, batch_stats, batch)
    return sharpax.hessian_top_eigenvalue(loss_fn, params, num_iters=num_iters, key=key)


@functools.partial(jax.jit, static_argnames=(*_DIAG_STATIC, "num_directions"))
def landscape(params, batch_stats, batch, scales, key, *, model, num_classes, num_directions):
    """Mean loss on ``batch`` under Gaussian perturbations of each relative scale."""
    loss_fn = diagnostics_loss(model, num_classes, batch_stats, batch)
    return sharpax.loss_landscape(
        loss_fn, params, scales=scales, num_directions=num_directions, key=key
    )


def fixed_batch(source, dataset: str, n: int) -> dict:
    """The first ``n`` training examples, eval preprocessing: the diagnostics batch."""
    it = input_pipeline.eval_batches(
        source, n, preprocess=input_pipeline.get_preprocess(dataset, train=False)
    )
    batch = next(iter(it))
    keep = batch["mask"].astype(bool)
    return {k: jnp.asarray(batch[k][keep]) for k in ("image", "label")}


@dataclasses.dataclass(frozen=True)
class Options:
    """What the command line asks for (:func:`parse_args`)."""

    config_file: str  # the task's config file (its get_config(method) is called per method)
    overrides: dict  # --config.<field>=<value>, flattened: applied to every method's config
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    out: str = "runs/compare"
    smoke: bool = False
    quiet: bool = False
    power_iters: int = 20
    directions: int = 4
    compile_cache: str = ""

    @property
    def task(self) -> str:
        return _task_name(self.config_file)


def _task_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _config_module(path: str):
    """The config file's module: experiments/configs/ by package name, others from their path."""
    if os.path.dirname(os.path.realpath(path)) == os.path.realpath(CONFIG_DIR):
        return importlib.import_module(f"experiments.configs.{_task_name(path)}")
    spec = importlib.util.spec_from_file_location("compare_task_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(method: str, seed: int, opts: Options):
    """The task's config for ``method``: smoke shrinking first, then the ``--config.*`` overrides."""
    config = _config_module(opts.config_file).get_config(method + (",runlocal" if opts.smoke else ""))
    config.seed = seed
    if opts.smoke:
        config.saf.start_epoch = 0
        config.mesa.start_epoch = 0
        config.vsam.window = 4
        config.vsam.blocks = 2
        config.eval_batch_size = 256
    config.update_from_flattened_dict(dict(opts.overrides))
    return config


def run_method(
    method: str,
    seed: int,
    opts: Options,
    sources: tuple,
    diag_batch: dict,
) -> dict:
    config = make_config(method, seed, opts)
    train_source, test_source = sources
    s = training.setup(config, train_size=len(train_source))
    state = training.init_state(s, training.init_sample(s, train_source))
    static = {"model": s.model, "num_classes": s.num_classes}

    def sharp_fn(st):
        return sharpness(st.params, st.batch_stats, diag_batch, config.sam.rho, **static)

    history = []
    epoch_times = []
    bar = tqdm(
        total=config.num_epochs * s.steps_per_epoch,
        desc=f"seed {seed} {method:>8}",
        leave=True,
        disable=opts.quiet,
    )
    sam_before = 0
    writer = metric_writers.TensorBoardWriter(
        os.path.join(opts.out, "tensorboard", f"{method}_seed{seed}")
    )
    for epoch in range(config.num_epochs):
        # Materialise the epoch's batches first: the timing is of the training steps,
        # not of the Python input pipeline (which dominates for a model this small).
        batches = list(training.train_iter(config, train_source, epoch, s.steps_per_epoch))
        t0 = time.perf_counter()

        def progress(m, _bar=bar):
            _bar.update(10)
            _bar.set_postfix(loss=f"{m['loss']:.3f}")

        state, train_metrics = training.run_train_epoch(
            s, state, batches, epoch, None if opts.quiet else progress
        )
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        epoch_times.append(dt)
        test = training.evaluate(s, state, training.eval_iter(config, test_source))
        num_sam = training.num_sam_steps(state, method)
        history.append(
            {
                "epoch": epoch + 1,  # 1-based, as on the console and in metrics.jsonl
                **train_metrics,
                **test,
                "sharpness": float(sharp_fn(state)),
                "epoch_time_s": dt,
                "sam_step_fraction": (num_sam - sam_before) / max(train_metrics["train_steps"], 1),
            }
        )
        sam_before = num_sam
        writer.write_scalars((epoch + 1) * s.steps_per_epoch, history[-1])
    writer.close()
    bar.n = bar.total
    bar.close()
    state = training.evaluation_state(s, state)  # MSAM: diagnostics at the unperturbed weights
    lam = float("nan")  # --power_iters 0: not measured
    if opts.power_iters:
        key = jax.random.key(seed)
        lam = float(
            top_eigenvalue(
                state.params, state.batch_stats, diag_batch, key, num_iters=opts.power_iters, **static
            )
        )
    curves = np.asarray(
        landscape(
            state.params,
            state.batch_stats,
            diag_batch,
            jnp.asarray(LANDSCAPE_SCALES),
            jax.random.key(1000 + seed),
            num_directions=opts.directions,
            **static,
        )
    )
    timed = epoch_times[1:] if len(epoch_times) > 1 else epoch_times
    steps = s.steps_per_epoch
    total_steps = steps * config.num_epochs
    return {
        "method": method,
        "seed": seed,
        "history": history,
        "test_accuracy": history[-1]["test_accuracy"],
        "final_train_loss": history[-1]["train_loss"],
        "median_epoch_time_s": statistics.median(timed),
        "images_per_sec": steps * config.batch_size / statistics.median(timed),
        "sam_step_fraction": training.num_sam_steps(state, method) / max(total_steps, 1),
        "sharpness": history[-1]["sharpness"],
        "lambda_max": lam,
        "landscape": curves.tolist(),
        "extra_memory_bytes": extra_memory_bytes(method, state),
        "param_bytes": tree_bytes(state.params),
    }


def _per_seed_step_ratio(results: list[dict], method: str) -> list[float]:
    """Per seed: this method's median epoch time / SGD's of the same seed (same process)."""
    sgd = {r["seed"]: r["median_epoch_time_s"] for r in results if r["method"] == "sgd"}
    return [
        r["median_epoch_time_s"] / sgd[r["seed"]]
        for r in results
        if r["method"] == method and r["seed"] in sgd
    ]


def summarize(results: list[dict], methods: list[str]) -> list[dict]:
    """One row per method: accuracy with its interval, the test against SGD, the gain share, cost.

    Intervals are 95 %: Student t over seeds for means, Welch for differences,
    Fieller for the share of SAM's gain (see :mod:`experiments.stats`). Cost is
    the per-seed ratio of median epoch times to SGD's of the same seed.
    """
    acc = {m: [r["test_accuracy"] for r in results if r["method"] == m] for m in methods}
    rows = []
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        a = acc[m]
        mean = stats.mean_ci(a)
        row = {
            "method": m,
            "seeds": len(rs),
            "test_acc_mean": mean.estimate,
            "test_acc_ci95": [mean.low, mean.high],
            "test_acc_std": statistics.stdev(a) if len(a) > 1 else float("nan"),
        }
        if m == "sgd":  # the reference: no gain, no test, share 0 by definition
            row |= {"gain_vs_sgd": 0.0, "gain_vs_sgd_ci95": [0.0, 0.0], "p_vs_sgd": float("nan")}
            if "sam" in acc:
                row |= {"gain_share": 0.0, "gain_share_ci95": [0.0, 0.0]}
        elif "sgd" in acc:
            gain = stats.diff_ci(a, acc["sgd"])
            row["gain_vs_sgd"] = gain.estimate
            row["gain_vs_sgd_ci95"] = [gain.low, gain.high]
            row["p_vs_sgd"] = stats.welch_test(a, acc["sgd"]).p
        if m != "sgd" and "sgd" in acc and "sam" in acc:
            share = stats.gain_share(a, acc["sgd"], acc["sam"])
            row["gain_share"] = share.estimate
            row["gain_share_ci95"] = [share.low, share.high]
        ratio = stats.mean_ci(_per_seed_step_ratio(results, m)) if "sgd" in acc else None
        row["step_time_vs_sgd"] = ratio.estimate if ratio else float("nan")
        row["step_time_vs_sgd_ci95"] = [ratio.low, ratio.high] if ratio else [float("nan")] * 2
        row["images_per_sec"] = statistics.mean(r["images_per_sec"] for r in rs)
        row["sam_step_fraction"] = statistics.mean(r["sam_step_fraction"] for r in rs)
        row["final_train_loss"] = statistics.mean(r["final_train_loss"] for r in rs)
        row["sharpness"] = statistics.mean(r["sharpness"] for r in rs)
        row["lambda_max"] = statistics.mean(r["lambda_max"] for r in rs)
        row["extra_memory_mb"] = rs[0]["extra_memory_bytes"] / 2**20
        rows.append(row)
    return rows


def _interval(ci: list[float], scale: float = 1.0) -> str:
    """'[lo, hi]' with '±∞' for unbounded ends; '' when the interval is undefined (nan)."""
    lo, hi = ci
    if np.isnan(lo) or np.isnan(hi):
        return ""
    b = [("−∞" if v < 0 else "+∞") if np.isinf(v) else f"{scale * v:.2f}" for v in (lo, hi)]
    return f"[{b[0]}, {b[1]}]"


def _pm(x: float, ci: list[float], scale: float = 1.0) -> str:
    """'x [lo, hi]'; 'n/a' for a nan estimate."""
    if not np.isfinite(x):
        return "n/a"
    return f"{scale * x:.2f} {_interval(ci, scale)}".strip()


def _num(x: float) -> str:
    return f"{x:.2f}" if np.isfinite(x) else "n/a"


def _p(p: float) -> str:
    return "n/a" if not np.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def table_markdown(rows: list[dict]) -> str:
    head = (
        "| method | test acc % [95 % CI] | gain over SGD, pt [95 % CI] | p (Welch, > SGD) "
        "| share of SAM's gain kept [95 % CI] | step time vs SGD [95 % CI] | SAM-step fraction "
        "| final train loss | SAM sharpness | λmax | extra memory |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if r["method"] == "sgd":
            lines.append(
                f"| sgd | {_pm(r['test_acc_mean'], r['test_acc_ci95'], 100)} | (reference) | "
                f"| 0 | {_pm(r['step_time_vs_sgd'], [np.nan] * 2)}× "
                f"| {r['sam_step_fraction']:.2f} | {r['final_train_loss']:.4f} "
                f"| {r['sharpness']:.4f} | {_num(r['lambda_max'])} | {r['extra_memory_mb']:.2f} MB |"
            )
            continue
        lines.append(
            f"| {r['method']} | {_pm(r['test_acc_mean'], r['test_acc_ci95'], 100)} "
            f"| {_pm(r.get('gain_vs_sgd', np.nan), r.get('gain_vs_sgd_ci95', [np.nan] * 2), 100)} "
            f"| {_p(r.get('p_vs_sgd', np.nan))} "
            f"| {_pm(r.get('gain_share', np.nan), r.get('gain_share_ci95', [np.nan] * 2))} "
            f"| {_pm(r['step_time_vs_sgd'], r['step_time_vs_sgd_ci95'])}× "
            f"| {r['sam_step_fraction']:.2f} | {r['final_train_loss']:.4f} "
            f"| {r['sharpness']:.4f} | {_num(r['lambda_max'])} | {r['extra_memory_mb']:.2f} MB |"
        )
    return head + "\n".join(lines) + "\n"


def verdict(rows: list[dict], alpha: float = 0.05) -> str:
    """What the table says, in sentences generated from it (no hand-written claims).

    A method keeps "little" of SAM's gain when the whole 95 % interval of its share
    lies below 0.5, "most" when it lies above 0.5; otherwise the interval does not
    settle it.
    """
    by = {r["method"]: r for r in rows}
    if "sgd" not in by or "sam" not in by:
        return "Add sgd and sam to --methods for the gain statistics.\n"
    sam = by["sam"]
    p = sam["p_vs_sgd"]
    out = []
    if np.isfinite(p) and p < alpha:
        out.append(
            f"* SAM beats SGD by {100 * sam['gain_vs_sgd']:.2f} pt "
            f"(95 % CI [{100 * sam['gain_vs_sgd_ci95'][0]:.2f}, "
            f"{100 * sam['gain_vs_sgd_ci95'][1]:.2f}], Welch p = {_p(p)}, {sam['seeds']} seeds)."
        )
    else:
        out.append(
            f"* SAM's gain over SGD ({100 * sam['gain_vs_sgd']:.2f} pt, p = {_p(p)}) is **not "
            f"significant** at {alpha}: the shares of that gain below are not meaningful."
        )
    for r in rows:
        if r["method"] in ("sgd", "sam"):
            continue
        lo, hi = r["gain_share_ci95"]
        share = f"keeps {_pm(r['gain_share'], [lo, hi])} of SAM's gain"
        sig = "significantly above SGD" if r["p_vs_sgd"] < alpha else "not significantly above SGD"
        if hi < 0.5:
            tag = "keeps **little** of SAM's gain"
        elif lo > 0.5:
            tag = "keeps **most** of SAM's gain"
        else:
            tag = "the interval does not settle how much it keeps"
        out.append(
            f"* {r['method']}: {share}, {sig} (p = {_p(r['p_vs_sgd'])}); {tag}; step time "
            f"{r['step_time_vs_sgd']:.2f}× SGD's at a SAM-step fraction of "
            f"{r['sam_step_fraction']:.2f}."
        )
    return "\n".join(out) + "\n"


def plot(results: list[dict], rows: list[dict], methods: list[str], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def per_epoch(key):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in methods:
            rs = [r for r in results if r["method"] == m]
            ys = np.mean([[h[key] for h in r["history"]] for r in rs], axis=0)
            ax.plot(np.arange(1, len(ys) + 1), ys, marker="o", ms=3, label=m)
        ax.set_xlabel("epoch")
        return fig, ax

    fig, ax = per_epoch("train_loss")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Training loss (SAF Fig. 3, left)")
    files.append(_save(fig, out, "train_loss.png"))

    fig, ax = per_epoch("sharpness")
    ax.set_ylabel("L(θ+ρg/‖g‖) − L(θ)")
    ax.legend()
    ax.set_title("SAM sharpness on a training batch (SAF Fig. 3, right)")
    files.append(_save(fig, out, "sharpness.png"))

    fig, ax = per_epoch("test_accuracy")
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax.set_title("Test accuracy per epoch (mean over seeds)")
    files.append(_save(fig, out, "test_accuracy.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        curves = np.concatenate([np.asarray(r["landscape"]) for r in rs])
        ax.plot(LANDSCAPE_SCALES, curves.mean(0), marker="o", ms=3, label=m)
    ax.set_xlabel("Gaussian perturbation (fraction of each layer's weight norm)")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Loss landscape (SAF Fig. 4)")
    files.append(_save(fig, out, "landscape.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        acc = 100 * r["test_acc_mean"]
        ax.errorbar(
            r["images_per_sec"], acc, yerr=_yerr(r["test_acc_mean"], r["test_acc_ci95"], 100.0),
            fmt="o", capsize=3,
        )
        ax.annotate(r["method"], (r["images_per_sec"], acc))
    ax.set_xlabel("training throughput (examples/s, same process)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs training speed")
    files.append(_save(fig, out, "accuracy_vs_throughput.png"))

    if rows and "gain_vs_sgd" in rows[0]:
        files.append(plot_tradeoff(rows, out))
    return files


def _yerr(x: float, ci: list[float], scale: float) -> list[list[float]]:
    """Asymmetric error bars from an interval; unbounded or missing bounds draw none."""
    lo, hi = ci
    ok = np.isfinite(lo) and np.isfinite(hi)
    return [[scale * (x - lo) if ok else 0.0], [scale * (hi - x) if ok else 0.0]]


def plot_tradeoff(rows: list[dict], out: str) -> str:
    """Accuracy gain over SGD against step cost relative to SGD, 95 % intervals (vSAM Fig. 1)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        x, y = r["step_time_vs_sgd"], 100 * r["gain_vs_sgd"]
        ax.errorbar(
            x,
            y,
            xerr=_yerr(x, r["step_time_vs_sgd_ci95"], 1.0),
            yerr=_yerr(r["gain_vs_sgd"], r["gain_vs_sgd_ci95"], 100.0),
            fmt="o",
            capsize=3,
            label=r["method"],
        )
    # A legend, not labels: methods of similar cost overlap.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("step time relative to SGD (same process)")
    ax.set_ylabel("test accuracy gain over SGD (pt)")
    ax.set_title("Gain vs cost, 95 % intervals over seeds (vSAM Fig. 1)")
    return _save(fig, out, "gain_vs_cost.png")


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """compare's flags (absl; the task as an ml_collections config file, as ``train`` takes it)."""
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(CONFIG_DIR, "mnist1d.py"),
        "The task's config file (experiments/configs/<task>.py; no ':method', compare runs "
        "--methods); override any field for every method with --config.<field>=<value>, e.g. "
        "--config.num_epochs=5, --config.label_noise=0, --config.data_dir=~/tensorflow_datasets, "
        "--config.precision.compute_dtype=bfloat16, --config.model_kwargs.quant_bits=2.",
        flag_values=fv,
        sys_argv=argv,
    )
    flags.DEFINE_string("methods", ",".join(DEFAULT_METHODS), "Comma-separated methods.", flag_values=fv)
    flags.DEFINE_string(
        "seeds", None, f"Comma-separated seeds (at least 3 for intervals; default {DEFAULT_SEEDS}, "
        f"with --smoke {SMOKE_SEEDS}).", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_bool("clean", False, "No label noise (--config.label_noise=0).", flag_values=fv)
    flags.DEFINE_string("out", "runs/compare", "Report, metrics, plots and TensorBoard go here.", flag_values=fv)
    flags.DEFINE_integer(
        "power_iters", 20, "Power iterations for the Hessian's top eigenvalue (0: skip it; on "
        "XLA:CPU the Hessian-vector products of 2-D conv nets are slow).", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("directions", 4, "Random directions of the loss landscape.", flag_values=fv)
    flags.DEFINE_bool(
        "smoke", False, "A test of the code path, not a measurement: every method for 2 steps "
        f"of 1 epoch, seeds {SMOKE_SEEDS}; its figures mean nothing and say so.", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_bool("quiet", False, "No progress bars.", flag_values=fv)
    flags.DEFINE_string(
        "compile_cache", os.path.join(input_pipeline.default_cache_dir(), "jax_compilation_cache"),
        "JAX persistent compilation cache: the seeds after the first, and reruns, reuse the "
        "compiled steps ('' disables it).", flag_values=fv,
    )  # fmt: skip


def parse_args(argv=None) -> Options:
    """The command line (without the program name) as :class:`Options`; bad values exit naming the flag."""
    fv = cli.parse("experiments.compare", __doc__, define_flags, argv)
    if ":" in config_flags.get_config_filename(fv["config"]):
        raise SystemExit("--config: compare runs every method of --methods; pass the file without ':<method>'")
    overrides = dict(config_flags.get_override_values(fv["config"]))
    for key, flag in SET_BY_COMPARE.items():
        if key in overrides:
            raise SystemExit(f"--config.{key}: compare sets config.{key} from {flag}")
    if fv.clean:
        if overrides.get("label_noise", 0.0) != 0.0:
            raise SystemExit(f"--clean contradicts --config.label_noise={overrides['label_noise']}")
        overrides["label_noise"] = 0.0
    methods = tuple(cli.split_list(fv.methods, "methods"))
    for m in methods:
        if m not in training.METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {tuple(training.METHODS)}")
    seeds = cli.split_list(fv.seeds or (SMOKE_SEEDS if fv.smoke else DEFAULT_SEEDS), "seeds", int)
    if not methods or not seeds:
        raise SystemExit("--methods and --seeds must name at least one method and one seed")
    smoke = {"power_iters": min(fv.power_iters, 3), "directions": min(fv.directions, 2)}
    return Options(
        config_file=config_flags.get_config_filename(fv["config"]),
        overrides=overrides,
        methods=methods,
        seeds=tuple(seeds),
        out=fv.out,
        smoke=fv.smoke,
        quiet=fv.quiet,
        power_iters=smoke["power_iters"] if fv.smoke else fv.power_iters,
        directions=smoke["directions"] if fv.smoke else fv.directions,
        compile_cache=fv.compile_cache,
    )


SMOKE_NOTE = (
    "**Smoke run** (`--smoke`): 2 steps of 1 epoch per method on a shrunken config. It tests "
    "that every part runs; its accuracies, gains, p-values and costs mean nothing."
)


def load_task(opts: Options, config) -> tuple[tuple, dict, dict]:
    """(train source, test source), the label-noise record, and the diagnostics batch."""
    info = input_pipeline.get_dataset_info(config.dataset)
    train_source, test_source = (
        input_pipeline.make_source(
            config.dataset,
            split,
            config.data_dir,
            in_memory=True,
            mnist1d_args=config.get("mnist1d_args"),
        )
        for split in (info.train_split, info.eval_split)
    )
    noise = {"rate": float(config.label_noise), "seed": int(config.label_noise_seed)}
    if config.label_noise:
        flipped = input_pipeline.symmetric_label_noise(
            train_source, config.label_noise, info.num_classes, config.label_noise_seed
        )
        train_source = flipped.source
        noise |= {
            "num_flipped": int(flipped.flipped_ids.size),
            "flipped_ids": flipped.flipped_ids.tolist(),
            "noisy_labels": flipped.noisy_labels.tolist(),
            "clean_labels": flipped.clean_labels.tolist(),
        }
    # Sharpness is measured on the training objective: the (noisy) training labels.
    diag = fixed_batch(train_source, config.dataset, 64 if opts.smoke else DIAG_BATCH)
    return (train_source, test_source), noise, diag


def report_markdown(opts: Options, config, env: dict, table: str, reading: str, files) -> str:
    noise = env["label_noise"]
    task = (
        f"{100 * noise['rate']:.0f} % symmetric label noise on the training set "
        f"({noise.get('num_flipped', 0)} labels flipped, flip seed {noise['seed']}; test set clean)"
        if noise["rate"]
        else "clean labels"
    )
    return (
        f"# sharpax compare: {opts.task}, {task}\n\n"
        + (SMOKE_NOTE + "\n\n" if opts.smoke else "")
        + f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} device(s)), "
        f"compute {config.precision.compute_dtype}, params {config.precision.param_dtype}, "
        f"seeds {list(opts.seeds)}, {env['epochs']} epochs per run, wall time {env['wall_time_s']:.0f} s. "
        "Same config (lr, batch, epochs, rho) for every method; no per-method tuning. "
        "Intervals are 95 % over seeds (Student t; Welch for differences; Fieller for the "
        "share of SAM's gain, `(acc − acc_sgd) / (acc_sam − acc_sgd)`); p is Welch's "
        "one-sided test of 'better than SGD'; a method keeps 'little' (or 'most') of SAM's gain "
        "when the share's whole interval lies below (above) 0.5. Step time is the median epoch time after the "
        "first (compiling) epoch, input pipeline excluded, divided by SGD's of the same seed "
        "in this process.\n\n"
        + table
        + "\n"
        + reading
        + "\n"
        + "\n".join(f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files)
        + "\n"
    )


def main(argv=None) -> dict:
    """Runs the comparison for the command line ``argv`` (without the program name)."""
    opts = parse_args(argv)
    # A smoke run's figures mean nothing: compile it with XLA's optimisations off (less compile
    # time; the same arithmetic up to rounding).
    options = {"jax_disable_most_optimizations": True} if opts.smoke else {}
    with cli.jax_config(opts.compile_cache, **options):
        return _run(opts)


def _run(opts: Options) -> dict:
    os.makedirs(opts.out, exist_ok=True)
    config = make_config("sgd", opts.seeds[0], opts)
    runs = len(opts.methods) * len(opts.seeds)
    print(
        f"compare: {opts.task} ({config.dataset}, {config.model}), {len(opts.methods)} methods × "
        f"{len(opts.seeds)} seeds = {runs} runs of {config.num_epochs} epoch(s)"
        + (" — smoke run, figures not meaningful" if opts.smoke else ""),
        flush=True,
    )
    sources, noise, diag = load_task(opts, config)
    t0 = time.perf_counter()
    results = []
    for seed in opts.seeds:
        for m in opts.methods:
            results.append(run_method(m, seed, opts, sources, diag))
            if opts.quiet:  # still one line per run: the bars are off
                print(f"  run {len(results)}/{runs} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = summarize(results, list(opts.methods))
    table = table_markdown(rows)
    reading = verdict(rows)
    files = plot(results, rows, list(opts.methods), opts.out)
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "task": opts.task,
        "config_file": opts.config_file,
        "config_overrides": opts.overrides,
        "smoke": opts.smoke,
        "dataset": config.dataset,
        "seeds": list(opts.seeds),
        "epochs": results[0]["history"][-1]["epoch"],
        "wall_time_s": time.perf_counter() - t0,
        "label_noise": noise,
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(opts.out, "metrics.json"), "w") as f:
        json.dump({"env": env, "summary": rows, "runs": results}, f, indent=1)
    with open(os.path.join(opts.out, "report.md"), "w") as f:
        f.write(report_markdown(opts, config, env, table, reading, files))
    if opts.smoke:
        print(SMOKE_NOTE.replace("**", ""))
    print(table)
    print(reading)
    print(f"wrote {opts.out}/report.md, metrics.json and {len(files)} plots in {env['wall_time_s']:.0f} s")
    return {"summary": rows, "files": files}


if __name__ == "__main__":
    main()
