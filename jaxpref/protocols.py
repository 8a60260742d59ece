"""The papers' evaluation protocols as presets: ``python -m jaxpref.evaluate --protocol=NAME`` (docs/evaluation.md).

A preset fixes what a paper's table depends on: sampler, steps, guidance scale (SD1.5 / SDXL), images per
prompt, seed and seed rule, resolution, prompt sets and scorers. Any one of them given as a flag wins over
the preset (``resolve``); the written protocol.json records each setting's value and where it came from.

  name  sampler  CFG SD1.5/SDXL  images  prompt sets             scorers
  dro   DDPM 50  7.5 / 7.5       5       pickapic, hpdv2         pickscore, hpsv2, aesthetic, clipscore, imagereward
  smpo  DDIM 50  7.5 / 5.0       1       hpdv2, parti, pickapic  pickscore, hpsv2, imagereward, aesthetic, clipscore
  dpo   DDIM 50  7.5 / 5.0       1       parti, hpdv2, pickapic  pickscore, hpsv2, clipscore, aesthetic
  kto   DDIM 50  7.0 / 5.0       1       pickapic, hpdv2, parti  pickscore, hpsv2, imagereward, aesthetic, clipscore
  mapo  DDIM 30  7.5 / 5.0       1       pickapic, parti, hpdv2  aesthetic, hpsv2, pickscore

Every preset: seed 0 and DRO's seed rule (image k of prompt i from seed ``seed + i + k·N``, so the base and
the tuned model draw the same noise for the same image), the model's native resolution (512 px for SD1.5,
1024 px for SDXL), every prompt of each set. Prompt sets: ``pickapic`` is Pick-a-Pic v2 test_unique (500
prompts), ``parti`` PartiPrompts (1632), ``hpdv2`` the HPDv2 benchmark (4 styles x 800); their files are
given with ``--prompts`` (``jaxpref.prompts``), their scorers' models with ``--reward`` (a preset fills in
the hub ids of the scorers published in a loadable form: PickScore, CLIP score, ImageReward).

Sources, and where a preset can only approximate the paper:
- dro: basiclab/DiffusionDRO, the released ``inference.py`` (DDPM scheduler, 50 steps, guidance 7.5 for
  SD1.5 and SDXL alike, 5 images per prompt, seed 0, the seed rule above), ``score.py`` and ``misc/scores.py``
  (PickScore, HPSv2 v2.0 = HPS_v2_compressed.pt, aesthetic v1 = LAION's linear head on CLIP-L/14, CLIP
  score, ImageReward v1.0; each averaged over all images), the readme (Pick-a-Pic v2 test_unique and the
  HPDv2 benchmark). Its CLIP score is open_clip ViT-H-14's cosine; jaxpref's ``clipscore`` is
  100·max(cos, 0) of the CLIP folder given (``clipscore=laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` for DRO's
  model).
- smpo: Lu et al., ICML 2025, §5 (median PickScore, HPSv2.1, ImageReward, Aesthetic and CLIP score on
  HPDv2, PartiPrompts and Pick-a-Pic); the released code (JaydenLyh/SmPO) has no evaluation script:
  DDIM 50 steps, guidance 7.5 (SDXL 5.0) and one image per prompt as ``configs/smposd15.py`` evaluates.
- dpo: SalesforceAIResearch/DiffusionDPO, ``quick_samples.ipynb`` (the pipeline's default scheduler and 50
  steps, guidance 7.5 for SD1.5 and 5 for SDXL, one image per prompt) and ``utils/`` (PickScore, HPSv2
  v2.0, open_clip ViT-H-14 CLIP score, aesthetics); PartiPrompts, the HPDv2 benchmark and Pick-a-Pic from
  the paper (Wallace et al., 2023). The default schedulers (PNDM for SD1.5, Euler for SDXL) are not in
  jaxpref: DDIM with the same 50 steps. Its aesthetic predictor is LAION's improved MLP head
  (sac+logos+ava1); jaxpref's ``aesthetic`` is the linear v1 head, so that column is not comparable.
- kto: jacklishufan/diffusion-kto, the readme's generation (50 steps, guidance 7.0, the pipeline's default
  scheduler: DDIM here); Pick-a-Pic test, the HPDv2 benchmark and PartiPrompts with PickScore, HPSv2,
  ImageReward, aesthetic and CLIP score from the paper (Li et al., 2024). SD1.5 only; SDXL gets diffusers'
  default 5.0.
- mapo: mapo-t2i/mapo, the readme's inference (SDXL, 30 steps, the pipeline's default guidance 5.0 and
  Euler scheduler: DDIM here) and its evaluation notes (Aesthetic, HPS v2.1, PickScore, each with its
  official code); Pick-a-Pic v2 test, PartiPrompts and the HPDv2 benchmark from the paper's general
  preference results (Hong et al., 2024).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

SEED_RULE = "seed + i + k * N"   # image k of prompt i of N (jaxpref.evaluate.image_seeds)
PROMPT_SETS = {"pickapic": "Pick-a-Pic v2 test_unique (pickapic:PARQUET)", "parti": "PartiPrompts (parti:TSV)",
               "hpdv2": "the HPDv2 benchmark (hpdv2:FOLDER)"}
# The hub repositories that hold everything a scorer's loader reads; the others take a path (or a file).
SCORER_HUB_IDS = {"pickscore": "yuvalkirstain/PickScore_v1", "clipscore": "openai/clip-vit-large-patch14",
                  "imagereward": "THUDM/ImageReward"}
SCORER_FILES = {"hpsv2": "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt, beside the CLIP tokenizer files",
                "aesthetic": "a CLIP-L/14 folder with sa_0_4_vit_l_14_linear.pth"}
# The settings a preset sets, each also a flag of jaxpref.evaluate (the flag given wins).
SETTINGS = ("sampler", "num_steps", "guidance_scale", "num_images_per_prompt", "seed", "resolution", "num_prompts",
            "prompts", "reward")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One paper's evaluation settings (module docstring). resolution 0: the model's native size;
    num_prompts 0: every prompt of each set."""
    name: str
    paper: str
    sampler: str
    num_steps: int
    guidance_scale: float
    guidance_scale_sdxl: float
    num_images_per_prompt: int
    prompt_sets: tuple
    scorers: tuple
    scorer_versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    seed: int = 0
    resolution: int = 0
    num_prompts: int = 0
    sources: tuple = ()

    def settings(self, is_sdxl: bool) -> dict:
        """The preset's value of every sampling setting for an SD1.5-like or an SDXL model."""
        return {"sampler": self.sampler, "num_steps": self.num_steps,
                "guidance_scale": self.guidance_scale_sdxl if is_sdxl else self.guidance_scale,
                "num_images_per_prompt": self.num_images_per_prompt, "seed": self.seed,
                "resolution": self.resolution, "num_prompts": self.num_prompts}

    def describe(self) -> str:
        """One line: what the preset sets."""
        return (f"{self.name}: {self.sampler.upper()} {self.num_steps} steps, CFG {self.guidance_scale:g} "
                f"(SDXL {self.guidance_scale_sdxl:g}), {self.num_images_per_prompt} image(s) per prompt, seed "
                f"{self.seed} ({SEED_RULE}), native resolution; prompt sets {', '.join(self.prompt_sets)}; "
                f"scorers {', '.join(self.scorers)}")


