"""Where a step's device time goes: a profiler trace summed by kind of kernel and, for JAX, by phase.

  python benchmarks/profile_breakdown.py <workdir>/profile --steps N     # a run's config.profile='a:b' trace
  python benchmarks/profile_breakdown.py TRACE_DIR [--hlo step.hlo.txt.gz] --steps N   # any jax.profiler trace
  python benchmarks/profile_breakdown.py trace.json --steps N                         # torch.profiler's

``bench.py --profile DIR`` and ``torch_dpo_step.py --profile DIR`` write such traces for a few timed steps and
put this summary in their JSON, so a GPU run says why one step is slower than another, not only that it is.

Kinds come from kernel names (cuDNN's and cuBLAS's on Hopper, XLA's fusions, Inductor's Triton kernels):
convolution, matmul, attention, reduction (norms, softmax, losses), elementwise, copy/transpose, other.
The phase of a JAX kernel comes from the HLO instruction it ran (the ``hlo_op`` of its event) and that
instruction's ``op_name``, the name stack of the traced step: ``optimizer`` and ``reference`` are named scopes
of the train step, ``transpose(...)`` is the backward pass, ``while`` a scan (sampling, inversion).
``busy`` is the union of the kernels' intervals: a step's wall time minus busy time is the device idling
(launch gaps, host work).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from typing import Iterable, Optional

# (kind, pattern on a kernel's name), first match wins: Inductor's Triton kernels say what they are in their
# prefix (the fused ops' names follow it); cuDNN's convolutions are implicit GEMMs, so they come before
# matmul; cuDNN's fused attention before both.
KINDS = (
    ("attention", r"fmha|flash|sdpa|attention|attn"),
    ("reduction", r"^triton_(red|per)_"),
    ("elementwise", r"^triton_poi_"),
    ("convolution", r"convolution|conv(?!ert)|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|matmul|dot|xmma"),
    ("optimizer", r"adam|multi_tensor"),
    ("reduction", r"reduce|reduction|norm|softmax|moments"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|concatenate|dynamic.update.slice|pad"),
    ("elementwise", r"fusion|elementwise|vectorized|unrolled|convert|add|multiply"),
)
_KIND_RES = tuple((kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in KINDS)
PHASES = ("optimizer", "reference", "backward", "loop", "text encoder", "forward/other")
TOP = 25


def kernel_kind(name: str) -> str:
    """The kind of work a kernel named ``name`` does (``KINDS``), ``other`` if none matches."""
    for kind, pattern in _KIND_RES:
        if pattern.search(name):
            return kind
    return "other"


def phase_of(op_name: Optional[str]) -> str:
    """The step's phase from an HLO instruction's ``op_name`` (None: unknown)."""
    if op_name is None:
        return "unknown"
    if "optimizer" in op_name:
        return "optimizer"
    if "transpose(" in op_name:
        return "backward"
    if "reference" in op_name:
        return "reference"
    if "while" in op_name:
        return "loop"
    if "CLIPText" in op_name:
        return "text encoder"
    return "forward/other"


_HLO_LINE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict:
    """{instruction name: op_name} of a compiled module's text (``compiled.as_text()``)."""
    names = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def _busy_ns(intervals: list) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def summarize(kernels: Iterable[tuple], steps: int, op_names: Optional[dict] = None) -> dict:
    """The breakdown of ``kernels``, (name, hlo_op or None, start ns, duration ns) each, over ``steps``
    steps: milliseconds per step by kind, by phase (where ``op_names`` maps hlo ops to op_names), the
    busy time and the kernels taking the most time."""
    per_ms = 1e6 * steps
    by_kind, by_phase = collections.Counter(), collections.Counter()
    by_name, count, meta = collections.Counter(), collections.Counter(), {}
    intervals = []
    for name, hlo_op, start, duration in kernels:
        kind = kernel_kind(name if not hlo_op or kernel_kind(name) != "other" else hlo_op)
        phase = phase_of(op_names.get(hlo_op)) if op_names is not None and hlo_op else "unknown"
        by_kind[kind] += duration
        by_phase[phase] += duration
        key = hlo_op or name
        by_name[key] += duration
        count[key] += 1
        meta[key] = (name, kind, phase)
        intervals.append((start, start + duration))
    total = sum(by_kind.values())
    return {
        "steps": steps,
        "kernels_per_step": len(intervals) / steps,
        "kernel_ms_per_step": total / per_ms,
        "busy_ms_per_step": _busy_ns(intervals) / per_ms,
        "by_kind_ms": {k: v / per_ms for k, v in by_kind.most_common()},
        "by_phase_ms": {k: v / per_ms for k, v in by_phase.most_common()} if op_names is not None else None,
        "top": [{"op": key, "kernel": meta[key][0], "kind": meta[key][1], "phase": meta[key][2],
                 "ms_per_step": v / per_ms, "calls_per_step": count[key] / steps}
                for key, v in by_name.most_common(TOP)],
    }


# ---------------------------------------------------------------------------------------------
# jax.profiler traces (XSpace protobufs).

