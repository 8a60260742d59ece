"""Quiet libtpu on hosts without TPU chips.

With the ``[tpu]`` extra installed, libtpu loads when JAX starts its backends and, finding no TPU VM
metadata, prints warnings about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES on every run, though the CPU
backend and compiling for an abstract TPU topology (``python -m jaxpref.aot``) need neither. Off a TPU VM
this fills them with inert values before JAX reads them; on a TPU VM (or if the user set them) nothing
changes. Without chips there is nothing for processes to contend for, so several may load libtpu at
once (compiling for topologies in parallel, test workers): ALLOW_MULTIPLE_LIBTPU_LOAD.
"""
from __future__ import annotations

import glob
import os

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id


def has_tpu_chips() -> bool:
    """Whether this host has TPU chips (as JAX's Cloud TPU detection: a PCI device of Google's vendor id)."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def quiet_libtpu_off_tpu() -> None:
    """Set libtpu's host-topology variables to single-host defaults where no TPU chip is present."""
    if has_tpu_chips():
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "TPU_ACCELERATOR_TYPE" in os.environ:
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
