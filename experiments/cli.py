"""The command-line convention of the experiments/ programs: absl flags and ml_collections configs.

``train``, ``compare``, ``bench`` and ``bench_memory`` take absl flags
(``--name=value`` or ``--name value``, ``--flagfile``, ``--help``), and those
that train a config take it as ``--config <file>`` with ``--config.<field>=<value>``
overrides (``ml_collections.config_flags``), e.g.::

  python -m experiments.train   --config experiments/configs/mnist1d.py:sam --config.sam.rho=0.1
  python -m experiments.compare --config experiments/configs/mnist1d.py --config.sam.rho=0.1

``train`` defines its flags on absl's global ``FLAGS`` and runs under
``absl.app.run``. The others define theirs on a fresh
``FlagValues`` per call (:func:`parse`), so their ``main(argv)`` can be
called from Python (the tests, a notebook) any number of times, in the same
process as ``train``, without one call's flags leaking into the next.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

import jax

from absl import flags

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def parse(
    prog: str,
    doc: str,
    define: Callable[[flags.FlagValues, list[str]], None],
    argv: Sequence[str] | None = None,
    config_flag: str | None = "config",
) -> flags.FlagValues:
    """Defines ``prog``'s flags on a fresh ``FlagValues`` and parses ``argv`` (no program name).

    ``define(flag_values, full_argv)`` declares the flags; ``full_argv`` is what
    ``config_flags.DEFINE_config_file(..., sys_argv=)`` needs to find the
    ``--config.<field>`` overrides. ``--help`` prints ``doc`` and the flags and
    exits 0; a bad flag, an unknown config field or a config file that does not
    load (``config_flag``: the name of the config-file flag, or None) exits 2 with a
    message naming it.
    """
    full_argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    values = flags.FlagValues()
    overrides = " ".join(a for a in full_argv if a.startswith("--config."))
    try:  # config_flags applies the --config.<field> overrides while the flag is defined
        define(values, full_argv)
    except (AttributeError, KeyError) as e:
        _exit(prog, f"the config has no field {e} (overrides: {overrides})")
    if any(a in HELP_FLAGS for a in full_argv[1:]):
        print(f"{doc.strip()}\n\nFlags:\n{values.get_help()}")
        raise SystemExit(0)
    try:
        values(full_argv)
        if config_flag is not None:  # a file that failed to load gives an object that raises
            getattr(values, config_flag).keys()
    except flags.Error as e:
        _exit(prog, f"{e}\nPass --help for the flags.")
    except (OSError, ImportError, SyntaxError, AttributeError, KeyError, TypeError, ValueError) as e:
        given = next((a for a in full_argv if a.split("=")[0] == f"--{config_flag}"), "the config")
        if given == f"--{config_flag}":  # --config <file>: the file is the next argument
            given += " " + full_argv[full_argv.index(given) + 1]
        _exit(prog, f"cannot load {given} or apply {overrides or 'its overrides'}: {e}")
    return values


def _exit(prog: str, message: str):
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)


def split_list(value: str, name: str, cast: Callable = str) -> list:
    """``'a, b,,c'`` -> ``['a', 'b', 'c']`` cast by ``cast``; a bad item exits naming the flag."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    try:
        return [cast(x) for x in items]
    except ValueError as e:
        raise SystemExit(f"--{name}={value!r}: {e}") from None


@contextlib.contextmanager
def jax_config(compile_cache: str = "", **options) -> Iterator[None]:
    """Sets JAX config options (``compile_cache``: a persistent compilation cache, '' none) and
    restores them on exit, so a ``main(argv)`` called from Python leaves the process as it was."""
    if compile_cache:
        options |= {
            "jax_compilation_cache_dir": compile_cache,
            "jax_persistent_cache_min_compile_time_secs": 0.0,
            "jax_persistent_cache_min_entry_size_bytes": 0,
        }
    saved = {name: jax.config.values[name] for name in options}
    try:
        for name, value in options.items():
            jax.config.update(name, value)
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
