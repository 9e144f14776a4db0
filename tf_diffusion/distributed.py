"""generate() with the batch spread over devices: tf.distribute on TensorFlow, keras.distribution on JAX.

Everything random is drawn on the host by ``NoiseSource`` before the batch is split, and every image's
computation is independent of the others in its batch, so the images equal single-device ``generate()``
output up to float32 kernel differences (the tests measure them on two logical CPU devices).

Example (TensorFlow, all local GPUs)::

    import tensorflow as tf
    from tf_diffusion.distributed import ShardedStableDiffusion

    sharded = ShardedStableDiffusion(sd, tf.distribute.MirroredStrategy())
    images = sharded.generate(["a cat", "a dog"] * 4, seed=0, num_steps=25)   # 8 images, split evenly

On a TPU use ``tf.distribute.TPUStrategy(resolver)`` the same way; on JAX pass a
``keras.distribution.DataParallel`` (or nothing: all JAX devices).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import keras
import numpy as np

from tf_diffusion.pipeline import StableDiffusion, _default_jit_compile, has_accelerator


class ShardedStableDiffusion:
    """A ``StableDiffusion`` whose ``generate()`` runs the denoising loop and the VAE decode data-parallel.

    The host part of ``generate()`` (argument checks, tokenization and text encoding, NumPy noise, the
    sampler plan, img2img encoding) runs unchanged; the batch of N latents is then padded to a multiple of
    the replica count R (repeating the last row), cut into R equal slices, and each replica runs the same
    fused denoising loop (``ops.fori_loop``) and decode on its slice.

    Args:
        sd: the model. On TensorFlow, build or load it inside ``strategy.scope()`` (mirrored variables;
            required for ``TPUStrategy``, whose replicas cannot read host variables); with
            ``MirroredStrategy`` a model built outside works too, its variables read from their device.
        strategy: TensorFlow: a ``tf.distribute.Strategy`` (``MirroredStrategy`` on GPUs, ``TPUStrategy``
            on TPUs); default the current strategy. JAX: a ``keras.distribution.DataParallel``; default
            ``DataParallel()`` over every JAX device.

    Raises:
        ValueError: for a strategy of the wrong kind for the Keras backend.
    """

    def __init__(self, sd: StableDiffusion, strategy=None):
        if not isinstance(sd, StableDiffusion):
            raise ValueError(f"sd must be a StableDiffusion, got {type(sd).__name__}")
        self.sd = sd
        self.backend = keras.backend.backend()
        if self.backend == "tensorflow":
            import tensorflow as tf

            strategy = strategy if strategy is not None else tf.distribute.get_strategy()
            if not isinstance(strategy, tf.distribute.Strategy):
                raise ValueError(
                    f"strategy must be a tf.distribute.Strategy on the TensorFlow backend, got {strategy!r}"
                )
            self.num_replicas = int(strategy.num_replicas_in_sync)
        elif self.backend == "jax":
            strategy = strategy if strategy is not None else keras.distribution.DataParallel()
            if not isinstance(strategy, keras.distribution.DataParallel):
                raise ValueError(
                    f"strategy must be a keras.distribution.DataParallel on the JAX backend, got {strategy!r}"
                )
            self.num_replicas = int(np.prod(strategy.device_mesh.shape))
        else:
            raise ValueError(f"the {self.backend!r} backend is not supported; use tensorflow or jax")
        self.strategy = strategy
        # The devices the last denoise / decode was placed on (a check that it really was spread).
        self.last_devices: tuple[str, ...] = ()
        self._compiled: dict = {}

    def __repr__(self) -> str:
        return f"ShardedStableDiffusion({self.sd!r}, replicas={self.num_replicas})"

    def generate(self, prompt: str | Sequence[str], negative_prompt=None, **kwargs) -> np.ndarray:
        """``StableDiffusion.generate`` with the same arguments, data-parallel over the replicas.

        ``callback`` is not supported (the loop runs fused on the devices), nor ``fused=False``.

        Raises:
            ValueError: as ``generate``, and for ``callback`` or ``fused=False``.
        """
        if kwargs.get("callback") is not None:
            raise ValueError("callback is not supported when generating on several devices; leave it None")
        if kwargs.get("fused", True) is False:
            raise ValueError("fused=False is not supported on several devices; the loop always runs fused")
        kwargs["fused"] = None
        view = copy.copy(self.sd)  # shares the models and compiled functions; only two methods differ
        view._denoise = self._denoise
        view.decode = self.decode
        return StableDiffusion.generate(view, prompt, negative_prompt, **kwargs)

    # ------------------------------------------------------------------ parts

    def decode(self, latents, jit_compile: bool | None = None) -> np.ndarray:
        """``StableDiffusion.decode`` (unscaled latents -> images in [-1, 1]), data-parallel.

        ``jit_compile=None`` chooses as ``StableDiffusion.decode`` does (XLA on accelerators and for
        float32 on a CPU, graph mode for reduced precision on a CPU).
        """
        if jit_compile is None:
            jit_compile = _default_jit_compile(self.sd.vae, has_accelerator())
        latents = np.asarray(latents, np.float32)
        vae = self.sd.vae

        def decode(inputs, replicated):
            del replicated
            return keras.ops.cast(vae.decode(inputs["latents"]), "float32")

        key = ("decode", bool(jit_compile))
        return self._run(key, decode, {"latents": latents}, {}, {}, jit_compile=bool(jit_compile))

    def _denoise(
        self,
        sampler,
        plan,
        x,
        context,
        guidance,
        extra,
        blend,
        step_noise,
        *,
        callback,
        progress,
        jit_compile,
        fused,
    ) -> np.ndarray:
        """Replaces ``StableDiffusion._denoise``: the fused loop on every replica's slice of the batch."""
        del callback, progress, fused
        if jit_compile is None:  # the same choice as StableDiffusion.generate
            jit_compile = _default_jit_compile(self.sd.unet, has_accelerator())
        x = np.asarray(x, np.float32)
        n = x.shape[0]
        context = np.asarray(context, np.float32)
        # The context holds [uncond..., cond...] when guided; each replica gets its rows of both halves.
        halves = {"uncond": context[:n], "cond": context[n:]} if guidance is not None else {"cond": context}
        rows = {"x": x, **halves}
        if extra is not None:
            rows["extra"] = np.asarray(extra, np.float32)
        if blend is not None:
            rows.update(mask=blend[0], image_latents=blend[1], noise=blend[2])
        columns = {} if step_noise is None else {"step_noise": np.asarray(step_noise, np.float32)}
        replicated = {
            "tables": {k: np.asarray(v) for k, v in plan.tables.items()},
            "timesteps": np.asarray(plan.timesteps),
        }
        if guidance is not None:
            replicated["guidance"] = np.float32(guidance)
        if blend is not None:
            replicated["scales"] = np.asarray(blend[3], np.float32)
        loop = self.sd._make_loop(sampler)

        def denoise(inputs, shared):
            x = inputs["x"]
            if "uncond" in inputs:
                context = keras.ops.concatenate([inputs["uncond"], inputs["cond"]], axis=0)
            else:
                context = inputs["cond"]
            blend = None
            if "mask" in inputs:
                blend = (inputs["mask"], inputs["image_latents"], inputs["noise"], shared["scales"])
            out, _ = loop(
                x,
                sampler.init_state(x),
                inputs.get("step_noise"),
                shared["tables"],
                shared["timesteps"],
                context,
                shared.get("guidance"),
                inputs.get("extra"),
                blend,
            )
            return out

        key = (
            "denoise",
            sampler.name,
            sampler.config,
            getattr(sampler, "eta", None),
            tuple(sorted(rows)),
            tuple(sorted(columns)),
            tuple(sorted(replicated)),
            bool(jit_compile),
        )
        return self._run(key, denoise, rows, columns, replicated, jit_compile=bool(jit_compile))

    # ------------------------------------------------------------- machinery

    def _run(self, key, fn: Callable, rows: dict, columns: dict, replicated: dict, *, jit_compile: bool):
        """Run ``fn(inputs, replicated)`` on every replica's slice; returns the (N, ...) result on the host.

        ``rows`` are split along axis 0, ``columns`` (step noise, (E, N, ...)) along axis 1.
        """
        n = next(iter(rows.values())).shape[0]
        per = math.ceil(n / self.num_replicas)
        total = per * self.num_replicas
        rows = {k: _pad(v, total, axis=0) for k, v in rows.items()}
        columns = {k: _pad(v, total, axis=1) for k, v in columns.items()}
        if self.backend == "tensorflow":
            out = self._run_tf(key, fn, rows, columns, replicated, per, jit_compile)
        else:
            out = self._run_jax(key, fn, rows, columns, replicated)  # always jitted: SPMD needs it
        return out[:n]

    def _run_tf(self, key, fn, rows, columns, replicated, per, jit_compile) -> np.ndarray:
        import tensorflow as tf

        strategy = self.strategy

        def value_fn(ctx):
            r = ctx.replica_id_in_sync_group
            part = {k: v[r * per : (r + 1) * per] for k, v in rows.items()}
            part.update({k: v[:, r * per : (r + 1) * per] for k, v in columns.items()})
            return {k: tf.constant(v) for k, v in part.items()}

        inputs = strategy.experimental_distribute_values_from_function(value_fn)
        shared = tf.nest.map_structure(tf.constant, replicated)
        if key not in self._compiled:
            tpu_types = (tf.distribute.TPUStrategy, getattr(tf.distribute.experimental, "TPUStrategy", ()))
            on_tpu = isinstance(strategy, tuple(t for t in tpu_types if isinstance(t, type)))
            # TPUStrategy compiles each replica's function with XLA already; elsewhere only when asked.
            if on_tpu or not jit_compile:
                replica_fn = fn
            else:
                # A fresh XLA function per replica, traced in that replica's context: MirroredStrategy
                # traces one shared tf.function once for all replicas, as one XLA program that then
                # cannot read the mirrored variables held on the other devices.
                def replica_fn(inputs, shared):
                    return tf.function(fn, jit_compile=True)(inputs, shared)

            @tf.function(autograph=False, reduce_retracing=True)
            def distributed(inputs, shared):
                return strategy.run(replica_fn, args=(inputs, shared))

            self._compiled[key] = distributed
        result = self._compiled[key](inputs, shared)
        parts = strategy.experimental_local_results(result)
        # Eager tensors on logical CPUs all report CPU:0, so read the placement off the traced graph.
        graph = self._compiled[key].get_concrete_function(inputs, shared).graph
        self.last_devices = tuple(sorted({op.device for op in graph.get_operations() if op.device}))
        return np.concatenate([np.asarray(p) for p in parts], axis=0)

    def _run_jax(self, key, fn, rows, columns, replicated) -> np.ndarray:
        import jax

        distribution = self.strategy

        def place(value, batch_axis):
            layout = distribution.get_data_layout(value.shape)
            axes = [None] * value.ndim
            axes[batch_axis] = layout.axes[0]
            layout = keras.distribution.TensorLayout(axes, distribution.device_mesh)
            return keras.distribution.distribute_tensor(value, layout)

        inputs = {k: place(v, 0) for k, v in rows.items()}
        inputs.update({k: place(v, 1) for k, v in columns.items()})
        if key not in self._compiled:
            # jax.jit partitions the program over the devices the inputs are sharded across (SPMD).
            self._compiled[key] = jax.jit(fn)
        result = self._compiled[key](inputs, jax.tree_util.tree_map(jax.numpy.asarray, replicated))
        self.last_devices = tuple(sorted(str(d) for d in result.sharding.device_set))
        return np.asarray(result)


def _pad(array: np.ndarray, total: int, axis: int) -> np.ndarray:
    """``array`` with its last row along ``axis`` repeated until that axis has ``total`` entries."""
    missing = total - array.shape[axis]
    if missing <= 0:
        return array
    last = np.take(array, [-1], axis=axis)
    return np.concatenate([array, np.repeat(last, missing, axis=axis)], axis=axis)


def generate(sd: StableDiffusion, prompt, negative_prompt=None, *, strategy=None, **kwargs) -> np.ndarray:
    """One-off ``ShardedStableDiffusion(sd, strategy).generate(prompt, negative_prompt, **kwargs)``.

    Keep a ``ShardedStableDiffusion`` instead when generating repeatedly: it caches the compiled functions.
    """
    return ShardedStableDiffusion(sd, strategy).generate(prompt, negative_prompt, **kwargs)
