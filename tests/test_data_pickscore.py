"""The data builders' pickscore_fn (our Flax CLIP) on a tiny random CLIPModel folder against transformers on the
same folder (the real PickScore checkpoint is a user download)."""
import numpy as np
import pytest

from jaxpref.world import shapes


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from jaxpref.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


def test_pickscore_fn_scores_a_batch(clip_folder):
    from jaxpref.data import get_scorer, pickscore_fn

    caps = shapes.all_captions()[:5]
    rng = np.random.default_rng(0)
    images = np.stack([shapes.render(c, rng) for c in caps])
    cos = pickscore_fn(clip_folder, batch_size=2)(images, caps)
    assert cos.shape == (5,) and cos.dtype == np.float32
    want, scale = _transformers_cosine(clip_folder, images, caps)
    np.testing.assert_allclose(cos, want, atol=1e-5)
    np.testing.assert_allclose(get_scorer(f"pickscore_scaled:{clip_folder}")(images, caps), scale * want, atol=1e-3)


def _transformers_cosine(folder, images, captions):
    """The oracle: transformers' CLIPModel and CLIPProcessor on the folder, in torch (cos [B], exp(logit_scale))."""
    import torch
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        pix = processor(images=list(images), return_tensors="pt")["pixel_values"]
        txt = processor(text=list(captions), padding=True, truncation=True, max_length=77, return_tensors="pt")
        ie = model.get_image_features(pixel_values=pix)
        te = model.get_text_features(input_ids=txt["input_ids"], attention_mask=txt["attention_mask"])
        ie, te = getattr(ie, "pooler_output", ie), getattr(te, "pooler_output", te)
        cos = torch.nn.functional.cosine_similarity(ie, te, dim=-1)
    return cos.numpy(), model.logit_scale.exp().item()


def test_scorer_from_a_hub_id_scores_as_the_folder(clip_folder, tmp_path, monkeypatch):
    """The scores and experts builders' --scorer pickscore:org/name: the CLIP read from the Hugging Face cache (built
    here, offline; with a pickled copy of the weights beside the safetensors, as hub repos have, never read)."""
    import hub_cache
    from jaxpref.data import get_scorer, pickscore_fn

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    hub_cache.add_repo(tmp_path / "hf_home", "someorg/PickScore_tiny", {"": clip_folder,
                                                                        "pytorch_model.bin": b"not read"})
    caps = shapes.all_captions()[:3]
    rng = np.random.default_rng(1)
    images = np.stack([shapes.render(c, rng) for c in caps])
    np.testing.assert_allclose(get_scorer("pickscore:someorg/PickScore_tiny")(images, caps),
                               pickscore_fn(clip_folder)(images, caps), rtol=1e-6)
    with pytest.raises(ValueError, match="someorg/missing.*HF_HUB_OFFLINE=0"):
        get_scorer("pickscore:someorg/missing")
