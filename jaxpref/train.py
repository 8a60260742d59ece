"""The training command: ``python -m jaxpref.train --config=configs/drosd15.py --workdir=DIR``.

Parse config -> validate (before anything compiles) -> mesh -> models -> data -> sharded state (or the
latest checkpoint of the workdir) -> loop of jitted steps -> checkpoints, logs, samples, evaluation ->
final checkpoint, exported UNet, base-vs-trained report. With no ``--config`` it trains the embedded
default (configs/tiny.py: DRO on the shapes world with the shipped tiny model, CPU, minutes).
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
if not os.path.isfile(_DEFAULT_CONFIG):  # installed without the repo: the packaged copy
    _DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file (a get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Checkpoints, logs, samples and the exported model go here.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host: TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process launch).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process launch).")
flags.DEFINE_integer("process_id", None, "This process's id (explicit multi-process launch).")
FLAGS = flags.FLAGS


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, cpu_collectives=False):
    """``jax.distributed.initialize`` (auto-detects TPU pods and SLURM when given no arguments)."""
    import jax

    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.distributed or FLAGS.coordinator_address:
        # CPU-only multi-process runs (tests on localhost) need gloo collectives, set before any backend starts.
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               cpu_collectives=os.environ.get("JAX_PLATFORMS", "") == "cpu")
    from jaxpref import loop

    summary = loop.train(FLAGS.config, FLAGS.workdir)
    if summary.get("preempted"):
        logging.info("preempted: checkpoint written at step %d; exiting 0", summary["step"])
    return 0


if __name__ == "__main__":
    app.run(main)
