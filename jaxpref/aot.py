"""Does a config fit a TPU pod, or a GPU? ``python -m jaxpref.aot --config=configs/drosd15.py --topology=v5e:2x4``
(or ``--topology=h100``, ``h200x8``, ``a100``: NVIDIA GPUs of one host, ``jaxpref.gpu_targets``).

Compiles, on this host (a CPU machine is enough, with the ``[tpu]`` extra: ``pip install -e '.[tpu]'``),
exactly the train step ``jaxpref.train`` would run on that pod slice: the config's mesh over the
topology's abstract devices (``jax.experimental.topologies``), the state and shardings of
``trainer.abstract_state``, the step of ``trainer.jit_train_step`` (DRO's generation and SmPO's inversion
run inside it). No weights are read: the architecture comes from ``model_path``'s config.json files when it
is a folder, else from ``jaxpref.models.presets``: SDXL's for a path naming an XL model (the SDXL configs'
placeholder) or ``--architecture=sdxl``, SD1.5's otherwise. Prints, per chip: argument bytes (params,
optimizer, other state, reference + text encoder, batch), the compiler's temporaries, the total against
the chip's HBM, FITS or DOES NOT FIT (exit 1), the compiler's FLOPs, and the largest buffers when it does
not fit (when the compiler refuses the program outright it assigns no buffers: then the largest values of
the program before partitioning, e.g. dense attention's [B, heads, T, S] logits). Multi-host topologies
(v5e:4x4, v4:2x2x4) compile the same way: all hosts' devices in one program. A GPU target needs JAX's CUDA
plugin (``pip install -U 'jax[cuda12]'``, no GPU or driver) and is measured against the memory a JAX process
may take there (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 75% by default).

  python -m jaxpref.aot --config=configs/drosd15.py --topology=v5e:2x4 --pairs_per_chip=4 --json fit.json
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

if __name__ == "__main__":
    from jaxpref import console as _console
    _console.quiet_native_logs()   # before jax loads: XLA's C++ log reads its level once

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from jaxpref import config_lib, gpu_targets, sharding, trainer
from jaxpref.methods import get_method
from jaxpref.models import clip, conditioning, pipeline as pipeline_lib, unet as unet_lib, vae as vae_lib
from jaxpref.models.presets import (SD15_SCHEDULER, SD15_TEXT, SD15_UNET, SD_VAE_CHANNELS, SDXL_TEXT, SDXL_TEXT_2,
                                     SDXL_UNET)

GIB = 2 ** 30
# HBM per device JAX sees by ``device_kind``: a chip (v4 and v5p: both TensorCores, megacore), a core on v2/v3.
HBM_BYTES = {"TPU v2": 8 * GIB, "TPU v3": 16 * GIB, "TPU v4": 32 * GIB, "TPU v4 lite": 8 * GIB,
             "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v5p": 95 * GIB, "TPU v6 lite": 32 * GIB,
             "TPU7x": 192 * GIB}
# Names ``get_topology_desc`` resolves (generation:chips per axis).
KNOWN_TOPOLOGIES = ("v2:2x2", "v3:2x2", "v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v5e:1x1", "v5e:2x2", "v5e:2x4",
                    "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4",
                    "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:16x16")
_TOPOLOGY = re.compile(r"^(v2|v3|v4|v5e|v5p|v6e)(?::|-)(\d+(?:x\d+){1,2})$")
MEGACORE = ("v4", "v5p")
ARCHITECTURES = ("auto", "sd15", "sdxl")


# ---------------------------------------------------------------------------------------------
# The pod and the model, from names and shapes only.

def topology_devices(name: str):
    """The abstract devices of a TPU topology name ("v5e:2x4", "v4:2x2x4") or of GPUs ("h100x8"); ValueError
    listing valid ones."""
    if gpu_targets.parse(name):
        return gpu_targets.devices(name)
    m = _TOPOLOGY.match(name.strip())
    if not m:
        raise ValueError(f"--topology={name!r}: expected generation:chips, e.g. {', '.join(KNOWN_TOPOLOGIES)}, "
                         f"or GPUs of one host: {', '.join(gpu_targets.GPUS)} (x2 ... x8)")
    # v4 and v5p chips are two TensorCores that JAX on the pod drives as one device (megacore).
    kwargs = {"chip_config_name": "megacore"} if m.group(1) in MEGACORE else {}
    dims = [int(d) for d in m.group(2).split("x")]
    if len(dims) == 2 and dims[0] * dims[1] < 4:  # a slice smaller than a host (v5e:1x1): say the host's bounds
        kwargs["chips_per_host_bounds"] = (*dims, 1)
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=f"{m.group(1)}:{m.group(2)}",
                                            **kwargs).devices
    except Exception as e:  # libtpu's own error says little: name what works
        if importlib.util.find_spec("libtpu") is None:
            raise ValueError(f"--topology={name!r}: compiling for a TPU needs the TPU compiler (libtpu), which this "
                             "install lacks: pip install -e '.[tpu]' (or pip install 'jax[tpu]')") from e
        raise ValueError(f"--topology={name!r}: the TPU compiler does not know it ({str(e).splitlines()[0]}); "
                         f"valid e.g. {', '.join(KNOWN_TOPOLOGIES)}") from e


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def architecture_of(model_path: str, architecture: str = "auto") -> str:
    """"folder" when ``model_path`` is one (its config.json files decide), else the preset to use: the given
    one, or for ``auto`` SDXL's when the path names an XL model (the SDXL configs' placeholder does), SD1.5's
    otherwise."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"--architecture={architecture!r}: expected one of {ARCHITECTURES}")
    if architecture != "auto":
        return architecture
    if os.path.isdir(pipeline_lib.resolve_model_path(model_path)):
        return "folder"
    name = os.path.basename(model_path.rstrip("/")).lower()
    return "sdxl" if re.search(r"(^|[^a-z])xl([^a-z]|$)", name) else "sd15"


