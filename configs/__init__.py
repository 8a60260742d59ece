"""The experiments: one file per run, each a ``get_config()`` (see jaxpref.config_lib). Installed as
``jaxpref.configs``; ``python -m jaxpref.train --config=configs/<name>.py``."""
