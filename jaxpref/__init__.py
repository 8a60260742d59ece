"""jaxpref: Diffusion-DPO, Diffusion-DRO and SmPO-Diffusion in JAX/Flax."""

__version__ = "0.1.0"
