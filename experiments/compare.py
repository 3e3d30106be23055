r"""The main demo: every method, same seeds and budget, one table and four plots.

  python -m experiments.compare                      # offline: MNIST-1D, 2 seeds, ~5 min on 2 CPU cores
  python -m experiments.compare --dataset mnist --data_dir ../shared/data/tfds --epochs 3
  python -m experiments.compare --methods sgd,sam,saf --seeds 0,1,2 --out runs/cmp

For each method it trains the dataset's config (``experiments/configs/<dataset>.py``)
with identical seeds, epochs, batch size and learning rate (no per-method tuning)
and records, per epoch, training loss, test accuracy and the SAM sharpness
``L(θ + ρ g/‖g‖) − L(θ)`` on a fixed batch of training data; at the end the
Hessian's top eigenvalue, loss-landscape curves under Gaussian perturbations,
throughput relative to SGD (median epoch time, first epoch excluded because it
compiles, all measured in this process, input pipeline excluded) and the extra
memory each method holds.
Writes ``report.md``, ``metrics.json`` and PNG plots to ``--out``.
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
from tqdm.auto import tqdm

import sharpax
from experiments import input_pipeline, models, training
from experiments.configs import cifar10_resnet18, cifar100_resnet18
from experiments.configs import mnist as mnist_config
from experiments.configs import mnist1d as mnist1d_config

DEFAULT_METHODS = ("sgd", "sam", "looksam", "vsam", "saf", "mesa")
# The dataset's config supplies model and recipe (CIFAR: ResNet-18, slow on a CPU:
# pass --epochs); `--dataset` picks one.
CONFIGS = {
    "mnist1d": mnist1d_config,
    "mnist": mnist_config,
    "cifar10": cifar10_resnet18,
    "cifar100": cifar100_resnet18,
}
DIAG_BATCH = 512
LANDSCAPE_SCALES = (0.0, 0.02, 0.04, 0.07, 0.1, 0.15)


def tree_bytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def extra_memory_bytes(method: str, state: training.TrainState) -> int:
    """Bytes a method keeps beyond SGD's state (params, batch stats, momentum).

    SAM-type methods hold one perturbed copy of the params during a step; LookSAM
    and vSAM also cache one gradient-sized direction; SAF holds its logit buffer;
    MESA an EMA copy of the variables.
    """
    params = tree_bytes(state.params)
    if method in ("sam", "asam"):
        return params
    if method in ("looksam", "vsam"):
        return 2 * params
    if method in ("saf", "mesa"):
        return tree_bytes(state.traj)
    return 0


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


def run_method(
    method: str,
    seed: int,
    args: argparse.Namespace,
    sources: tuple,
    diag_batch: dict,
) -> dict:
    cfg_module = CONFIGS[args.dataset]
    config = cfg_module.get_config(method + (",runlocal" if args.smoke else ""))
    config.seed = seed
    config.data_dir = args.data_dir
    if args.epochs:
        config.num_epochs = args.epochs
    if args.smoke:
        config.saf.start_epoch = 0
        config.mesa.start_epoch = 0
        config.vsam.window = 4
        config.vsam.blocks = 2
        config.eval_batch_size = 256
    train_source, test_source = sources
    s = training.setup(config, train_size=len(train_source))
    state = training.init_state(s)
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
                "epoch": epoch,
                **train_metrics,
                **test,
                "sharpness": float(sharp_fn(state)),
                "epoch_time_s": dt,
                "sam_step_fraction": (num_sam - sam_before) / max(train_metrics["train_steps"], 1),
            }
        )
        sam_before = num_sam
    bar.n = bar.total
    bar.close()
    loss_fn = diagnostics_loss(s, state, diag_batch)
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


def summarize(results: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    sgd = [r for r in results if r["method"] == "sgd"]
    sgd_speed = statistics.mean(r["images_per_sec"] for r in sgd) if sgd else None
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        accs = [r["test_accuracy"] for r in rs]
        speed = statistics.mean(r["images_per_sec"] for r in rs)
        rows.append(
            {
                "method": m,
                "test_acc_mean": statistics.mean(accs),
                "test_acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "images_per_sec": speed,
                "throughput_vs_sgd": speed / sgd_speed if sgd_speed else float("nan"),
                "sam_step_fraction": statistics.mean(r["sam_step_fraction"] for r in rs),
                "final_train_loss": statistics.mean(r["final_train_loss"] for r in rs),
                "sharpness": statistics.mean(r["sharpness"] for r in rs),
                "lambda_max": statistics.mean(r["lambda_max"] for r in rs),
                "extra_memory_mb": rs[0]["extra_memory_bytes"] / 2**20,
                "seeds": len(rs),
            }
        )
    return rows


def table_markdown(rows: list[dict]) -> str:
    head = (
        "| method | test acc (mean ± std) | throughput vs SGD | SAM-step fraction | "
        "final train loss | SAM sharpness | λmax | extra memory |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} % "
        f"| {r['throughput_vs_sgd']:.2f}× | {r['sam_step_fraction']:.2f} "
        f"| {r['final_train_loss']:.4f} | {r['sharpness']:.4f} | {r['lambda_max']:.2f} "
        f"| {r['extra_memory_mb']:.2f} MB |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


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
        ax.errorbar(
            r["throughput_vs_sgd"],
            100 * r["test_acc_mean"],
            yerr=100 * r["test_acc_std"],
            fmt="o",
            capsize=3,
        )
        ax.annotate(r["method"], (r["throughput_vs_sgd"], 100 * r["test_acc_mean"]))
    ax.set_xlabel("throughput relative to SGD (same process)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs training speed (vSAM Fig. 1)")
    files.append(_save(fig, out, "accuracy_vs_throughput.png"))
    return files


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
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--power_iters", type=int, default=20)
    p.add_argument("--directions", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: 2 steps, 1 epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.power_iters, args.directions = min(args.power_iters, 3), min(args.directions, 2)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in training.METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {training.METHODS}")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    os.makedirs(args.out, exist_ok=True)
    train_source, test_source = (
        input_pipeline.make_source(args.dataset, split, args.data_dir, in_memory=True)
        for split in ("train", "test")
    )
    diag = fixed_batch(train_source, args.dataset, 64 if args.smoke else DIAG_BATCH)

    t0 = time.perf_counter()
    results = []
    for seed in seeds:
        for m in methods:
            results.append(run_method(m, seed, args, (train_source, test_source), diag))
    rows = summarize(results, methods)
    table = table_markdown(rows)
    files = plot(results, rows, methods, args.out)
    elapsed = time.perf_counter() - t0
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "dataset": args.dataset,
        "seeds": seeds,
        "epochs": results[0]["history"][-1]["epoch"] + 1 if results else 0,
        "wall_time_s": elapsed,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"env": env, "summary": rows, "runs": results}, f, indent=1)
    report = (
        f"# sharpax compare: {args.dataset}\n\n"
        f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} device(s)), "
        f"seeds {seeds}, {env['epochs']} epochs per run, wall time {elapsed:.0f} s. "
        "Same config (lr, batch, epochs) for every method; no per-method tuning. Throughput is "
        "the median epoch time after the first (compiling) epoch, relative to SGD in this process.\n\n"
        + table
        + "\n"
        + "\n".join(f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files)
        + "\n"
    )
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    print(table)
    print(f"wrote {args.out}/report.md, metrics.json and {len(files)} plots in {elapsed:.0f} s")
    return {"summary": rows, "files": files}


if __name__ == "__main__":
    main()
