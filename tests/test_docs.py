"""The documentation site builds with warnings as errors and documents every public name.

The build is the command in docs/conf.py's docstring, into a fresh directory.
"""

import importlib.util
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import sharpax
import sharpax.flax
from sharpax import reuse_rules, schedules

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# What each API page documents (a sample per page; completeness is test_every_public_name_...).
API_PAGES = {
    "sam": ["sam", "SAMState"],
    "gsam": ["gsam", "gsam_rho_schedule", "GSAMState"],
    "esam": ["esam", "ESAMState"],
    "scheduled": [
        "scheduled_sam",
        "ScheduledSAMState",
        "looksam",
        "LookSAMState",
        "vsam",
        "VSAMState",
        "ae_sam",
        "ss_sam",
        "schedules.every_k",
        "schedules.bounded",
        "schedules.Schedule",
        "reuse_rules.ReuseRule",
        "reuse_rules.decayed_psf",
        "reuse_rules.orthogonal",
    ],
    "msam": ["msam", "msam_unperturbed_params", "MSAMState"],
    "trajectory": [
        "saf",
        "SAF",
        "SAFState",
        "with_saf",
        "check_example_ids",
        "mesa",
        "MESA",
        "MESAState",
        "with_mesa",
        "trajectory_kl",
        "TrajectoryAux",
    ],
    "diagnostics": ["sam_sharpness", "hessian_top_eigenvalue", "loss_landscape"],
    "utilities": [
        "check_chain",
        "sam_due",
        "upcoming_sam_steps",
        "num_sam_steps",
        "sam_rate",
        "pmean_updates",
    ],
    "flax": ["flax.TrainState", "flax.TrainState.apply_gradients", "flax.nnx_grad_fn"],
}
GUIDE_PAGES = [
    "sam",
    "gsam_esam",
    "cheaper_sam",
    "diagnostics",
    "saf_mesa",
    "experiments",
    "reproducing",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "html"
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "docs",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _anchors(html_file: pathlib.Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', html_file.read_text()))


def _text(html_file: pathlib.Path) -> str:
    """The page's text, without tags (highlighted code is split into many spans)."""
    return re.sub(r"<[^>]+>", "", html_file.read_text())


def _public_names() -> list[str]:
    """Every public name users reach: sharpax.__all__, the two submodules' names, sharpax.flax's."""
    names = list(sharpax.__all__)
    names += [f"schedules.{n}" for n in schedules.__all__]
    # reuse_rules has no __all__: its public names are the ones defined in it.
    names += [
        f"reuse_rules.{n}"
        for n, obj in vars(reuse_rules).items()
        if not n.startswith("_")
        and getattr(obj, "__module__", None) == reuse_rules.__name__
        and (inspect.isfunction(obj) or inspect.isclass(obj))
    ]
    names += ["flax.TrainState", "flax.nnx_grad_fn"]
    return names


@pytest.mark.parametrize("page", sorted(API_PAGES))
def test_api_page_documents_its_names(site, page):
    anchors = _anchors(site / "api" / f"{page}.html")
    missing = [n for n in API_PAGES[page] if f"sharpax.{n}" not in anchors]
    assert not missing, f"api/{page}.html has no entry for {missing}"


def test_every_public_name_is_documented(site):
    anchors = set().union(*(_anchors(f) for f in (site / "api").glob("*.html")))
    assert len(_public_names()) > len(sharpax.__all__)  # the submodules' names are in the list
    missing = [
        n
        for n in _public_names()
        if f"sharpax.{n}" not in anchors and f"module-sharpax.{n}" not in anchors
    ]
    assert not missing, f"public names without an API entry: {missing}"


def test_guide_tutorial_and_pages_from_outside_docs(site):
    for page in GUIDE_PAGES:
        assert (site / "guide" / f"{page}.html").is_file(), page
    # README's sections, its install commands, BENCHMARKS.md and the notebook are on the site.
    assert "grad_fn" in _text(site / "guide" / "sam.html")
    assert "pip install -e ." in _text(site / "index.html")
    assert "Targets at a glance" in _text(site / "benchmarks.html")
    assert "sharpax quickstart" in _text(site / "tutorials" / "quickstart.html")
    assert "train_sam_family" in _text(site / "tutorials" / "quickstart.html")  # its code cells
    # README's links (relative to the repository root) point at the pages that render the files.
    index = (site / "index.html").read_text()
    assert 'href="tutorials/quickstart.html"' in index
    assert 'href="benchmarks.html"' in (site / "results.html").read_text()
    assert 'href="../multihost.html"' in (site / "guide" / "experiments.html").read_text()


def _conf():
    spec = importlib.util.spec_from_file_location("sharpax_docs_conf", DOCS / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rewrite_repo_links():
    conf = _conf()
    text = (
        "See [bench](BENCHMARKS.md#cpu), [nb](experiments/quickstart.ipynb), "
        "[hosts](docs/multihost.md), [a test](tests/test_docs.py), [web](https://jax.dev), "
        "[here](#install), [gone](missing.md).\n\n"
        "[def]: docs/configs.md\n\n```python\nx = a[0](docs/configs.md)\n```\n"
    )
    out = conf.rewrite_repo_links(text, ROOT)
    assert "[bench](/benchmarks.md#cpu)" in out
    assert "[nb](/tutorials/quickstart.ipynb)" in out
    assert "[hosts](/multihost.md)" in out
    assert "[a test](path:/../tests/test_docs.py)" in out  # a download link to the file itself
    assert "[web](https://jax.dev)" in out and "[here](#install)" in out
    assert "[gone](missing.md)" in out  # left as is: the strict build reports it
    assert "[def]: /configs.md" in out
    assert "x = a[0](docs/configs.md)" in out  # code is not rewritten
    # Relative to the file the link is written in: docs/configs.md linking to ../BENCHMARKS.md.
    assert conf.rewrite_repo_link("../BENCHMARKS.md", DOCS) == "/benchmarks.md"
    assert conf.rewrite_repo_link("multihost.md", DOCS) == "/multihost.md"
