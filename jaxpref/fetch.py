"""Fetch the models a training run reads, without training:

    python -m jaxpref.fetch --config=configs/dposd15.py \\
        --config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 --config.eval.rewards=pickscore=yuvalkirstain/PickScore_v1
    python -m jaxpref.fetch --config=configs/dposd15.py ... yuvalkirstain/PickScore_v1   # and more hub ids

It resolves the config's model references as ``python -m jaxpref.train`` does before it opens the data
(``jaxpref.hub.resolve_run_paths``: model_path, reference_path, vae_path, lora.init_from and the evaluation
rewards), downloading hub ids into the Hugging Face cache, and prints each one's local path. Run it where the
network is (every host of a TPU pod: ``launch/tpu_pod.sh``'s fetch stage), then train there, also with
``HF_HUB_OFFLINE=1``. Local paths and ``embedded:tiny`` pass through unchanged. Exit 0, or 2 with one line
naming the key and the reference that cannot be resolved. Hub ids given after the flags are fetched too (models
read later, e.g. by ``python -m jaxpref.evaluate``), each as ``jaxpref.hub.resolve`` selects its files.
"""
from __future__ import annotations

if __name__ == "__main__":
    from jaxpref import console as _console
    _console.quiet_native_logs()

from absl import flags
from ml_collections import config_flags

from jaxpref import config_lib, console, hub

KEYS = ("model_path", "reference_path", "vae_path", "lora.init_from", "eval.rewards")


def local_references(config) -> dict[str, str]:
    """{config key: local path} for the config's model references (fetched from the hub where needed)."""
    local = hub.resolve_run_paths(config, announce=console.say)
    found = {}
    for key in KEYS:
        value = _get(local, key)
        if value and (key != "lora.init_from" or local.lora.enabled):
            found[key] = value
    return found


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def main(argv):
    for key, path in local_references(flags.FLAGS.config).items():
        console.say(f"config.{key} -> {path}")
    for value in argv[1:]:
        console.say(f"{value} -> {hub.resolve(value, key='argument', announce=console.say)}")
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", config_lib.config_path("tiny"), "the training config whose models "
                                    "to fetch (with its --config.* overrides)", lock_config=True)
    console.run(main, "jaxpref.fetch")
