"""The papers' evaluation protocols (jaxpref.protocols, jaxpref.paper_eval): each preset is what its docstring
table documents, a flag given wins over the preset, the evaluate command writes the settings it used (read back
from its JSON), --compare checks the pairing, and the evaluation FLOP model against independent counts."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import flops, paper_eval, protocols, stats
from jaxpref.evaluate import image_seeds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _documented_rows() -> dict:
    """The preset table of jaxpref.protocols' docstring: {name: (sampler, steps, cfg, cfg_sdxl, images, sets,
    scorers)}."""
    lines = protocols.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["name", "sampler"])
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        name, sampler, cfg, images, sets, scorers = re.split(r"\s{2,}", line.strip())
        kind, steps = sampler.split()
        cfg15, cfgxl = (float(x) for x in cfg.split(" / "))
        rows[name] = (kind.lower(), int(steps), cfg15, cfgxl, int(images), tuple(sets.split(", ")),
                      tuple(scorers.split(", ")))
    return rows


def test_presets_are_what_the_docstring_documents():
    rows = _documented_rows()
    assert sorted(rows) == sorted(protocols.PROTOCOLS) == ["dpo", "dro", "kto", "mapo", "smpo"]
    for name, p in protocols.PROTOCOLS.items():
        assert rows[name] == (p.sampler, p.num_steps, p.guidance_scale, p.guidance_scale_sdxl,
                              p.num_images_per_prompt, p.prompt_sets, p.scorers), name
        assert (p.seed, p.resolution, p.num_prompts) == (0, 0, 0) and p.sources
        assert set(p.prompt_sets) <= set(protocols.PROMPT_SETS)
    # DRO's released inference.py: DDPM, 50 steps, CFG 7.5 (SDXL too), 5 images per prompt.
    assert protocols.get("dro").settings(is_sdxl=True) == {
        "sampler": "ddpm", "num_steps": 50, "guidance_scale": 7.5, "num_images_per_prompt": 5, "seed": 0,
        "resolution": 0, "num_prompts": 0}
    assert protocols.get("dpo").settings(is_sdxl=True)["guidance_scale"] == 5.0
    with pytest.raises(ValueError, match="dro"):
        protocols.get("paper")


def test_an_explicit_flag_wins_over_the_preset():
    fallback = {"sampler": "ddim", "num_steps": 25, "guidance_scale": 3.0, "num_images_per_prompt": 4, "seed": 9,
                "batch_size": 8, "model_path": "embedded:tiny", "num_prompts": 64}   # e.g. a --config's eval
    settings, sources = protocols.resolve(protocols.get("smpo"), {"num_steps": 10, "seed": 3}, fallback, is_sdxl=True)
    assert settings == {"sampler": "ddim", "num_steps": 10, "guidance_scale": 5.0, "num_images_per_prompt": 1,
                        "seed": 3, "resolution": 0, "num_prompts": 0, "batch_size": 8, "model_path": "embedded:tiny"}
    assert sources["num_steps"] == sources["seed"] == "flag" and sources["guidance_scale"] == "protocol"
    assert sources["batch_size"] == "default"
    # Prompt sets and scorers: as given, else a one-line error naming what the protocol needs.
    dro = protocols.get("dro")
    assert protocols.prompt_specs(dro, "shapes, txt:/p.txt") == ["shapes", "txt:/p.txt"]
    with pytest.raises(ValueError, match="--prompts=pickapic:PATH,hpdv2:PATH"):
        protocols.prompt_specs(dro, None)
    assert protocols.reward_spec(dro, "shapes") == "shapes"
    with pytest.raises(ValueError, match=r"hpsv2 \(.*aesthetic .*pickscore=yuvalkirstain/PickScore_v1,hpsv2=PATH"):
        protocols.reward_spec(dro, "")
    hub_only = protocols.Protocol("x", "", "ddim", 1, 1.0, 1.0, 1, ("parti",), ("pickscore", "imagereward"))
    assert protocols.reward_spec(hub_only, None) == "pickscore=yuvalkirstain/PickScore_v1,imagereward=THUDM/ImageReward"


def test_protocol_command_writes_the_settings_it_used(tmp_path):
    """--protocol=dro on the embedded model, its own UNet as the "tuned" checkpoint, with a tiny override of
    prompts, images and steps and an explicit guidance scale; read back from the JSON it wrote."""
    out = str(tmp_path / "dro")
    cmd = [sys.executable, "-m", "jaxpref.evaluate", "--protocol=dro", "--model_path=embedded:tiny",
           "--checkpoint=embedded:tiny", "--prompts=shapes", "--reward=shapes", "--num_prompts=2",
           "--num_images_per_prompt=2", "--num_steps=2", "--guidance_scale=3", "--batch_size=4", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "protocol.json")))
    s, src = report["settings"], report["setting_sources"]
    assert (s["sampler"], s["seed"], s["resolution"]) == ("ddpm", 0, 32)         # the preset; 32 px: native
    assert (src["sampler"], src["seed"], src["resolution"]) == ("protocol",) * 3
    assert (s["num_steps"], s["num_images_per_prompt"], s["num_prompts"], s["guidance_scale"]) == (2, 2, 2, 3.0)
    assert src["guidance_scale"] == src["num_steps"] == "flag"
    assert (s["prompts"], s["reward"], report["seed_rule"]) == (["shapes"], "shapes", protocols.SEED_RULE)
    # What generation actually used, as each evaluation folder recorded it.
    for model in ("base", "tuned"):
        used = json.load(open(os.path.join(out, "shapes_test_2", model, "metrics.json")))
        assert {k: used["settings"][k] for k in ("sampler", "num_steps", "guidance_scale", "seed", "height")} == {
            "sampler": "ddpm", "num_steps": 2, "guidance_scale": 3.0, "seed": 0, "height": 32}
        with np.load(os.path.join(out, "shapes_test_2", model, "scores.npz")) as data:
            np.testing.assert_array_equal(data["__seeds__"], image_seeds(2, 2, 0))
    entry = report["prompt_sets"]["shapes_test_2"]
    assert entry["base"]["shapes"]["n"] == entry["tuned"]["shapes"]["n"] == 4
    # The same UNet on the same seeds: every prompt ties.
    comp = entry["comparison"]["shapes"]
    assert (comp["win_rate"], comp["win_rate_ci"], comp["mean_diff"]) == (0.5, [0.5, 0.5], 0.0)
    assert os.path.isfile(entry["before_after"])
    table = open(os.path.join(out, "protocol.md")).read()
    assert "| scorer | base mean | base median | tuned mean | tuned median |" in table and "| shapes |" in table
    # --compare on the protocol's folder pairs each set's tuned with its base.
    results = paper_eval.run_compare(out, str(tmp_path / "cmp"))
    assert list(results) == ["shapes_test_2: tuned vs base"]
    assert json.load(open(tmp_path / "cmp" / "compare.json"))["shapes_test_2: tuned vs base"]["comparison"][
        "shapes"]["win_rate"] == 0.5


def _evaluation_folder(path, prompts, seeds, **scores):
    os.makedirs(path)
    np.savez(os.path.join(path, "scores.npz"), __seeds__=seeds, **scores)
    with open(os.path.join(path, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    return str(path)


def test_compare_needs_the_same_prompts_and_seeds(tmp_path):
    rng = np.random.default_rng(0)
    a_scores, b_scores = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    prompts, seeds = [f"p{i}" for i in range(6)], image_seeds(6, 2, 0)
    a = _evaluation_folder(tmp_path / "a", prompts, seeds, r=a_scores, only_a=a_scores)
    b = _evaluation_folder(tmp_path / "b", prompts, seeds, r=b_scores)
    got = paper_eval.run_compare(f"{a},{b}", str(tmp_path / "out"))[f"{a} vs {b}"]["comparison"]
    assert list(got) == ["r"] and got["r"] == stats.paired_comparison(a_scores, b_scores)
    assert "| r |" in open(tmp_path / "out" / "compare.md").read()
    c = _evaluation_folder(tmp_path / "c", prompts[::-1], seeds, r=b_scores)
    with pytest.raises(ValueError, match="differ at prompt 0"):
        paper_eval.compare_evaluations(a, c)
    d = _evaluation_folder(tmp_path / "d", prompts, seeds + 1, r=b_scores)
    with pytest.raises(ValueError, match="different seeds"):
        paper_eval.compare_evaluations(a, d)
    with pytest.raises(ValueError, match="RUN_A,RUN_B"):
        paper_eval.compare_pairs(str(tmp_path))
    # A training workdir: eval_trained against eval_base.
    os.rename(a, tmp_path / "eval_trained")
    os.rename(b, tmp_path / "eval_base")
    assert paper_eval.compare_pairs(str(tmp_path))[0][0] == "trained vs base"


def _transformer_flops(layers: int, width: int, mlp: int, tokens: int) -> float:
    """2 x multiply-adds of the projections, the MLP and the two attention products of a pre-LN encoder."""
    return layers * (2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width)


def test_evaluation_flop_model():
    # Scorer counts against the analytic transformer count (patch embedding and norms left out: < 2 %).
    vit_h = _transformer_flops(32, 1280, 5120, 257) + _transformer_flops(24, 1024, 4096, 77)
    vit_l = _transformer_flops(24, 1024, 4096, 257)
    assert flops.SCORER_FLOPS["pickscore"] == flops.SCORER_FLOPS["hpsv2"] == pytest.approx(vit_h, rel=0.02)
    assert flops.SCORER_FLOPS["aesthetic"] == pytest.approx(vit_l, rel=0.02)
    assert flops.SCORER_FLOPS["clipscore"] == pytest.approx(vit_l + _transformer_flops(12, 768, 3072, 77), rel=0.02)
    # The VAE decoder constant against XLA's count of our SD-sized decoder (lowered, not compiled).
    from jaxpref.models import vae as vae_lib
    vae = vae_lib.vae_from_config({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                                   "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512,
                                   "down_block_types": ["DownEncoderBlock2D"] * 4,
                                   "up_block_types": ["UpDecoderBlock2D"] * 4})
    lowered = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode")).lower(
        vae_lib.param_shapes(vae), jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32))
    assert flops.SD_VAE_DECODE_FLOPS == pytest.approx(lowered.cost_analysis()["flops"], rel=0.01)
    # The full DRO protocol on Pick-a-Pic (500 prompts x 5 images), by hand: 50 DDPM steps x 2 (CFG) UNet
    # forwards + one decode + five scorers per image, its CLIP score on ViT-H/14 as PickScore and HPSv2;
    # docs/evaluation.md quotes it.
    dro = protocols.get("dro")
    assert "ViT-H-14" in dro.scorer_versions["clipscore"]
    per_image = 50 * 2 * 0.80e12 + 2.50e12 + (0.385 + 0.385 + 0.162 + 0.385 + 0.139) * 1e12
    total = flops.evaluation_flops(2500, dro.num_steps, dro.guidance_scale, dro.scorers,
                                   scorer_flops={"clipscore": flops.CLIP_VIT_H_FLOPS})
    assert total == pytest.approx(2500 * per_image) and per_image == pytest.approx(83.956e12)
    minutes = total / (0.30 * flops.peak_flops("NVIDIA H100 80GB HBM3")) / 60
    doc = open(os.path.join(REPO, "docs", "evaluation.md")).read()
    assert "84.0 TFLOP" in doc and f"{minutes:.1f} min" in doc and math.isclose(minutes, 11.79, rel_tol=0.01)
    with pytest.raises(ValueError, match="no FLOP count"):
        flops.evaluation_flops(1, 1, 1.0, ["unknown"])
