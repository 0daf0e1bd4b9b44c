"""Quantization-aware training at 1.58 bits: BitLinear layers (bitlinear.py) and the quantizer warm-up (warmup.py)."""
