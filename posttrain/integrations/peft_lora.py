"""peft LoRA internals that posttrain uses (checked by tests/test_integrations.py).

- `LoraConfig._register_custom_module({base_cls: lora_cls})`: peft's documented but underscore-named hook for
  LoRA layers of module types it does not know. The ternary-aware adapter on a packed 1.58-bit base
  (posttrain.ternary.lora) is such a layer: its forward re-quantizes the base plus the adapter, which no stock
  peft layer does. The mapping lives on the config object only (it is not written to adapter_config.json), so
  every load of such an adapter registers it again.
"""

from __future__ import annotations


def register_lora_layer(config, base_class: type, lora_class: type) -> None:
    """Make peft wrap modules of base_class with lora_class when `config` is applied or loaded."""
    config._register_custom_module({base_class: lora_class})


def registered_lora_layers(config) -> dict:
    return dict(config._custom_modules or {})
