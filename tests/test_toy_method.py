"""A method is one file plus one registry line, hyperparameters included: a toy method written here (its
own config section, help text and checks) is registered from a test file and trained through the command
line with ``--config.toy.<key>=`` overrides; no file of the package is touched.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import train_helpers as th
from jaxpref import errors

TOY_METHOD = '''
"""A toy objective: a weighted denoising loss on one side of each pair."""
import jax.numpy as jnp
import ml_collections

from jaxpref import objectives
from jaxpref.errors import ConfigError
from jaxpref.methods import METHODS
from jaxpref.methods.base import Method

SIDES = ("winner", "loser")


class ToyWeighted(Method):
    config_section = "toy"
    config_help = {"weight": "scale of the loss (> 0)", "side": f"which image of a pair, one of {SIDES}"}
    uses_reference = False

    @classmethod
    def default_config(cls):
        return ml_collections.ConfigDict(dict(weight=1.0, side="winner"))

    @classmethod
    def validate_config(cls, config, micro_batch):
        if not config.toy.weight > 0:
            raise ConfigError("toy.weight", config.toy.weight, "a positive scale")
        if config.toy.side not in SIDES:
            raise ConfigError("toy.side", config.toy.side, f"one of {SIDES}")

    def loss(self, params, frozen, micro, rng, method_state):
        cfg = self.config.toy
        text2, x0_2, t2 = self.pairs(frozen, micro)
        xt, noise2 = self.noised_pairs(micro["keys"], x0_2, t2)
        err = objectives.denoising_error(self.eps(params, xt, t2, text2), noise2)
        b = x0_2.shape[0] // 2
        side = err[:b] if cfg.side == "winner" else err[b:]
        metrics = {"toy_weight": jnp.asarray(cfg.weight), "toy_side_is_loser": jnp.asarray(cfg.side == "loser",
                                                                                           jnp.float32)}
        return cfg.weight * jnp.mean(side), (metrics, method_state)


METHODS["toy"] = ToyWeighted
'''


def _config_file(tmp_path, world) -> str:
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    path = tmp_path / "toy_config.py"
    path.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {th.TESTS!r}]
        import toy_method  # noqa: F401  (registers "toy")
        import train_helpers


        def get_config():
            train_helpers.compile_as_the_parent_asked()
            return train_helpers.tiny_dpo_config({world[0]!r}, {world[1]!r}, total_steps=2, **{{"eval.final": False}})
        """))
    return str(path)


def _train(*args, timeout=900):
    """The command in a child process; its 2-update step compiles at LLVM level 0 (conftest's
    ``compiled_for_few_runs``)."""
    return subprocess.run([sys.executable, "-m", "jaxpref.train", *args], cwd=th.REPO,
                          env=th.subprocess_env(llvm_level_0=True), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_toy_method_with_its_own_hyperparameters_trains_from_the_command_line(world, tmp_path):
    config = _config_file(tmp_path, world)
    workdir = tmp_path / "run"
    listed = _train(f"--config={config}", "--config.objective=toy", "--print_config", timeout=300)
    assert "toy.weight = 1.0" in listed.stdout and "scale of the loss (> 0)" in listed.stdout, listed.stderr

    bad = _train(f"--config={config}", "--config.objective=toy", "--config.toy.weight=-1.0", f"--workdir={workdir}",
                 timeout=300)
    assert bad.returncode == errors.EXIT_CONFIG and "config.toy.weight=-1.0: a positive scale" in bad.stderr

    out = _train(f"--config={config}", "--config.objective=toy", "--config.toy.weight=0.5",
                 "--config.toy.side=loser", f"--workdir={workdir}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/toy_weight"] == 0.5 and r["train/toy_side_is_loser"] == 1.0 for r in rows)
    with open(workdir / "config.json") as f:
        assert json.load(f)["toy"] == {"weight": 0.5, "side": "loser"}
    assert os.path.isdir(workdir / "export" / "unet")
