"""Autotuning that collapses to a single config under the Triton interpreter.

Under TRITON_INTERPRET=1 (CPU tests) benchmarking configs is meaningless and slow, so only
the first config, the safe default, is kept. Only kernels whose launches are idempotent (they
never read what they write) may be autotuned: the tuner runs each config on the real tensors.
"""
import os

import triton


def interpreted(fn) -> bool:
    """Whether a @triton.jit function was built for the interpreter (decided at decoration)."""
    return type(fn).__name__ == "InterpretedFunction"


def interpreter_ready() -> bool:
    """Whether kernels can run under the interpreter: Triton's own library functions
    (tl.zeros, tl.sum's combine...) are built for it only when TRITON_INTERPRET=1 was set
    before triton.language was first imported."""
    import triton.language.standard as standard
    return interpreted(standard.zeros)


def interpreting() -> bool:
    """Whether kernels decorated from now on will run under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune(configs, key, **kwargs):
    """``triton.autotune`` over ``configs``; only ``configs[0]`` when interpreting."""
    def decorator(fn):
        kept = configs[:1] if interpreted(fn) or interpreting() else configs
        return triton.autotune(configs=kept, key=key, **kwargs)(fn)
    return decorator
