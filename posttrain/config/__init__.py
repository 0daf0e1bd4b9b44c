"""The typed run config (schema.py), its strict YAML loader with did-you-mean errors (strict.py), and the
generated reference of every key (reference.py)."""

from posttrain.config.schema import Config, dump_yaml, load_config

__all__ = ["Config", "dump_yaml", "load_config"]
