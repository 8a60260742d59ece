"""jaxpref: Diffusion-DPO, Diffusion-DRO and SmPO-Diffusion in JAX/Flax."""
from jaxpref import tpu_env as _tpu_env

_tpu_env.quiet_libtpu_off_tpu()  # before JAX starts its backends

__version__ = "0.1.0"
