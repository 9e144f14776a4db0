"""The one execution context: frozen options, read at trace time from a ``contextvars`` variable.

Every fast path reads ``current()`` while a function is traced, so two threads tracing at once
(a server) each see their own options: a new thread starts from ``ExecutionOptions()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable

COMPILE_MODES = ("xla", "graph", "islands", "eager")
ATTENTION_CHOICES = ("auto", "xla", "off")


@dataclasses.dataclass(frozen=True)
class ExecutionOptions:
    """How a model runs; what it computes never changes (every choice matches the reference).

    Attributes:
        compile: "xla" (one XLA program; ``jax.jit`` under JAX), "graph" (TensorFlow graph mode),
            "islands" (TensorFlow graph mode with each UNet block its own XLA cluster, the
            self-attention scores in graph mode between them) or "eager" (no compilation).
        winograd: where XLA compiles on a CPU (under "xla", inside islands), let 3x3
            convolutions run as Winograd F(2x2, 3x3) / F(4x4, 3x3) and 2x upsamplings feeding a
            3x3 convolution in sub-pixel form, where the autotuner finds that faster.
        graph_matmuls: under "islands", let a ResBlock run its two convolutions' matmuls in
            graph mode (oneDNN) between three islands, where the autotuner finds that faster.
        prepared_filters: under "islands", let ``prepare`` transform such ResBlocks' filters once
            per call (held in memory while the call runs) where the autotuner finds that faster.
        attention: the fused attention kernel for JAX on a GPU: "auto" (cuDNN flash attention
            where it applies), "xla" (``jax.nn.dot_product_attention``'s XLA form), "off" (the
            explicit form everywhere). Other backends and devices always use the explicit form.
        head_attention_elements: under "islands", score elements (heads x rows x keys) per block
            of the self-attention core, sized to stay in the CPU cache.
        post_attention_tokens: under "islands", tokens per block of a transformer block's work
            after the self-attention core (None: one block).
        autotune: measure candidates on this machine (True), take the conservative one of every
            choice (False: direct convolutions, one island per block), or follow the
            ``TF_DIFFUSION_AUTOTUNE`` environment variable (None; "0" turns tuning off).
        choose: decide without measuring: ``choose(op, key, candidates) -> name`` returns one of
            the candidate names (tests force paths with it); None measures.

    Raises:
        ValueError: for a compile mode or attention choice that is not allowed, or a block size
            below 1.
    """

    compile: str = "eager"
    winograd: bool = False
    graph_matmuls: bool = False
    prepared_filters: bool = False
    attention: str = "auto"
    head_attention_elements: int = 2**20
    post_attention_tokens: int | None = 1024
    autotune: bool | None = None
    choose: Callable[[str, tuple, tuple], str] | None = None

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"ExecutionOptions.compile={self.compile!r} must be one of {COMPILE_MODES}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"ExecutionOptions.attention={self.attention!r} must be one of {ATTENTION_CHOICES}"
            )
        for name in ("head_attention_elements", "post_attention_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ExecutionOptions.{name}={value!r} must be an integer >= 1")

    def replace(self, **changes) -> ExecutionOptions:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


_DEFAULT = ExecutionOptions()
_OPTIONS: contextvars.ContextVar[ExecutionOptions | None] = contextvars.ContextVar(
    "tf_diffusion_execution_options", default=None
)
# Whether the code being traced now is compiled by XLA (an "xla" function, or inside an island).
_IN_XLA: contextvars.ContextVar[bool] = contextvars.ContextVar("tf_diffusion_in_xla", default=False)
# What ``prepare`` returned for the call being traced (the traced function's argument).
_STATE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tf_diffusion_state", default=None)


def current() -> ExecutionOptions:
    """The options of the calling thread's active ``options`` context (defaults outside any)."""
    opts = _OPTIONS.get()
    return _DEFAULT if opts is None else opts


@contextlib.contextmanager
def options(opts: ExecutionOptions):
    """Trace (or run) model calls under ``opts`` in this thread.

    Example:
        >>> with execution.options(ExecutionOptions(compile="islands", winograd=True)):
        ...     y = traced(x)  # traced now: its blocks see these options
    """
    if not isinstance(opts, ExecutionOptions):
        raise ValueError(f"options() takes an ExecutionOptions, got {type(opts).__name__}")
    token = _OPTIONS.set(opts)
    try:
        yield opts
    finally:
        _OPTIONS.reset(token)


@contextlib.contextmanager
def _scope(*, opts=None, in_xla=None, state=None, set_state=False):
    """Set any of the context variables for the duration of a trace."""
    tokens = []
    if opts is not None:
        tokens.append((_OPTIONS, _OPTIONS.set(opts)))
    if in_xla is not None:
        tokens.append((_IN_XLA, _IN_XLA.set(bool(in_xla))))
    if set_state:
        tokens.append((_STATE, _STATE.set(state)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def in_xla() -> bool:
    """Whether the code traced now is compiled by XLA (an "xla" function or an island)."""
    return _IN_XLA.get()


@contextlib.contextmanager
def using_state(state: dict | None):
    """Trace model calls with ``state`` (from ``prepare``) available to the fast paths.

    ``compile``'s functions do this for their ``execution_state`` argument; use it directly
    only around calls traced some other way.
    """
    with _scope(state=state, set_state=True):
        yield


def prepared_state() -> dict | None:
    """The ``prepare`` state bound to the trace now, if any."""
    return _STATE.get()
