"""The train loop end to end on the tiny random pipeline (DPO, fp32, CPU, 8 pairs a step): a resumed run
repeats the uninterrupted run's losses exactly (in-process, after SIGKILL, after SIGTERM), the CLI, two
``jax.distributed`` processes in lockstep, and every shipped config validating without weights.

Cost: one compile of the 1-device step (shared by every in-process run and by the CLI children through the
persistent compile cache), plus the children of the slow tests.
"""
import gc
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train_helpers as th
from jaxpref import checkpoint as checkpoint_lib, config_lib, errors, evaluate, train as train_lib, trainer
from jaxpref.methods import get_method

CONFIGS = os.path.join(th.REPO, "configs")


def test_reference_run_trains_checkpoints_and_exports(reference):
    """The run every other test compares against: 6 distinct losses, checkpoints 3 and 6, an export."""
    workdir, summary = reference
    losses = th.losses(summary["history"])
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and summary["step"] == 6 and not summary["preempted"]
    # policy == reference at step 1: log 2 up to fp32 rounding of the two forwards, times β/2 = 250
    assert losses[1] == pytest.approx(np.log(2.0), abs=2e-5)
    assert len({round(v, 6) for v in losses.values()}) >= 5    # the params move: later losses differ
    assert th.checkpoint_steps(workdir) == [3, 6]
    assert th.metrics_losses(workdir) == losses
    assert os.path.isfile(os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors"))
    assert len(th.checkpoint_meta(workdir, 6)["loaders"]) == 1


def test_resume_in_process_repeats_the_uninterrupted_losses_exactly(world, reference, tmp_path, monkeypatch):
    """0 -> 3 (max_steps), then a second train() in the same workdir restores checkpoint 3 (state + loader
    position) and runs 3 -> 6: losses 4-6 and the final params equal the uninterrupted run's bit for bit. The
    second train() reuses the first's compiled step (the same program: trainer.compile_train_step's cache)."""
    compiles = []
    original = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **k: compiles.append(1) or original(self, *a, **k))
    ref_dir, ref = reference
    workdir = str(tmp_path / "run")
    config = th.tiny_dpo_config(*world)
    first = train_lib.train(config, workdir, max_steps=3)
    assert first["step"] == 3 and "exported_unet" not in first and th.checkpoint_steps(workdir) == [3]
    compiled_before = len(compiles)
    second = train_lib.train(config, workdir)
    assert len(compiles) == compiled_before
    want = th.losses(ref["history"])
    assert th.losses(first["history"]) == {k: want[k] for k in (1, 2, 3)}
    assert th.losses(second["history"]) == {k: want[k] for k in (4, 5, 6)}
    assert th.metrics_losses(workdir) == want
    assert th.tree_max_abs_diff(checkpoint_lib.load_policy_params(workdir),
                                checkpoint_lib.load_policy_params(ref_dir)) == 0.0
    assert gc.isenabled()  # paused while the step was traced, back on after
    _rerun_of_a_finished_run(config, workdir, compiles, monkeypatch)


