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
        # What the last ``run`` did: {"jit_compile": ..., "fused": ...}; and how many times loop or step
        # functions were traced so far (each trace is a compile), for tests and diagnostics.
        self.last_run: dict = {}
        self.traces = 0

    def __repr__(self) -> str:
        return "LocalExecutor()"

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
    ) -> np.ndarray:
        """Run every evaluation of ``program`` from latents ``x``; returns the final latents.

        Args:
            program: the ``DenoiseProgram``.
            x: (N, h, w, C) starting latents.
            inputs: the loop inputs (``rows``, ``per_step``, ``shared``; see ``program``).
            callback: ``callback(step, timestep, latents)`` after every step (step-by-step loop only).
            progress: show a progress bar.
            jit_compile: True (XLA), False (graph mode), None (the default for the model and device).
            fused: one compiled function for the whole loop; default: under XLA on an accelerator
                without a callback (on a CPU the loop runs step by step, so the bar moves per step and
                switching the bar on or off compiles nothing new).

        Raises:
            ValueError: for a callback with ``fused=True``.
        """
        from tf_diffusion.pipeline import ISLANDS, _compile, _default_loop_compile, has_accelerator

        accelerator = has_accelerator()
        x = ops.convert_to_tensor(x, "float32")
        model = program.denoiser.unet
        if jit_compile is None:
            jit_compile = _default_loop_compile(model, accelerator, tuple(x.shape))
        execution = None
        if jit_compile == ISLANDS and keras.backend.backend() == "tensorflow":
            # Transformed filters for this call's size, computed once rather than every step.
            batch = int(x.shape[0]) * program.guidance.copies
            execution = model.prepare_filters((batch,) + tuple(x.shape[1:]))
        if fused is None:
            fused = bool(jit_compile) and callback is None and accelerator
        if fused and callback is not None:
            raise ValueError("callback needs the step-by-step loop; pass fused=False (or no callback)")
        self.last_run = {"jit_compile": jit_compile, "fused": bool(fused)}
        tensors = to_tensors(inputs)
        state = program.sampler.init_state(x)
        timesteps = np.asarray(inputs["shared"]["timesteps"])
        if fused:
            loop = self.compiled(
                (program.key, jit_compile, "fused"),
                lambda: _compile(self._counted(program.loop), jit_compile),
            )
            bar = _progress(1, progress)
            x, _ = loop(x, state, tensors, execution)
            bar.update(1)
            bar.close()
            return ops.convert_to_numpy(x)
        step = self.compiled(
            (program.key, jit_compile, "step"), lambda: _compile(self._counted(program.step), jit_compile)
        )
        bar = _progress(len(timesteps), progress)
        for i in range(len(timesteps)):
            x, state = step(ops.convert_to_tensor(i, "int32"), x, state, tensors, execution)
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

    def decode(self, vae, latents, jit_compile=None) -> np.ndarray:
        """Unscaled latents (N, h, w, C) -> images (N, H, W, 3) in [-1, 1], float32."""
        from tf_diffusion.pipeline import _compile, _default_jit_compile, has_accelerator

        jit = _default_jit_compile(vae, has_accelerator()) if jit_compile is None else bool(jit_compile)
        fn = self.compiled(("decode", id(vae), jit), lambda: _compile(vae.decode, jit_compile=jit))
        return ops.convert_to_numpy(ops.cast(fn(ops.convert_to_tensor(latents, "float32")), "float32"))

    def encode_text(self, text_encoder, ids) -> np.ndarray:
        """Token ids (B, T) -> float32 hidden states (B, T, D)."""
        from tf_diffusion.pipeline import _compile

        fn = self.compiled(("text", id(text_encoder)), lambda: _compile(text_encoder, jit_compile=False))
        return ops.convert_to_numpy(ops.cast(fn(ids), "float32"))


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
