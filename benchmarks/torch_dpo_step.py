"""The PyTorch reference for one Diffusion-DPO step: current diffusers UNet2DConditionModel, SDPA attention.

  python benchmarks/torch_dpo_step.py --size tiny                            # CPU: checks the script works
  python benchmarks/torch_dpo_step.py --size sd15 --batch 8 --compile       # GPU: eager and torch.compile rows
  python benchmarks/bench.py --size sd15 --batch 8 --torch --torch-compile   # both frameworks, one table

One step on B pairs, as Diffusion-DPO's train.py computes it and at jaxpref's shapes (cached latents):
the CLIP text encoder on the B captions (no grad); x0 = 0.18215 (mean + std·n); one t and one ε per pair,
shared by winner and loser; the policy UNet forward+backward on the 2B noised latents; the reference
UNet forward on the same 2B under no_grad; loss −log σ(−β/2 (Δθ − Δref)); grad-norm clip 1.0; AdamW
(fused on CUDA). Precision, as the reference code trains with accelerate's mixed_precision="bf16":
policy weights fp32 under ``torch.autocast(bfloat16)``, reference UNet and text encoder stored in bf16.
``--dtype float32`` (the CPU default) runs all in fp32 without autocast. On CPU torch runs one thread
unless ``--threads`` says otherwise (2 spinning OpenMP threads on 2 shared cores: 6 s vs 42 ms a step).

Weights are random (speed does not depend on them). The first call and 2 (eager) or 3 (compiled)
warm-up calls are excluded; a row is the median of ``--iters`` steps, each ended by
``torch.cuda.synchronize``. The table format is ``benchmarks/measure.py``'s and the FLOP model
``jaxpref.flops``' (``model_flops('dpo step', ...)``), so the rows line up with JAX's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# This process never needs JAX's GPU client (it would reserve most of the GPU's memory).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import measure  # noqa: E402
import profile_breakdown  # noqa: E402
import random_sd  # noqa: E402
from jaxpref.flops import model_flops  # noqa: E402

SCALING_FACTOR = 0.18215
BETA = 5000.0
ERRORS: list[str] = []  # what failed in ``run`` (written to --json)


def flop_counts(size_name: str) -> tuple[float, float]:
    """(F, G) per image: the measured ones for sd15, else XLA's batch-1 count of our UNet of the same config."""
    size = random_sd.SIZES[size_name]
    if size.fwd_flops is not None:
        return size.fwd_flops, size.fwdbwd_flops
    import jax.numpy as jnp
    pipe = random_sd.random_pipeline(size, jnp.float32)
    return measure.unet_xla_flops(pipe.unet, pipe.unet_params, size)


def build_models(size_name: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(policy fp32, reference, text encoder) with random weights; SDPA attention everywhere."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    diffusers_logging.set_verbosity_error()  # its advice on casting with .to() concerns loading checkpoints
    size = random_sd.SIZES[size_name]
    torch.manual_seed(seed)
    policy = UNet2DConditionModel.from_config(dict(size.unet)).to(device=device, dtype=torch.float32)
    policy.set_attn_processor(AttnProcessor2_0())
    reference = UNet2DConditionModel.from_config(dict(size.unet)).to(device=device, dtype=dtype)
    reference.load_state_dict(policy.state_dict())
    reference.set_attn_processor(AttnProcessor2_0())
    reference.requires_grad_(False).eval()
    t = size.text
    text_config = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                 intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                                 num_attention_heads=t.num_attention_heads,
                                 max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
                                 projection_dim=t.projection_dim, bos_token_id=t.bos_token_id,
                                 eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
                                 attn_implementation="sdpa")
    text_encoder = CLIPTextModel(text_config).to(device=device, dtype=dtype).requires_grad_(False).eval()
    policy.train()
    return policy, reference, text_encoder


