"""Reward models: each JAX scorer against its PyTorch reference on tiny random weights.

PickScore / CLIP score: transformers' CLIPModel + CLIPImageProcessor (PIL backend) + CLIPTokenizer.
HPSv2: open_clip's own CLIP with a tiny custom config (skipped if open_clip_torch is not installed).
Aesthetic: the head against a float64 numpy formula on transformers' image features.
"""
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from jaxpref.rewards import (REWARDS, Scorer, load_scorer, load_scorers, parse_reward_specs,
                             preprocess as pp)
from jaxpref.rewards import openclip, state_dicts
from tiny_sd import randomize_, tiny_text_config, tiny_tokenizer

IMAGE_SIZE = 32
PROMPTS = ["the cat", "a cat", "the", "cat cat the cat"]


def _images(seed, n=4, shapes=((40, 56), (57, 33), (32, 32), (64, 64))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


def _square_batch(seed, n=4, side=48):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _hf_clip(seed, hidden_act="quick_gelu"):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=8, hidden_act=hidden_act)
    text = tiny_text_config(hidden_act=hidden_act)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)
    return randomize_(CLIPModel(config), seed)


def _processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny HF CLIPModel folder with tokenizer and preprocessor config; returns (folder, torch model)."""
    folder = str(tmp_path_factory.mktemp("clip"))
    model = _hf_clip(seed=3)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(folder)
    _processor().save_pretrained(folder)
    return folder, model


def _torch_features(model, folder, images, prompts=None):
    """Unit image (and text) embeddings as the PickScore reference computes them (float64 numpy)."""
    from transformers import CLIPTokenizer

    pix = _processor()(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=pix)
        ie = getattr(ie, "pooler_output", ie).double().numpy()
        te = None
        if prompts is not None:
            tok = CLIPTokenizer.from_pretrained(folder)
            t = tok(prompts, padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
                    return_tensors="pt")
            te = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
            te = getattr(te, "pooler_output", te).double().numpy()
            te /= np.linalg.norm(te, axis=-1, keepdims=True)
    return ie / np.linalg.norm(ie, axis=-1, keepdims=True), te


# ---------------------------------------------------------------------------------------------
# Preprocessing.

def test_preprocess_matches_clip_image_processor():
    p = pp.from_preprocessor_config(_processor().to_dict(), IMAGE_SIZE)
    images = _images(0, n=4)
    ref = _processor()(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.stack([pp.preprocess_one(im, p) for im in images])
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_pad_mode_is_open_clip_resize_max_size():
    """ResizeMaxSize: longest side to S, centered black padding; square images: a plain resize."""
    from PIL import Image

    p = pp.Preprocess(size=IMAGE_SIZE, crop=IMAGE_SIZE, mode="pad")
    img = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    out = pp.preprocess_one(img, p)
    black = -np.asarray(pp.OPENAI_CLIP_MEAN, np.float32) / np.asarray(pp.OPENAI_CLIP_STD, np.float32)
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(out[:8], np.broadcast_to(black, (8, IMAGE_SIZE, 3)), atol=1e-6)
    np.testing.assert_allclose(out[24:], np.broadcast_to(black, (8, IMAGE_SIZE, 3)), atol=1e-6)
    resized = np.asarray(Image.fromarray(img).resize((32, 16), resample=3), np.float32) / 255.0
    np.testing.assert_allclose(out[8:24], (resized - pp.OPENAI_CLIP_MEAN) / np.asarray(pp.OPENAI_CLIP_STD), atol=1e-5)
    square = _square_batch(2, n=1)[0]
    crop = pp.Preprocess(size=IMAGE_SIZE, crop=IMAGE_SIZE)
    np.testing.assert_array_equal(pp.preprocess_one(square, p), pp.preprocess_one(square, crop))


def test_preprocess_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        pp.preprocess(np.zeros((2, 8, 8, 3), np.float32), pp.Preprocess())
    with pytest.raises(ValueError, match="crop_size"):
        pp.from_preprocessor_config({"crop_size": {"height": 10, "width": 20}})


# ---------------------------------------------------------------------------------------------
# PickScore and CLIP score against transformers.

def test_pickscore_matches_transformers(clip_folder):
    folder, model = clip_folder
    scorer = load_scorer("pickscore", folder, batch_size=3)
    images = _square_batch(4, n=len(PROMPTS), side=48)
    ie, te = _torch_features(model, folder, images, PROMPTS)
    ref = model.logit_scale.exp().item() * np.sum(ie * te, axis=-1)
    got = scorer(images, PROMPTS)
    assert got.shape == (len(PROMPTS),) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)  # measured max |diff| ~1e-6 on scores ~ O(1)


def test_clipscore_is_torchmetrics_formula(clip_folder):
    folder, model = clip_folder
    images = _square_batch(5, n=len(PROMPTS), side=40)
    ie, te = _torch_features(model, folder, images, PROMPTS)
    cos = np.sum(ie * te, axis=-1)
    got = load_scorer("clipscore", folder)(images, PROMPTS)
    np.testing.assert_allclose(got, 100.0 * np.maximum(cos, 0.0), atol=2e-4)


def test_scorer_batches_and_pads_without_changing_scores():
    calls = []

    def fn(images, prompts):
        calls.append(len(images))
        return images.reshape(len(images), -1).mean(axis=1) + np.asarray([len(p) for p in prompts])

    images = _square_batch(6, n=7, side=8)
    prompts = [f"p{i}" * (i + 1) for i in range(7)]
    whole = Scorer("t", fn, batch_size=16, pad_batches=False)(images, prompts)
    chunked = Scorer("t", fn, batch_size=3)(images, prompts)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    assert calls[1:] == [3, 3, 3]  # the last chunk of 1 was padded to 3
    with pytest.raises(ValueError, match="prompts"):
        Scorer("t", fn)(images, prompts[:3])
    with pytest.raises(ValueError, match="uint8"):
        Scorer("t", fn)(images.astype(np.float32), prompts)


# ---------------------------------------------------------------------------------------------
# LAION aesthetic.

@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_aesthetic_head_matches_float64_formula(clip_folder, tmp_path, suffix):
    folder, model = clip_folder
    os.symlink(folder, tmp_path / "clip")
    rng = np.random.default_rng(7)
    weight, bias = rng.normal(size=(1, 8)).astype(np.float32), rng.normal(size=(1,)).astype(np.float32)
    head = str(tmp_path / f"sa_0_4_vit_l_14_linear{suffix}")
    if suffix == ".pth":
        torch.save({"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}, head)
    else:
        state_dicts.save_numpy_state_dict(head, {"weight": weight, "bias": bias})
    images = _square_batch(8, n=3, side=IMAGE_SIZE * 2)
    ie, _ = _torch_features(model, folder, images)
    ref = ie @ weight[0].astype(np.float64) + float(bias[0])
    got = load_scorer("aesthetic", str(tmp_path))(images, ["unused"] * 3)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_aesthetic_rejects_other_heads(clip_folder, tmp_path):
    folder, _ = clip_folder
    os.symlink(folder, tmp_path / "clip")
    state_dicts.save_numpy_state_dict(str(tmp_path / "aesthetic_head.npz"),
                                      {"layers.0.weight": np.zeros((1024, 768), np.float32)})
    with pytest.raises(ValueError, match="linear aesthetic head"):
        load_scorer("aesthetic", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# HPSv2 (open_clip layout) against open_clip itself.

_TORCHVISION = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                "torchvision.transforms.functional", "torchvision.transforms.v2")


def _stub_torchvision() -> list:
    """Import-time stand-ins for torchvision (only its image transforms and FrozenBatchNorm2d are named by
    open_clip at import; the model forward passes compared here never touch them)."""
    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Meta(name, (), {"__init__": lambda self, *a, **k: None})

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Meta(name, (), {"__init__": lambda self, *a, **k: None})

    added = []
    for name in _TORCHVISION:
        sys.modules[name] = _Module(name)
        added.append(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    return added


def _import_open_clip():
    """open_clip, or a skip with the reason. This machine's torchvision wheel is a CUDA build that cannot
    load against CPU torch (and no CPU wheel is reachable offline), so when torchvision is unusable the
    import runs over stand-ins that are removed again right after."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (pip install open_clip_torch --no-deps; ftfy)")
    try:
        import open_clip
        return open_clip
    except (ImportError, RuntimeError, OSError) as e:
        if "torchvision" not in str(e) and "nms" not in str(e):
            pytest.skip(f"open_clip does not import here: {e}")
    import transformers  # noqa: F401  (decides torchvision availability before the stand-ins exist)

    for name in [m for m in sys.modules if m.split(".")[0] in ("open_clip", "torchvision")]:
        del sys.modules[name]
    added = _stub_torchvision()
    try:
        import open_clip
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"open_clip does not import even with torchvision stand-ins: {e}")
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return open_clip


