"""Shared pieces of the training tests: the test config, a CLI config file, subprocess drivers, hooks.

Also a script: ``python tests/train_helpers.py mesh|multiproc ARGS_JSON`` runs ``jaxpref.train.train`` in a fresh
process (a simulated device count, or one of several ``jax.distributed`` processes) and prints one
``RESULT {json}`` line for the test to read.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from jaxpref import paths

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
PAUSE_ENV = "JAXPREF_TEST_PAUSE_AT"


def build_world(root) -> tuple[str, str]:
    """(tiny SD folder, data dir with the shapes dataset built) under ``root``, built once even when several
    test processes (xdist workers) ask at the same time: the first takes a file lock and builds, the others
    wait and reuse it. Deterministic, so every worker trains on the same bytes."""
    import fcntl
    import pathlib
    from tiny_sd import build_tiny_sd
    from jaxpref import data

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model, data_dir = str(root / "tiny_sd"), str(root / "data")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            build_tiny_sd(model)
            data.open_source("shapes", "train", data_dir)  # builds the shapes pairs (~20 s)
            (root / ".done").touch()
    return model, data_dir


def tiny_dpo_config(model_path: str, data_dir: str, **overrides):
    """DPO on the shapes world with the tiny random pipeline: 8 pairs, 6 steps, fp32, a loss every step."""
    from jaxpref import config_lib

    c = config_lib.load_config("tiny:dpo")
    c.model_path = model_path
    c.batch_size = 8
    c.total_steps = 6
    c.prompt_dropout = 0.25
    c.optimizer.warmup_steps = 0      # every step moves the params (a warmup from 0 makes step 1 a no-op)
    c.ema.enabled = False             # checkpoints and exports hold φ itself (EMA has its own step tests)
    c.log.every = 1
    c.checkpoint.update(every=3, keep=10, export_unet=True)
    c.data.update(data_dir=data_dir, experts_k=64)
    c.eval.update(final=False, num_prompts=4, num_steps=4, images_per_prompt=1, batch_size=4)
    return config_lib.apply_overrides(c, overrides, source="tiny_dpo_config")


def write_config_file(path: str, model_path: str, data_dir: str, **overrides) -> str:
    """A ``--config`` file for ``python -m jaxpref.train`` whose get_config() is ``tiny_dpo_config``."""
    with open(path, "w") as f:
        f.write(f"""import sys
sys.path.insert(0, {TESTS!r})
import train_helpers


def get_config():
    train_helpers.install_pause_hook()  # test-only, driven by ${PAUSE_ENV}; no-op when unset
    return train_helpers.tiny_dpo_config({model_path!r}, {data_dir!r}, **{overrides!r})
