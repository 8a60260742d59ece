"""ImageReward in JAX against the ``image-reward`` package's PyTorch model on the same random weights.

The package (``pip install image-reward==1.5 timm==0.6.13 --no-deps``; skipped without it) is imported
module by module (its ``__init__`` pulls in the ReFL training code the score never touches), on a
reduced BLIP: a 2-block ViT of width 128 at 32 px and a 2-layer BERT of width 32 from a small
``med_config.json``, with its own ``MLP`` class at that width. Two things are patched at import, in
the test only: torchvision is replaced by recording stand-ins when it cannot load (this machine's
wheel is a CUDA build; the package names its transforms at import, and the stand-ins let the test
read the arguments of ImageReward's ``_transform``), and the few transformers-4 helpers the package's
``med.py`` imports or calls are supplied when transformers 5 no longer has them (see ``_patch_med``).
fairscale, which ``vit.py`` imports for gradient checkpointing only, is stood in for when absent (its
sdist installs a top-level ``benchmarks`` package that would shadow this repository's).
"""
import collections
import functools
import importlib.util
import json
import os
import sys
import types
import warnings

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from jaxpref.rewards import imagereward, load_scorer, load_scorers, state_dicts, torch_archive
from jaxpref.rewards import preprocess as pp
from tiny_sd import randomize_

VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "the", "dog", "red", "##s", "on",
         "mat", "photo", "of", "blue", "sky", ".", ","]
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
              "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": len(VOCAB) + 2, "encoder_width": 768, "add_cross_attention": True}
VIT = dict(img_size=32, patch_size=16, embed_dim=128, depth=2, num_heads=2)  # 64-wide heads, as BLIP's ViTs
PROMPTS = ["a red cat on the mat.", "Dogs, cats", "photo of a blue sky " * 8, "the"]
RTOL = 1e-4


def _images(seed, n=4, side=48):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _close(got, ref, rtol=RTOL):
    """Elementwise within rtol of the reference's largest magnitude (entries near zero included)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return got.shape == ref.shape and np.all(np.abs(got - ref) <= rtol * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# Importing the package's modules.

class _Recorded:
    """A torchvision transform stand-in that keeps its arguments."""
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _RecordingMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _RecordingMeta(name, (_Recorded,), {})


class _RecordingModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _RecordingMeta(name, (_Recorded,), {})


_TORCHVISION = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.datasets",
                "torchvision.io", "torchvision.models", "torchvision.models.feature_extraction")


def _stub_torchvision(mp: pytest.MonkeyPatch) -> None:
    for name in _TORCHVISION:
        mp.setitem(sys.modules, name, _RecordingModule(name))
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])


def _stub_fairscale(mp: pytest.MonkeyPatch) -> None:
    def checkpoint_wrapper(module, *args, **kwargs):
        raise AssertionError("gradient checkpointing is not used by an ImageReward forward pass")

    names = ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations")
    for name in names:
        mp.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].checkpoint_wrapper = checkpoint_wrapper


def _patch_med(mp: pytest.MonkeyPatch) -> None:
    """transformers 5 moved ``apply_chunking_to_forward``/``prune_linear_layer`` to ``pytorch_utils`` and
    dropped ``find_pruneable_heads_and_indices`` (only head pruning uses it), ``get_head_mask`` and
    ``invert_attention_mask``; and its ``init_weights`` needs ``post_init``, which ``med.py`` never calls.
    Supplied here as transformers 4 defined them."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            mp.setattr(mu, name, getattr(pu, name), raising=False)
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        mp.setattr(mu, "find_pruneable_heads_and_indices", None, raising=False)


def _patch_bert_model(med) -> None:
    if hasattr(med.BertModel, "invert_attention_mask"):
        return

    def invert_attention_mask(self, mask):
        ext = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]).to(self.dtype)
        return (1.0 - ext) * torch.finfo(self.dtype).min

    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = lambda self, head_mask, num_layers: [None] * num_layers
    med.BertPreTrainedModel.init_weights = lambda self: self.apply(self._init_weights)


