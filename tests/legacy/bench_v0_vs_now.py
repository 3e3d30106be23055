"""Benchmark (not a test): the reuse and SAM steps of looksam / vsam, previous code versus now.

  python tests/legacy/bench_v0_vs_now.py [--steps 30 --rounds 5]

Compiles each step function of the frozen pre-refactor code (``legacy/reuse_v0.py``) and
of today's presets for a small 1-D CNN (the MNIST-1D demo's shapes), compares the
optimized HLO's instruction counts, then times the steps interleaved in one process
(median per kind). Prints a table and writes it to ``runs/bench_v0_vs_now.md``.
"""

import argparse
import os
import pathlib
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: `legacy`

import jax  # noqa: E402
import optax  # noqa: E402
from legacy import reuse_v0  # noqa: E402

import sharpax  # noqa: E402


def cnn_init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "c1": jax.random.normal(k1, (5, 1, 64)) * 0.2,
        "c2": jax.random.normal(k2, (5, 64, 64)) * 0.05,
        "d": jax.random.normal(k3, (64 * 40, 10)) * 0.01,
    }


def cnn_loss(p, x, y):
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["c1"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")))
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, p["c2"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")))
    logits = h.reshape(h.shape[0], -1) @ p["d"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(opt, sam_step):
    def step(params, state, x, y):
        grads = jax.grad(cnn_loss)(params, x, y)
        kw = {} if sam_step is False else {"grad_fn": lambda q: jax.grad(cnn_loss)(q, x, y)}
        updates, state = opt.update(grads, state, params, sam_step=sam_step, **kw)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def hlo_size(step, *args):
    text = step.lower(*args).compile().as_text()
    return len(re.findall(r"^\s+\S+ = ", text, flags=re.M))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    params = cnn_init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (128, 40, 1))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    runs = {}
    for name in ("looksam", "vsam"):
        for version, module in (("v0", reuse_v0), ("now", sharpax)):
            opt = optax.chain(getattr(module, name)(0.05), optax.sgd(0.05, momentum=0.9))
            state = opt.init(params)
            for kind in (True, False):
                step = make_step(opt, kind)
                size = hlo_size(step, params, state, x, y)
                jax.block_until_ready(step(params, state, x, y))
                runs[(name, kind, version)] = dict(step=step, state=state, size=size, times=[])
    for _ in range(args.rounds):  # interleaved: noise hits every variant alike
        for r in runs.values():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(r["step"](params, r["state"], x, y))
                r["times"].append(time.perf_counter() - t0)
    lines = [
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"{args.rounds} rounds x {args.steps} steps, interleaved; median step time",
        "",
        "| method | step | HLO instructions v0 / now | v0 (ms) | now (ms) | now / v0 |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("looksam", "vsam"):
        for kind in (True, False):
            old, new = runs[(name, kind, "v0")], runs[(name, kind, "now")]
            t_old, t_new = statistics.median(old["times"]), statistics.median(new["times"])
            lines.append(
                f"| {name} | {'SAM' if kind else 'reuse'} | {old['size']} / {new['size']} | "
                f"{1e3 * t_old:.2f} | {1e3 * t_new:.2f} | {t_new / t_old:.3f} |"
            )
    table = "\n".join(lines)
    print(table)
    os.makedirs("runs", exist_ok=True)
    pathlib.Path("runs/bench_v0_vs_now.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
