"""The local executor: runs a ``DenoiseProgram`` on this process's default device.

It chooses how the loop is compiled (XLA, graph mode, XLA islands on a CPU), runs it step by step
(a progress bar or callback sees every step) or fused (one program for the whole loop), and caches
the compiled functions per program, so one trace serves every step count, prompt and guidance scale.
Other executors keep the same ``run`` / ``decode`` / ``encode_text`` methods: ``ShardedExecutor``
in ``tf_diffusion.distributed`` spreads the batch over devices.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import ops


def to_tensors(tree):
    """Every array leaf of a nested dict as a tensor (float64 arrays as float32)."""

    def convert(value):
        if isinstance(value, np.ndarray) and value.dtype == np.float64:
            value = value.astype(np.float32)
        return ops.convert_to_tensor(value)

    return keras.tree.map_structure(convert, tree)


class LocalExecutor:
    """Runs denoising loops, decodes and text encodes in this process, caching compiled functions."""

    def __init__(self):
        self._compiled: dict = {}
        # What the last ``run`` did: {"compile": mode, "fused": ...}; and how many times loop or step
        # functions were traced so far (each trace is a compile), for tests and diagnostics.
        self.last_run: dict = {}
        self.traces = 0

    def __repr__(self) -> str:
        return "LocalExecutor()"

    def clear(self) -> None:
        """Forget every compiled function: what changes a layer's call (not only its variables) needs this,
        since a trace keeps the calls of its time."""
        self._compiled.clear()

    def compiled(self, key, make: Callable):
        """The function cached under ``key``, made by ``make()`` on first use."""
        if key not in self._compiled:
            self._compiled[key] = make()
        return self._compiled[key]

    # ------------------------------------------------------------------ loop

    def run(
        self,
        program,
        x,
        inputs: dict,
        *,
        callback: Callable | None = None,
        progress: bool = True,
        jit_compile=None,
        fused: bool | None = None,
        options=None,
    ) -> np.ndarray:
        """Run every evaluation of ``program`` from latents ``x``; returns the final latents.

        Args:
            program: the ``DenoiseProgram``.
            x: (N, h, w, C) starting latents.
            inputs: the loop inputs (``rows``, ``per_step``, ``shared``; see ``program``).
            callback: ``callback(step, timestep, latents)`` after every step (step-by-step loop only).
            progress: show a progress bar.
            jit_compile: True (XLA), False (no XLA), None (``execution.default_options``' choice).
            fused: one compiled function for the whole loop; default: under XLA (or islands) on an
                accelerator without a callback. On a CPU the loop runs step by step, so the bar moves
                per step and switching the bar on or off compiles nothing new.
            options: ``execution.ExecutionOptions`` to run under instead of ``jit_compile``'s choice.

        Raises:
            ValueError: for a callback with ``fused=True``, or both ``options`` and ``jit_compile``.
        """
        from tf_diffusion import execution

        accelerator = execution.has_accelerator()
        x = ops.convert_to_tensor(x, "float32")
        model = program.denoiser.backbone  # its dtype and layers choose the execution options
        if options is not None and jit_compile is not None:
            raise ValueError("pass either jit_compile or execution, not both: execution replaces jit_compile")
        opts = options or execution.default_options(
            model, tuple(x.shape), jit_compile=jit_compile, accelerator=accelerator
        )
        # What the fast paths need computed once per call (transformed filters, say).
        batch = int(x.shape[0]) * program.guidance.copies
        concat = inputs["rows"]["cond"].get("extra.concat")
        channels = int(x.shape[-1]) + (0 if concat is None else int(np.shape(concat)[-1]))
        prepared = execution.prepare(model, (batch, *tuple(x.shape[1:-1]), channels), opts)
        if fused is None:
            fused = opts.compile in ("xla", "islands") and callback is None and accelerator
        if fused and callback is not None:
            raise ValueError("callback needs the step-by-step loop; pass fused=False (or no callback)")
        self.last_run = {"compile": opts.compile, "fused": bool(fused)}
        tensors = to_tensors(inputs)
        state = program.sampler.init_state(x)
        timesteps = np.asarray(inputs["shared"]["timesteps"])
        if fused:
            loop = self.compiled(
                (program.key, opts, "fused"), lambda: execution.compile(self._counted(program.loop), opts)
            )
            bar = _progress(1, progress)
            x, _ = loop(x, state, tensors, execution_state=prepared)
            bar.update(1)
            bar.close()
            return ops.convert_to_numpy(x)
        step = self.compiled(
            (program.key, opts, "step"), lambda: execution.compile(self._counted(program.step), opts)
        )
        bar = _progress(len(timesteps), progress)
        for i in range(len(timesteps)):
            x, state = step(ops.convert_to_tensor(i, "int32"), x, state, tensors, execution_state=prepared)
            if callback is not None:
                callback(i, float(timesteps[i]), ops.convert_to_numpy(x))
            bar.update(1)
        bar.close()
        return ops.convert_to_numpy(x)

    def _counted(self, fn: Callable) -> Callable:
        def traced(*args):
            self.traces += 1  # runs once per trace, not per call
            return fn(*args)

        return traced

    # ------------------------------------------------------------ components

    def decode(self, vae, latents, jit_compile=None, tiling=None) -> np.ndarray:
        """Unscaled latents (N, h, w, C) -> images (N, H, W, 3) in [-1, 1], float32.

        ``tiling``: an ``execution.tiling.VAETiling`` to decode large latents tile by tile (one compiled
        decode per tile shape), as diffusers' ``enable_tiling``.
        """
        from tf_diffusion import execution
        from tf_diffusion.execution.tiling import tiled_decode

        opts = execution.default_options(vae, jit_compile=None if jit_compile is None else bool(jit_compile))
        fn = self.compiled(("decode", id(vae), opts), lambda: execution.compile(vae.decode, opts))

        def run(z):
            return ops.convert_to_numpy(ops.cast(fn(ops.convert_to_tensor(z, "float32")), "float32"))

        if tiling is None:
            return run(latents)
        return tiled_decode(run, np.asarray(latents, np.float32), tiling, vae.config.downsample_factor)

    def encode_text(self, text_encoder, ids, **options):
        """Token ids (B, T) -> float32 hidden states (B, T, D), in graph mode.

        ``options`` are the text encoder's call options (``clip_skip``, ``token_embeds`` for
        textual inversion's input vectors, ``final_norm``, ``pooled``); with ``pooled=True`` the
        result is a pair (hidden states, pooled embedding).
        """
        from tf_diffusion import execution

        opts = execution.ExecutionOptions(
            compile="graph" if keras.backend.backend() == "tensorflow" else "eager"
        )
        # One compiled function per set of option names: a tf.function traced without token_embeds
        # cannot take them on a later call (TF's function-type polymorphism fails on the new keyword).
        key = ("text", id(text_encoder), tuple(sorted(options)))
        fn = self.compiled(key, lambda: execution.compile(text_encoder, opts))
        out = fn(ids, **options)
        if isinstance(out, (tuple, list)):
            return tuple(ops.convert_to_numpy(ops.cast(o, "float32")) for o in out)
        return ops.convert_to_numpy(ops.cast(out, "float32"))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


class _TextBar:
    """A minimal progress bar on stderr when tqdm is not installed."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def update(self, n):
        import sys

        self.done += n
        sys.stderr.write(f"\rdenoising {self.done}/{self.total}")
        sys.stderr.flush()

    def close(self):
        import sys

        sys.stderr.write("\n")


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total)
    return tqdm(total=total, desc="denoising", leave=False)
