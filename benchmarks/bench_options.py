"""The method-level speed options, each timed on its own against its baseline, at two sizes on one device.

  python benchmarks/bench_options.py                                   # CPU: tiny and narrow-SD, JSON below
  python benchmarks/bench_options.py --sizes narrow --options smpo --json $OUT/options.json

Options and the program each is timed on (random weights, fp32 on CPU, bf16 elsewhere, jitted; compile
excluded; the variants of an option compiled first, then called in ``--iters`` rounds, each round one call of
every variant with that round's rng key; a ratio is the median over rounds of variant / baseline):
  smpo      ``smpo.inversion_chunks`` 1 (whole batch) / 4 / one image per chunk: SmPO's "code" inversion of a
            micro-batch (``SmPO.invert``); also the UNet rows it evaluates, counted from the drawn t.
  dro       ``dro.steps_per_trajectory`` 1 / 2 / 4: DRO's negative generation (``refill_negatives``, DPM++,
            20 steps), and the update it is added to (policy fwd+bwd, reference fwd on 2B latents); the
            step ratio is derived: (update + generation_k) / (update + generation_1).
  fuse      ``lora.fuse_reference_forward``: a LoRA DPO update (loss and adapter gradient), the policy's
            and reference's errors from two UNet calls or one.
  remat     ``remat_policy`` (``remat`` off, then each policy): a full-UNet DPO update's time and XLA's
            temporary bytes (``memory_analysis``), the activation memory remat trades for compute.

Sizes: "tiny" (the benchmarks' tiny UNet, 8x8 latents) and "narrow" (SD1.5's UNet topology, four levels,
two layers per block, cross-attention on 77 tokens, at a tenth of its widths and 16x16 latents: a shape
the CPU runs in seconds; ``--sizes sd15-narrow,sd15`` for ``random_sd``'s 64x64 ones on an accelerator).
The JSON (default benchmarks/results/options_<platform>.json) names the device and holds every time and
each option's ratio to its baseline (< 1: faster).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpref import diffusion, step as step_lib, trainer  # noqa: E402
from jaxpref.methods.base import pair_keys  # noqa: E402
from jaxpref.methods.dro import empty_negatives_buffer  # noqa: E402
from jaxpref.models import clip  # noqa: E402
from jaxpref.models.presets import SD15_UNET  # noqa: E402
from random_sd import SIZES, Size, bench_config, make_batch, random_pipeline  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NARROW_TEXT = clip.TextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, projection_dim=64,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                              bos_token_id=998, eos_token_id=999, pad_token_id=999)
OPTION_SIZES = {
    "tiny": dataclasses.replace(SIZES["tiny"], batch=8),
    "narrow": Size({**SD15_UNET, "block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 64}, 16,
                   NARROW_TEXT, (8, 16, 32, 32), 4, None, None),
    "sd15-narrow": SIZES["sd15-narrow"],
    "sd15": SIZES["sd15"],
}
OPTIONS = ("smpo", "dro", "fuse", "remat")
REMAT_ROWS = (None, "nothing_saveable", "dots_with_no_batch_dims_saveable", "convs_and_projections_saveable",
              "dots_saveable")


class Bench:
    """One size: the random pipeline, a batch, rng keys, and a timer for its programs."""

    def __init__(self, size_name: str, dtype: str, iters: int, log=print):
        self.size_name, self.size = size_name, OPTION_SIZES[size_name]
        self.batch_pairs, self.dtype, self.iters, self.log = self.size.batch, dtype, iters, log
        self.pipeline = random_pipeline(self.size, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
        self.rngs = [jax.random.PRNGKey(i) for i in range(iters)]
        self.batches = {}

    def run(self, objective: str, *overrides, remat: bool = False):
        config = bench_config(self.size, objective, self.batch_pairs, self.dtype, remat,
                              (f"reference_dtype='{self.dtype}'", *overrides))
        return trainer.build_run(config, self.pipeline)

    def batch(self, run):
        key = (run.method.data, run.method.needs_rewards)
        if key not in self.batches:
            self.batches[key] = jax.device_put(make_batch(run, self.batch_pairs))
        return self.batches[key]

    def compare(self, programs) -> list[dict]:
        """Compiles every (name, fn, args) of ``programs`` (fn(*args, rng)), then times them in rounds, one call
        of each per rng key in turn, so that a change of load on a shared machine hits every variant alike."""
        compiled = []
        for name, fn, args in programs:
            start = time.perf_counter()
            program = jax.jit(fn).lower(*args, self.rngs[0]).compile()
            compiled.append((name, program, args, time.perf_counter() - start))
            jax.block_until_ready(program(*args, self.rngs[0]))  # warm-up
        times = {name: [] for name, *_ in compiled}
        for rng in self.rngs:
            for name, program, args, _ in compiled:
                start = time.perf_counter()
                jax.block_until_ready(program(*args, rng))
                times[name].append(time.perf_counter() - start)
        rows = []
        for name, program, _, compile_s in compiled:
            memory = program.memory_analysis()
            row = {"name": name, "min_ms": 1e3 * min(times[name]), "median_ms": 1e3 * statistics.median(times[name]),
                   "times_ms": [1e3 * x for x in times[name]], "compile_s": compile_s,
                   "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes)}
            self.log(f"  {self.size_name:>6} {name:<50} {row['min_ms']:9.2f} ms (median {row['median_ms']:.2f}, "
                     f"compile {compile_s:.1f} s)")
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------------
# Programs.

def inversion(run):
    method = run.method

    def invert(params, frozen, batch, rng):
        keys = pair_keys(rng, batch["input_ids"].shape[0])
        text2, x0_2, t2 = method.pairs(frozen, dict(batch, keys=keys))
        return method.invert(params, keys, x0_2, t2, text2).latents
    return invert


def generation(run):
    method, cfg = run.method, run.config

    def generate(params, frozen, batch, rng):
        keys = pair_keys(rng, batch["input_ids"].shape[0])
        micro = dict(batch, keys=keys)
        buffer = empty_negatives_buffer(cfg.dro.buffer_size, run.text_shape, run.latent_shape,
                                        cfg.dro.num_inference_steps)
        return method.refill_negatives(buffer, params, frozen, method.captions(frozen, micro),
                                       method.latents(micro), keys, jax.random.fold_in(rng, 1)).final
    return generate


def update(run):
    """A DPO update without the optimizer: loss and gradient of the trained params (policy fwd+bwd,
    reference fwd on the 2B latents)."""
    method, cfg = run.method, run.config

    def loss_and_grad(trained, frozen, batch, rng):
        keys = pair_keys(rng, batch["input_ids"].shape[0])

        def loss(p):
            policy = step_lib.policy_params(cfg, p, frozen, rng)
            text2, x0_2, t2 = method.pairs(frozen, dict(batch, keys=keys))
            x_t, noise = method.noised_pairs(keys, x0_2, t2)
            err, ref_err = method.errors(policy, frozen["ref"], x_t, t2, text2, noise)
            return jnp.mean(err - ref_err)
        return jax.value_and_grad(loss)(trained)
    return loss_and_grad


def inverted_rows(run, chunks: int, rng) -> int:
    """UNet rows SmPO's "code" inversion evaluates for this rng's t: per chunk (rows ordered by the steps
    they need) 2 predictions x rows x the steps its first row needs."""
    keys = pair_keys(rng, run.config.batch_size)
    t = np.tile(np.asarray(run.method.timesteps(keys)), 2)
    src = diffusion.smpo_grid(run.schedule, run.config.smpo.inversion_steps)
    needed = np.sort(np.sum(src[None, :] < t[:, None], axis=1))[::-1]
    per_chunk = needed.reshape(chunks, -1)
    return int(2 * per_chunk.shape[1] * per_chunk.max(axis=1).sum())


# ---------------------------------------------------------------------------------------------
# Options.

def paired_ratio(row, base) -> float:
    """The median over rounds of row's time over base's in the same round (the same inputs: SmPO's work
    depends on the drawn t), robust to a round slowed by other load."""
    return statistics.median(a / b for a, b in zip(row["times_ms"], base["times_ms"]))


def with_ratios(rows, **more) -> dict:
    """Each row's time over the first row's (< 1: faster than the baseline)."""
    for row in rows:
        row["ratio"] = paired_ratio(row, rows[0])
        for name, key in more.items():
            row[name] = None if rows[0][key] in (None, 0) or row[key] is None else row[key] / rows[0][key]
    return {"rows": rows}


def bench_smpo(b: Bench) -> dict:
    programs, chunk_counts = [], sorted({1, 4, 2 * b.batch_pairs})
    for chunks in chunk_counts:
        run = b.run("smpo", "smpo.inversion='code'", f"smpo.inversion_chunks={chunks}")
        programs.append((f"smpo inversion, chunks={chunks}", inversion(run),
                         (run.pipeline.unet_params, trainer.frozen_params(run), b.batch(run))))
    rows = b.compare(programs)
    for row, chunks in zip(rows, chunk_counts):
        row["chunks"] = chunks
        row["unet_rows_mean"] = float(np.mean([inverted_rows(run, chunks, r) for r in b.rngs]))
    return with_ratios(rows, unet_rows_ratio="unet_rows_mean")


def bench_dro(b: Bench) -> dict:
    run = b.run("dpo")
    programs = [("update (policy fwd+bwd, reference fwd)", update(run),
                 (run.pipeline.unet_params, trainer.frozen_params(run), b.batch(run)))]
    for k in (1, 2, 4):
        run = b.run("dro", f"dro.steps_per_trajectory={k}")
        programs.append((f"dro generation, steps_per_trajectory={k}", generation(run),
                         (run.pipeline.unet_params, trainer.frozen_params(run), b.batch(run))))
    upd, *rows = b.compare(programs)
    for row, k in zip(rows, (1, 2, 4)):
        row["steps_per_trajectory"] = k
        row["step_ratio_derived"] = (upd["median_ms"] + row["median_ms"]) / (upd["median_ms"] + rows[0]["median_ms"])
    return dict(with_ratios(rows), update=upd)


def bench_fuse(b: Bench) -> dict:
    programs = []
    for fused in (False, True):
        run = b.run("dpo", "lora.enabled=True", f"lora.fuse_reference_forward={fused}")
        programs.append((f"lora dpo update, fuse_reference_forward={fused}", update(run),
                         (trainer.start_params(run), trainer.frozen_params(run), b.batch(run))))
    rows = b.compare(programs)
    for row, fused in zip(rows, (False, True)):
        row["fuse_reference_forward"] = fused
    return with_ratios(rows)


def bench_remat(b: Bench) -> dict:
    programs = []
    for policy in REMAT_ROWS:
        run = b.run("dpo", f"remat_policy='{policy or 'nothing_saveable'}'", remat=policy is not None)
        programs.append((f"dpo update, remat={'off' if policy is None else policy}", update(run),
                         (run.pipeline.unet_params, trainer.frozen_params(run), b.batch(run))))
    rows = b.compare(programs)
    for row, policy in zip(rows, REMAT_ROWS):
        row["remat_policy"] = policy
    return with_ratios(rows, temp_bytes_ratio="temp_bytes")


BENCHES = {"smpo": bench_smpo, "dro": bench_dro, "fuse": bench_fuse, "remat": bench_remat}


def device_name() -> dict:
    dev = jax.devices()[0]
    out = {"device": dev.device_kind, "platform": dev.platform, "num_devices": len(jax.devices()),
           "jax": jax.__version__}
    if dev.platform == "cpu":
        out["cpu_count"] = os.cpu_count()
        out["load_average_1min_at_start"] = os.getloadavg()[0]  # other processes sharing the cores
        try:
            with open("/proc/cpuinfo") as f:
                out["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,narrow", help=f"comma-separated, of {sorted(OPTION_SIZES)}")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of {OPTIONS}")
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (each with its own rng key)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/options_<platform>.json")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    for name, known, flag in ((sizes, OPTION_SIZES, "--sizes"), (options, BENCHES, "--options")):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"{flag}: {unknown} not in {sorted(known)}")
    platform = jax.devices()[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    path = args.json or os.path.join(HERE, "results", f"options_{platform}.json")
    payload = {**device_name(), "dtype": dtype, "iters": args.iters, "sizes": {}}
    start = time.perf_counter()
    for size in sizes:
        b = Bench(size, dtype, args.iters)
        payload["sizes"][size] = {"pairs": b.batch_pairs, "latent": b.size.latent, "unet": b.size.unet}
        for option in options:
            payload["sizes"][size][option] = BENCHES[option](b)
            payload["wall_s"] = time.perf_counter() - start
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