""")
    return path


def install_pause_hook():
    """With $JAXPREF_TEST_PAUSE_AT=N: once checkpoint N is on disk, write <workdir>/paused_at_N and
    block until SIGTERM (or 300 s), so a test can SIGKILL or SIGTERM the run at a known step."""
    pause = os.environ.get(PAUSE_ENV)
    if not pause:
        return
    pause = int(pause)
    from jaxpref import checkpoint as checkpoint_lib

    guards = []
    enter, save = checkpoint_lib.PreemptionGuard.__enter__, checkpoint_lib.CheckpointManager.save

    def guarded_enter(self):
        guards.append(self)
        return enter(self)

    def paused_save(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        if step == pause:
            self.wait()
            open(os.path.join(os.path.dirname(self.directory), f"paused_at_{step}"), "w").close()
            deadline = time.time() + 300
            while not (guards and guards[-1].requested) and time.time() < deadline:
                time.sleep(0.05)
        return out

    checkpoint_lib.PreemptionGuard.__enter__ = guarded_enter
    checkpoint_lib.CheckpointManager.save = paused_save


LLVM_LEVEL_0_ENV = "JAXPREF_TEST_LLVM_LEVEL_0"


def compile_at_llvm_level_0(set_attribute=setattr):
    """Every later compile of this process at LLVM optimisation level 0 (XLA's ``xla_backend_optimization_level``):
    the same HLO program, its machine code built ~40% faster and run ~5x slower (conftest's
    ``compiled_for_few_runs``; a child process started with ``subprocess_env(llvm_level_0=True)``). Test-only:
    it wraps a jax internal; ``set_attribute`` may be a monkeypatch's, to undo it after the test."""
    from jax._src import compiler

    get_compile_options = compiler.get_compile_options

    def at_level_0(*args, env_options_overrides=None, **kwargs):
        overrides = {"xla_backend_optimization_level": 0, **(env_options_overrides or {})}
        return get_compile_options(*args, env_options_overrides=overrides, **kwargs)

    set_attribute(compiler, "get_compile_options", at_level_0)


def compile_as_the_parent_asked():
    """In a child started with ``subprocess_env(llvm_level_0=True)``: ``compile_at_llvm_level_0``."""
    if os.environ.get(LLVM_LEVEL_0_ENV):
        compile_at_llvm_level_0()


def subprocess_env(num_devices: int | None = None, llvm_level_0: bool = False) -> dict:
    """Environment of a child JAX process: CPU, the persistent compile cache, the tests on sys.path; with
    ``llvm_level_0`` the child compiles as ``compile_at_llvm_level_0`` (where its script calls
    ``compile_as_the_parent_asked``)."""
    env = dict(os.environ)
    env.pop(LLVM_LEVEL_0_ENV, None)
    if llvm_level_0:
        env[LLVM_LEVEL_0_ENV] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", paths.compile_cache_dir())  # as conftest
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([TESTS, REPO, env.get("PYTHONPATH", "")])
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if num_devices:
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def train_cli(config_file: str, workdir: str, *extra, env=None) -> subprocess.Popen:
    """``python -m jaxpref.train --config=... --workdir=...`` as a child process (stdout+stderr to a log)."""
    return _popen([sys.executable, "-m", "jaxpref.train", f"--config={config_file}", f"--workdir={workdir}", *extra],
                  f"{workdir}.cli.{time.time_ns()}.log", env or subprocess_env())


def _popen(cmd, log_path, env) -> subprocess.Popen:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def log_of(proc: subprocess.Popen, tail: int = 4000) -> str:
    with open(proc.log_path) as f:
        return f.read()[-tail:]


def wait_for_file(path: str, proc: subprocess.Popen, timeout: float = 400):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared:\n{log_of(proc)}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s:\n{log_of(proc)}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 400) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"process did not finish in {timeout}s:\n{log_of(proc)}")


def metrics_losses(workdir: str) -> dict[int, float]:
    """{step: train/loss} from a workdir's metrics.jsonl (every run appends to it)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                assert rec["step"] not in out, f"step {rec['step']} logged twice in {workdir}/metrics.jsonl"
                out[rec["step"]] = rec["train/loss"]
    return out


def checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(mode: str, args: dict, num_devices: int, llvm_level_0: bool = False) -> subprocess.Popen:
    """Starts ``python tests/train_helpers.py MODE ARGS`` (read the result with ``script_result``)."""
    log = f"{args['workdir']}.{mode}.{args.get('process_id', 0)}.{time.time_ns()}.log"
    return _popen([sys.executable, os.path.join(TESTS, "train_helpers.py"), mode, json.dumps(args)], log,
                  subprocess_env(num_devices, llvm_level_0))


def script_result(proc: subprocess.Popen, timeout: float = 500) -> dict:
    return script_results([proc], timeout)[0]


def script_results(procs: list[subprocess.Popen], timeout: float = 500) -> list[dict]:
    """Waits for all; the first failure kills the rest (peers of a dead jax.distributed process hang)."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            culprit = failed[0] if failed else procs[0]
            raise AssertionError(f"{'rc=%s' % culprit.returncode if failed else f'timeout {timeout}s'}:\n"
                                 f"{log_of(culprit, 6000)}")
        time.sleep(0.2)
    out = []
    for p in procs:
        text = log_of(p, tail=10 ** 9)
        lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"rc={p.returncode}:\n{text[-6000:]}"
        out.append(json.loads(lines[-1][len("RESULT "):]))
    return out


def checkpoint_meta(workdir: str, step: int) -> dict:
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
        return json.load(f)


def tree_max_abs_diff(a, b) -> float:
    import jax
    import numpy as np

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(la, lb))


