"""Training configs: one file per (dataset, model) row of the papers' tables.

Each ``get_config(arg)`` takes an optional ``"<method>"`` or
``"<method>,runlocal"`` string, as passed by ``--config path.py:saf``.
"""