def make_batch(size_name: str, batch: int, device: str, seed: int = 0):
    """input_ids [B, L], latent mean/std [B, 2, C, h, w] (NCHW, torch's layout), winner first."""
    size = random_sd.SIZES[size_name]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, size.text.vocab_size - 2, (batch, size.text.max_position_embeddings))
    ids[:, 0], ids[:, -1] = size.text.bos_token_id, size.text.eos_token_id
    shape = (batch, 2, size.unet.get("in_channels", 4), size.latent, size.latent)
    mean = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 4.0)
    return (torch.from_numpy(ids).to(device), mean.to(device), torch.full(shape, 0.1, device=device))


def alphas_cumprod(device: str) -> torch.Tensor:
    """SD1.5's scaled_linear DDPM schedule: betas linear in sqrt space, 0.00085 to 0.012, 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).to(device=device, dtype=torch.float32)


def make_step(policy, reference, text_encoder, optimizer, device: str, dtype: torch.dtype):
    """The DPO step as a closure; returns the loss (a device tensor)."""
    acp = alphas_cumprod(device)
    autocast = torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16,
                              enabled=dtype == torch.bfloat16)
    params = [p for p in policy.parameters() if p.requires_grad]

    def err(pred, target):
        return ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))

    def step(ids, mean, std):
        b = ids.shape[0]
        with torch.no_grad(), autocast:
            text = text_encoder(ids)[0]
        x0 = SCALING_FACTOR * (mean + std * torch.randn_like(mean))
        t = torch.randint(0, 1000, (b,), device=device)
        noise = torch.randn_like(x0[:, 0])
        t2, noise2, text2 = torch.cat([t, t]), torch.cat([noise, noise]), torch.cat([text, text])
        a = acp[t2].view(-1, 1, 1, 1)
        xt = a.sqrt() * torch.cat([x0[:, 0], x0[:, 1]]) + (1 - a).sqrt() * noise2
        with autocast:
            pred = policy(xt, t2, text2).sample
        e = err(pred, noise2)
        with torch.no_grad(), autocast:
            e_ref = err(reference(xt.to(dtype), t2, text2.to(dtype)).sample, noise2)
        inside = -0.5 * BETA * ((e[:b] - e[b:]) - (e_ref[:b] - e_ref[b:]))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_step(step, batch, iters: int, warmup: int, device: str) -> tuple[float, list[float]]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(*batch)
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step(*batch)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def run(size_name: str = "tiny", batch: int = 2, dtype: str = "float32", iters: int = 5, compile: bool = False,
        flops: tuple[float, float] | None = None, log=print, warmup: int | None = None, eager: bool = True,
        share: tuple | None = None, profile: str | None = None) -> list[measure.Row]:
    """The eager row and/or the torch.compile row; FLOPs by jaxpref.flops' DPO model. ``warmup``: calls
    after the first, untimed (default 2 eager, 3 compiled). ``share``: as bench.py's ``--share-device``
    (one row: the first call and warm-ups before the turn, one more warm-up in it). ``profile``: a folder
    for a torch.profiler trace of 3 steps per row, summarised in ``PROFILES``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    fwd, fwdbwd = flops or flop_counts(size_name)
    step_flops = model_flops("dpo step", batch, fwd, fwdbwd)
    import diffusers
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {kind}, {dtype}, {size_name}, {batch} pairs")
    policy, reference, text_encoder = build_models(size_name, device, tdtype)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=1e-2, fused=device == "cuda")
    data = make_batch(size_name, batch, device)
    rows, errors = [], ERRORS
    variants = [("torch eager", policy, reference, 2 if warmup is None else warmup)] if eager else []
    if compile:
        variants.append(("torch compile", torch.compile(policy), torch.compile(reference),
                         3 if warmup is None else warmup))
    if share and len(variants) != 1:
        raise ValueError("--share-device times one row per process: pass --compile --no-eager, or neither")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for impl, pol, ref, n_warm in variants:
        step = make_step(pol, ref, text_encoder, optimizer, device, tdtype)
        try:
            start = time.perf_counter()
            step(*data)
            sync()
            first = time.perf_counter() - start
            if share:  # compiled and warm before the turn; the turn starts from an emptied cache
                for _ in range(n_warm):
                    step(*data)
                sync()
                if device == "cuda":
                    torch.cuda.empty_cache()
            with measure.timing_turn(share, log):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, times = time_step(step, data, iters, 1 if share else n_warm, device)
                peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
                if profile:
                    try:
                        PROFILES[impl] = profile_steps(step, data, device,
                                                       os.path.join(profile, impl.replace(" ", "_")), seconds, log)
                    except Exception as e:  # noqa: BLE001 - a trace we cannot read must not cost the timed row
                        PROFILES[impl] = {"error": f"{type(e).__name__}: {e}"}
                        log(f"  profile failed: {PROFILES[impl]['error']}")
        except (RuntimeError, torch.OutOfMemoryError) as e:  # torch.compile's failures are RuntimeErrors too
            # One variant failing (out of memory, a compiler missing) leaves the other row standing.
            errors.append(f"{impl}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            log(f"  {errors[-1]}")
            optimizer.zero_grad(set_to_none=True)
            measure.mark_failed(share)
            continue
        rows.append(measure.Row(impl=impl, workload="dpo step", pairs=batch, seconds=seconds, model_flops=step_flops,
                              peak_bytes=peak, peak_source="torch" if peak else "", compile_seconds=first,
                              device=kind, notes="SDPA; compile s = first call", times=times))
        log(f"  {impl}: {seconds * 1e3:.2f} ms")
    return rows


PROFILE_STEPS = 3
PROFILES: dict = {}  # row name -> profile_breakdown summary (written to --json)


def profile_steps(step, data, device: str, folder: str, step_seconds: float, log=print) -> dict:
    """``PROFILE_STEPS`` steps under torch.profiler (its GPU kernels), the Chrome trace gzipped into
    ``folder``; returns its breakdown by kernel kind (``profile_breakdown``)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            step(*data)
        if device == "cuda":
            torch.cuda.synchronize()
    path = os.path.join(folder, "trace.json.gz")
    prof.export_chrome_trace(path)  # gzipped by torch for a .gz path
    summary = profile_breakdown.torch_breakdown(path, PROFILE_STEPS)
    log(profile_breakdown.format_breakdown(summary, f"  profile ({folder})", step_seconds * 1e3))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(random_sd.SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: the size's)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 10; CPU 3)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument("--no-eager", action="store_true", help="no eager row (with --compile: that row alone)")
    parser.add_argument("--share-device", default=None, metavar="DIR:N[:RANK]", type=measure.parse_share,
                        help="one of N bench commands on one GPU (bench.py's --share-device); one row")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, trace 3 steps of each row with torch.profiler into DIR and put their "
                        "breakdown by kernel kind in the JSON")
    parser.add_argument("--fwd-flops", type=float, default=None, help="F per image (default: measured for sd15, else XLA)")
    parser.add_argument("--fwdbwd-flops", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default on CPU: 1; its OpenMP threads spin and, on shared "
                        "cores, made a tiny step 100x slower)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quiet-table", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    batch = args.batch or random_sd.SIZES[args.size].batch
    flops = (args.fwd_flops, args.fwdbwd_flops) if args.fwd_flops and args.fwdbwd_flops else None
    try:
        rows = run(args.size, batch, dtype, args.iters or (10 if cuda else 3), args.compile, flops,
                   eager=not args.no_eager, share=args.share_device, profile=args.profile)
    except BaseException:
        measure.mark_failed(args.share_device)
        raise
    if args.json:
        import diffusers
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__, "size": args.size,
                       "batch": batch, "dtype": dtype, "rows": [r.as_dict() for r in rows], "errors": ERRORS,
                       "profiles": PROFILES}, f,
                      indent=2)
    if not args.quiet_table:
        print(measure.format_table(rows, f"{args.size}: PyTorch reference DPO step, {batch} pairs, {dtype}"))
        for e in ERRORS:
            print(f"failed: {e}")
    return rows


if __name__ == "__main__":
    main()