# Losses of differently sharded runs agree to ~2e-5 relative, not 1e-7: DPO's loss is -log σ(-β/2 (Δθ - Δref))
# with β/2 = 250, which multiplies the fp32 rounding of the denoising errors (reductions split over other
# devices and in another order) by 250. The reference's error gap ref_gap is not amplified; it agrees to
# ~1e-7 and would be off by O(0.1) if a device got other pairs or other noise.
LOSS_RTOL, GRAD_NORM_RTOL, REF_GAP_ATOL = 1e-4, 1e-4, 1e-5


def check_close(got_history, want_history, steps, what):
    diff = compare_histories(got_history, want_history, steps)
    print(f"{what}: max relative loss difference {diff['loss']:.1e}, grad_norm {diff['grad_norm']:.1e}; "
          f"max |ref_gap difference| {diff['ref_gap']:.1e}")
    assert diff["loss"] < LOSS_RTOL and diff["grad_norm"] < GRAD_NORM_RTOL and diff["ref_gap"] < REF_GAP_ATOL, diff


def compare_histories(got: list, want: list, steps) -> dict:
    """Max differences between two runs' logged metrics over ``steps``: relative for the loss and the
    gradient norm, absolute for ref_gap (the frozen reference's error gap: it depends only on the batch and
    the per-pair noise and timesteps, so it checks that both runs saw the same pairs with the same noise)."""
    got = {h["step"]: h for h in got}
    want = {h["step"]: h for h in want}
    assert sorted(got) == sorted(steps), (sorted(got), sorted(steps))
    rel = lambda k: max(abs(got[s][k] - want[s][k]) / abs(want[s][k]) for s in steps)
    return {"loss": rel("loss"), "grad_norm": rel("grad_norm"),
            "ref_gap": max(abs(got[s]["ref_gap"] - want[s]["ref_gap"]) for s in steps)}


# ---------------------------------------------------------------------------------------------
# In-process pieces.

def fsdp_rules(min_size: int):
    """The fsdp rule for tensors of >= min_size elements (the tiny UNet's are all < 2**14, the default)."""
    return ((".*", f"fsdp(min_size={min_size})"),)


def spy_on_saves(record: list):
    """Appends a description of the state's params sharding to ``record`` at every checkpoint save."""
    import jax
    import numpy as np
    from jaxpref import checkpoint as checkpoint_lib

    save = checkpoint_lib.CheckpointManager.save

    def spying_save(self, step, state, *args, **kwargs):
        leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
        path, big = max(leaves, key=lambda kv: kv[1].size)
        sharded = sum(1 for _, x in leaves if any(a is not None for a in x.sharding.spec))
        record.append({"step": int(step), "path": jax.tree_util.keystr(path), "shape": list(big.shape),
                       "spec": [a if a is None or isinstance(a, str) else list(a) for a in big.sharding.spec],
                       "shard_shape": list(big.addressable_shards[0].data.shape),
                       "num_devices": len(big.sharding.device_set), "sharded_leaves": sharded,
                       "leaves": len(leaves), "mesh": dict(big.sharding.mesh.shape),
                       "opt_sharded": sum(1 for x in jax.tree_util.tree_leaves(state.opt_state)
                                          if np.ndim(x) and any(a is not None for a in x.sharding.spec))})
        return save(self, step, state, *args, **kwargs)

    checkpoint_lib.CheckpointManager.save = spying_save


class TwoShardLoader:
    """What two processes' loaders feed together, in one process: rows of process 0 then process 1.

    A stand-in for ``jaxpref.data.loader.make_loader`` so a single-process run sees the global batches of a
    two-process run (each process reads its own contiguous half of the records).
    """

    make_loader = None  # the real one, set while this stands in for it

    def __init__(self, source, global_batch_size, **kwargs):
        kwargs.pop("process_index", None), kwargs.pop("process_count", None)
        self.loaders = [self.make_loader(source, global_batch_size, process_index=p, process_count=2, **kwargs)
                        for p in range(2)]

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        parts = [next(l) for l in self.loaders]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps([l.get_state().decode() for l in self.loaders]).encode()

    def set_state(self, state: bytes):
        for l, s in zip(self.loaders, json.loads(state)):
            l.set_state(s.encode())


