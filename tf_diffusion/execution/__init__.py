"""How models run, apart from what they compute: compilation modes and CPU fast paths.

The model files (``layers``, ``unet``, ``vae``, ``clip``) compute what the reference computes.
This package runs the same maths faster, chosen through one explicit, thread-safe context:

- ``ExecutionOptions``: a frozen dataclass (compile mode "xla" | "graph" | "islands" |
  "eager", Winograd on/off, graph-mode matmuls, prepared filters, fused attention, block sizes,
  autotuning).
- ``default_options(model, latent_shape=None, *, jit_compile=None, accelerator=None)``: what
  ``generate()`` uses (``jit_compile`` True/False/None maps onto the options).
- ``compile(fn, options)``: ``fn`` compiled and traced under ``options``; the result takes an
  extra keyword ``execution_state``.
- ``apply(model)``: give a built model's layers their processors (by layer class, as diffusers
  swaps attention processors); idempotent, done by ``StableDiffusion`` for its UNet and VAE.
- ``prepare(unet, model_input_shape, options) -> state``: what a call needs computed once
  (today: transformed filters); pass it as ``compiled(..., execution_state=state)``.
- ``options(opts)`` / ``current()``: the context itself (``contextvars``), read at trace time.
- ``lean``: the VAE decoder's GroupNorm + SiLU over large activations in row blocks (graph and
  eager TensorFlow), so a 1024x1024 decode holds no full-size float32 intermediates.
- ``quantize`` (imported on its own): weight-only int8 Linear weights, applied at load time
  (``from_pretrained(..., quantize="int8")``).
- ``model_parallel`` (imported on its own, JAX only): the Flux transformer and SD3's MMDiT sharded
  over a ("batch", "model") device mesh (``keras.distribution.ModelParallel``).
- ``autotune``: choices measured on the machine at hand, cached per CPU
  (``TF_DIFFUSION_AUTOTUNE=0`` turns measuring off; ``TF_DIFFUSION_AUTOTUNE_CACHE`` names the
  JSON file, "" keeps it in memory).

Example:
    >>> opts = execution.default_options(sd.unet, (1, 64, 64, 4))   # islands on a CPU
    >>> state = execution.prepare(sd.unet, (2, 64, 64, 4), opts)
    >>> step = execution.compile(step_fn, opts)
    >>> x = step(x, t, context, execution_state=state)

Measurements behind every fast path and default are in benchmarks/README.md.
"""

from tf_diffusion.execution import autotune
from tf_diffusion.execution.compiling import (
    ISLAND_MIN_LATENT_PIXELS,
    compile,
    default_options,
    has_accelerator,
)
from tf_diffusion.execution.cpu import PROCESSORS, apply, island_names, prepare, resblock_input_sizes
from tf_diffusion.execution.options import (
    ATTENTION_CHOICES,
    COMPILE_MODES,
    ExecutionOptions,
    current,
    options,
    using_state,
)

__all__ = [
    "ATTENTION_CHOICES",
    "COMPILE_MODES",
    "ISLAND_MIN_LATENT_PIXELS",
    "PROCESSORS",
    "ExecutionOptions",
    "apply",
    "autotune",
    "compile",
    "current",
    "default_options",
    "has_accelerator",
    "island_names",
    "options",
    "prepare",
    "resblock_input_sizes",
    "using_state",
]
