r"""The main demo: every method, same seeds and budget, the gain each keeps and what it costs.

  python -m experiments.compare                       # MNIST-1D, 30 % label noise, 3 seeds
  python -m experiments.compare --clean               # the same without label noise
  python -m experiments.compare --dataset cifar10_cnn_noisy --data_dir ../shared/data/tfds
  python -m experiments.compare --methods sgd,sam,saf --seeds 0,1,2,3,4 --out runs/cmp

For each method it trains the task's config (``experiments/configs/<dataset>.py``;
default ``mnist1d``: MNIST-1D with 30 % of the training labels flipped, where
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

import argparse
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import sharpax
from experiments import input_pipeline, metric_writers, models, stats, training
from experiments.configs import cifar10_cnn_noisy, cifar10_resnet18, cifar100_resnet18
from experiments.configs import mnist as mnist_config
from experiments.configs import mnist1d as mnist1d_config
from experiments.configs import mnist1d_lsq as mnist1d_lsq_config

DEFAULT_METHODS = ("sgd", "sam", "looksam", "vsam", "saf", "mesa")
DEFAULT_SEEDS = "0,1,2"
# The dataset's config supplies model and recipe (CIFAR: ResNet-18, slow on a CPU:
# pass --epochs); `--dataset` picks one.
CONFIGS = {
    "mnist1d": mnist1d_config,
    "mnist1d_lsq": mnist1d_lsq_config,
    "mnist": mnist_config,
    "cifar10": cifar10_resnet18,
    "cifar100": cifar100_resnet18,
    "cifar10_cnn_noisy": cifar10_cnn_noisy,
}
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


def diagnostics_loss(s: training.Setup, state: training.TrainState, batch: dict):
    """loss(params) on a fixed batch, eval-mode batch statistics: what sharpness is measured on."""
    images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])

    def loss_fn(params):
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        logits, _ = models.apply_model(s.model, variables, images, train=False)
        return training.cross_entropy(logits, labels, s.num_classes, 0.0).mean()

    return loss_fn


def fixed_batch(source, dataset: str, n: int) -> dict:
    """The first ``n`` training examples, eval preprocessing: the diagnostics batch."""
    it = input_pipeline.eval_batches(
        source, n, preprocess=input_pipeline.get_preprocess(dataset, train=False)
    )
    batch = next(iter(it))
    keep = batch["mask"].astype(bool)
    return {k: v[keep] for k, v in batch.items()}


def make_config(method: str, seed: int, args: argparse.Namespace):
    """The dataset's config for ``method``, with the command line's overrides."""
    config = CONFIGS[args.dataset].get_config(method + (",runlocal" if args.smoke else ""))
    config.seed = seed
    config.data_dir = args.data_dir
    if args.epochs:
        config.num_epochs = args.epochs
    if args.label_noise is not None:
        config.label_noise = args.label_noise
    if args.quant_bits is not None:
        if "quant_bits" not in config.model_kwargs:
            raise SystemExit(f"--quant_bits: {args.dataset}'s model {config.model} is not quantized")
        config.model_kwargs.quant_bits = args.quant_bits
    if args.compute_dtype:
        config.precision.compute_dtype = args.compute_dtype
    if args.param_dtype:
        config.precision.param_dtype = args.param_dtype
    if args.smoke:
        config.saf.start_epoch = 0
        config.mesa.start_epoch = 0
        config.vsam.window = 4
        config.vsam.blocks = 2
        config.eval_batch_size = 256
    return config


def run_method(
    method: str,
    seed: int,
    args: argparse.Namespace,
    sources: tuple,
    diag_batch: dict,
) -> dict:
    config = make_config(method, seed, args)
    train_source, test_source = sources
    s = training.setup(config, train_size=len(train_source))
    state = training.init_state(s, training.init_sample(s, train_source))
    rho = config.sam.rho
    sharp_fn = jax.jit(
        lambda st: sharpax.sam_sharpness(diagnostics_loss(s, st, diag_batch), st.params, rho)
    )
    history = []
    epoch_times = []
    bar = tqdm(
        total=config.num_epochs * s.steps_per_epoch,
        desc=f"seed {seed} {method:>8}",
        leave=True,
        disable=args.quiet,
    )
    sam_before = 0
    writer = metric_writers.TensorBoardWriter(
        os.path.join(args.out, "tensorboard", f"{method}_seed{seed}")
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
            s, state, batches, epoch, None if args.quiet else progress
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
    loss_fn = diagnostics_loss(s, state, diag_batch)
    lam = float("nan")  # --power_iters 0: not measured
    if args.power_iters:
        lam = float(
            jax.jit(
                lambda p: sharpax.hessian_top_eigenvalue(
                    loss_fn, p, num_iters=args.power_iters, key=jax.random.key(seed)
                )
            )(state.params)
        )
    landscape = np.asarray(
        jax.jit(
            lambda p: sharpax.loss_landscape(
                loss_fn,
                p,
                scales=jnp.asarray(LANDSCAPE_SCALES),
                num_directions=args.directions,
                key=jax.random.key(1000 + seed),
            )
        )(state.params)
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
        "landscape": landscape.tolist(),
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist1d", choices=sorted(CONFIGS))
    p.add_argument("--data_dir", default=None, help="TFDS data_dir (all datasets but mnist1d)")
    p.add_argument("--epochs", type=int, default=None, help="default: the dataset config's")
    p.add_argument(
        "--seeds", default=DEFAULT_SEEDS, help="comma-separated seeds (at least 3 for intervals)"
    )
    p.add_argument(
        "--label_noise",
        type=float,
        default=None,
        help="fraction of training labels flipped (default: the config's; mnist1d: 0.3)",
    )
    p.add_argument("--clean", action="store_true", help="no label noise (same as --label_noise 0)")
    p.add_argument(
        "--quant_bits",
        type=int,
        default=None,
        help="LSQ bit width of a quantized task's model (mnist1d_lsq; default: the config's, 4)",
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    for field in ("compute_dtype", "param_dtype"):
        p.add_argument(
            f"--{field}",
            default=None,
            choices=("float32", "bfloat16", "float16"),
            help=f"config.precision.{field} (default: the config's, float32); float16 turns on "
            "dynamic loss scaling (experiments/precision.py)",
        )
    p.add_argument("--out", default="runs/compare")
    p.add_argument(
        "--power_iters",
        type=int,
        default=20,
        help="power iterations for the Hessian's top eigenvalue (0: skip it; on XLA:CPU the "
        "loop of Hessian-vector products of 2-D conv nets is slow)",
    )
    p.add_argument("--directions", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: 2 steps, 1 epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--compile_cache",
        default=os.path.join(input_pipeline.default_cache_dir(), "jax_compilation_cache"),
        help="JAX persistent compilation cache: the seeds after the first, and reruns, reuse "
        "the compiled steps ('' disables it)",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.clean:
        if args.label_noise not in (None, 0.0):
            raise SystemExit(f"--clean contradicts --label_noise {args.label_noise}")
        args.label_noise = 0.0
    if args.smoke:
        args.power_iters, args.directions = min(args.power_iters, 3), min(args.directions, 2)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in training.METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {tuple(training.METHODS)}")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    os.makedirs(args.out, exist_ok=True)
    config = make_config("sgd", seeds[0] if seeds else 0, args)
    info = input_pipeline.get_dataset_info(config.dataset)
    train_source, test_source = (
        input_pipeline.make_source(
            config.dataset,
            split,
            args.data_dir,
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
    diag = fixed_batch(train_source, config.dataset, 64 if args.smoke else DIAG_BATCH)

    t0 = time.perf_counter()
    results = []
    for seed in seeds:
        for m in methods:
            results.append(run_method(m, seed, args, (train_source, test_source), diag))
    rows = summarize(results, methods)
    table = table_markdown(rows)
    reading = verdict(rows)
    files = plot(results, rows, methods, args.out)
    elapsed = time.perf_counter() - t0
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "task": args.dataset,
        "dataset": config.dataset,
        "seeds": seeds,
        "epochs": results[0]["history"][-1]["epoch"] if results else 0,
        "wall_time_s": elapsed,
        "label_noise": noise,
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"env": env, "summary": rows, "runs": results}, f, indent=1)
    task = (
        f"{100 * noise['rate']:.0f} % symmetric label noise on the training set "
        f"({noise.get('num_flipped', 0)} labels flipped, flip seed {noise['seed']}; test set clean)"
        if noise["rate"]
        else "clean labels"
    )
    report = (
        f"# sharpax compare: {args.dataset}, {task}\n\n"
        f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} device(s)), "
        f"compute {config.precision.compute_dtype}, params {config.precision.param_dtype}, "
        f"seeds {seeds}, {env['epochs']} epochs per run, wall time {elapsed:.0f} s. "
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
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    print(table)
    print(reading)
    print(f"wrote {args.out}/report.md, metrics.json and {len(files)} plots in {elapsed:.0f} s")
    return {"summary": rows, "files": files}


if __name__ == "__main__":
    main()
