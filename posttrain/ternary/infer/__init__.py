"""Running packed ternary models fast: the layer (linear.py), Triton kernels (kernel.py, gemv.py), the CPU
kernel (cpu.py) and CUDA-graph decoding (decode.py)."""
