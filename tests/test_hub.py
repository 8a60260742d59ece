"""Model references through jaxpref.hub: local paths, embedded:tiny, and hub ids read from a Hugging Face cache
the tests build (offline), plus the caches that follow XDG_CACHE_HOME."""
import os
import subprocess
import sys
import time

import pytest

import hub_cache
import train_helpers as th
from jaxpref import hub, paths
from jaxpref.models import pipeline as pipeline_lib
from jaxpref.models.pipeline import TINY_SD_DIR

# The files of stable-diffusion-v1-5/stable-diffusion-v1-5 (its model card's listing, abridged): what a
# diffusers pipeline repo holds besides what load_pipeline reads.
SD15_FILES = [
    "model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home, offline: nothing reaches the network."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_hub_id_syntax():
    assert hub.parse_hub_id("org/name") == hub.HubRef("org/name")
    assert hub.parse_hub_id("org/name@v1.0/unet") == hub.HubRef("org/name", "v1.0", "unet")
    assert hub.parse_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5/text_encoder") == hub.HubRef(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", None, "text_encoder")
    for not_an_id in ("/abs/path", "~/models/sd", "./rel/dir", "../up/dir", "embedded:tiny", "single", "org/",
                      "org//name", "org/name@", "a b/c", "org/../name"):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id
    assert not hub.is_hub_id(TINY_SD_DIR)  # an existing path is never an id


def test_only_what_the_loaders_read_is_fetched():
    """Of a diffusers pipeline: the components load_pipeline reads, each with its full-precision safetensors; no
    safety checker, root single-file checkpoint, fp16/non-EMA variant or pickle."""
    assert hub.select_files(SD15_FILES) == [
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert set(hub.SD_COMPONENTS) == set(pipeline_lib._REQUIRED + pipeline_lib._SDXL)   # what load_pipeline reads
    assert hub.select_files(SD15_FILES, components=("unet",)) == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    sharded = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "pytorch_model.bin", "tokenizer.json"]
    assert hub.select_files(sharded) == sorted(set(sharded) - {"pytorch_model.bin"})
    # A reward head published only as a pickle: the named file (the first of the names present), nothing else.
    hps = ["HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt", "README.md"]
    assert hub.select_files(hps, None, pickles=("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")) == [
        "HPS_v2.1_compressed.pt"]
    with pytest.raises(hub.Refused, match="unet/diffusion_pytorch_model.bin: only pickled weights"):
        hub.select_files(["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"])
    with pytest.raises(hub.Refused, match="sd-v1-4.ckpt: only pickled weights"):
        hub.select_files(["README.md", "sd-v1-4.ckpt"])
    with pytest.raises(hub.Refused, match="only variant weights"):
        hub.select_files(["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"])


def test_a_hub_id_resolves_to_the_cached_snapshot_offline(hf_home):
    snapshot = hub_cache.add_repo(hf_home, "someorg/tiny-sd", {"": TINY_SD_DIR})
    from huggingface_hub import snapshot_download

    # The cache the test built is the one huggingface_hub itself reads.
    assert snapshot_download("someorg/tiny-sd", local_files_only=True, cache_dir=str(hf_home / "hub")) == str(snapshot)
    said = []
    assert hub.resolve("someorg/tiny-sd", announce=said.append) == str(snapshot)
    assert hub.resolve("someorg/tiny-sd@main/unet") == os.path.join(snapshot, "unet")
    assert hub.resolve("someorg/tiny-sd", subfolder="vae") == os.path.join(snapshot, "vae")
    assert hub.resolve(f"someorg/tiny-sd@{snapshot.name}") == str(snapshot)   # a commit hash
    from jaxpref.data import cache

    assert cache._component("someorg/tiny-sd", "vae", "--vae") == os.path.join(snapshot, "vae")   # a pipeline's vae/
    assert said == []   # all cached: nothing fetched, nothing announced
    assert hub.resolve(TINY_SD_DIR) == TINY_SD_DIR and hub.resolve("embedded:tiny") == TINY_SD_DIR


