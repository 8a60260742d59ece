"""The packaged default config (configs/tiny.py for installs without the repo's configs/ folder)."""
from jaxpref.config_lib import tiny_config as get_config  # noqa: F401
