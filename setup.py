"""jaxpref: preference optimization (Diffusion-DPO, Diffusion-DRO, SmPO) for text-to-image diffusion in JAX."""
from setuptools import find_packages, setup

setup(
    name="jaxpref",
    version="0.1.0",
    description="JAX/Flax trainer aligning text-to-image diffusion models with human preferences",
    packages=find_packages(include=["jaxpref", "jaxpref.*"]) + ["jaxpref.configs"],
    # The experiments live in the top-level configs/ folder and install as jaxpref.configs.
    package_dir={"jaxpref.configs": "configs"},
    package_data={"jaxpref": ["assets/**/*", "assets/*/*/*", "assets/*/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "absl-py",
        "diffusers>=0.30",
        "transformers>=4.40",
        "huggingface_hub>=0.20",  # hub ids of models and Pick-a-Pic fetched into the HF cache (jaxpref.hub)
        "tensorflow-datasets",
        "grain",
        "array-record",
        "safetensors",
        "numpy",
        "pillow",
        "pyarrow",
        "tensorboardX",
        "matplotlib",           # the run's figures (before_after.png, reward_curve.png)
    ],
    extras_require={
        # torch==2.13.0 is the CPU wheel the CI machines carry; an unpinned torch pulls GBs of CUDA.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "peft", "nbclient", "nbformat", "ipykernel"],
        # The TPU compiler (libtpu): runs on TPU VMs, and compiles for TPU topologies on any host
        # (python -m jaxpref.aot). Same version as jax.
        # gcsfs and google-cloud-storage: a workdir or data dir on a gs:// bucket (our files, TFDS and orbax).
        "tpu": ["jax[tpu]==0.10.2", "gcsfs", "google-cloud-storage"],
    },
)