def abstract_pipeline(model_path: str, dtype, architecture: str = "auto") -> pipeline_lib.SDPipeline:
    """An ``SDPipeline`` whose params are ShapeDtypeStructs: the architecture of ``model_path``'s
    config.json files if it is a folder (nothing else is read), else SD1.5's or SDXL's presets
    (``architecture_of``)."""
    kind = architecture_of(model_path, architecture)
    if kind == "folder":
        folder = pipeline_lib.resolve_model_path(model_path)
        unet = unet_lib.unet_from_config(_read_json(os.path.join(folder, "unet", "config.json")),
                                         source=f"{folder}/unet/config.json", dtype=dtype)
        text_encoder = clip.text_encoder_from_config(_read_json(os.path.join(folder, "text_encoder", "config.json")),
                                                     dtype)
        if os.path.isdir(os.path.join(folder, "text_encoder_2")):
            text_encoder = _sdxl_encoders(
                text_encoder, clip.text_encoder_from_config(
                    _read_json(os.path.join(folder, "text_encoder_2", "config.json")), dtype))
        vae = vae_lib.vae_from_config(_read_json(os.path.join(folder, "vae", "config.json")), dtype)
        scheduler = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
        return pipeline_lib.shape_pipeline(unet, text_encoder, vae, scheduler, folder)
    vae = vae_lib.AutoencoderKL(block_out_channels=SD_VAE_CHANNELS)
    if kind == "sdxl":
        unet = unet_lib.unet_from_config(SDXL_UNET, source="SDXL preset", dtype=dtype)
        text_encoder = _sdxl_encoders(clip.CLIPTextModel(config=SDXL_TEXT, dtype=dtype),
                                      clip.CLIPTextModel(config=SDXL_TEXT_2, with_projection=True, dtype=dtype))
        return pipeline_lib.shape_pipeline(unet, text_encoder, vae, SD15_SCHEDULER, "SDXL preset")
    unet = unet_lib.unet_from_config(SD15_UNET, source="SD1.5 preset", dtype=dtype)
    text_encoder = clip.CLIPTextModel(config=SD15_TEXT, dtype=dtype)
    return pipeline_lib.shape_pipeline(unet, text_encoder, vae, SD15_SCHEDULER, "SD1.5 preset")


def _sdxl_encoders(first, second) -> conditioning.SDXLTextEncoders:
    """SDXL's two encoders as the pipeline loader joins them (token ids: the first tokenizer's)."""
    return conditioning.SDXLTextEncoders(first, second, eos_token_id=first.config.eos_token_id,
                                         pad_token_id_2=second.config.pad_token_id)


def frozen_shapes(run: trainer.Run):
    """Shapes of ``trainer.frozen_params(run)`` for a run whose params are ShapeDtypeStructs."""
    def frozen(unet_params, text_params):
        pipeline = dataclasses.replace(run.pipeline, unet_params=unet_params, text_encoder_params=text_params)
        return trainer.frozen_params(dataclasses.replace(run, pipeline=pipeline))
    return jax.eval_shape(frozen, run.pipeline.unet_params, run.pipeline.text_encoder_params)


