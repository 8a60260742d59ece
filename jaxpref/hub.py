"""A model or dataset reference -> a local folder: a local path, the shipped ``embedded:tiny``, or a Hugging
Face hub id fetched into the standard Hugging Face cache.

Accepted wherever a model is read (config.model_path, reference_path, vae_path, lora.init_from, the reward
specs, ``export --base``, ``evaluate --model_path``, the scores and experts builders' ``--scorer``):

- an existing local path: returned as it is;
- ``embedded:tiny``: the tiny SD folder shipped in the package;
- ``org/name[@revision][/subfolder]``: a hub repository, as diffusers' ``pretrained_model_name_or_path`` (its
  ``subfolder=`` may also be passed separately), fetched with ``huggingface_hub`` into its cache and returned
  as the cached snapshot folder. The cache is Hugging Face's own (``HF_HOME`` / ``HF_HUB_CACHE``, default
  ``$XDG_CACHE_HOME/huggingface/hub``), shared with diffusers and transformers; ``HF_TOKEN`` opens gated and
  private repositories; ``HF_HUB_OFFLINE=1`` reads the cache and never the network. An interrupted download
  resumes when run again.

Only safetensors weights and the config and tokenizer files are fetched, never pickles (``*.bin``, ``*.ckpt``,
``*.pt``): a model folder that holds only pickled weights is refused, naming the file. Of a diffusers
pipeline only the components ``load_pipeline`` reads are fetched (``SD_COMPONENTS``: no safety checker, no
root-level single-file checkpoint), and of each component only the full-precision weights our loaders read
(``diffusion_pytorch_model.safetensors`` / ``model.safetensors`` or their shards, not the fp16 or non-EMA
variants). One exception: reward heads published only as torch pickles (HPSv2's HPS_v2_compressed.pt,
LAION's sa_0_4_vit_l_14_linear.pth). Their callers name those files (``pickles=``), and
``jaxpref.rewards.state_dicts`` reads them with ``torch.load(weights_only=True)``, which runs no code from
the pickle.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import posixpath
import re
import time
from typing import Callable, Iterable, Mapping, Optional

from jaxpref.errors import EXIT_CONFIG, JaxprefError

EMBEDDED_TINY = "embedded:tiny"
# The folders of a diffusers pipeline that jaxpref.models.pipeline.load_pipeline reads (SD and SDXL).
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_CONFIG_SUFFIXES = (".json", ".txt", ".model")   # configs, tokenizer vocab/merges, sentencepiece models
# The weights files the diffusers/transformers loaders here read (jaxpref.models.weights.read_checkpoint_folder).
_STANDARD_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model)(-\d{5}-of-\d{5})?\.safetensors$")
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9._-]+))?(?P<subfolder>(?:/{_PART})*)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
ID_SYNTAX = "a Hugging Face hub id org/name[@revision][/subfolder]"

Announce = Callable[[str], None]


class HubError(JaxprefError, ValueError):
    """A reference that is neither a local path nor a hub repository we can read; the message is one line
    naming the key, the reference and what to set."""

    exit_code = EXIT_CONFIG


@dataclasses.dataclass(frozen=True)
class HubRef:
    """``org/name[@revision][/subfolder]`` taken apart (revision None: the default branch)."""
    repo_id: str
    revision: Optional[str] = None
    subfolder: str = ""

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return self.repo_id + revision + (f"/{self.subfolder}" if self.subfolder else "")


def parse_hub_id(value) -> Optional[HubRef]:
    """The ``HubRef`` of ``org/name[@revision][/subfolder]``; None for anything else (syntax only: absolute,
    ``~``, ``./`` paths and ``embedded:`` names are never hub ids)."""
    if not isinstance(value, str):
        return None
    m = _HUB_ID.match(value)
    if m is None or any(part in (".", "..") for part in value.split("/")):
        return None
    return HubRef(m["repo"], m["revision"], m["subfolder"].strip("/"))


def is_hub_id(value) -> bool:
    """True when ``value`` is not an existing local path and has hub id syntax (nothing is looked up)."""
    return (isinstance(value, str) and not os.path.exists(os.path.expanduser(value))
            and parse_hub_id(value) is not None)


def hf_cache_dir() -> str:
    """Hugging Face's hub cache, read from the environment at call time with huggingface_hub's precedence:
    HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.abspath(os.path.expandvars(os.path.expanduser(cache)))


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, else as huggingface_hub read it at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------------------------------------
# Which files of a repository are fetched (a pure function of its file list).