def losses(history, key: str = "loss") -> dict[int, float]:
    return {h["step"]: h[key] for h in history}


def reference_run(world, workdir: str):
    """The uninterrupted 1-device run 0 -> 6 (a loss every step, checkpoints 3 and 6, the UNet exported):
    (workdir, summary)."""
    from jaxpref import train as train_lib

    return workdir, train_lib.train(tiny_dpo_config(*world), workdir)


def shared_reference_run(world, root) -> tuple[str, dict]:
    """``reference_run`` computed once for all test processes (xdist workers) under ``root``: the first takes
    a file lock and trains, the others wait and read its summary (JSON; floats round-trip exactly)."""
    import fcntl
    import pathlib

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    workdir, done = str(root / "run"), root / "summary.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _, summary = reference_run(world, workdir)
            done.write_text(json.dumps(summary))
    return workdir, json.loads(done.read_text())


def two_shard_reference(world, workdir: str):
    """Like ``reference_run`` but fed what two processes read together (each its own half of the records)."""
    from jaxpref import train as train_lib
    from jaxpref.data import loader

    original = loader.make_loader
    TwoShardLoader.make_loader = staticmethod(original)
    loader.make_loader = TwoShardLoader
    try:
        return workdir, train_lib.train(tiny_dpo_config(*world), workdir)
    finally:
        loader.make_loader = original


# ---------------------------------------------------------------------------------------------
# Child-process drivers.

def _mesh_main(args: dict) -> dict:
    """One process, the simulated devices of XLA_FLAGS, mesh (data, fsdp): train, report shardings."""
    import jax
    from jaxpref import train as train_lib

    saves = []
    spy_on_saves(saves)
    config = tiny_dpo_config(args["model_path"], args["data_dir"], **args.get("overrides", {}))
    config.mesh.update(data=args["data"], fsdp=args["fsdp"])
    config.sharding_rules = fsdp_rules(args["min_size"])
    summary = train_lib.train(config, args["workdir"], max_steps=args.get("max_steps"))
    return {"devices": jax.device_count(), "history": summary["history"], "saves": saves, "step": summary["step"]}


def _every_process_writes_the_compile_cache():
    """Test-only speed-up: jax writes persistent-cache entries from process 0 only, and another process's
    keys differ (its compile options hold its process index), so process 1 would compile the step afresh in
    every run and every train() call. Best effort: jax internals; without them the test is only slower."""
    try:
        from jax._src import compilation_cache, compiler, distributed
        original, put = compiler._cache_write, compilation_cache.put_executable_and_time
    except (ImportError, AttributeError):
        return

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if distributed.global_state.process_id == 0 or host_callbacks:
            return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
        import jax

        if compile_time_secs >= jax.config.jax_persistent_cache_min_compile_time_secs:
            put(cache_key, module_name, executable, backend, int(compile_time_secs))

    compiler._cache_write = cache_write


def _multiproc_main(args: dict) -> dict:
    """One of ``num_processes`` jax.distributed processes: train to ``first`` steps, then resume to the end."""
    from jaxpref import train as train_cli_lib

    _every_process_writes_the_compile_cache()
    train_cli_lib.initialize_distributed(f"127.0.0.1:{args['port']}", args["num_processes"], args["process_id"],
                                         cpu_collectives=True)
    import jax
    from jaxpref import train as train_lib

    saves = []
    spy_on_saves(saves)
    config = tiny_dpo_config(args["model_path"], args["data_dir"], **args.get("overrides", {}))
    config.mesh.update(data=args["data"], fsdp=args["fsdp"])
    config.sharding_rules = fsdp_rules(args["min_size"])
    first = train_lib.train(config, args["workdir"], max_steps=args["first"])
    second = train_lib.train(config, args["workdir"])
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "history": first["history"] + second["history"], "saves": saves,
            "exported": second.get("exported_unet")}


if __name__ == "__main__":
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    compile_as_the_parent_asked()
    mode, raw = sys.argv[1], json.loads(sys.argv[2])
    result = {"mesh": _mesh_main, "multiproc": _multiproc_main}[mode](raw)
    print("RESULT " + json.dumps(result), flush=True)