TINY_OPENCLIP = {"embed_dim": 8,
                 "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
                 "text_cfg": {"context_length": 12, "vocab_size": 58, "width": 16, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def hps_folder(tmp_path_factory):
    """A tiny open_clip CLIP saved as HPSv2 saves it ({'state_dict': ...} in a .pt) + config + tokenizer."""
    open_clip = _import_open_clip()
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=8, vision_cfg=CLIPVisionCfg(**TINY_OPENCLIP["vision_cfg"]),
                 text_cfg=CLIPTextCfg(**TINY_OPENCLIP["text_cfg"]), quick_gelu=False)
    randomize_(model, seed=11)
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, folder / "HPS_v2_compressed.pt")
    with open(folder / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": TINY_OPENCLIP, "preprocess_cfg": {}}, f)
    tiny_tokenizer(str(folder))
    assert open_clip is not None
    return str(folder), model


def test_hpsv2_matches_open_clip(hps_folder):
    folder, model = hps_folder
    from jaxpref.rewards.openclip import load_hpsv2

    backbone = load_hpsv2(folder)
    assert backbone.module.vision_config.hidden_act == "gelu"
    images = _square_batch(9, n=len(PROMPTS), side=IMAGE_SIZE * 2)
    pixels = backbone.pixels(images)
    ids = backbone.tokenize(PROMPTS)
    with torch.no_grad():  # same pixels and ids into both: this compares the towers and the key mapping
        ie = model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2), normalize=True)
        te = model.encode_text(torch.from_numpy(ids.astype(np.int64)), normalize=True)
    ref = 100.0 * (ie * te).sum(-1).double().numpy()
    got = load_scorer("hpsv2", folder)(images, PROMPTS)
    np.testing.assert_allclose(got, ref, atol=2e-4)