def _rerun_of_a_finished_run(config, workdir, compiles, monkeypatch):
    """The same command again loads nothing and changes nothing; after a kill between the last checkpoint and
    the end of the export (finished.json missing), it exports again without compiling or training."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = f.read()
    exported = os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors")
    with monkeypatch.context() as m:
        m.setattr(trainer, "build_run", lambda *a, **k: pytest.fail("a finished run loaded its model again"))
        again = train_lib.train(config, workdir)
    assert again["already_finished"] and again["step"] == 6 and again["exported_unet"].endswith("unet")
    os.remove(os.path.join(workdir, train_lib.FINISHED_FILE))
    os.remove(exported)
    compiled_before = len(compiles)
    after_kill = train_lib.train(config, workdir)
    assert len(compiles) == compiled_before and after_kill["history"] == [] and os.path.isfile(exported)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert f.read() == rows
    with open(os.path.join(workdir, train_lib.FINISHED_FILE)) as f:
        assert json.load(f)["step"] == 6


def test_the_cycle_collector_pause_restores_its_state_on_errors_too():
    with trainer._gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError), trainer._gc_paused():
        1 / 0
    assert gc.isenabled()
    gc.disable()
    try:
        with trainer._gc_paused():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


@pytest.mark.slow
def test_cli_survives_sigkill_and_sigterm_and_exports(world, reference, tmp_path):
    """``python -m jaxpref.train`` three times with the same command and workdir:
    1. SIGKILL once checkpoint 2 is on disk (a test hook holds the run there);
    2. resumes at 2; SIGTERM at step 4: it finishes step 5, checkpoints it and exits 75 (preempted: rerun to
       resume) without exporting;
    3. resumes at 5 and finishes: metrics.jsonl holds steps 1-6 once each, equal to the in-process run's
       losses exactly, and the exported UNet (loadable by load_unet) equals the in-process run's export."""
    from jaxpref.models import load_unet

    ref_dir, ref = reference
    config_file = th.write_config_file(str(tmp_path / "config.py"), *world, **{"checkpoint.every": 2})
    workdir = str(tmp_path / "run")
    env = th.subprocess_env()

    proc = th.train_cli(config_file, workdir, env={**env, th.PAUSE_ENV: "2"})
    th.wait_for_file(os.path.join(workdir, "paused_at_2"), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert th.checkpoint_steps(workdir) == [2]

    proc = th.train_cli(config_file, workdir, env={**env, th.PAUSE_ENV: "4"})
    th.wait_for_file(os.path.join(workdir, "paused_at_4"), proc)
    proc.send_signal(signal.SIGTERM)
    assert th.finish(proc) == errors.EXIT_PREEMPTED, th.log_of(proc)
    assert th.checkpoint_steps(workdir) == [2, 4, 5]
    assert not os.path.exists(os.path.join(workdir, "export"))

    proc = th.train_cli(config_file, workdir, env=env)
    assert th.finish(proc) == 0, th.log_of(proc)
    assert th.checkpoint_steps(workdir) == [2, 4, 5, 6]
    assert th.metrics_losses(workdir) == th.losses(ref["history"])
    module, params = load_unet(os.path.join(workdir, "export", "unet"))
    _, ref_params = load_unet(os.path.join(ref_dir, "export", "unet"))
    assert th.tree_max_abs_diff(params, ref_params) == 0.0
    assert th.tree_max_abs_diff(params, checkpoint_lib.load_policy_params(workdir)) == 0.0
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["objective"] == "dpo"


@pytest.mark.slow
@pytest.mark.compiled_for_few_runs  # both sides: the children and the one-process run here
def test_two_processes_train_in_lockstep_and_resume(world, tmp_path_factory, tmp_path):
    """Two processes x 2 CPU devices (gloo collectives), mesh (data=1, fsdp=4) spanning both, params
    sharded over all 4 devices (fsdp threshold lowered to 256 elements for the tiny UNet). Each process
    trains 0 -> 3, then resumes 3 -> 6 from the checkpoint (each from its own loader position). Metrics
    match the single-process run fed the same global batches (tolerances of train_helpers.check_close;
    measured: losses 3.8e-5, grad norms 5.0e-5 relative, ref_gap 1e-7); exported params within 1e-4
    (measured 3.9e-5). Both sides compile at LLVM level 0 (74 -> 57 s for this test alone; at the shipped
    level: 2.3e-5, 1.8e-5, 9e-8 and 1.6e-5)."""
    args = dict(workdir=str(tmp_path / "run"), model_path=world[0], data_dir=world[1], min_size=256, data=1, fsdp=-1,
                first=3, port=th.free_port(), num_processes=2)
    procs = [th.run_script("multiproc", {**args, "process_id": i}, num_devices=2, llvm_level_0=True) for i in range(2)]
    try:  # the reference runs here while the children start up
        ref_dir, ref = th.two_shard_reference(world, str(tmp_path_factory.mktemp("two_shard_reference") / "run"))
    except BaseException:
        for p in procs:
            p.kill()
        raise
    results = th.script_results(procs, timeout=900)
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (i, 2, 4, 2)
        save = r["saves"][0]
        assert save["num_devices"] == 4 and "fsdp" in save["spec"] and save["sharded_leaves"] > 10
    assert results[0]["history"] == results[1]["history"]  # replicated metrics: the same on both processes
    th.check_close(results[0]["history"], ref["history"], [1, 2, 3, 4, 5, 6], "two processes vs one")
    meta = th.checkpoint_meta(args["workdir"], 3)
    assert len(meta["loaders"]) == 2 and meta["loaders"][0] != meta["loaders"][1]
    assert th.checkpoint_steps(args["workdir"]) == [3, 6]
    assert results[0]["exported"] and results[1]["exported"] is None
    from jaxpref.models import load_unet

    diff = th.tree_max_abs_diff(load_unet(results[0]["exported"])[1],
                                load_unet(os.path.join(ref_dir, "export", "unet"))[1])
    print(f"two processes vs one: max |param difference| after 6 steps {diff:.1e}")
    assert diff < 1e-4  # Adam moves a param by up to lr = 3e-4 a step; other gradients would show as ~1e-3


# ---------------------------------------------------------------------------------------------
# Configs and the command line.

def _load_config_file(path):
    return config_lib.load_config(os.path.basename(path)[:-3])


CONFIG_FILES = sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py") and f != "__init__.py")


def test_configs_are_found_installed_and_from_a_source_tree(monkeypatch):
    """``--config``'s default and the benchmarks name configs through ``config_path``: the installed
    ``jaxpref.configs`` package, or the checkout's configs/ when the package runs from a source tree that
    was never installed (no ``jaxpref.configs`` to import)."""
    import importlib

    installed = config_lib.config_path("tiny")
    assert os.path.samefile(installed, os.path.join(th.REPO, "configs", "tiny.py"))
    real_import = importlib.import_module

    def uninstalled(name, *args):
        if name == "jaxpref.configs":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", uninstalled)
    assert os.path.samefile(config_lib.config_path("dposd15"), os.path.join(th.REPO, "configs", "dposd15.py"))


# Configs sized for another device count than a v5e-8 / 8 GPUs (their docstrings say so): the LoRA config for
# one 16 GiB chip, the SDXL configs for a v5p-8's 4 (megacore) chips, one pair per chip per micro-batch.
SIZED_FOR = {"dposd15_lora.py": 1, "dposdxl.py": 4, "dposdxl_lora.py": 4, "drosdxl.py": 4, "smposdxl.py": 4}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_config_builds_and_validates(name, sd15_unet_shapes):
    """Every configs/*.py validates (paths unchecked); the SD1.5 ones build their whole train state from
    the SD1.5 UNet's shapes under eval_shape (no weights): optimizer, EMA, DRO's negatives buffer."""
    from jaxpref import optim, step as step_lib

    config = _load_config_file(os.path.join(CONFIGS, name))
    config_lib.validate(config, check_paths=False)
    config_lib.validate(config, num_devices=SIZED_FOR.get(name, 8), check_paths=False)
    if "sd15" not in name:
        return
    from jaxpref.models.unet import count_params
    assert count_params(sd15_unet_shapes) == 859_520_964
    assert config.data.resolution == 512
    latent_shape, text_shape = (64, 64, 4), (77, 768)
    state = jax.eval_shape(lambda p: step_lib.init_train_state(p, optim.make_optimizer(config.optimizer), config,
                                                               get_method(config.objective)(config),
                                                               text_shape=text_shape, latent_shape=latent_shape),
                           sd15_unet_shapes)
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(sd15_unet_shapes)
    n = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    assert sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state)) >= 2 * n  # adam's mu and nu
    assert (state.ema_params is not None) == bool(config.ema.enabled)
    if config.objective == "dro":
        negatives = state.method_state.negatives
        assert negatives.latents.shape == (config.dro.buffer_size, config.dro.num_inference_steps, *latent_shape)
        assert negatives.text.shape == (config.dro.buffer_size, *text_shape)
    elif config.objective == "smpo":   # the micro-step count (its inversion diagnostics run on log steps)
        assert state.method_state.shape == () and state.method_state.dtype == np.int32
    else:
        assert state.method_state is None


