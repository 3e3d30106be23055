"""`python -m build` makes an sdist and a wheel; the wheel imports and trains with jax, optax and chex only.

The wheel goes into a fresh venv (no system site-packages) with ``--no-deps``; the core
dependencies come from this interpreter's installation, exposed through a ``.pth`` as a
folder of links to exactly the distributions that jax, optax and chex require, recursively
(installing jax from the registry takes ~40 s on 2 cores, longer than the whole test).
flax and tensorflow_datasets, installed here, must then be unimportable in that venv.
"""

from __future__ import annotations

import email.parser
import importlib.metadata as md
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import venv
import zipfile

import numpy as np
import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = {"jax", "optax", "chex"}


def _run(*cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_build_then_install_the_wheel_into_a_fresh_venv(tmp_path):
    # One test, so that pytest-xdist does not build twice (~15 s a build).
    if importlib.util.find_spec("build") is None:
        pytest.fail("tests/test_package.py needs the `build` package: pip install -e '.[all]' (extra `test`)")
    out = tmp_path / "dist"
    # python -m build: the sdist, then the wheel built from the unpacked sdist.
    _run(sys.executable, "-m", "build", "--outdir", str(out), str(ROOT))
    (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    _check_contents(sdist, wheel)
    _check_fresh_venv(wheel, tmp_path)


def _metadata(wheel: pathlib.Path):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = email.parser.Parser().parsestr(z.read(next(n for n in names if n.endswith("/METADATA"))).decode())
    return names, meta


def _check_contents(sdist: pathlib.Path, wheel: pathlib.Path) -> None:
    """The wheel ships sharpax/ only and needs jax, optax, chex; the sdist is the whole source."""
    names, meta = _metadata(wheel)
    shipped = {n for n in names if not n.startswith("sharpax-")}  # minus the .dist-info
    assert shipped == {f"sharpax/{p.name}" for p in (ROOT / "sharpax").glob("*.py")}
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {r.name for r in reqs if r.marker is None}
    assert core == CORE, core
    # The license: the expression in the metadata and the Apache-2.0 text in the .dist-info.
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    extras = set(meta.get_all("Provides-Extra"))
    assert {"experiments", "test", "all"} <= extras
    assert any(r.name == "build" for r in reqs if r.marker and "test" in str(r.marker))
    # The sdist is the whole source: the wheel above was built from it, and it holds what the
    # tests need (conftest, the frozen legacy code, experiments/).
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    for path in ("pyproject.toml", "README.md", "sharpax/sam.py", "tests/conftest.py",
                 "tests/legacy/common_v0.py", "experiments/training.py", "experiments/quickstart.ipynb"):
        assert path in members, path


def _closure(names: set[str]) -> list[md.Distribution]:
    """The installed distributions ``names`` need, recursively (extras' requirements excluded)."""
    seen, todo, out = set(), list(names), []
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        seen.add(key)
        d = md.distribution(key)
        out.append(d)
        for r in map(Requirement, d.requires or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return out


def _link_distributions(dists: list[md.Distribution], folder: pathlib.Path) -> None:
    """Links each distribution's top-level modules and its .dist-info into ``folder``."""
    folder.mkdir()
    for d in dists:
        site = pathlib.Path(d.locate_file(""))
        tops = {pathlib.PurePath(f).parts[0] for f in d.files or []}
        for top in tops:
            src = site / top
            if top.startswith("..") or top in {"__pycache__", "bin"} or not src.exists():
                continue
            if not (folder / top).exists():
                (folder / top).symlink_to(src)


SCRIPT = """
import importlib.util, json, sys
import jax, jax.numpy as jnp, optax, sharpax
loss = lambda w, x: jnp.sum((x * w) ** 2)
x = jnp.array([1.0, 2.0, -0.5])
w = jnp.array([1.0, -1.0, 0.5])
opt = optax.chain(sharpax.sam(0.05), optax.sgd(0.1))
state = opt.init(w)
for _ in range(3):
    g = jax.grad(loss)(w, x)
    updates, state = opt.update(g, state, w, grad_fn=lambda p: jax.grad(loss)(p, x))
    w = optax.apply_updates(w, updates)
print(json.dumps({
    "file": sharpax.__file__, "w": [float(v) for v in w], "sam_steps": int(state[0].num_sam_steps),
    "missing": [m for m in ("flax", "tensorflow_datasets", "experiments")
                if importlib.util.find_spec(m) is None],
    "checked": list(sharpax.check_chain(opt, w)),
}))
"""


def _check_fresh_venv(wheel: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """In a venv with the core dependencies only: sharpax imports from the wheel and trains."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    site = pathlib.Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    _link_distributions(_closure(CORE), tmp_path / "core")
    (site / "core_deps.pth").write_text(str(tmp_path / "core") + "\n")
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--quiet", str(wheel))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = json.loads(_run(str(python), "-I", "-c", SCRIPT, cwd=tmp_path, env=env).strip().splitlines()[-1])
    assert pathlib.Path(out["file"]).is_relative_to(site), out["file"]
    assert out["missing"] == ["flax", "tensorflow_datasets", "experiments"], out
    assert out["checked"] == ["SAMState at opt_state[0]"] and out["sam_steps"] == 3
    # Three SAM steps by hand, float64: eps = rho g / |g|, w <- w - lr grad(w + eps).
    x, w = np.array([1.0, 2.0, -0.5]), np.array([1.0, -1.0, 0.5])
    grad = lambda v: 2 * x**2 * v
    for _ in range(3):
        g = grad(w)
        w = w - 0.1 * grad(w + 0.05 * g / np.linalg.norm(g))
    np.testing.assert_allclose(out["w"], w, rtol=1e-5)
