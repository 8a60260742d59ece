"""Shared pytest setup: a persistent XLA compilation cache so repeated runs skip recompiles."""
import os
import pathlib

# Outside the checkout, so fresh clones on the same machine (CI) reuse earlier compiles.
_CACHE = pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or pathlib.Path.home() / ".cache" / "jaxpref" / "jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