PROTOCOLS = {p.name: p for p in (
    Protocol("dro", "Diffusion-DRO (Wu et al., NeurIPS 2025)", "ddpm", 50, 7.5, 7.5, 5, ("pickapic", "hpdv2"),
             ("pickscore", "hpsv2", "aesthetic", "clipscore", "imagereward"),
             {"hpsv2": "v2.0", "aesthetic": "v1 linear head", "clipscore": "open_clip ViT-H-14 cosine"},
             sources=("github.com/basiclab/DiffusionDRO: inference.py, score.py, misc/scores.py, readme.md",)),
    Protocol("smpo", "SmPO-Diffusion (Lu et al., ICML 2025)", "ddim", 50, 7.5, 5.0, 1, ("hpdv2", "parti", "pickapic"),
             ("pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore"), {"hpsv2": "v2.1"},
             sources=("arXiv 2506.02698, section 5 (medians)", "configs/smposd15.py, configs/smposdxl.py")),
    Protocol("dpo", "Diffusion-DPO (Wallace et al., 2023)", "ddim", 50, 7.5, 5.0, 1, ("parti", "hpdv2", "pickapic"),
             ("pickscore", "hpsv2", "clipscore", "aesthetic"),
             {"hpsv2": "v2.0", "clipscore": "open_clip ViT-H-14 cosine", "aesthetic": "LAION improved MLP head"},
             sources=("github.com/SalesforceAIResearch/DiffusionDPO: quick_samples.ipynb, utils/", "arXiv 2311.12908")),
    Protocol("kto", "Diffusion-KTO (Li et al., 2024)", "ddim", 50, 7.0, 5.0, 1, ("pickapic", "hpdv2", "parti"),
             ("pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore"),
             sources=("github.com/jacklishufan/diffusion-kto: readme.md", "arXiv 2404.04465")),
    Protocol("mapo", "MaPO (Hong et al., 2024)", "ddim", 30, 7.5, 5.0, 1, ("pickapic", "parti", "hpdv2"),
             ("aesthetic", "hpsv2", "pickscore"), {"hpsv2": "v2.1"},
             sources=("github.com/mapo-t2i/mapo: README.md (inference, notes on evaluation)", "arXiv 2406.06424")),
)}


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol={name!r}: not a known protocol; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def prompt_specs(protocol: Protocol, given: Optional[str]) -> list[str]:
    """The prompt-set specs to evaluate: ``--prompts`` as given (a comma-separated list of specs), else a
    ValueError naming the sets the protocol needs (their files are not on the hub)."""
    if given:
        return [spec.strip() for spec in given.split(",") if spec.strip()]
    needed = ",".join(f"{kind}:PATH" for kind in protocol.prompt_sets)
    raise ValueError(f"--protocol={protocol.name} evaluates on "
                     f"{'; '.join(PROMPT_SETS[k] for k in protocol.prompt_sets)}: give their files as "
                     f"--prompts={needed} (a comma-separated list of prompt-set specs, see jaxpref.prompts)")