def test_unknown_config_key_is_named():
    config = config_lib.load_config("tiny")
    config.optimizer.lrr = 1.0
    config.data.typo_dir = "x"
    with pytest.raises(ValueError, match="no such config key") as err:
        config_lib.validate(config, check_paths=False)
    assert "data.typo_dir" in str(err.value)     # the first unknown key, named
    del config.data.typo_dir
    with pytest.raises(ValueError, match=r"optimizer.lrr=1.0: no such config key \(did you mean 'optimizer.lr'\?\)"):
        config_lib.validate(config, check_paths=False)


def test_overrides_set_dotted_keys_and_name_a_typo():
    """The benchmarks' ``--set key.path=value``: literals parsed, strings kept, an unknown key named."""
    overrides = config_lib.parse_overrides(["dro.margin=0.01", "objective=dpo", "smpo.inversion_window=(0, 2)"])
    assert overrides == {"dro.margin": 0.01, "objective": "dpo", "smpo.inversion_window": (0, 2)}
    config = config_lib.apply_overrides(config_lib.load_config("tiny"), overrides)
    assert (config.dro.margin, config.objective, config.smpo.inversion_window) == (0.01, "dpo", (0, 2))
    for bad in ({"dro.marginn": 1.0}, {"drop.margin": 1.0}, {"dro.margin.x": 1.0}):
        with pytest.raises(ValueError, match=f"--set {list(bad)[0]}: no such config key"):
            config_lib.apply_overrides(config_lib.load_config("tiny"), bad)
    with pytest.raises(ValueError, match="expected key.path=value"):
        config_lib.parse_overrides(["dro.margin"])