def xplane_file(trace_dir: str) -> str:
    """The newest ``*.xplane.pb`` under a ``jax.profiler.start_trace`` folder."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb (not a jax.profiler trace folder)")
    return files[-1]


_ANNOTATION_OP = re.compile(r"hlo_op=([\w.\-]+)")


def _event_hlo_op(stats: dict) -> Optional[str]:
    op = stats.get("hlo_op")
    if op:
        return str(op)
    for value in stats.values():  # a kernel's launch annotation: "...#hlo_op=fusion.12,hlo_module=...#"
        if isinstance(value, str):
            m = _ANNOTATION_OP.search(value)
            if m:
                return m.group(1)
    return None


_NOT_KERNELS = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Launch Stats", "Source code", "Framework")


def jax_kernels(path: str, module: Optional[str] = None) -> tuple:
    """(name, hlo_op, start ns, duration ns) of every device kernel in an xplane file. GPU: the events of
    the device planes' stream lines; a CPU trace has no device plane, so its XLA thunks (events carrying
    ``hlo_op``) stand in. ``module``: keep only kernels of HLO modules whose name contains it. Returns
    (kernels, "device" or "host": where they were read; host thunks on a GPU mean the device trace is missing,
    e.g. no CUPTI)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:") and "CUSTOM" not in p.name]
    device = bool(planes)
    planes = planes or [p for p in data.planes if p.name.startswith("/host:CPU")]
    kernels = []
    for plane in planes:
        for line in plane.lines:
            if device and line.name.startswith(_NOT_KERNELS):
                continue
            for event in line.events:
                stats = dict(event.stats)
                hlo_op = _event_hlo_op(stats)
                if not device and hlo_op is None:
                    continue
                if module and module not in str(stats.get("hlo_module", module)):
                    continue
                kernels.append((event.name, hlo_op, float(event.start_ns), float(event.duration_ns)))
    return kernels, "device" if device else "host"


def jax_breakdown(trace_dir: str, steps: int, hlo_text: Optional[str] = None, module: Optional[str] = None) -> dict:
    """``summarize`` of a jax.profiler trace folder; phases from ``hlo_text``, the compiled step's HLO."""
    path = xplane_file(trace_dir)
    kernels, source = jax_kernels(path, module)
    out = summarize(kernels, steps, hlo_op_names(hlo_text) if hlo_text else None)
    out.update(trace=os.path.relpath(path, trace_dir), source=source)
    return out


# ---------------------------------------------------------------------------------------------
# torch.profiler traces (Chrome trace JSON, from ``prof.export_chrome_trace``).

def torch_kernels(path: str) -> list:
    """(name, None, start ns, duration ns) of the GPU kernels (``cat`` "kernel") of a Chrome trace."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [(e["name"], None, float(e["ts"]) * 1e3, float(e.get("dur", 0)) * 1e3)
            for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]


def torch_breakdown(path: str, steps: int) -> dict:
    return summarize(torch_kernels(path), steps)


def format_breakdown(summary: dict, title: str = "", wall_ms: Optional[float] = None) -> str:
    """The summary as lines: busy and kernel time per step, then each kind's and phase's share."""
    lines = [title] if title else []
    busy = summary["busy_ms_per_step"]
    idle = "" if wall_ms is None else f", idle {wall_ms - busy:.2f} ms of a {wall_ms:.2f} ms step"
    if not summary["kernels_per_step"]:
        return "\n".join(lines + ["  no device kernels in the trace"])
    lines.append(f"  {summary['kernels_per_step']:.0f} kernels/step, busy {busy:.2f} ms/step{idle}")
    for label, table in (("kind", summary["by_kind_ms"]), ("phase", summary.get("by_phase_ms") or {})):
        total = sum(table.values()) or 1.0
        lines.append(f"  by {label}: " + ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in table.items()))
    for item in summary["top"][:10]:
        lines.append(f"    {item['ms_per_step']:8.3f} ms  x{item['calls_per_step']:<5.0f} {item['kind']:<14} "
                     f"{item['phase']:<13} {item['op'][:60]}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a jax.profiler trace folder, or a torch Chrome trace (.json or .json.gz)")
    parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (the summary is per step)")
    parser.add_argument("--hlo", default=None, help="the compiled step's HLO text, .gz or not (JAX: phases; "
                        "default TRACE/step.hlo.txt.gz, which a run's config.profile and bench.py --profile write)")
    parser.add_argument("--module", default=None, help="JAX: only kernels of HLO modules whose name contains this")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not os.path.exists(args.trace):
        parser.error(f"{args.trace}: no such trace folder or file")
    if args.steps < 1:
        parser.error(f"--steps={args.steps}: the number of steps the trace holds, >= 1")
    if args.hlo and not os.path.isfile(args.hlo):
        parser.error(f"--hlo={args.hlo}: no such file")
    try:
        if os.path.isdir(args.trace):
            hlo_path = args.hlo or os.path.join(args.trace, "step.hlo.txt.gz")  # a run's config.profile writes it
            hlo = None
            if os.path.exists(hlo_path):
                with (gzip.open if hlo_path.endswith(".gz") else open)(hlo_path, "rt") as f:
                    hlo = f.read()
            summary = jax_breakdown(args.trace, args.steps, hlo, args.module)
        else:
            summary = torch_breakdown(args.trace, args.steps)
    except (OSError, ValueError, KeyError) as e:  # not a trace (json's decode error is a ValueError)
        parser.error(f"{args.trace}: not a readable jax.profiler folder or Chrome trace ({type(e).__name__}: {e})")
    print(format_breakdown(summary, args.trace))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
