"""generate() with the batch spread over devices: tf.distribute on TensorFlow, keras.distribution on JAX.

Everything random is drawn on the host from each image's seed (``tf_diffusion.noise``) before the batch
is split, and every image's computation is independent of the others in its batch, so the images equal
single-device ``generate()`` output up to float32 kernel differences (the tests measure them on two
logical CPU devices).

Example (TensorFlow, all local GPUs)::

    import tensorflow as tf
    from tf_diffusion.distributed import ShardedStableDiffusion

    sharded = ShardedStableDiffusion(sd, tf.distribute.MirroredStrategy())
    images = sharded.generate(["a cat", "a dog"] * 4, seed=0, num_steps=25)   # 8 images, split evenly

On a TPU use ``tf.distribute.TPUStrategy(resolver)`` the same way; on JAX pass a
``keras.distribution.DataParallel`` (or nothing: all JAX devices).

Model parallelism (JAX, transformer families: Flux, SD3): a ``keras.distribution.ModelParallel`` over a
("batch", "model") mesh (``execution.model_parallel``) splits the transformer's block kernels over the
"model" axis and the batch over the "batch" axis; the text encoders and the VAE stay whole (replicated
reads of the default device's copy). ``ShardedStableDiffusion.from_pretrained`` loads a model with the
transformer created on its shards, so it is never whole on one device::

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), jax.devices())
    sharded = ShardedStableDiffusion.from_pretrained("black-forest-labs/FLUX.1-schnell", mesh,
                                                     quantize="int8", dtype="mixed_bfloat16")
    images = sharded.generate(["a cat", "a dog"], num_steps=4, seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras
import numpy as np

from tf_diffusion.denoising import LocalExecutor
from tf_diffusion.pipeline import StableDiffusion, _default_jit_compile, has_accelerator


class ShardedExecutor:
    """An executor (see ``tf_diffusion.denoising``) that runs the loop and the decode data-parallel.

    The host part of ``generate()`` (argument checks, tokenization and text encoding, the seeded noise,
    the sampler plan, img2img encoding) runs unchanged; the batch of N latents and every per-image
    loop input is then padded to a multiple of the replica count R (repeating the last row), cut into R
    equal slices, and each replica runs the same fused denoising loop (``ops.fori_loop``) and decode.

    Args:
        strategy: TensorFlow: a ``tf.distribute.Strategy`` (``MirroredStrategy`` on GPUs, ``TPUStrategy``
            on TPUs); default the current strategy. JAX: a ``keras.distribution.DataParallel``; default
            ``DataParallel()`` over every JAX device; or a ``keras.distribution.ModelParallel`` whose
            layouts shard the backbone (``execution.model_parallel.model_parallel``): the replicas are
            then the mesh's "batch" axis, and the backbone's variables are passed into the compiled
            loop as arguments, so it reads each kernel's shards where they lie.

    Raises:
        ValueError: for a strategy of the wrong kind for the Keras backend.
    """

    def __init__(self, strategy=None):
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
            if isinstance(strategy, keras.distribution.ModelParallel):
                mesh = strategy.device_mesh
                self.num_replicas = int(mesh.shape[list(mesh.axis_names).index(strategy.batch_dim_name)])
            elif isinstance(strategy, keras.distribution.DataParallel):
                self.num_replicas = int(np.prod(strategy.device_mesh.shape))
            else:
                raise ValueError(
                    "strategy must be a keras.distribution.DataParallel or ModelParallel on the JAX backend, "
                    f"got {strategy!r}"
                )
        else:
            raise ValueError(f"the {self.backend!r} backend is not supported; use tensorflow or jax")
        self.strategy = strategy
        # The devices the last denoise / decode was placed on (a check that it really was spread).
        self.last_devices: tuple[str, ...] = ()
        self._compiled: dict = {}
        self._host = LocalExecutor()  # the text encoder runs on the host, as in generate()

    def __repr__(self) -> str:
        return f"ShardedExecutor(replicas={self.num_replicas})"

    def encode_text(self, text_encoder, ids, **options):
        return self._host.encode_text(text_encoder, ids, **options)

    def run(
        self,
        program,
        x,
        inputs: dict,
        *,
        callback=None,
        progress=True,
        jit_compile=None,
        fused=None,
        options=None,
    ):
        """The fused loop of ``program`` on every replica's slice of the batch; returns (N, h, w, C).

        Raises:
            ValueError: for a callback or ``fused=False`` (the loop always runs fused on the devices).
        """
        del progress
        if options is not None:
            raise ValueError("execution options are not supported on several devices; leave execution None")
        if callback is not None:
            raise ValueError("callback is not supported when generating on several devices; leave it None")
        if fused is False:
            raise ValueError("fused=False is not supported on several devices; the loop always runs fused")
        if jit_compile is None:  # the same choice as the local executor's whole-loop default
            jit_compile = _default_jit_compile(program.denoiser.backbone, has_accelerator())
        rows = {"x": np.asarray(x, np.float32), **inputs["rows"]}
        per_step = inputs.get("per_step", {})

        def denoise(parts, steps, shared):
            parts = dict(parts)
            x = parts.pop("x")
            out, _ = program.loop(
                x, program.sampler.init_state(x), {"rows": parts, "per_step": steps, "shared": shared}
            )
            return out

        key = (
            "denoise",
            program.key,
            _structure(rows),
            _structure(per_step),
            _structure(inputs["shared"]),
            bool(jit_compile),
        )
        return self._run(
            key,
            denoise,
            rows,
            per_step,
            inputs["shared"],
            jit_compile=bool(jit_compile),
            backbone=program.denoiser.backbone,
        )

    def decode(self, vae, latents, jit_compile=None, tiling=None) -> np.ndarray:
        """Unscaled latents -> images in [-1, 1], data-parallel (defaults as the local executor's).

        ``tiling`` (``enable_vae_tiling``): every tile is decoded data-parallel over the batch.
        """
        from tf_diffusion.execution.tiling import tiled_decode

        if jit_compile is None:
            jit_compile = _default_jit_compile(vae, has_accelerator())

        def decode(parts, steps, shared):
            del steps, shared
            return keras.ops.cast(vae.decode(parts["latents"]), "float32")

        def run(z):
            key = ("decode", id(vae), bool(jit_compile))
            return self._run(
                key, decode, {"latents": np.asarray(z, np.float32)}, {}, {}, jit_compile=bool(jit_compile)
            )

        latents = np.asarray(latents, np.float32)
        return (
            run(latents)
            if tiling is None
            else tiled_decode(run, latents, tiling, vae.config.downsample_factor)
        )

    # ------------------------------------------------------------- machinery

    def _run(
        self,
        key,
        fn: Callable,
        rows: dict,
        columns: dict,
        replicated: dict,
        *,
        jit_compile: bool,
        backbone=None,
    ):
        """Run ``fn(rows, columns, replicated)`` on every replica's slice; returns the (N, ...) result.

        ``rows`` (nested dicts of arrays) are split along axis 0, ``columns`` (step noise, (E, N, ...))
        along axis 1; ``replicated`` goes to every replica whole. ``backbone``: the model whose
        variables a ``ModelParallel`` run passes in as arguments.
        """
        n = np.asarray(rows["x"] if "x" in rows else rows["latents"]).shape[0]
        per = math.ceil(n / self.num_replicas)
        total = per * self.num_replicas
        rows = keras.tree.map_structure(lambda v: _pad(np.asarray(v), total, axis=0), rows)
        columns = keras.tree.map_structure(lambda v: _pad(np.asarray(v), total, axis=1), columns)
        replicated = keras.tree.map_structure(np.asarray, replicated)
        if self.backend == "tensorflow":
            out = self._run_tf(key, fn, rows, columns, replicated, per, jit_compile)
        else:
            out = self._run_jax(key, fn, rows, columns, replicated, backbone)  # always jitted: SPMD
        return out[:n]

    def _run_tf(self, key, fn, rows, columns, replicated, per, jit_compile) -> np.ndarray:
        import tensorflow as tf

        strategy = self.strategy

        def value_fn(ctx):
            r = ctx.replica_id_in_sync_group
            part = tf.nest.map_structure(lambda v: tf.constant(v[r * per : (r + 1) * per]), rows)
            steps = tf.nest.map_structure(lambda v: tf.constant(v[:, r * per : (r + 1) * per]), columns)
            return {"rows": part, "columns": steps}

        inputs = strategy.experimental_distribute_values_from_function(value_fn)
        shared = tf.nest.map_structure(tf.constant, replicated)
        if key not in self._compiled:
            tpu_types = (tf.distribute.TPUStrategy, getattr(tf.distribute.experimental, "TPUStrategy", ()))
            on_tpu = isinstance(strategy, tuple(t for t in tpu_types if isinstance(t, type)))

            # TPUStrategy compiles each replica's function with XLA already; elsewhere only when asked.
            def call(inputs, shared):
                return fn(inputs["rows"], inputs["columns"], shared)

            if on_tpu or not jit_compile:
                replica_fn = call
            else:
                # A fresh XLA function per replica, traced in that replica's context: MirroredStrategy
                # traces one shared tf.function once for all replicas, as one XLA program that then
                # cannot read the mirrored variables held on the other devices.
                def replica_fn(inputs, shared):
                    return tf.function(call, jit_compile=True, autograph=False)(inputs, shared)

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

    def _run_jax(self, key, fn, rows, columns, replicated, backbone=None) -> np.ndarray:
        import jax

        distribution = self.strategy
        # Model parallel: the backbone's (sharded) variables are arguments of the compiled program,
        # read through a StatelessScope; captured, they would be baked into it as constants.
        variables = []
        if backbone is not None and isinstance(distribution, keras.distribution.ModelParallel):
            variables = list(backbone.variables)

        def place(value, batch_axis):
            layout = distribution.get_data_layout(value.shape)
            axes = [None] * value.ndim
            axes[batch_axis] = layout.axes[0]
            layout = keras.distribution.TensorLayout(axes, distribution.device_mesh)
            return keras.distribution.distribute_tensor(value, layout)

        parts = jax.tree_util.tree_map(lambda v: place(v, 0), rows)
        steps = jax.tree_util.tree_map(lambda v: place(v, 1), columns)
        if key not in self._compiled:

            def with_variables(values, parts, steps, shared):
                if not variables:
                    return fn(parts, steps, shared)
                with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                    return fn(parts, steps, shared)

            # jax.jit partitions the program over the devices the inputs are sharded across (SPMD).
            self._compiled[key] = jax.jit(with_variables)
        shared = jax.tree_util.tree_map(jax.numpy.asarray, replicated)
        result = self._compiled[key]([v.value for v in variables], parts, steps, shared)
        self.last_devices = tuple(sorted(str(d) for d in result.sharding.device_set))
        return np.asarray(result)


class ShardedStableDiffusion:
    """A ``StableDiffusion`` whose ``generate()`` runs the denoising loop and the VAE decode data-parallel.

    ``sd.generate(..., executor=ShardedExecutor(strategy))`` with the executor kept, so its compiled
    functions are reused.

    Args:
        sd: the model. On TensorFlow, build or load it inside ``strategy.scope()`` (mirrored variables;
            required for ``TPUStrategy``, whose replicas cannot read host variables); with
            ``MirroredStrategy`` a model built outside works too, its variables read from their device.
        strategy: as ``ShardedExecutor``. A ``keras.distribution.ModelParallel`` (JAX) must hold the
            layouts of ``sd.transformer`` (``execution.model_parallel.model_parallel(sd.transformer,
            mesh)``); a transformer not yet on them is moved onto them (``shard_model``: each split
            kernel is whole on its device until then; ``from_pretrained`` never makes it whole).

    Raises:
        ValueError: for a strategy of the wrong kind for the Keras backend, or a ``ModelParallel``
            for a model without a transformer.
    """

    def __init__(self, sd: StableDiffusion, strategy=None):
        if not isinstance(sd, StableDiffusion):
            raise ValueError(f"sd must be a StableDiffusion, got {type(sd).__name__}")
        if isinstance(strategy, keras.distribution.ModelParallel):
            from tf_diffusion.execution import model_parallel

            if getattr(sd, "transformer", None) is None:
                raise ValueError(
                    "a ModelParallel strategy shards a transformer backbone (Flux, SD3); this model has "
                    "none: run it with keras.distribution.DataParallel"
                )
            if getattr(sd, "model_parallel", None) is not strategy:
                model_parallel.shard_model(sd.transformer, strategy)
                sd.model_parallel = strategy
        self.sd = sd
        self.executor = ShardedExecutor(strategy)
        self.strategy = self.executor.strategy
        self.num_replicas = self.executor.num_replicas

    def __repr__(self) -> str:
        return f"ShardedStableDiffusion({self.sd!r}, replicas={self.num_replicas})"

    @classmethod
    def from_pretrained(
        cls, source, device_mesh, *, quantize=None, quantize_components=None, **kwargs
    ) -> ShardedStableDiffusion:
        """Load a transformer model (Flux, SD3) model-parallel over ``device_mesh`` (JAX only).

        As ``StableDiffusion.from_pretrained``, but the transformer is built with every variable on
        its shards before its weights are read (``execution.model_parallel.build_sharded_pipeline``),
        so a model larger than one device loads; the text encoders and the VAE go to the default device.

        Args:
            source: a diffusers folder, an original single file or a hub id, as ``from_pretrained``.
            device_mesh: a ``keras.distribution.DeviceMesh`` with axes ("batch", "model"): the
                transformer's kernels split over "model", the batch over "batch".
            quantize: "int8": int8 weights (``execution.quantize``) for ``quantize_components``
                (default: the transformer and the text encoders), the transformer's created sharded.
            quantize_components: which components to quantize.
            **kwargs: the family loader's arguments (``dtype``, ...).

        Returns:
            a ``ShardedStableDiffusion`` over the mesh's "batch" axis.

        Raises:
            ValueError: on a backend other than JAX, for a model without a transformer, a mesh with
                other axes or one whose model axis does not divide a split width, and as
                ``from_pretrained``.
        """
        from functools import partial

        from tf_diffusion.execution import model_parallel
        from tf_diffusion.family_hooks import hooks_for_source

        if keras.backend.backend() != "jax":
            raise ValueError(
                "ShardedStableDiffusion.from_pretrained (model parallelism) needs the JAX backend "
                f"(KERAS_BACKEND=jax); this is {keras.backend.backend()!r}"
            )
        build = partial(
            model_parallel.build_sharded_pipeline, StableDiffusion, device_mesh, quantize, quantize_components
        )
        hooks = hooks_for_source(source, revision=kwargs.get("revision"))
        sd = hooks.load(build, source, **kwargs)
        return cls(sd, sd.model_parallel)

    @property
    def last_devices(self) -> tuple[str, ...]:
        """The devices the last denoise / decode was placed on."""
        return self.executor.last_devices

    def generate(self, prompt: str | Sequence[str], negative_prompt=None, **kwargs):
        """``StableDiffusion.generate`` with the same arguments, data-parallel over the replicas.

        ``callback`` is not supported (the loop runs fused on the devices), nor ``fused=False``.

        Raises:
            ValueError: as ``generate``, and for ``callback`` or ``fused=False``.
        """
        if "executor" in kwargs:
            raise ValueError(
                "ShardedStableDiffusion.generate runs on its own executor; do not pass executor="
            )
        return self.sd.generate(prompt, negative_prompt, executor=self.executor, **kwargs)

    def decode(self, latents, jit_compile: bool | None = None) -> np.ndarray:
        """``StableDiffusion.decode`` (unscaled latents -> images in [-1, 1]), data-parallel."""
        return self.executor.decode(self.sd.vae, latents, jit_compile, tiling=self.sd.vae_tiling)


def _pad(array: np.ndarray, total: int, axis: int) -> np.ndarray:
    """``array`` with its last row along ``axis`` repeated until that axis has ``total`` entries."""
    missing = total - array.shape[axis]
    if missing <= 0:
        return array
    last = np.take(array, [-1], axis=axis)
    return np.concatenate([array, np.repeat(last, missing, axis=axis)], axis=axis)


def _structure(tree) -> tuple:
    """The nested key paths of a dict tree (what a traced function's input structure depends on)."""
    if not isinstance(tree, dict):
        return ()
    return tuple((k, _structure(v)) for k, v in sorted(tree.items()))


def generate(sd: StableDiffusion, prompt, negative_prompt=None, *, strategy=None, **kwargs) -> np.ndarray:
    """One-off ``ShardedStableDiffusion(sd, strategy).generate(prompt, negative_prompt, **kwargs)``.

    Keep a ``ShardedStableDiffusion`` instead when generating repeatedly: it caches the compiled functions.
    """
    return ShardedStableDiffusion(sd, strategy).generate(prompt, negative_prompt, **kwargs)
