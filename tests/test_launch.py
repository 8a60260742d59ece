"""The launchers (launch/tpu_pod.sh, launch/slurm_gpu.sh), the models fetch they run (jaxpref.fetch) and the
runtime layouts of the SD1.5 configs (jaxpref.layouts).

The scripts run for real with fake ``gcloud`` / ``srun`` / ``scontrol`` first on PATH that record their
arguments and exit as told: the oracle is each script's documented contract (stage order, ``--worker=all``,
exit 75 = rerun to resume, one line for a missing setting). No network, no TPU: seconds.
"""
import os
import subprocess
import tarfile

import pytest

from jaxpref import config_lib, fetch, hub, layouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sh")
POD_ENV = {"TPU_NAME": "pod1", "ZONE": "us-west4-a", "TOPOLOGY": "v5e:2x4", "WORKDIR": "gs://bucket/run1",
           "CONFIG": "configs/dposd15.py", "EXTRA": "--config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5"}


def _bash(script, *args, env=None, path_dir=None):
    base = {k: v for k, v in os.environ.items() if k not in POD_ENV and k not in ("STAGES", "DRY_RUN", "FIT_CHECK")}
    if path_dir is not None:
        base["PATH"] = f"{path_dir}:{base['PATH']}"
    return subprocess.run(["bash", script, *args], env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def _dry_run(*args, **env):
    p = _bash(POD, *args, env={**POD_ENV, "DRY_RUN": "1", **env})
    assert p.returncode == 0, p.stderr
    return [line[2:] for line in p.stdout.splitlines() if line.startswith("+ ")]


def _fake(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("script", [POD, SLURM])
def test_help_exits_0_and_lists_the_variables(script):
    p = _bash(script, "--help")
    assert p.returncode == 0 and p.stderr == ""
    names = (["TPU_NAME", "ZONE", "PROJECT", "CONFIG", "WORKDIR", "EXTRA", "STAGES", "DRY_RUN", "REPO_URL", "REPO_REF",
              "FIT_CHECK", "TOPOLOGY", "DATA_DIR", "PICKAPIC_SOURCE", "MAX_SHARDS", "FETCH_MODELS", "75"] if script == POD
             else ["CONFIG", "WORKDIR", "EXTRA", "DRY_RUN", "requeue", "75", "gpu8"])
    assert all(name in p.stdout for name in names), [n for n in names if n not in p.stdout]


def test_dry_run_prints_every_stage_on_every_worker_in_order():
    lines = _dry_run(PICKAPIC_SOURCE="yuvalkirstain/pickapic_v2", MAX_SHARDS="2", DATA_DIR="gs://bucket/tfds",
                     FETCH_MODELS="yuvalkirstain/PickScore_v1")
    gcloud = [line for line in lines if line.startswith("gcloud ")]
    assert len(gcloud) == len(lines) - 1            # and the one local command: the tarball of this checkout
    order = ["scp", "tar -xzf", "pip install", "jaxpref.fetch", "jaxpref.data.pickapic", "jaxpref.aot",
             "jaxpref.train"]
    where = [next(i for i, line in enumerate(gcloud) if what in line) for what in order]
    assert where == sorted(where) and len(gcloud) == len(order), gcloud
    for line in gcloud:
        assert line.startswith("gcloud compute tpus tpu-vm ") and "pod1" in line and "--zone=us-west4-a" in line
        # every stage on every worker, except the fit check (worker 0) and a build into a bucket (once)
        once = "jaxpref.aot" in line or "jaxpref.data.pickapic" in line
        assert ("--worker=0" if once else "--worker=all") in line, line
    assert "--worker=all" in gcloud[0] and " scp " in gcloud[0] and "jaxpref.tar.gz" in gcloud[0]
    train = gcloud[-1]
    assert "--distributed" in train and "--config=configs/dposd15.py" in train and "--workdir=gs://bucket/run1" in train
    assert "--config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5" in train
    assert "JAX_PLATFORMS=cpu" in gcloud[order.index("jaxpref.aot")]
    assert "--source=yuvalkirstain/pickapic_v2 --max_shards=2 --data_dir=gs://bucket/tfds" in \
        gcloud[order.index("jaxpref.data.pickapic")]
    fetch_line = gcloud[order.index("jaxpref.fetch")]
    assert "--config=configs/dposd15.py --config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 " \
           "yuvalkirstain/PickScore_v1" in fetch_line


def test_a_stage_run_alone_prints_only_its_commands():
    assert [line for line in _dry_run(STAGES="install")] == [
        "gcloud compute tpus tpu-vm ssh pod1 --zone=us-west4-a --worker=all "
        "--command='cd jaxpref && python3 -m pip install -q -e \".[tpu]\"'"]
    only_train = _dry_run("train")                  # positional stage names
    assert len(only_train) == 1 and "jaxpref.train" in only_train[0]
    cloned = _dry_run(STAGES="copy", REPO_URL="https://github.com/jaxpref/jaxpref", REPO_REF="v1")
    assert len(cloned) == 1 and "--worker=all" in cloned[0]
    assert "git clone --quiet https://github.com/jaxpref/jaxpref jaxpref" in cloned[0] and "checkout --quiet v1" in cloned[0]
    assert _dry_run(STAGES="fitcheck", FIT_CHECK="off") == []


@pytest.mark.parametrize("named", ["TPU_NAME", "ZONE", "WORKDIR", "TOPOLOGY"])
def test_a_missing_setting_fails_with_one_line(named):
    env = {k: v for k, v in POD_ENV.items() if k != named}
    p = _bash(POD, env=env)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and f"set {named}" in p.stderr
    bad = _bash(POD, "deploy", env=POD_ENV)
    assert bad.returncode == 2 and "unknown stage 'deploy'" in bad.stderr


def test_copy_sends_this_checkout_to_every_worker(tmp_path):
    """Not a dry run: the tarball the fake scp receives holds this checkout's files."""
    got = tmp_path / "received.tar.gz"
    _fake(tmp_path, "gcloud", f'for a in "$@"; do case "$a" in *.tar.gz) cp "$a" {got};; esac; done\n'
                              f'echo "$@" >> {tmp_path}/calls\n')
    p = _bash(POD, "copy", env=POD_ENV, path_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    with tarfile.open(got) as tar:
        names = set(tar.getnames())
    assert {"launch/tpu_pod.sh", "setup.py", "jaxpref/train.py", "configs/dposd15.py"} <= names
    assert not any(n.startswith(".git/") for n in names)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["scp", "ssh"] and all("--worker=all" in c for c in calls)


def test_a_preempted_pod_run_exits_75_saying_rerun_to_resume(tmp_path):
    _fake(tmp_path, "gcloud", 'echo "jaxpref.train exit 0 on w0"; echo "jaxpref.train exit 75 on w1"; exit 75\n')
    p = _bash(POD, "train", env=POD_ENV, path_dir=tmp_path)
    assert p.returncode == 75 and "rerun to resume" in p.stderr and "STAGES=train" in p.stderr
    _fake(tmp_path, "gcloud", 'echo "jaxpref.train exit 3 on w0"; exit 1\n')
    p = _bash(POD, "train", env=POD_ENV, path_dir=tmp_path)
    assert p.returncode == 3 and "diverged" in p.stderr


def test_a_remote_fit_check_that_does_not_fit_stops_before_training(tmp_path):
    _fake(tmp_path, "gcloud", f'echo "$@" >> {tmp_path}/calls; case "$*" in *jaxpref.aot*) exit 1;; esac\n')
    p = _bash(POD, "fitcheck", "train", env=POD_ENV, path_dir=tmp_path)
    assert p.returncode == 1 and "does not fit" in p.stderr
    calls = (tmp_path / "calls").read_text()
    assert "jaxpref.aot" in calls and "jaxpref.train" not in calls


def test_slurm_requeues_a_preempted_job(tmp_path):
    _fake(tmp_path, "srun", 'exit "${FAKE_RC:-0}"\n')
    _fake(tmp_path, "scontrol", f'echo "$@" >> {tmp_path}/scontrol_calls\n')
    env = {"WORKDIR": "/shared/run", "SLURM_JOB_ID": "4242"}
    p = _bash(SLURM, env={**env, "FAKE_RC": "75"}, path_dir=tmp_path)
    assert p.returncode == 0 and "requeue" in p.stderr
    assert (tmp_path / "scontrol_calls").read_text().split() == ["requeue", "4242"]
    p = _bash(SLURM, env={**env, "FAKE_RC": "2"}, path_dir=tmp_path)
    assert p.returncode == 2 and len((tmp_path / "scontrol_calls").read_text().splitlines()) == 1
    dry = _bash(SLURM, env={"WORKDIR": "/shared/run", "DRY_RUN": "1", "CONFIG": "configs/dposd15.py:gpu8"})
    assert dry.stdout.startswith("+ srun ") and "--config=configs/dposd15.py:gpu8 --workdir=/shared/run --distributed" in dry.stdout
    missing = _bash(SLURM)
    assert missing.returncode == 2 and "WORKDIR" in missing.stderr and len(missing.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The models fetch of the fetch stage.

def test_fetch_resolves_what_the_run_reads(monkeypatch, tmp_path):
    config = config_lib.load_config("tiny:dpo")
    found = fetch.local_references(config)
    assert os.path.isfile(os.path.join(found["model_path"], "unet", "config.json"))
    assert found["eval.rewards"] == "shapes" and "reference_path" not in found
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    config.model_path = "nobody-org/no-such-model"
    with pytest.raises(hub.HubError, match="nobody-org/no-such-model"):
        fetch.local_references(config)


# ---------------------------------------------------------------------------------------------
# Runtime layouts.

@pytest.mark.parametrize("name", ["dposd15", "drosd15", "smposd15"])
def test_gpu8_lays_the_recipe_out_on_eight_gpus(name):
    """configs/<name>.py:gpu8: 8 pairs per GPU per micro-batch (the measured 8-pair step, ~29 GiB of an H200),
    data parallel over every device, the recipe itself (update size, lr, objective settings) unchanged."""
    shipped, gpu8 = config_lib.load_config(name), config_lib.load_config(f"{name}:gpu8")
    config_lib.validate(gpu8, num_devices=8, check_paths=False)
    assert gpu8.batch_size // gpu8.grad_accum == 8 * 8 and not gpu8.remat
    assert dict(gpu8.mesh) == {"data": -1, "fsdp": 1}
    for key in ("batch_size", "total_steps", "objective"):
        assert gpu8[key] == shipped[key]
    assert gpu8.optimizer.to_dict() == shipped.optimizer.to_dict()
    with pytest.raises(ValueError, match="gpu8"):
        config_lib.load_config(f"{name}:gpu9")


def test_lora_pairs_per_chip_follow_the_memory():
    assert layouts.lora_pairs_per_chip(None) is None
    pairs = [layouts.lora_pairs_per_chip(gib) for gib in (11.0, 15.7, 24.0, 30.0, 60.0)]
    assert pairs == sorted(pairs) and pairs[0] == 2 and pairs[-1] == 8
    config = layouts.lora_on_one_chip(config_lib.load_config("dposd15_lora"), 60.0)
    assert (config.batch_size, config.grad_accum) == (32, 4)
    config_lib.validate(config, num_devices=1, check_paths=False)
