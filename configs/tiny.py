"""The embedded default: DRO on the shapes world with the shipped tiny model (CPU, minutes).

Same as running ``python -m jaxpref.train`` with no --config; see jaxpref.config_lib.tiny_config for
what it trains, the data, the cost and the expected result. Other objectives on the same world:

  python -m jaxpref.train --config=configs/tiny.py --config.objective=dpo --workdir=/tmp/tiny_dpo
  python -m jaxpref.train --config=configs/tiny.py --config.objective=smpo --workdir=/tmp/tiny_smpo
"""
from jaxpref import config_lib


def get_config():
    return config_lib.tiny_config()