def batch_shapes(run: trainer.Run, rows: int) -> dict:
    """The global batch the step receives (the loader's, latents already encoded): pairs [B, 2, h, w, c] or
    experts [B, h, w, c], token ids, reward scores where the method reads them."""
    h, w, c = run.latent_shape
    latent = (rows, h, w, c) if run.method.data == "experts" else (rows, 2, h, w, c)
    out = {"input_ids": jax.ShapeDtypeStruct((rows, run.null_ids.shape[0]), jnp.int32),
           "latent_mean": jax.ShapeDtypeStruct(latent, jnp.float32),
           "latent_std": jax.ShapeDtypeStruct(latent, jnp.float32)}
    if run.method.needs_rewards:
        out["rewards"] = jax.ShapeDtypeStruct((rows, 2), jnp.float32)
    if run.pipeline.is_sdxl and run.config.data.time_ids == "crop":  # each image's recorded size and crop
        out["time_ids"] = jax.ShapeDtypeStruct(latent[:-3] + (6,), jnp.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Compile and account.

def per_device_bytes(shapes, shardings) -> int:
    """Bytes of one device's shard of a tree, from its shardings (the largest shard where uneven)."""
    total = 0
    for s, sh in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        total += int(np.prod(sh.shard_shape(s.shape), dtype=np.int64)) * jnp.dtype(s.dtype).itemsize
    return total


@dataclasses.dataclass
class Program:
    """The train step of one config on one mesh, as shapes: what ``check`` lowers and compiles."""
    run: trainer.Run
    mesh: jax.sharding.Mesh
    state: object
    frozen: object
    batch: dict

    def lower(self):
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        return trainer.lower_train_step(self.run, self.mesh, self.state, self.batch, self.frozen, rng)

    def argument_bytes(self) -> dict:
        """Per-chip bytes of the step's arguments by part, from the shardings the step is compiled with."""
        state, shardings = self.state, trainer.state_shardings(self.mesh, self.state, self.run.config, self.run.method)
        frozen_sh = trainer.frozen_shardings(self.run, self.mesh, self.frozen)
        out = {"params": per_device_bytes(state.params, shardings.params),
               "optimizer": per_device_bytes(state.opt_state, shardings.opt_state)}
        out["other_state"] = per_device_bytes(state, shardings) - out["params"] - out["optimizer"]
        out["reference"] = (per_device_bytes(self.frozen["ref"], frozen_sh["ref"]) if "ref" in self.frozen
                            else 0)   # a reference-free method (MaPO, SFT) keeps none
        out["text_encoder"] = per_device_bytes(self.frozen["text"], frozen_sh["text"])
        out["batch"] = per_device_bytes(self.batch, sharding.rows_sharding(self.mesh, self.batch))
        return out


def build_program(config, devices, architecture: str = "auto") -> Program:
    """The config's run on a mesh of ``devices``, validated, from shapes only."""
    config = config_lib.validate(config, check_paths=False)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    config_lib.validate(config, num_devices=mesh.size, check_paths=False)
    with config.unlocked():
        config.reference_path = ""  # the reference is the policy's architecture: same shapes, nothing to read
    pipeline = abstract_pipeline(config.model_path, config_lib.DTYPES[config.dtype], architecture)
    run = trainer.build_run(config, pipeline)
    state, _ = trainer.abstract_state(run, mesh)
    return Program(run, mesh, state, frozen_shapes(run), batch_shapes(run, config.batch_size))


def hbm_bytes(device) -> int | None:
    """The memory a step may use on ``device``: a TPU chip's HBM; on a GPU, what a JAX process allocates."""
    if device.platform == "gpu":
        usable = gpu_targets.usable_bytes(device)
        return usable[0] if usable else None
    return HBM_BYTES.get(device.device_kind)


def attention_kernel(lowered_text: str) -> str:
    """The attention kernel a lowered step calls: Pallas on TPU, cuDNN flash attention on GPU, or XLA's ops."""
    if "tpu_custom_call" in lowered_text:
        return "Pallas TPU kernel"
    return "cuDNN flash attention" if "__cudnn$fmha" in lowered_text else "XLA (no attention kernel)"


def check(config, topology: str, top: int = 10, architecture: str = "auto") -> dict:
    """Compiles the config's train step for ``topology`` and reports its memory per chip (a JSON-able dict)."""
    devices = topology_devices(topology)
    program = build_program(config, devices, architecture)
    chips, hbm = len(devices), hbm_bytes(devices[0])
    platform = devices[0].platform
    c = program.run.config
    report = {"topology": topology, "device_kind": devices[0].device_kind, "chips": chips,
              "hosts": len({d.process_index for d in devices}), "hbm_per_chip": hbm,
              "objective": c.objective, "model": program.run.pipeline.folder,
              "mesh": dict(program.mesh.shape), "batch_size": c.batch_size, "grad_accum": c.grad_accum,
              "pairs_per_chip": c.batch_size // c.grad_accum // chips, "dtype": c.dtype, "remat": c.remat,
              "remat_policy": c.remat_policy,
              "attention": c.attention, "arguments": program.argument_bytes(), "jax": jax.__version__,
              "platform": platform}
    if platform == "gpu":
        report["memory_fraction"] = gpu_targets.usable_bytes(devices[0])[1]
    if hbm is not None and sum(report["arguments"].values()) > hbm:  # no compile can make it fit: say so now
        report.update(compile_seconds=None, fits=False, compiler_refused=False, arguments_exceed_hbm=True,
                      uses_pallas_attention=None, attention_kernel=None)
        return report
    start = time.perf_counter()
    try:
        with gpu_targets.target_capability(devices[0]):
            lowered = program.lower()
            compiled = _compile(lowered)
    except NotImplementedError as e:   # a kernel the target does not have (cuDNN attention's head dim on an A100)
        raise ValueError(f"--topology={topology}: {str(e).splitlines()[0]} (config.attention={c.attention!r}; "
                         "'auto' picks what the device takes)") from e
    text = lowered.as_text()
    report["uses_pallas_attention"] = "tpu_custom_call" in text
    report["attention_kernel"] = attention_kernel(text)
    if isinstance(compiled, Exception):
        report.update(compile_seconds=time.perf_counter() - start, fits=False, compiler_refused=True,
                      compiler_message=str(compiled)[:6000],
                      largest_before_partitioning=largest_buffers(  # op names need the debug info
                          lowered.as_text(dialect="hlo", debug_info=True), top))
        return report
    report["compile_seconds"] = time.perf_counter() - start
    if platform == "gpu":   # on a mesh of several GPUs cuDNN's call appears only once the program is partitioned
        report["attention_kernel"] = attention_kernel(compiled.as_text())
    m = compiled.memory_analysis()
    memory = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
              "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
              "generated_code": int(m.generated_code_size_in_bytes)}
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]
    report["memory"] = memory
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report["flops_per_chip"] = float(cost.get("flops", 0.0)) if cost else None
    report["fits"] = hbm is None or memory["total"] <= hbm
    report["compiler_refused"] = False
    if not report["fits"]:
        report["largest_buffers"] = largest_buffers(compiled.as_text(), top)
    return report