def test_openclip_mapping_names_every_tensor():
    sd = {"visual.transformer.resblocks.0.attn.in_proj_weight": np.arange(12.0).reshape(6, 2),
          "visual.proj": np.ones((4, 3)), "text_projection": np.ones((4, 3)), "logit_scale": np.array(1.0),
          "transformer.resblocks.3.mlp.c_fc.bias": np.zeros(8), "attn_mask": np.zeros((2, 2))}
    out = openclip.openclip_to_hf(sd)
    np.testing.assert_array_equal(out["vision_model.encoder.layers.0.self_attn.k_proj.weight"], [[4, 5], [6, 7]])
    assert out["visual_projection.weight"].shape == (3, 4) and "text_model.encoder.layers.3.mlp.fc1.bias" in out
    with pytest.raises(ValueError, match="different architecture"):
        openclip.openclip_to_hf({**sd, "visual.attn_pool.query": np.zeros(3)})
    with pytest.raises(ValueError, match="ls_init_value"):
        openclip.hf_config_from_openclip({"embed_dim": 8, "vision_cfg": {"ls_init_value": 1e-5}})


# ---------------------------------------------------------------------------------------------
# Shapes, registry, bad inputs.

def test_shapes_scorer_is_the_world_reward():
    from jaxpref.world import shapes

    captions = shapes.heldout_prompts("test")[:3]
    rng = np.random.default_rng(0)
    images = np.stack([shapes.render(c, rng) for c in captions])
    np.testing.assert_array_equal(load_scorer("shapes")(images, captions), shapes.reward_batch(images, captions))


def test_bad_paths_fail_at_start_with_the_path(tmp_path, clip_folder):
    missing = str(tmp_path / "nope")
    for name in ("pickscore", "clipscore", "hpsv2", "aesthetic"):
        with pytest.raises(ValueError, match="nope"):
            load_scorer(name, missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_scorer("pickscore", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="HPS_v2_compressed.pt"):
        load_scorer("hpsv2", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="supported"):
        load_scorer("fid", None)
    with pytest.raises(ValueError, match="med_config.json"):
        load_scorer("imagereward", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs a model, as pickscore=/path/to/folder or pickscore=org/name"):
        parse_reward_specs("shapes,pickscore")
    assert parse_reward_specs("pickscore=/a/b, shapes") == [("pickscore", "/a/b"), ("shapes", None)]
    assert set(load_scorers("shapes")) == {"shapes"} and "imagereward" in REWARDS
