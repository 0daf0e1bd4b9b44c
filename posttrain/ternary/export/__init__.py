"""Writing ternary models: transformers' BitNet folder (hf.py) and llama.cpp's GGUF TQ1_0/TQ2_0 (gguf.py)."""