def _compile(lowered):
    """The compiled step, or the compiler's error when it refuses a program whose buffers exceed HBM (TPU)."""
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001 - only the over-memory refusal is a report; anything else is raised
        if "RESOURCE_EXHAUSTED" not in str(e) and "exceeds available" not in str(e):
            raise
        return e


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


def largest_buffers(hlo_text: str, top: int = 10) -> list[dict]:
    """The largest array values of the compiled (per-chip) HLO, with the JAX op that made them: what
    to look at when a step does not fit (e.g. the [B, heads, T, S] logits of dense attention)."""
    rows = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]", line)
        if not m or m.group(2) not in _BYTES or not m.group(3):
            continue
        shape = tuple(int(d) for d in m.group(3).split(","))
        size = int(np.prod(shape, dtype=np.int64)) * _BYTES[m.group(2)]
        op = re.search(r'op_name="([^"]*)"', line)
        name = op.group(1) if op else m.group(1)
        key = (name, shape)
        if key not in rows or rows[key]["bytes"] < size:
            rows[key] = {"bytes": size, "shape": f"{m.group(2)}{list(shape)}", "op": name}
    return sorted(rows.values(), key=lambda r: -r["bytes"])[:top]


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GIB:8.3f} GiB"  # noqa: E731
    gpu = r.get("platform") == "gpu"
    lines = [f"{r['objective']} on {r['topology']} ({r['chips']} x {r['device_kind']}, {r['hosts']} host(s)), "
             f"mesh {r['mesh']}, {r['pairs_per_chip']} pairs/chip per micro-batch (batch_size {r['batch_size']}, "
             f"grad_accum {r['grad_accum']}), {r['dtype']}, remat={r['remat']} ({r['remat_policy']}), "
             f"attention={r['attention']} ({r.get('attention_kernel') or 'not lowered'}), model: {r['model']}",
             "per chip:"]
    lines += [f"  {name:<22}{gib(b)}" for name, b in r["arguments"].items()]
    lines.append(f"  {'arguments (all)':<22}{gib(sum(r['arguments'].values()))}")
    hbm = r["hbm_per_chip"]
    memory_name = (f"usable GPU memory ({r['memory_fraction']:.0%}: XLA_PYTHON_CLIENT_MEM_FRACTION)" if gpu
                   else "HBM")
    if r.get("arguments_exceed_hbm"):
        lines.append(f"  the arguments alone exceed the chip's {gib(hbm)} {memory_name} (not compiled)")
    elif r.get("compiler_refused"):
        lines += ["  the TPU compiler refused the program (over HBM):",
                  *("    " + line for line in r["compiler_message"].splitlines()[:40])]
        if r.get("largest_before_partitioning"):
            lines.append(f"  largest values of the program before partitioning (global shapes, no buffer assignment; "
                         f"per chip about 1/{r['chips']} of those the batch is split over):")
            lines += [f"    {gib(b['bytes'])}  {b['shape']:<28} {b['op']}" for b in r["largest_before_partitioning"]]
    else:
        m = r["memory"]
        layout = "" if gpu else "   (TPU layout: small arrays padded to tiles)"
        flops_note = "cuBLAS and cuDNN calls not counted" if gpu else "loop bodies counted once"
        lines += [f"  {'arguments (compiler)':<22}{gib(m['argument'])}{layout}",
                  f"  {'temporaries':<22}{gib(m['temp'])}",
                  f"  {'outputs - donated':<22}{gib(m['output'] - m['alias'])}",
                  f"  {'generated code':<22}{gib(m['generated_code'])}",
                  f"  {'total':<22}{gib(m['total'])}   of {gib(hbm) if hbm else 'unknown'} {memory_name}"]
        if r["flops_per_chip"]:
            lines.append(f"  compiler FLOPs per chip per step: {r['flops_per_chip']:.4g} ({flops_note})")
        for b in r.get("largest_buffers", []):
            lines.append(f"    largest: {gib(b['bytes'])}  {b['shape']:<28} {b['op']}")
    how = "not compiled" if r["compile_seconds"] is None else f"lowered and compiled in {r['compile_seconds']:.0f} s"
    lines.append(f"{how}: {'FITS' if r['fits'] else 'DOES NOT FIT'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command.

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when run as a command only: jaxpref.train defines --config too, and a process (a test) may
    import both modules."""
    config_flags.DEFINE_config_file("config", config_lib.config_path("tiny"), "the experiment file")
    flags.DEFINE_string("topology", "v5e:2x4", "a TPU topology, generation:chips, e.g. v5e:2x4, v5e:4x4, "
                        "v4:2x2x4, v5p:2x2x1; or NVIDIA GPUs of one host: h100, h200, a100, h100x8 (needs "
                        "jax[cuda12], no GPU)")
    flags.DEFINE_integer("pairs_per_chip", None, "set batch_size to this many pairs per chip per micro-batch "
                         "(x chips x grad_accum); default: the config's batch_size")
    flags.DEFINE_string("json", None, "also write the report to this JSON file")
    flags.DEFINE_enum("architecture", "auto", list(ARCHITECTURES), "the model when model_path is not a folder: "
                      "auto = SDXL's presets for a path naming an XL model (the SDXL configs'), else SD1.5's")
    flags.DEFINE_integer("top", 10, "largest buffers listed when the step does not fit")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if gpu_targets.parse(FLAGS.topology):
        gpu_targets.prepare_host()   # before the first backend starts
    config = FLAGS.config
    try:
        if FLAGS.pairs_per_chip:
            chips = len(topology_devices(FLAGS.topology))
            config.batch_size = FLAGS.pairs_per_chip * chips * config.grad_accum
            get_method(config.objective).fit_config_to_batch(config, FLAGS.pairs_per_chip * chips)
        report = check(config, FLAGS.topology, FLAGS.top, FLAGS.architecture)
    except ValueError as e:
        print(f"jaxpref.aot: {e}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    _define_flags()
    _console.run(main, "jaxpref.aot")
