"""Sphinx configuration of the sharpax documentation.

Build (from the repository root, with the `docs` extra installed: ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

``tests/test_docs.py`` runs the same command into a fresh directory (warnings are errors).

Single source of truth: the guide pages include sections of ``README.md`` and the benchmarks page
includes ``BENCHMARKS.md`` (MyST ``{include}``); the tutorial is ``experiments/quickstart.ipynb``,
copied to ``docs/tutorials/quickstart.ipynb`` (gitignored) when the build starts. The notebook
is not executed here (``tests/test_notebook.py`` executes it).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the checkout's sharpax, not an installed copy

import sharpax  # noqa: E402

project = "sharpax"
author = "the sharpax authors"
copyright = "the sharpax authors"
release = version = sharpax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",  # Markdown pages (it includes myst_parser) and the notebook
]
# No intersphinx: the build runs offline, and intersphinx would fetch jax/optax inventories.

exclude_patterns = ["_build", "jupyter_execute", ".DS_Store"]

# autodoc + napoleon: sharpax's docstrings are Google style.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # show `rho=0.05`, and schedule defaults by their source text

# MyST / myst-nb.
myst_heading_anchors = 3  # `[...](#some-heading)` links in the included Markdown resolve
nb_execution_mode = "off"  # tests/test_notebook.py executes experiments/quickstart.ipynb

html_theme = "sphinx_book_theme"
html_title = f"sharpax {release}"
html_theme_options = {"show_toc_level": 2}

# The notebook is copied into the source tree when the build starts (so that Sphinx finds it as a
# document); experiments/quickstart.ipynb stays the only copy in git (docs/.gitignore has the
# copy's path) and in the sdist (MANIFEST.in prunes docs/tutorials). The copy is written
# atomically and left in place: two builds at once (the tests under pytest-xdist) would
# otherwise remove it under each other's feet.
NOTEBOOKS = {"experiments/quickstart.ipynb": "tutorials/quickstart.ipynb"}

# Files outside docs/ that are pages of the site (they are included by a page under docs/).
# A Markdown link to one of them from an included file is rewritten to its page.
PAGES_OUTSIDE_DOCS = {
    "BENCHMARKS.md": "benchmarks.md",
    **NOTEBOOKS,
}

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
_LINK_DEFINITION = re.compile(r"^(\s{0,3}\[[^\]]+\]:\s*)(\S+)(.*)$")
# A URL or `path:`/`project:` link, an anchor, or a link already relative to the source dir.
_EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|#|/)")


def rewrite_repo_link(target: str, file_dir: Path, root: Path = ROOT) -> str:
    """The link ``target`` of a Markdown file in ``file_dir``, as a link that works from any docs page.

    Markdown links are relative to the file they are written in (GitHub resolves README's
    ``BENCHMARKS.md`` from the repository root), but MyST resolves the links of an included file
    relative to the *including* page. So a relative link is resolved against ``file_dir`` and
    becomes:

    * a file under ``docs/`` -> ``/<path in docs>`` (MyST: relative to the source directory);
    * a file of ``PAGES_OUTSIDE_DOCS`` -> ``/<its page>``;
    * any other existing file of the repository (a test, an experiment script) ->
      ``path:/../<path>``: a download link to the file itself (no hosting site is assumed);
    * anything else (a missing file, a directory) is left as written, so that the strict
      build reports it as a broken link.

    URLs, anchors, absolute and ``path:``/``project:`` links are left alone.
    """
    if _EXTERNAL.match(target):
        return target
    path, sep, anchor = target.partition("#")
    resolved = (file_dir / path).resolve()
    try:
        repo_path = resolved.relative_to(root).as_posix()
    except ValueError:  # outside the repository
        return target
    docs_dir = (root / "docs").resolve()
    if repo_path in PAGES_OUTSIDE_DOCS:
        return "/" + PAGES_OUTSIDE_DOCS[repo_path] + sep + anchor
    if resolved.is_file() and resolved.is_relative_to(docs_dir):
        return "/" + resolved.relative_to(docs_dir).as_posix() + sep + anchor
    if resolved.is_file():
        return "path:/../" + repo_path
    return target


def rewrite_repo_links(text: str, file_dir: Path, root: Path = ROOT) -> str:
    """Applies :func:`rewrite_repo_link` to the inline links and link definitions of ``text``.

    Fenced code blocks are left as they are (``x[0](y)`` in Python is no link).
    """
    out, in_fence = [], False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            line = _INLINE_LINK.sub(
                lambda m: m[1] + rewrite_repo_link(m[2], file_dir, root) + m[3], line
            )
            line = _LINK_DEFINITION.sub(
                lambda m: m[1] + rewrite_repo_link(m[2], file_dir, root) + m[3], line
            )
        out.append(line)
    return "".join(out)


def _on_include_read(app, relative_path, parent_docname, content) -> None:
    included = (Path(app.srcdir) / relative_path).resolve()
    content[0] = rewrite_repo_links(content[0], included.parent)


def _copy_notebooks(app) -> None:
    for source, dest in NOTEBOOKS.items():
        dst = Path(app.srcdir) / dest
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
        shutil.copy2(ROOT / source, tmp)  # with its mtime: an incremental build rereads it if changed
        os.replace(tmp, dst)  # atomic: a concurrent build reads the old or the new copy, whole


def setup(app):
    app.connect("builder-inited", _copy_notebooks)
    app.connect("include-read", _on_include_read)
    return {"parallel_read_safe": True}
