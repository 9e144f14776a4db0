"""Compiling a function under execution options, and the options generate() uses by default."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import keras

from tf_diffusion.execution.options import ExecutionOptions, _scope

# Latent pixels (H * W) above which the float32 UNet runs faster as islands than as one XLA
# program on a CPU (benchmarks/README.md, "Islands").
ISLAND_MIN_LATENT_PIXELS = 32 * 32


# XLA on TensorFlow's CPU maps a few pages per compiled kernel (about 700 mappings for one step of a
# micro UNet, thousands for a full one) and frees none of them while the process lives. Linux stops a
# process at vm.max_map_count mappings (65,530 by default), and XLA then crashes the process
# (SIGSEGV) instead of failing. Past SOFT_MAPPING_SHARE of the limit the default choice stops
# compiling with XLA (graph mode instead); past HARD_MAPPING_SHARE an XLA compile asked for
# explicitly is an error.
SOFT_MAPPING_SHARE = 0.6
HARD_MAPPING_SHARE = 0.85


def memory_mappings() -> tuple[int, int] | None:
    """(mappings this process holds, the kernel's limit), or None where Linux's /proc is absent."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return used, limit


def _mapping_share() -> float:
    counts = memory_mappings()
    return 0.0 if counts is None else counts[0] / counts[1]


def check_xla_headroom() -> None:
    """Refuse an XLA compile that could crash the process (see ``HARD_MAPPING_SHARE``).

    Raises:
        RuntimeError: when the process holds more than ``HARD_MAPPING_SHARE`` of its memory
            mappings.
    """
    counts = memory_mappings()
    if counts is not None and counts[0] > HARD_MAPPING_SHARE * counts[1]:
        raise RuntimeError(
            f"this process holds {counts[0]} of its {counts[1]} memory mappings (vm.max_map_count), "
            f"most of them code of earlier XLA compiles, which TensorFlow never frees; another XLA "
            f"compile could crash it. Run without XLA (jit_compile=False), restart the process, or "
            f"raise vm.max_map_count (sysctl)"
        )


def has_accelerator() -> bool:
    """Whether the active Keras backend sees a GPU or TPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    return False


def default_options(
    model, latent_shape=None, *, jit_compile: bool | None = None, accelerator: bool | None = None
) -> ExecutionOptions:
    """The options ``generate`` runs ``model`` under.

    XLA where it is the faster choice: on accelerators, under JAX, and for a float32 model on a
    CPU; TensorFlow graph mode for a reduced-precision model on a CPU (faster there). A float32
    UNet on TensorFlow's CPU with latents above ``ISLAND_MIN_LATENT_PIXELS`` runs as islands. On
    a CPU, wherever XLA compiles, Winograd convolutions and sub-pixel upsamplings are allowed
    (the autotuner decides where they run); islands also allow graph-mode matmuls and prepared
    filters (benchmarks/README.md). A process that has used most of its memory mappings on earlier
    XLA compiles (``SOFT_MAPPING_SHARE``) gets graph mode instead, with one warning.

    Args:
        model: the component to run (its compute dtype decides on a CPU).
        latent_shape: (B, H, W, C) of the UNet's latents; None for other components.
        jit_compile: None chooses as above; True forces one XLA program ("xla"), False no XLA
            ("graph" on TensorFlow, "eager" under JAX).
        accelerator: whether a GPU/TPU is used; None asks ``has_accelerator()``.

    Returns:
        The ExecutionOptions.

    Raises:
        ValueError: for a ``jit_compile`` other than True, False or None.
    """
    if jit_compile is not None and not isinstance(jit_compile, bool):
        raise ValueError(
            f"jit_compile={jit_compile!r} must be True, False or None; for XLA islands pass "
            f"execution=ExecutionOptions(compile='islands', ...)"
        )
    accel = has_accelerator() if accelerator is None else bool(accelerator)
    backend = keras.backend.backend()
    if jit_compile is None:
        jit = accel or backend == "jax" or keras.backend.standardize_dtype(model.compute_dtype) == "float32"
    else:
        jit = jit_compile
    if backend != "tensorflow":
        return ExecutionOptions(compile="xla" if jit else "eager")
    if jit and jit_compile is None and not accel and _mapping_share() > SOFT_MAPPING_SHARE:
        _warn_mappings_once()
        jit = False
    if not jit:
        return ExecutionOptions(compile="graph")
    if accel:
        return ExecutionOptions(compile="xla")
    if jit_compile is None and latent_shape is not None:
        h, w = latent_shape[1], latent_shape[2]
        if h is not None and w is not None and h * w > ISLAND_MIN_LATENT_PIXELS:
            return ExecutionOptions(
                compile="islands", winograd=True, graph_matmuls=True, prepared_filters=True
            )
    return ExecutionOptions(compile="xla", winograd=True)


_warned: list = []


def _warn_mappings_once() -> None:
    if not _warned:
        _warned.append(True)
        counts = memory_mappings()
        warnings.warn(
            f"this process holds {counts[0]} of its {counts[1]} memory mappings, most of them code "
            f"of earlier XLA compiles (never freed); new programs now run in graph mode, without XLA",
            RuntimeWarning,
            stacklevel=3,
        )


def compile(fn: Callable, options: ExecutionOptions) -> Callable:  # noqa: A001 - execution.compile
    """``fn`` compiled for the active Keras backend as ``options`` say, traced under them.

    The returned function takes ``fn``'s arguments plus an optional keyword
    ``execution_state``: what ``prepare`` returned for this call (tensors), bound to the trace
    so that the fast paths find it; the caller need not know what it holds.

    Args:
        fn: the function to compile (a step, a fused loop, a decode).
        options: how to compile and trace it.

    Returns:
        A callable: a ``tf.function`` (XLA for "xla"; graph mode with XLA islands for
        "islands"), ``jax.jit`` for "xla" under JAX, or ``fn`` run eagerly under the options.

    Raises:
        ValueError: for "islands" off TensorFlow, or options of the wrong type.
        RuntimeError: when called (traced) for an XLA compile on TensorFlow while the process
            is close to its memory-mapping limit (``check_xla_headroom``).
    """
    if not isinstance(options, ExecutionOptions):
        raise ValueError(f"options must be an ExecutionOptions, got {type(options).__name__}")
    backend = keras.backend.backend()
    if options.compile == "islands" and backend != "tensorflow":
        raise ValueError(f"ExecutionOptions(compile='islands') needs the TensorFlow backend, not {backend!r}")
    xla = options.compile == "xla"

    def traced(*args, execution_state=None, **kwargs):
        if backend == "tensorflow" and options.compile in ("xla", "islands"):
            check_xla_headroom()  # each trace is a new XLA compile
        with _scope(opts=options, in_xla=xla, state=execution_state, set_state=True):
            return fn(*args, **kwargs)

    if options.compile == "eager":
        return traced
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(traced, jit_compile=xla, reduce_retracing=True, autograph=False)
    if backend == "jax" and xla:
        import jax

        return jax.jit(traced)
    return traced