def test_a_missing_id_offline_is_one_line_naming_it_and_the_env_vars(hf_home):
    with pytest.raises(hub.HubError) as e:
        hub.resolve("someorg/not-cached", key="config.model_path")
    message = str(e.value)
    assert "\n" not in message and message.startswith("config.model_path='someorg/not-cached': ")
    assert "HF_HUB_OFFLINE=0" in message and "HF_HOME" in message and str(hf_home) in message
    with pytest.raises(hub.HubError, match=r"'/no/such/folder': no such local path.*org/name\[@revision\]"):
        hub.resolve("/no/such/folder", key="--base")


def test_a_pickle_only_repo_is_refused_naming_the_file(hf_home):
    hub_cache.add_repo(hf_home, "someorg/bin-only", {"model_index.json": b"{}", "unet/config.json": b"{}",
                                                     "unet/diffusion_pytorch_model.bin": b"pickle"})
    hub_cache.add_repo(hf_home, "someorg/ckpt-only", {"README.md": b"x", "sd-v1-4.ckpt": b"pickle"})
    with pytest.raises(hub.HubError, match=r"^config.model_path='someorg/bin-only': unet/diffusion_pytorch_model"
                                           r"\.bin: only pickled weights"):
        hub.resolve("someorg/bin-only", key="config.model_path")
    with pytest.raises(hub.HubError, match=r"sd-v1-4\.ckpt: only pickled weights.*safetensors"):
        hub.resolve("someorg/ckpt-only")
    with pytest.raises(hub.HubError, match=r"sd-v1-4\.ckpt: only pickled weights"):
        hub.resolve("someorg/ckpt-only/sd-v1-4.ckpt")   # a single file named outright: refused the same