def _import_image_reward() -> types.SimpleNamespace:
    missing = [m for m in ("ImageReward", "timm") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{missing} not installed: pip install image-reward==1.5 timm==0.6.13 --no-deps")
    import transformers

    root = importlib.util.find_spec("ImageReward").submodule_search_locations[0]
    verbosity = transformers.logging.get_verbosity()
    try:
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
            try:
                import torchvision.transforms  # noqa: F401
            except (ImportError, RuntimeError, OSError):
                for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                    mp.delitem(sys.modules, name)
                _stub_torchvision(mp)
            _patch_med(mp)
            if importlib.util.find_spec("fairscale") is None:
                _stub_fairscale(mp)
            for package, path in (("ImageReward", root), ("ImageReward.models", os.path.join(root, "models"))):
                module = types.ModuleType(package)
                module.__path__ = [path]  # the package without its __init__ (ReFL, diffusers, datasets)
                mp.setitem(sys.modules, package, module)
            import ImageReward.ImageReward as ir
            import ImageReward.models.BLIP.blip_pretrain as bp
            import ImageReward.models.BLIP.med as med
            import ImageReward.models.BLIP.vit as vit
        _patch_bert_model(med)
        return types.SimpleNamespace(ir=ir, bp=bp, med=med, vit=vit)
    except Exception as e:  # noqa: BLE001 - any import failure of the oracle is a skip with its reason
        pytest.skip(f"image-reward's modules do not import here: {type(e).__name__}: {e}")
    finally:
        transformers.logging.set_verbosity(verbosity)
        for name in [m for m in sys.modules if m.split(".")[0] in ("ImageReward", "timm")]:
            del sys.modules[name]  # modules built over stand-ins stay private to this test


# ---------------------------------------------------------------------------------------------
# Fixtures: the reference model and its files.

def _write_folder(folder: str) -> None:
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(MED_CONFIG, f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(folder with ImageReward.pt + med_config.json + vocab.txt, the package's ImageReward, its modules)."""
    pkg = _import_image_reward()
    folder = str(tmp_path_factory.mktemp("imagereward"))
    _write_folder(folder)
    tokenizer = imagereward.load_bert_tokenizer(folder)  # what BLIP's init_tokenizer builds from bert-base-uncased
    reduced_vit = lambda vit, image_size, *args: (pkg.vit.VisionTransformer(**VIT), VIT["embed_dim"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pkg.bp, "create_vit", reduced_vit)
        mp.setattr(pkg.bp, "init_tokenizer", lambda: tokenizer)
        torch.manual_seed(0)
        model = pkg.ir.ImageReward(med_config=os.path.join(folder, "med_config.json"))
    model.mlp = pkg.ir.MLP(MED_CONFIG["hidden_size"])
    randomize_(model, seed=5)
    torch.save(model.state_dict(), os.path.join(folder, "ImageReward.pt"))
    return folder, model, pkg


@pytest.fixture(scope="module")
def ours(reference):
    return imagereward.load_imagereward(reference[0])


def _torch_image_tokens(model, pixels):
    with torch.no_grad():
        return model.blip.visual_encoder(torch.from_numpy(pixels).permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Parity.

def test_preprocess_is_imagereward_transform(reference):
    """ImageReward's _transform(224) arguments, and torchvision's PIL Resize + CenterCrop transcribed."""
    _, _, pkg = reference
    transform = pkg.ir._transform(224)
    if not isinstance(transform, _Recorded):
        pytest.skip("torchvision is real here; the transform's arguments are not recorded")
    steps = transform.args[0]
    names = [type(s).__name__ for s in steps if isinstance(s, _Recorded)]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    p = imagereward.imagereward_preprocess()
    assert steps[0].args == (p.size,) and steps[0].kwargs["interpolation"].__name__ == "BICUBIC" and p.resample == 3
    assert steps[1].args == (p.crop,) and p.crop_rounding == "round"
    assert steps[4].args == (p.mean, p.std)
    rng = np.random.default_rng(0)
    for h, w in ((300, 250), (250, 301), (224, 224)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        scale = 224 / min(h, w)
        new_w, new_h = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
        assert abs(new_w - w * scale) < 1 and abs(new_h - h * scale) < 1
        resized = Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
        ref = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float64) / 255.0
        ref = (ref - np.asarray(steps[4].args[0])) / np.asarray(steps[4].args[1])
        np.testing.assert_allclose(pp.preprocess(img[None], p)[0], ref, atol=1e-5)


def _towers(module, params, pixels, ids, mask, image_tokens):
    """Our image tokens of ``pixels``, and our text features of ``ids`` attending to the given ``image_tokens``."""
    apply = functools.partial(module.apply, {"params": params})
    return (apply(pixels, method=imagereward.ImageRewardModel.image_tokens),
            apply(ids, mask, image_tokens, method=imagereward.ImageRewardModel.text_features))


def test_image_and_text_towers_match_blip(reference, ours):
    """The ViT's tokens; then the same (torch) image tokens into both BERTs: cross-attention, token 0 out."""
    _, model, _ = reference
    pixels = ours.pixels(_images(1))
    image_tokens = _torch_image_tokens(model, pixels)
    ids, mask = ours.tokenize(PROMPTS)
    assert ids.shape == (4, imagereward.MAX_TEXT_LENGTH) and mask[2].all() and not mask[3].all()
    with torch.no_grad():
        out = model.blip.text_encoder(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                                      encoder_hidden_states=image_tokens,
                                      encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long),
                                      return_dict=True)
    got_image, got_text = jax.jit(functools.partial(_towers, ours.module))(ours.params, pixels, ids, mask,
                                                                           image_tokens.numpy())
    ref_image, ref_text = image_tokens.numpy(), out.last_hidden_state[:, 0].numpy()
    assert ref_image.shape == (4, 5, VIT["embed_dim"]) and ref_text.shape == (4, MED_CONFIG["hidden_size"])
    assert _close(got_image, ref_image), np.abs(np.asarray(got_image) - ref_image).max()
    assert _close(got_text, ref_text), np.abs(np.asarray(got_text) - ref_text).max()


def _reference_scores(model, pixels, prompts):
    """ImageReward.score's path per pair: its tokenizer call, then score_gard (tower, MLP, mean/std)."""
    out = []
    with torch.no_grad():
        for pix, prompt in zip(pixels, prompts):
            text = model.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35,
                                        return_tensors="pt")
            image = torch.from_numpy(pix[None]).permute(0, 3, 1, 2)
            out.append(model.score_gard(text.input_ids, text.attention_mask, image).item())
    return np.asarray(out)


def test_scores_match_image_reward(reference, ours):
    folder, model, _ = reference
    images = _images(3)
    ref = _reference_scores(model, ours.pixels(images), PROMPTS)
    assert (imagereward.MEAN, imagereward.STD) == (model.mean, model.std)
    # eval.rewards / --reward: imagereward=PATH (the folder, or its weights file); two chunks, the last padded
    got = load_scorers(f"imagereward={os.path.join(folder, 'ImageReward.pt')}", batch_size=3)["imagereward"](
        images, PROMPTS)
    assert got.shape == (4,) and np.ptp(ref) > 10 * RTOL * np.abs(ref).max()
    assert _close(got, ref), (got, ref)


def test_parity_fails_when_a_layer_or_the_normalisation_changes(reference, ours):
    _, model, _ = reference
    images = _images(4)
    ref = _reference_scores(model, ours.pixels(images), PROMPTS)
    assert _close(imagereward.imagereward_scorer(ours, batch_size=3)(images, PROMPTS), ref)
    layer = ours.params["blip"]["text_encoder"]["encoder"]["layer_1"]["crossattention"]["self"]["key"]
    noise = 0.05 * np.random.default_rng(0).standard_normal(layer["kernel"].shape)
    perturbed = {**layer, "kernel": layer["kernel"] + noise.astype(np.float32)}
    params = _replace(ours.params, ("blip", "text_encoder", "encoder", "layer_1", "crossattention", "self", "key"),
                      perturbed)
    broken = imagereward.ImageRewardBackbone(ours.module, params, ours.tokenizer, ours.preprocess, "perturbed")
    assert not _close(imagereward.imagereward_scorer(broken, batch_size=3)(images, PROMPTS), ref)
    shifted = _reference_scores(model, ours.pixels(images), PROMPTS) * model.std / (model.std * 1.001)
    assert not _close(shifted, ref)  # a 0.1 % change of the std is outside the tolerance


def _replace(tree, path, value):
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


# ---------------------------------------------------------------------------------------------
# Files.

def test_torch_archive_reads_what_torch_load_reads(tmp_path):
    base = torch.randn(12)
    sd = collections.OrderedDict(w=torch.randn(3, 4), t=torch.randn(4, 3).t(), view=base[2:7], full=base,
                                 i=torch.arange(6).view(2, 3), h=torch.randn(5).half(), b=torch.randn(5).bfloat16(),
                                 p=torch.nn.Parameter(torch.ones(2)), empty=torch.zeros(0, 3))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "m.pt")
    got = torch_archive.load(str(tmp_path / "m.pt"))
    assert got["epoch"] == 3 and list(got["state_dict"]) == list(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(np.asarray(got["state_dict"][key], np.float64), value.detach().double().numpy())
    flat = state_dicts.read_state_dict(str(tmp_path / "m.pt"))
    assert flat["h"].dtype == np.float32 and flat["b"].dtype == np.float32 and flat["i"].dtype == np.int64


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pickled code ran",))


def test_torch_archive_refuses_code(tmp_path):
    torch.save({"w": torch.ones(1), "x": _RunsCode()}, tmp_path / "bad.pt")
    with pytest.raises(torch_archive.UnsupportedArchive, match="system"):
        torch_archive.load(str(tmp_path / "bad.pt"))
    (tmp_path / "plain.pt").write_bytes(b"not a zip")
    assert not torch_archive.is_torch_zip(str(tmp_path / "plain.pt"))


def test_bad_folders_fail_naming_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a folder without vocab.txt looks in the (empty) cache only
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(ValueError, match="med_config.json"):
        load_scorer("imagereward", str(tmp_path))
    _write_folder(str(tmp_path))
    with pytest.raises(ValueError, match="ImageReward.pt"):
        load_scorer("imagereward", str(tmp_path))
    state_dicts.save_numpy_state_dict(str(tmp_path / "ImageReward.npz"), {"weight": np.zeros((1, 768), np.float32)})
    with pytest.raises(ValueError, match="blip.visual_encoder.pos_embed"):
        load_scorer("imagereward", str(tmp_path))
    with open(tmp_path / "med_config.json", "w") as f:
        json.dump({**MED_CONFIG, "position_embedding_type": "relative_key"}, f)
    with pytest.raises(ValueError, match="position_embedding_type"):
        load_scorer("imagereward", str(tmp_path))
    os.remove(tmp_path / "vocab.txt")
    with open(tmp_path / "med_config.json", "w") as f:
        json.dump(MED_CONFIG, f)
    with pytest.raises(ValueError, match="vocab.txt"):
        load_scorer("imagereward", str(tmp_path))


def test_hub_id_fetches_the_published_files():
    """THUDM/ImageReward holds only ImageReward.pt and med_config.json of use: both are fetched, nothing else."""
    from jaxpref import hub
    from jaxpref.rewards import HUB_PICKLES

    published = [".gitattributes", "ImageReward.pt", "README.md", "med_config.json"]
    assert hub.select_files(published, None, HUB_PICKLES["imagereward"]) == ["ImageReward.pt", "med_config.json"]