class Refused(ValueError):
    """The selection holds weights jaxpref does not read (pickles only, or only fp16/non-EMA variants)."""


def select_files(paths: Iterable[str], components: Optional[Iterable[str]] = SD_COMPONENTS,
                 pickles: Iterable[str] = ()) -> list[str]:
    """The files to fetch of a model folder's ``paths`` (relative, '/'-separated); see the module docstring.

    ``components``: the folders kept when the selection is a diffusers pipeline (a root model_index.json);
    None keeps every folder. ``pickles``: names of pickled weights files accepted where a folder has no
    safetensors, the first present one fetched (reward heads published only as pickles). Raises ``Refused``
    naming the file when a model folder (one with a config.json), or the whole selection, has only weights
    that jaxpref does not read.
    """
    paths, pickles = sorted(set(paths)), tuple(pickles)
    if "model_index.json" in paths and components is not None:
        wanted = set(components)
        paths = [p for p in paths if ("/" in p and p.split("/", 1)[0] in wanted)
                 or ("/" not in p and p.endswith(_CONFIG_SUFFIXES))]
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        by_folder.setdefault(posixpath.dirname(p), []).append(posixpath.basename(p))
    keep, pickled_anywhere = [], []
    for folder, names in by_folder.items():
        is_model = "config.json" in names
        weights = [n for n in names if n.endswith(".safetensors") and (not is_model or _STANDARD_WEIGHTS.match(n))]
        pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        pickled_anywhere += [posixpath.join(folder, n) for n in pickled]
        if not weights:
            accepted = next((n for n in pickles if n in pickled), None)
            variants = [n for n in names if n.endswith(".safetensors")]
            if accepted:
                weights = [accepted]
            elif is_model and variants:
                raise Refused(f"{posixpath.join(folder, variants[0])}: only variant weights in {folder or 'the root'} "
                              "(jaxpref reads the full-precision diffusion_pytorch_model.safetensors or "
                              "model.safetensors)")
            elif is_model and pickled:
                raise Refused(_pickle_refusal(posixpath.join(folder, pickled[0])))
        keep += [posixpath.join(folder, n) for n in names if n.endswith(_CONFIG_SUFFIXES)]
        keep += [posixpath.join(folder, n) for n in weights]
    if pickled_anywhere and not any(p.endswith(".safetensors") or p.endswith(PICKLE_SUFFIXES) for p in keep):
        raise Refused(_pickle_refusal(pickled_anywhere[0]))
    return sorted(keep)


def _pickle_refusal(path: str) -> str:
    return (f"{path}: only pickled weights there, and jaxpref never loads pickles; convert them once to "
            "safetensors (diffusers/transformers save_pretrained(..., safe_serialization=True)) and pass that folder")


# ---------------------------------------------------------------------------------------------
# Listing and fetching a repository revision.

@dataclasses.dataclass(frozen=True)
class Listing:
    """A repository revision's files: {path: size in bytes (None: unknown)} and where its snapshot is cached."""
    ref: HubRef
    repo_type: str
    files: Mapping[str, Optional[int]]
    snapshot: Optional[str]   # <cache>/<type>s--org--name/snapshots/<commit> (may not exist yet)
    online: bool              # listed by the hub (False: read from the cache)


def _storage(repo_id: str, repo_type: str) -> str:
    return os.path.join(hf_cache_dir(), f"{repo_type}s--" + repo_id.replace("/", "--"))


def _cached_snapshot(ref: HubRef, repo_type: str) -> Optional[str]:
    """The cached snapshot folder of ``ref``'s revision (refs/<branch> names its commit), or None."""
    storage = _storage(ref.repo_id, repo_type)
    revision = ref.revision or "main"
    commit = revision
    if not _COMMIT.match(revision):
        try:
            with open(os.path.join(storage, "refs", revision)) as f:
                commit = f.read().strip()
        except OSError:
            return None
    folder = os.path.join(storage, "snapshots", commit)
    return folder if os.path.isdir(folder) else None