def test_online_fetch_states_the_size_first_and_asks_only_for_the_selected_files(hf_home, monkeypatch):
    """With the hub reachable (its two calls replaced here): one line with the count and size of what is
    missing, then a snapshot_download limited to the selected files, into HF_HOME's cache."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    sizes = {p: 1000 * (i + 1) for i, p in enumerate(SD15_FILES)}
    commit = "0" * 40

    class Info:
        sha = commit
        siblings = [type("Sibling", (), {"rfilename": p, "size": s}) for p, s in sizes.items()]

    asked = {}

    def fake_download(repo_id, *, repo_type, revision, cache_dir, allow_patterns):
        asked.update(repo_id=repo_id, revision=revision, cache_dir=cache_dir, patterns=sorted(allow_patterns))
        snapshot = hub_cache.add_repo(hf_home, repo_id, {p: b"x" for p in allow_patterns}, commit=commit)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, *a, **k: Info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    said = []
    folder = hub.resolve("someorg/sd15", announce=said.append)
    selected = hub.select_files(SD15_FILES)
    assert asked == dict(repo_id="someorg/sd15", revision=None, cache_dir=str(hf_home / "hub"), patterns=selected)
    assert folder.endswith(os.path.join("models--someorg--sd15", "snapshots", commit))
    total = sum(sizes[p] for p in selected)
    assert said[0].startswith(f"fetching someorg/sd15 into the Hugging Face cache ({hf_home / 'hub'}): "
                              f"{len(selected)} files, {hub.human_size(total)}")


def test_config_accepts_a_hub_id_and_still_names_a_missing_local_path():
    from jaxpref import config_lib

    c = config_lib.load_config("tiny:dpo")
    c.model_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    c.reference_path = "someorg/dpo-sd15/unet"
    c.vae_path = "madebyollin/sdxl-vae-fp16-fix"
    config_lib.validate(c)   # syntax only: nothing is looked up
    c.model_path = "/no/such/sd15"
    with pytest.raises(ValueError, match=r"^config.model_path='/no/such/sd15': not a folder") as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)


def test_export_accepts_embedded_tiny_as_base(tmp_path):
    from jaxpref import export

    assert export.local_model_args(None, "embedded:tiny") == (None, TINY_SD_DIR)
    out = export.export(TINY_SD_DIR, str(tmp_path / "out"), base="embedded:tiny")
    for part in ("unet", "vae", "text_encoder"):
        with open(os.path.join(TINY_SD_DIR, part, "config.json")) as a, open(os.path.join(out, part, "config.json")) as b:
            assert a.read() == b.read()


def test_a_missing_id_stops_train_before_any_model_loads(hf_home, tmp_path, monkeypatch):
    from jaxpref import config_lib, train

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline_lib, "load_pipeline", no_load)
    c = config_lib.load_config("tiny:dpo")
    c.model_path = "someorg/not-cached"
    start = time.perf_counter()
    with pytest.raises(hub.HubError, match="config.model_path='someorg/not-cached': .*HF_HUB_OFFLINE=0"):
        train.train(c, str(tmp_path / "run"))
    assert time.perf_counter() - start < 30


def test_reward_models_are_fetched_for_a_run_that_evaluates_only(hf_home):
    """A run's reward model ids are fetched when it starts if it evaluates (the fetch fails here, offline with
    an empty cache), and left alone when it generates nothing held out (no final evaluation, and none along
    the way: eval.every 0 or not below total_steps)."""
    from jaxpref import config_lib

    c = config_lib.load_config("dposd15")
    c.model_path = TINY_SD_DIR
    with pytest.raises(hub.HubError, match="config.eval.rewards pickscore='yuvalkirstain/PickScore_v1'"):
        hub.resolve_run_paths(c, announce=lambda _: None)
    c.eval.update(final=False)
    with pytest.raises(hub.HubError):   # an evaluation every eval.every updates
        hub.resolve_run_paths(c, announce=lambda _: None)
    for every in (0, c.total_steps):
        c.eval.every = every
        assert hub.resolve_run_paths(c, announce=lambda _: None).eval.rewards == "pickscore=yuvalkirstain/PickScore_v1"


@pytest.mark.slow
def test_train_command_trains_the_embedded_model_from_the_hub_cache(world, tmp_path):
    """python -m jaxpref.train --config.model_path=<org/name>, offline, with the shipped tiny model in a hub cache:
    ten updates (its warmup), and the exported UNet is that model's. The settings are test_embedded's DPO run's (one train
    step program for both in the persistent compile cache), without its evaluation."""
    home = tmp_path / "hf_home"
    snapshot = hub_cache.add_repo(home, "someorg/tiny-sd", {"": TINY_SD_DIR})
    config = tmp_path / "config.py"
    config.write_text(f"""from jaxpref import config_lib


def get_config():
    c = config_lib.load_config("tiny:dpo")
    c.data.data_dir = {world[1]!r}
    c.eval.update(every=0, final=False)
    c.checkpoint.update(every=0, keep=1, export_unet=True)
    return c
""")
    env = th.subprocess_env()
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "jaxpref.train", f"--config={config}", f"--workdir={workdir}",
                           "--config.model_path=someorg/tiny-sd", "--config.total_steps=10"],
                          cwd=th.REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "loading the model (someorg/tiny-sd)" in out and "step 10/10" in out
    with open(snapshot / "unet" / "config.json") as a, open(workdir / "export" / "unet" / "config.json") as b:
        assert a.read() == b.read()


def test_caches_follow_xdg_cache_home(tmp_path, monkeypatch):
    from jaxpref import config_lib
    from jaxpref.data import sources

    monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert paths.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "jaxpref")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir("tfds") == str(tmp_path / "xdg" / "jaxpref" / "tfds")
    assert paths.compile_cache_dir() == str(tmp_path / "xdg" / "jaxpref" / "jax_cache")
    assert str(sources._data_dir(None)) == str(tmp_path / "xdg" / "jaxpref" / "tfds")   # where datasets are built
    assert "$XDG_CACHE_HOME/jaxpref/tfds" in config_lib.KEY_HELP["data.data_dir"]      # and what --print_config says
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "data"))
    assert str(sources._data_dir(None)) == str(tmp_path / "data")
