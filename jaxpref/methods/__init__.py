"""The preference methods, one module each behind the small interface of ``base.Method``.

``METHODS`` maps ``config.objective`` to a method class; the generic train step (``jaxpref.step``) calls
only that interface (``init_state``, ``begin_micro_step``, ``loss``) and the data feed reads what the class
declares (``data``, ``pair_order``, ``needs_rewards``). Adding an objective
means one new file here plus one line in ``METHODS``.
"""
from __future__ import annotations

from jaxpref.methods.base import Method
from jaxpref.methods.dpo import DPO
from jaxpref.methods.dro import DRO
from jaxpref.methods.kto import KTO
from jaxpref.methods.mapo import MaPO
from jaxpref.methods.sft import SFT
from jaxpref.methods.smpo import SmPO

METHODS: dict[str, type[Method]] = {"dpo": DPO, "dro": DRO, "smpo": SmPO, "sft": SFT, "kto": KTO, "mapo": MaPO}


def get_method(name: str) -> type[Method]:
    """The class of ``config.objective``; ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"config.objective={name!r}: supported {tuple(METHODS)}")
    return METHODS[name]