def reward_spec(protocol: Protocol, given: Optional[str]) -> str:
    """The ``--reward`` spec to score with: as given, else the protocol's scorers from their hub ids; a
    ValueError naming the missing paths when a scorer has no loadable hub repository."""
    if given:
        return given
    missing = [name for name in protocol.scorers if name not in SCORER_HUB_IDS]
    if missing:
        example = ",".join(f"{name}={SCORER_HUB_IDS.get(name, 'PATH')}" for name in protocol.scorers)
        raise ValueError(f"--protocol={protocol.name} scores with {', '.join(protocol.scorers)}; "
                         f"{', '.join(f'{m} ({SCORER_FILES[m]})' for m in missing)} need a local path: give "
                         f"--reward={example}")
    return ",".join(f"{name}={SCORER_HUB_IDS[name]}" for name in protocol.scorers)


def resolve(protocol: Protocol, explicit: Mapping[str, Any], fallback: Mapping[str, Any],
            is_sdxl: bool) -> tuple[dict, dict]:
    """(settings, source of each): a flag given on the command line ("flag") wins over the preset
    ("protocol"), which wins over ``fallback`` (a --config's eval section or the flag defaults)."""
    preset = protocol.settings(is_sdxl)
    settings, sources = {}, {}
    for name in preset:
        if name in explicit:
            settings[name], sources[name] = explicit[name], "flag"
        else:
            settings[name], sources[name] = preset[name], "protocol"
    for name, value in fallback.items():
        settings.setdefault(name, value)
        sources.setdefault(name, "default")
    return settings, sources
