"""Where jaxpref keeps what it can rebuild: one cache folder, following the XDG base directory convention.

``cache_dir()`` is ``$XDG_CACHE_HOME/jaxpref`` (``~/.cache/jaxpref`` when XDG_CACHE_HOME is unset or empty),
read at call time so that a notebook or a test setting the variable after import is honoured. Below it:

- ``jax_cache/``  compiled train steps (``python -m jaxpref.train``; ``$JAX_COMPILATION_CACHE_DIR`` wins);
- ``tfds/``       built datasets (the shapes world, DRO's shapes experts); ``$JAXPREF_DATA_DIR`` or
                  ``config.data.data_dir`` win.

Model weights and Pick-a-Pic shards are not here: they go to the Hugging Face cache (``jaxpref.hub``).
"""
from __future__ import annotations

import os

DATA_DIR_ENV = "JAXPREF_DATA_DIR"


def cache_dir(*parts: str) -> str:
    """``$XDG_CACHE_HOME/jaxpref[/parts...]``, or ``~/.cache/jaxpref[/parts...]``; an absolute path."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "jaxpref", *parts)


def compile_cache_dir() -> str:
    """The persistent XLA compilation cache of the commands: ``<cache>/jax_cache``."""
    return cache_dir("jax_cache")


def default_data_dir() -> str:
    """Where datasets are built when no data_dir is given: ``$JAXPREF_DATA_DIR``, else ``<cache>/tfds``."""
    return os.path.expanduser(os.environ.get(DATA_DIR_ENV) or cache_dir("tfds"))
