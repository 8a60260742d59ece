"""Measuring for the benchmark: XLA's FLOP counts, compiled and device memory, median wall time, and
the one table (``Row``, ``format_table``) that JAX's rows and the PyTorch reference's share."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import math
import os
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp

from jaxpref.flops import mfu, peak_flops, unet_flops, xla_flops  # noqa: F401  (xla_flops: the benchmarks' import)


def compiled_bytes(compiled) -> Optional[int]:
    """argument + output + temp − alias of a compiled program (its own footprint, per device)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_peak_bytes() -> Optional[int]:
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def peak(compiled) -> tuple[Optional[int], str]:
    """(bytes, source): the device high-water mark ("hwm") where the backend reports it, else the
    compiled program's memory_analysis ("xla")."""
    hwm = device_peak_bytes()
    if hwm is not None:
        return hwm, "hwm"
    b = compiled_bytes(compiled)
    return (b, "xla") if b is not None else (None, "")


def parse_share(value: str) -> tuple:
    """``--share-device DIR:N[:RANK]`` as (DIR, N) or (DIR, N, RANK), checked before anything is compiled."""
    head, _, last = value.rpartition(":")
    rank = None
    if head.rpartition(":")[2].isdigit() and last.isdigit() and head.rpartition(":")[0]:
        head, _, count = head.rpartition(":")
        rank = int(last)
    else:
        count = last
    folder = head
    if not folder or not count.isdigit() or int(count) < 1 or (rank is not None and not 0 <= rank < int(count)):
        raise ValueError(f"expected DIR:N or DIR:N:RANK (a fresh folder per group, N >= 1 processes, "
                         f"0 <= RANK < N), got {value!r}")
    return (folder, int(count)) if rank is None else (folder, int(count), rank)


def _marker(folder: str, what: str, share: tuple) -> str:
    """DIR/<what>.<rank> in a ranked group, DIR/<what>.<pid> otherwise."""
    return os.path.join(folder, f"{what}.{share[2] if len(share) > 2 else os.getpid()}")


def _count(folder: str, *whats: str) -> int:
    return sum(len(glob.glob(os.path.join(folder, f"{w}.*"))) for w in whats)


@contextlib.contextmanager
def timing_turn(share: Optional[tuple], log=print, wait_s: float = 900.0):
    """Several bench processes on one GPU: they compile at once (compiles are CPU work), then time one
    at a time. ``share`` is (DIR, N) or (DIR, N, RANK) from ``parse_share``: this process marks
    DIR/compiled.*, waits (at most ``wait_s``) until N processes have compiled or failed, then times while
    no other does: in rank order when ranked (rank r starts once ranks 0..r-1 are done or failed: the rows
    that matter most first, in case the run is cut short), else whoever holds DIR/lock. So no timed call
    runs beside another process's compile (its autotuning runs on the GPU) or timing. None: no sharing."""
    if not share:
        yield
        return
    folder, count = share[:2]
    os.makedirs(folder, exist_ok=True)
    open(_marker(folder, "compiled", share), "w").close()
    start = time.perf_counter()

    def waiting(ready):
        while not ready():
            if time.perf_counter() - start > wait_s:
                log(f"  timing_turn: gave up waiting after {wait_s:.0f} s; timing anyway")
                return
            time.sleep(0.5)

    waiting(lambda: _count(folder, "compiled", "failed") >= count)
    if len(share) > 2:
        rank = share[2]
        waiting(lambda: all(os.path.exists(os.path.join(folder, f"done.{r}"))
                            or os.path.exists(os.path.join(folder, f"failed.{r}")) for r in range(rank)))
        log(f"  timing_turn: turn {rank} of {count} after {time.perf_counter() - start:.1f} s")
        try:
            yield
        finally:
            open(_marker(folder, "done", share), "w").close()
        return
    with open(os.path.join(folder, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        log(f"  timing_turn: waited {time.perf_counter() - start:.1f} s for the others' compiles and timings")
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mark_failed(share: Optional[tuple]) -> None:
    """A process of a ``timing_turn`` group that will not time: the others need not wait for it."""
    if share:
        os.makedirs(share[0], exist_ok=True)
        open(_marker(share[0], "failed", share), "w").close()


def median_seconds(call, iters: int, warmup: int = 2) -> tuple[float, list[float]]:
    """Median wall seconds of ``call()``, which must block until its results are ready."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def unet_xla_flops(unet, params, size) -> tuple[float, float]:
    """XLA's FLOPs of one image's UNet forward and forward+backward (F, G) at this size."""
    text_shape = (size.text.max_position_embeddings, unet.cross_attention_dim)
    eps = lambda p, x, t, c: unet.apply({"params": p}, x, t, c).astype(jnp.float32)  # noqa: E731
    return unet_flops(eps, params, (size.latent, size.latent, unet.in_channels), text_shape)


@dataclasses.dataclass
class Row:
    """One timed workload. FLOPs are per call; seconds the median per call."""
    impl: str
    workload: str
    pairs: int
    seconds: float
    model_flops: Optional[float] = None
    xla_flops: Optional[float] = None
    peak_bytes: Optional[int] = None
    peak_source: str = ""          # "hwm" (device high-water mark), "xla" (compiled), "torch" (max_memory_allocated)
    compile_seconds: Optional[float] = None
    device: str = ""
    notes: str = ""
    times: list = dataclasses.field(default_factory=list)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        kind = self.device
        d.update(pairs_per_second=self.pairs_per_second,
                 model_tflops_per_s=None if self.model_flops is None else self.model_flops / self.seconds / 1e12,
                 xla_tflops_per_s=None if self.xla_flops is None else self.xla_flops / self.seconds / 1e12,
                 mfu_model=mfu(self.model_flops, self.seconds, kind), mfu_xla=mfu(self.xla_flops, self.seconds, kind),
                 peak_tflops=None if peak_flops(kind) is None else peak_flops(kind) / 1e12)
        return d


def row_from_dict(d: dict) -> Row:
    fields = {f.name for f in dataclasses.fields(Row)}
    return Row(**{k: v for k, v in d.items() if k in fields})


def fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(rows, title: str = "") -> str:
    """The one table: time, throughput, both FLOP counts with their MFU, peak memory."""
    head = (f"{'impl':<14} {'workload':<15} {'pairs':>5} {'ms/call':>9} {'pairs/s':>8} "
            f"{'TF model':>9} {'TF/s':>7} {'MFU':>6} {'TF xla':>9} {'TF/s':>7} {'MFU':>6} {'peak GiB':>12} "
            f"{'compile s':>9}  notes")
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        d = r.as_dict()
        peak_text = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f} {r.peak_source}"
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        lines.append(
            f"{r.impl:<14} {r.workload:<15} {r.pairs:>5} {r.seconds * 1e3:>9.2f} {r.pairs_per_second:>8.2f} "
            f"{fmt(None if r.model_flops is None else r.model_flops / 1e12, '.4g'):>9} "
            f"{fmt(d['model_tflops_per_s'], '.4g'):>7} {pct(d['mfu_model']):>6} "
            f"{fmt(None if r.xla_flops is None else r.xla_flops / 1e12, '.4g'):>9} "
            f"{fmt(d['xla_tflops_per_s'], '.4g'):>7} {pct(d['mfu_xla']):>6} {peak_text:>12} "
            f"{fmt(r.compile_seconds, '.1f'):>9}  {r.notes}")
    return "\n".join(lines)
