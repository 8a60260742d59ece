"""The data layer: datasets (TFDS array_record, no TensorFlow), derived caches, and grain loaders.

Public API (names resolve lazily; importing jaxpref.data imports neither TFDS nor grain):

Sources
    open_source(name, split="train", data_dir=None, *, scores=None) -> Source
        name: "shapes" (= "shapes/pairs"), "shapes/base", "pickapic_v2[/<config>]", or the folder of a
        latent cache / experts set. The shapes world builds itself into data_dir on first use (10-25 s on 2 cores).
    load_prompts(name="shapes", split="test_unique", data_dir=None) -> list[str]
        held-out evaluation prompts (shapes: captions never seen in train).
    prepare_shapes(data_dir, kind="pairs", **settings), build_pickapic(source, data_dir, **config)

Loaders (grain; deterministic given seed; state in the training checkpoint; per-host sharded)
    make_loader(source, global_batch_size, *, seed=0, sharding=None, order="label", require_rewards=False,
                resolution=None, crop="center", random_flip=True, tokenizer=None, ...)
        -> Loader: next(loader) -> dict batch; loader.get_state() -> bytes; loader.set_state(bytes)

    DPO pairs:   make_loader(open_source("shapes", "train", d), 64, sharding=s)
                 -> images uint8 [B,2,H,W,3] (winner first), input_ids int32 [B,L], label [B], rewards [B,2]
    SmPO pairs:  make_loader(open_source("pickapic_v2", "train", d, scores=scores_dir), 64, order="reward",
                             require_rewards=True)  -> + rewards_norm [B,2] = (r - min) / (max - min)
                 (shapes carries its analytic rewards already: open_source("shapes", "train", d))
    DRO experts: make_loader(open_source(experts_dir), 4)  -> images [B,H,W,3], input_ids, reward [B]
    Latents:     make_loader(open_source(cache_dir), 64)   -> latent_mean / latent_std instead of images

Derived datasets (each also a command: python -m jaxpref.data.<cache|scores|experts|pickapic> --help;
resumable shard by shard)
    build_latent_cache(dataset, out_dir, encode_fn, ...), vae_encode_fn(vae_folder)
    build_scores(dataset, out_dir, score_fn, ...), pickscore_fn(clip_folder), get_scorer("shapes" | ...)
    build_experts(dataset, out_dir, score_fn, k=500, ...)

The shapes world (module jaxpref.world.shapes)
    shapes.reward_batch(images [B,H,W,3], captions) -> [B] in [0,1]; shapes.reward(image, caption)
    shapes.render(caption, rng, size=32, flaws=()), shapes.all_captions(), shapes.heldout_prompts()

Tokenizer
    load_tokenizer(path=None) -> transformers.CLIPTokenizer (default: jaxpref/assets/shapes_tokenizer)
    tokenize(tokenizer, captions, max_length=None) -> int32 [B, L]
"""
import importlib

_EXPORTS = {
    "open_source": "sources", "load_prompts": "sources", "Source": "sources",
    "prepare_shapes": "jaxpref.world.builder", "shapes_config": "jaxpref.world.builder",
    "build_pickapic": "pickapic", "pickapic_config": "pickapic",
    "make_loader": "loader", "Loader": "loader",
    "build_latent_cache": "cache", "vae_encode_fn": "cache",
    "build_scores": "scores", "pickscore_fn": "scores", "get_scorer": "scores",
    "build_experts": "experts",
    "load_tokenizer": "tokenizer", "tokenize": "tokenizer", "SHAPES_TOKENIZER_DIR": "tokenizer",
    "BuildReport": "common",
}
_MODULES = ("sources", "loader", "cache", "scores", "experts", "pickapic", "tokenizer", "records", "common")
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f"jaxpref.data.{module}"), name)
    if name in _MODULES:
        return importlib.import_module(f"jaxpref.data.{name}")
    raise AttributeError(f"module 'jaxpref.data' has no attribute {name!r}")