def _walk(folder: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                out[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return out


def _offline_message(key: str, value: str, ref: HubRef) -> str:
    return (f"{key}={value!r}: {ref} is not in the Hugging Face cache ({hf_cache_dir()}) and HF_HUB_OFFLINE=1; "
            "set HF_HUB_OFFLINE=0 to download it (HF_TOKEN for a gated or private repo), or HF_HOME to the cache "
            "that holds it")


def list_files(ref: HubRef, repo_type: str = "model", *, key: str = "model", value: Optional[str] = None) -> Listing:
    """The files of ``ref``'s revision: from the hub (sizes included), or offline (or with the hub out of
    reach) from the cached snapshot. HubError (one line) when neither has it."""
    value = str(ref) if value is None else value
    if not offline():
        from huggingface_hub import HfApi
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = HfApi().repo_info(ref.repo_id, repo_type=repo_type, revision=ref.revision, files_metadata=True)
        except GatedRepoError as e:
            raise HubError(f"{key}={value!r}: {ref.repo_id} is gated; accept its terms at "
                           f"https://huggingface.co/{_url_path(ref.repo_id, repo_type)} and set HF_TOKEN to a token "
                           "of that account") from e
        except RepositoryNotFoundError as e:
            raise HubError(f"{key}={value!r}: no such local path, and no {repo_type} repository {ref.repo_id} on the "
                           "Hugging Face hub (a private one needs HF_TOKEN)") from e
        except RevisionNotFoundError as e:
            raise HubError(f"{key}={value!r}: {ref.repo_id} has no revision {ref.revision!r}") from e
        except Exception as e:  # noqa: BLE001 - no network, a proxy, the hub down: the cache may still have it
            snapshot = _cached_snapshot(ref, repo_type)
            if snapshot is None:
                raise HubError(f"{key}={value!r}: cannot reach the Hugging Face hub ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}) and {ref} is not in the cache "
                               f"({hf_cache_dir()}); check the network, or set HF_HOME to a cache that holds it") from e
            return Listing(ref, repo_type, _walk(snapshot), snapshot, online=False)
        files = {s.rfilename: s.size for s in info.siblings or ()}
        snapshot = os.path.join(_storage(ref.repo_id, repo_type), "snapshots", info.sha)
        return Listing(ref, repo_type, files, snapshot, online=True)
    snapshot = _cached_snapshot(ref, repo_type)
    if snapshot is None:
        raise HubError(_offline_message(key, value, ref))
    return Listing(ref, repo_type, _walk(snapshot), snapshot, online=False)


def _url_path(repo_id: str, repo_type: str) -> str:
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def human_size(num_bytes: Optional[float]) -> str:
    if num_bytes is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def fetch(listing: Listing, paths: Iterable[str], *, key: str = "model", value: Optional[str] = None,
          announce: Announce = print) -> str:
    """The snapshot folder of ``listing`` with ``paths`` in it: those not cached yet are downloaded (one
    console line with their count and size first, then huggingface_hub's progress bars)."""
    paths = sorted(paths)
    value = str(listing.ref) if value is None else value
    snapshot = listing.snapshot
    missing = [p for p in paths if snapshot is None or not os.path.isfile(os.path.join(snapshot, p))]
    if not missing:
        return snapshot
    if not listing.online:
        raise HubError(_offline_message(key, value, listing.ref) if offline() else
                       f"{key}={value!r}: the cached snapshot of {listing.ref} lacks {missing[0]} and the hub is out "
                       "of reach; rerun with the network to complete it")
    sizes = [listing.files.get(p) for p in missing]
    total = None if any(s is None for s in sizes) else sum(sizes)
    announce(f"fetching {listing.ref} into the Hugging Face cache ({hf_cache_dir()}): {len(missing)} files, "
             f"{human_size(total)}; an interrupted download resumes when rerun ...")
    from huggingface_hub import snapshot_download

    start = time.perf_counter()
    folder = snapshot_download(listing.ref.repo_id, repo_type=listing.repo_type, revision=listing.ref.revision,
                               cache_dir=hf_cache_dir(), allow_patterns=[glob.escape(p) for p in paths])
    announce(f"fetched {listing.ref} in {time.perf_counter() - start:.0f}s")
    absent = [p for p in paths if not os.path.isfile(os.path.join(folder, p))]
    if absent:
        raise HubError(f"{key}={value!r}: {absent[0]} is still missing from {folder} after the download; rerun it")
    return folder


# ---------------------------------------------------------------------------------------------
# The one entry point for models.

def resolve(value: str, *, key: str = "model", subfolder: str = "", components: Optional[Iterable[str]] = SD_COMPONENTS,
            pickles: Iterable[str] = (), announce: Announce = print) -> str:
    """A local path for ``value`` (see the module docstring): unchanged when it exists, the shipped folder
    for ``embedded:tiny``, else the hub repository's cached snapshot (fetched first when needed), joined with
    its subfolder. ``key`` names the setting in error messages (``config.model_path``, ``--base``, ...);
    ``components`` and ``pickles``: ``select_files``. Raises HubError (one line) otherwise."""
    if value == EMBEDDED_TINY:
        from jaxpref.models.pipeline import resolve_model_path

        return os.path.join(resolve_model_path(value), subfolder) if subfolder else resolve_model_path(value)
    value, pickles = os.fspath(value), tuple(pickles)
    local = os.path.expanduser(value)
    if os.path.exists(local):
        return os.path.join(local, subfolder) if subfolder else local
    ref = parse_hub_id(value)
    if ref is None:
        raise HubError(f"{key}={value!r}: no such local path; expected an existing folder or file, "
                       f"'{EMBEDDED_TINY}' or {ID_SYNTAX}")
    if subfolder:
        ref = dataclasses.replace(ref, subfolder=posixpath.join(ref.subfolder, subfolder.strip("/")))
    listing = list_files(ref, key=key, value=value)
    sub = ref.subfolder
    if sub and sub in listing.files:    # a single file, e.g. org/name/pytorch_lora_weights.safetensors
        if sub.endswith(PICKLE_SUFFIXES) and posixpath.basename(sub) not in pickles:
            raise HubError(f"{key}={value!r}: {_pickle_refusal(sub)}")
        return os.path.join(fetch(listing, [sub], key=key, value=value, announce=announce), sub)
    inside = {p[len(sub) + 1:] if sub else p for p in listing.files if not sub or p.startswith(sub + "/")}
    if not inside:
        raise HubError(f"{key}={value!r}: {ref.repo_id} has no " + (f"folder {sub!r}" if sub else "files")
                       + (f" at revision {ref.revision!r}" if ref.revision else ""))
    try:
        keep = select_files(inside, components, pickles)
    except Refused as e:
        raise HubError(f"{key}={value!r}: {posixpath.join(sub, str(e)) if sub else e}") from e
    if not keep:
        raise HubError(f"{key}={value!r}: {ref} holds no config or safetensors file to read (it has "
                       f"{sorted(inside)[:5]})")
    folder = fetch(listing, [posixpath.join(sub, p) if sub else p for p in keep], key=key, value=value,
                   announce=announce)
    return os.path.join(folder, sub) if sub else folder


def resolve_run_paths(config, *, announce: Announce = print, model: bool = True, rewards: bool = True):
    """A copy of a training config whose model references (model_path, reference_path, vae_path,
    lora.init_from, and eval.rewards' paths when the run evaluates) are local paths, fetching what the hub must
    supply first: the run reads no model from the network after this. ``model`` False leaves model_path (a
    pipeline was given); ``rewards`` False leaves eval.rewards (a run that will not evaluate)."""
    from jaxpref import config_lib
    from jaxpref import rewards as rewards_lib

    config = config.copy_and_resolve_references()
    components = tuple(c for c in SD_COMPONENTS if not (config.vae_path and c == "vae"))
    if model:
        config.model_path = resolve(config.model_path, key="config.model_path", components=components,
                                    announce=announce)
    if config.reference_path:
        config.reference_path = resolve(config.reference_path, key="config.reference_path", components=("unet",),
                                        announce=announce)
    if config.vae_path:
        config.vae_path = resolve(config.vae_path, key="config.vae_path", components=("vae",), announce=announce)
    if config.lora.enabled and config.lora.init_from:
        config.lora.init_from = resolve(config.lora.init_from, key="config.lora.init_from", components=None,
                                        announce=announce)
    if rewards and config.eval.rewards and config_lib.evaluates(config):
        config.eval.rewards = rewards_lib.resolve_reward_specs(config.eval.rewards, key="config.eval.rewards",
                                                           announce=announce)
    return config
