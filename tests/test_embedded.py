"""The embedded default end to end: on the shipped tiny model (jaxpref/assets/tiny_sd) each objective,
trained by the same loop and config as ``python -m jaxpref.train --config=configs/tiny.py
--config.objective=X`` (only total_steps shortened), against the base model on held-out prompts.

The oracle is the shapes world's analytic reward (jaxpref.data.shapes.reward_batch on the decoded
images; SmPO sees it only as offline soft labels, DRO only through the choice of its top-500 experts,
DPO not at all). Steps and margins come from the runs recorded in MEASURED (this 2-core CPU, seeds
0 and 1): each margin is about half the measured seed-averaged gain, so an objective, step or data defect
that stops learning fails, while eval noise (~0.006 on a seed's paired mean over 32 prompts x 4 images)
does not.

SmPO has no test here yet: on this world it did not beat the base model at 100 steps (measured -0.017
and -0.027 for seeds 0 and 1; +0.009 to +0.018 at 150 steps, lr 3e-5 to 1e-4). See the issue 7 notes.
"""
import numpy as np
import pytest

from jaxpref import config_lib, loop, trainer
from jaxpref.models import load_pipeline

STEPS = 100
# objective -> (seeds, asserted lower bound on the seed-averaged gain in held-out mean reward,
#               measured gains for those seeds at STEPS)
# CI runs seed 0 only (each run costs ~100 s on 2 cores, most of it compile and evaluation); the seed-1
# numbers are the measurement the bounds were chosen against. SmPO is not asserted (see above).
MEASURED = {
    "dpo": ((0,), 0.012, {0: 0.0304, 1: 0.0213}),
    "dro": ((0,), 0.008, {0: 0.0173, 1: 0.0173}),
}
_GAINS: dict = {}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embedded_data"))


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline(trainer.resolve_model_path("embedded:tiny"))


def embedded_config(objective: str, seed: int, data_dir: str):
    """configs/tiny.py as the CLI builds it, with objective, seed and total_steps set; no checkpoints."""
    c = config_lib.tiny_config()
    c.objective, c.seed, c.total_steps = objective, seed, STEPS
    c.data.data_dir = data_dir
    c.checkpoint.update(every=0, keep=1, export_unet=False)
    return c


def gain(objective: str, seed: int, data_dir: str, pipeline, tmp_path_factory) -> float:
    """Held-out mean reward after STEPS updates minus the base model's (same prompts, same seeds)."""
    if (objective, seed) not in _GAINS:
        workdir = str(tmp_path_factory.mktemp(f"{objective}_{seed}"))
        summary = loop.train(embedded_config(objective, seed, data_dir), workdir, pipeline=pipeline)
        base, trained = summary["base"]["shapes/mean"], summary["trained"]["shapes/mean"]
        print(f"{objective} seed {seed}: base {base:.4f} trained {trained:.4f} "
              f"win rate {summary['trained']['shapes/win_rate']:.3f}")
        _GAINS[objective, seed] = trained - base
    return _GAINS[objective, seed]


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(MEASURED))
def test_objective_against_the_base_model(objective, data_dir, pipeline, tmp_path_factory):
    seeds, bound, _ = MEASURED[objective]
    gains = [gain(objective, s, data_dir, pipeline, tmp_path_factory) for s in seeds]
    assert np.mean(gains) > bound, (objective, gains)