def _cli(*args, timeout=120):
    start = time.perf_counter()
    env = {**th.subprocess_env(), "JAX_LOG_COMPILES": "1"}  # any compile would print "Compiling ..."
    out = subprocess.run([sys.executable, "-m", "jaxpref.train", *args], cwd=th.REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr, time.perf_counter() - start


def test_a_bad_sharding_rule_is_named_before_compiling():
    config = config_lib.load_config("tiny")
    config.sharding_rules = ((".*", "fsdp(min=3)"),)
    with pytest.raises(ValueError, match=r"config\.sharding_rules=\('\.\*', 'fsdp\(min=3\)'\)"):
        config_lib.validate(config, check_paths=False)


def test_cli_help():
    """--help prints the module docstring and the flags (absl exits 1 after printing help)."""
    rc, out, _ = _cli("--help")
    assert "python -m jaxpref.train" in out and "--workdir" in out and "--coordinator_address" in out
    assert "Traceback" not in out


def test_cli_rejects_bad_keys_and_missing_model_before_compiling(tmp_path):
    """A misspelt override, an unknown key in a config file and a missing model_path all fail in seconds
    (before any model, data or compile), naming the key; nothing is written to the workdir."""
    workdir = str(tmp_path / "run")
    rc, out, _ = _cli(f"--config={CONFIGS}/dposd15.py", "--config.optimizer.lrr=1", f"--workdir={workdir}")
    assert rc != 0 and "lrr" in out

    bad = tmp_path / "bad.py"
    bad.write_text("from jaxpref import config_lib\n\n\ndef get_config():\n    c = config_lib.load_config('tiny')\n"
                   "    c.optimizer.learning_rate = 1e-4\n    return c\n")
    rc, out, _ = _cli(f"--config={bad}", f"--workdir={workdir}")
    assert rc == errors.EXIT_CONFIG and "optimizer.learning_rate" in out and "Traceback" not in out

    rc, out, seconds = _cli(f"--config={CONFIGS}/dposd15.py", "--config.model_path=/nonexistent/sd15",
                            f"--workdir={workdir}")
    assert rc == errors.EXIT_CONFIG and "config.model_path='/nonexistent/sd15'" in out
    assert "Compiling" not in out and seconds < 60
    assert not os.path.exists(workdir)


def test_a_bad_eval_prompt_set_fails_before_the_model_loads_or_the_step_compiles(world, tmp_path, monkeypatch):
    """A prompt file that is not there fails before the model loads; a missing split of the training dataset
    itself (which the run may build on first use) as soon as the data is open, before the step compiles; a
    run that generates nothing held out is not held up by its prompt spec."""
    model_path, data_dir = world
    loaded, compiled = [], []
    build_run = trainer.build_run
    monkeypatch.setattr(trainer, "build_run", lambda *a, **k: loaded.append(1) or build_run(*a, **k))

    def no_compile(*args):
        compiled.append(1)
        raise RuntimeError("compiling")

    monkeypatch.setattr(train_lib, "_compile_note", no_compile)
    cases = [({"eval.every": 3, "eval.prompts": "parti:/nonexistent/PartiPrompts.tsv"}, "ConfigError", 0),
             ({"eval.final": True, "eval.prompts": "tfds:shapes:nosuchsplit"}, "ConfigError", 1),
             ({"eval.every": 0, "eval.prompts": "parti:/nonexistent/PartiPrompts.tsv"}, "RuntimeError", 1)]  # none
    for overrides, raised, loads in cases:
        loaded.clear()
        config = th.tiny_dpo_config(model_path, data_dir, **overrides)
        with pytest.raises((errors.ConfigError, RuntimeError)) as failure:
            train_lib.train(config, str(tmp_path / f"run{len(compiled)}_{raised}"))
        assert type(failure.value).__name__ == raised, (overrides, failure.value)
        assert len(loaded) == loads, overrides
        if raised == "ConfigError":
            assert str(failure.value).startswith(f"config.eval.prompts={overrides['eval.prompts']!r}: ")
    assert len(compiled) == 1


def test_a_run_reads_its_held_out_split_from_its_own_data_dir():
    """A real model's run evaluates on the test_unique captions built beside its training split
    (``data:test_unique``), read from the run's dataset and data_dir; a build with other settings is trained
    and evaluated by its name."""
    from jaxpref import prompts

    for name in ("dposd15", "drosd15", "smposdxl"):
        c = config_lib.load_config(name)
        assert c.eval.prompts == "data:test_unique" and c.eval.rewards.startswith("pickscore=")
    c.data.name = "pickapic_v2/resolution256"      # a build with other settings is trained on by its name
    config_lib.validate(c, check_paths=False)
    c.data.name = "pickapic"
    with pytest.raises(ValueError, match="config.data.name='pickapic'"):
        config_lib.validate(c, check_paths=False)
    for_run = prompts.for_run
    assert for_run("data:test_unique", "pickapic_v2", "/data/tfds") == "tfds:pickapic_v2:test_unique:/data/tfds"
    assert for_run("data:test_unique", "pickapic_v2/resolution256", "") == "tfds:pickapic_v2/resolution256:test_unique"
    assert for_run("tfds:pickapic_v2:test_unique", "shapes", "/data/tfds") == "tfds:pickapic_v2:test_unique:/data/tfds"
    assert for_run("tfds:pickapic_v2:test_unique:/mine", "shapes", "/d") == "tfds:pickapic_v2:test_unique:/mine"
    for spec in ("shapes", "parti:/x.tsv", "tfds:pickapic_v2:test_unique"):
        assert for_run(spec, "pickapic_v2", "") == spec
    assert for_run("parti:/x.tsv", "pickapic_v2", "/d") == "parti:/x.tsv"
    with pytest.raises(ValueError, match="a training run's own dataset split"):
        prompts.load_prompts("data:test_unique")
    # jaxpref.evaluate reads a run's data:SPLIT the same way: tests/test_evaluate.py.


def test_base_evaluation_is_reused_only_for_the_same_pipeline_settings_and_seed(tmp_path, monkeypatch):
    """A sweep in one process evaluates the base model once per (pipeline, eval settings, seed)."""
    import types

    calls = []

    def fake_evaluate(run, params, out_dir, baseline=None, mesh=None, label=""):
        calls.append(out_dir)
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "scores.npz"), "w") as f:
            f.write(out_dir)
        return {"shapes/mean": float(len(calls))}

    monkeypatch.setattr(evaluate, "evaluate_run", fake_evaluate)
    monkeypatch.setattr(evaluate, "_BASE_EVALS", {"model": None, "runs": {}})
    pipe_a, pipe_b = (types.SimpleNamespace(unet_params={"w": np.zeros(2)}) for _ in range(2))

    def run(pipe, seed=0, steps=25):
        c = config_lib.load_config("tiny")
        c.seed, c.eval.num_steps = seed, steps
        return types.SimpleNamespace(config=c, pipeline=pipe)

    first = evaluate.evaluate_base(run(pipe_a), str(tmp_path / "r1"))
    again = evaluate.evaluate_base(run(pipe_a), str(tmp_path / "r2"))          # reused: copied, not generated
    assert again == first and len(calls) == 1
    assert open(tmp_path / "r2" / "scores.npz").read() == str(tmp_path / "r1")
    evaluate.evaluate_base(run(pipe_a, seed=1), str(tmp_path / "r3"))          # another seed: generated
    evaluate.evaluate_base(run(pipe_a, steps=10), str(tmp_path / "r4"))        # other sampling: generated
    evaluate.evaluate_base(run(pipe_b), str(tmp_path / "r5"))                  # another pipeline: generated
    pipe_b.unet_params = {"w": np.ones(2)}
    evaluate.evaluate_base(run(pipe_b), str(tmp_path / "r6"))                  # params replaced: generated
    assert len(calls) == 5
