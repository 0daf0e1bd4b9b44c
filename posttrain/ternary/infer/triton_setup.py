"""Importing triton on first use, and the host-side helpers both kernel modules share.

triton (the `kernels` extra) is imported when a kernel is first built, not with posttrain: importing it fixes
the interpreter mode (TRITON_INTERPRET), which tests set before.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def import_triton():
    """(triton, triton.language), or a RuntimeError that says how to install it."""
    try:
        import triton
        import triton.language as language
    except ImportError as err:
        raise RuntimeError(f"triton is not usable here ({err}): pip install 'posttrain[kernels]'") from err
    return triton, language


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: triton's is a constexpr_function whose wrapper costs ~6 us per call from Python
    (measured on the CPU runner), several times per decode launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 for host code (n >= 1), without its wrapper's cost (see cdiv)."""
    return 1 << (n - 1).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def built_kernels(namespace: dict, cache: dict, build) -> dict:
    """The kernels build() makes, once per TRITON_INTERPRET mode. `triton` and `tl` are set in the kernel module's
    namespace first: its kernel functions read `tl` as a global when they are compiled or interpreted."""
    mode = interpreting()
    if mode not in cache:
        namespace["triton"], namespace["tl"] = import_triton()
        cache[mode] = build()
    return cache[mode]
