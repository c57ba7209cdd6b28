"""plait: train transformer language models from one CPU core to thousands of GPUs, one config.

    import plait
    cfg = plait.build_config(overrides=["--train.steps=200"])
    result = plait.train(cfg)
    run = plait.load(result.run_dir)
    print(run.generate("def "))
"""

from plait.api import LoadedRun, load, train
from plait.config import Config, ConfigError, load_toml
from plait.validation import build_config

from plait._version import __version__

__all__ = ["Config", "ConfigError", "LoadedRun", "__version__", "build_config", "load", "load_toml", "train"]
