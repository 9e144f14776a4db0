"""The trainers: the VAE, and the text encoder + UNet with the noise-prediction loss.

The loss is written in ``keras.ops`` and runs on TensorFlow or JAX. What is backend-specific is the step
that differentiates and applies it, built once per trainer: ``tf.function`` + ``tf.GradientTape`` under
``tf.distribute`` here (``_build_step``), ``jax.value_and_grad`` over stateless calls in
``training.jax_step`` under ``KERAS_BACKEND=jax``. The random draws (caption dropout, posterior noise,
timesteps, noise) are TensorFlow stateless draws on both backends (``_draw``), so a JAX step sees the
draws a TensorFlow step sees. Two trainers share one loop:

- ``VAETrainer``: reconstruction (L1, L2 or both) of images through a posterior sample, plus a small
  KL term, as the LDM autoencoder is trained (without its adversarial and perceptual terms).
- ``DiffusionTrainer``: noise images' latents with the pipeline's training schedule and regress the
  UNet's output onto epsilon, v or x0 (``SchedulerConfig.prediction_type``), with caption dropout for
  classifier-free guidance. Train the UNet only, or the UNet and text encoder; the VAE stays frozen.

Both keep an exponential moving average of the trained weights in separate variables (export those),
write checkpoints that resume exactly (weights, EMA, optimizer state and step in one safetensors file,
replaced atomically; random draws are stateless functions of (seed, step, replica), so the step is the
whole RNG state), show a progress bar, and run their step under any ``tf.distribute`` strategy.

Example:
    >>> sd = StableDiffusion.from_preset("tiny-shapes")
    >>> trainer = DiffusionTrainer(sd, train="unet+text_encoder", config=TrainingConfig(learning_rate=2e-4))
    >>> data = dataset_from_arrays(images, captions, sd.tokenizer, batch_size=32)
    >>> trainer.fit(data, steps=10_000, checkpoint_dir="ckpt")
    >>> trainer.export_ema()  # {"unet": {key: array}, "text_encoder": {...}} in checkpoint layout
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_diffusion.config import from_dict, to_dict
from tf_diffusion.schedulers.schedule import alphas_cumprod
from tf_diffusion.training.config import (
    CHECKPOINT_FORMAT,
    TRAIN_PREFIXES,
    TRAIN_TARGETS,
    TrainingConfig,
)
from tf_diffusion.weights.safetensors_io import load_safetensors, save_safetensors
from tf_diffusion.weights.state_dict import named_parameters, state_dict


def drop_captions(token_ids, empty_ids, rate: float, seed):
    """Replace each row of ``token_ids`` by ``empty_ids`` with probability ``rate`` (stateless).

    Args:
        token_ids: (B, L) int token ids (SDXL: (B, 2, L), both tokenizers').
        empty_ids: (L,) the ids of the empty prompt "" ((2, L) for SDXL).
        rate: drop probability in [0, 1].
        seed: a (2,) int seed for ``tf.random.stateless_uniform``.

    Returns:
        (B, L) token ids.
    """
    token_ids = tf.convert_to_tensor(token_ids)
    draw = tf.random.stateless_uniform(tf.shape(token_ids)[:1], seed=seed)  # (B,)
    empty = tf.cast(tf.convert_to_tensor(empty_ids), token_ids.dtype)[None]  # (1, L) or (1, 2, L)
    keep = tf.reshape(draw < rate, [-1] + [1] * (len(token_ids.shape) - 1))
    return tf.where(keep, empty, token_ids)


def draw_timesteps(
    seed, batch, num_timesteps: int, high_noise_fraction: float = 0.0, high_noise_start: float = 0.5
):
    """(batch,) int32 training timesteps, uniform on [0, T), with a share moved to [start * T, T).

    Args:
        seed: a (2,) int seed for ``tf.random.stateless_uniform``.
        batch: number of timesteps.
        num_timesteps: T.
        high_noise_fraction: the first round(fraction * batch) entries map t -> lo + t * (T - lo) // T
            with lo = round(high_noise_start * T), a uniform draw on [lo, T); 0 leaves the uniform
            draw untouched.
        high_noise_start: start of the noisier range as a fraction of T (0.5: the noisier half).
    """
    t = tf.random.stateless_uniform((batch,), seed=seed, minval=0, maxval=num_timesteps, dtype=tf.int32)
    if high_noise_fraction <= 0:
        return t
    lo = int(round(high_noise_start * num_timesteps))
    count = tf.cast(tf.round(high_noise_fraction * tf.cast(batch, tf.float32)), tf.int32)
    return tf.where(tf.range(batch) < count, lo + t * (num_timesteps - lo) // num_timesteps, t)


class _WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup`` steps, then constant."""

    def __init__(self, peak: float, warmup: int):
        self.peak, self.warmup = float(peak), int(warmup)

    def __call__(self, step):
        if self.warmup == 0:
            return ops.convert_to_tensor(self.peak, "float32")
        frac = ops.minimum(1.0, (ops.cast(step, "float32") + 1.0) / float(self.warmup))
        return self.peak * frac

    def get_config(self):
        return {"peak": self.peak, "warmup": self.warmup}


class _Progress:
    """tqdm when installed, else a line printed every few seconds."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.enabled, self.total, self.n = enabled, total, initial
        self._bar, self._last = None, 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, logs: dict):
        self.n += 1
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        elif time.monotonic() - self._last > 10 or self.n == self.total:
            self._last = time.monotonic()
            print(f"step {self.n}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()


class _TrainerBase:
    """The loop, optimizer, EMA and checkpoints shared by both trainers."""

    kind = ""

    def __init__(
        self, components: dict, train: str, config: TrainingConfig, strategy, params: list | None = None
    ):
        self.config = config
        self.train = train
        _check_backend(strategy)
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        self.components = components  # name -> keras model
        self.trained = {name: components[name] for name in TRAIN_TARGETS[train]}
        if params is None:
            # (component, key, variable) for every trained weight, in a fixed order.
            prefixes = TRAIN_PREFIXES.get(train, ("",))
            params = [
                (name, key, getattr(layer, attr))
                for name, model in self.trained.items()
                for key, (layer, attr) in named_parameters(model).items()
                if key.startswith(prefixes)
            ]
        self._params = params
        self.trainable_variables = [v for _, _, v in self._params]
        # One AdamW per learning rate: the text encoder's weights may have their own
        # (config.text_encoder_learning_rate); every optimizer steps once per train step.
        te_lr = config.text_encoder_learning_rate
        groups: dict[float, list[int]] = {}
        for i, (name, _, _) in enumerate(self._params):
            lr = te_lr if te_lr is not None and name.startswith("text_encoder") else config.learning_rate
            groups.setdefault(lr, []).append(i)
        if not groups:
            groups = {config.learning_rate: []}
        with self.strategy.scope():
            self._optimizers = []
            for lr, indices in groups.items():
                variables = [self.trainable_variables[i] for i in indices]
                optimizer = keras.optimizers.AdamW(
                    learning_rate=_WarmupConstant(lr, config.warmup_steps),
                    weight_decay=config.weight_decay,
                    beta_1=config.adam_beta1,
                    beta_2=config.adam_beta2,
                    epsilon=config.adam_epsilon,
                )
                # Decay only matrices and kernels, as is usual for transformers and UNets.
                optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
                optimizer.build(variables)
                self._optimizers.append((optimizer, indices))
            self.optimizer = self._optimizers[0][0]  # its iterations are the step
            self.ema_variables = (
                [_ema_variable(v, f"ema_{i}") for i, v in enumerate(self.trainable_variables)]
                if config.ema_decay is not None
                else []
            )
        self._step_fn = None
        self._loss_fn = None

    # ------------------------------------------------------------ hooks

    def _checkpoint_metadata(self) -> dict[str, str]:
        """Extra checkpoint metadata that a resuming trainer must match (e.g. the LoRA setup)."""
        return {}

    def _optimizer_variables(self) -> list:
        return [v for optimizer, _ in self._optimizers for v in optimizer.variables]

    def _draw(self, batch, seed):
        """The random draws of one step from a (2,) seed, with TensorFlow's stateless ops (on the host
        under JAX): ``{name: tensor}`` that ``_loss`` reads; subclasses define it."""
        raise NotImplementedError

    def _loss(self, batch, draws):
        """(loss scalar for these examples, logs dict) in ``keras.ops``; subclasses define it."""
        raise NotImplementedError

    def _replica_loss(self, batch, seed):
        """(loss scalar for this replica's examples, logs dict)."""
        return self._loss(batch, self._draw(batch, seed))

    # -------------------------------------------------------------- step

    @property
    def step(self) -> int:
        """Optimizer updates done so far (the checkpointed step)."""
        return int(self.optimizer.iterations.numpy())

    def _seed(self):
        """A (2,) int64 stateless seed from (config seed, step, replica id)."""
        ctx = tf.distribute.get_replica_context()
        base = tf.stack(
            [tf.constant(self.config.seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)]
        )
        return tf.random.experimental.stateless_fold_in(base, ctx.replica_id_in_sync_group)

    def _replica_step(self, *batch):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync
        seed = self._seed()

        def loss_and_grads(*batch):
            with tf.GradientTape() as tape:
                loss, logs = self._replica_loss(batch, seed)
            grads = tape.gradient(loss, self.trainable_variables)
            # A weight the loss does not reach has no gradient: SDXL's CLIP-L LoRA in its last layer,
            # which the penultimate states skip. It gets a zero one: Adam's moments stay 0, so only the
            # weight decay moves it, which the loss does not see either.
            grads = [
                tf.zeros_like(v) if g is None else g
                for g, v in zip(grads, self.trainable_variables, strict=True)
            ]
            return loss, logs, grads

        if self.config.jit_compile:
            loss_and_grads = tf.function(loss_and_grads, jit_compile=True, autograph=False)
        loss, logs, grads = loss_and_grads(*batch)
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        # Each replica's loss is the mean over its own examples: the mean over the global batch is
        # the cross-replica sum divided by the replica count.
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        grads = [g / replicas for g in grads]
        if self.config.grad_clip_norm is not None:
            grads, norm = tf.clip_by_global_norm(grads, self.config.grad_clip_norm)
            logs = dict(logs, grad_norm=norm)
        # Keras sums gradients across replicas again; hand it each replica's share of the mean.
        shares = [g / replicas for g in grads]
        for optimizer, indices in self._optimizers:
            optimizer.apply_gradients([(shares[i], self.trainable_variables[i]) for i in indices])
        return dict(logs, loss=loss)

    def _update_ema(self):
        if not self.ema_variables:
            return
        n = tf.cast(self.optimizer.iterations, tf.float32)  # updates done, >= 1 here
        decay = tf.constant(self.config.ema_decay, tf.float32)
        if self.config.ema_warmup:
            decay = tf.minimum(decay, (1.0 + n) / (10.0 + n))
        for ema, v in zip(self.ema_variables, self.trainable_variables, strict=True):
            ema.assign(ema * decay + tf.cast(v.value, ema.dtype) * (1.0 - decay))

    def _build_step(self):
        """The step for the Keras backend: ``batch -> logs``; jitted (traced) once per batch shape."""
        if keras.backend.backend() == "jax":
            from tf_diffusion.training.jax_step import build_step

            return build_step(self)
        strategy = self.strategy

        def step(batch):
            per_replica = strategy.run(self._replica_step, args=tuple(batch))
            logs = {
                k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in per_replica.items()
            }
            self._update_ema()
            return logs

        return tf.function(step, autograph=False)

    def train_step(self, batch) -> dict[str, float]:
        """Run one optimisation step on a (global) batch; returns the logged values as floats.

        Args:
            batch: the tuple the data pipeline yields (a per-replica value under a multi-device
                strategy, as ``strategy.experimental_distribute_dataset`` gives).
        """
        if self._step_fn is None:
            self._step_fn = self._build_step()
        logs = self._step_fn(tuple(batch))
        return {k: float(np.asarray(v)) for k, v in logs.items()}

    def compute_loss(self, batch, seeds: Sequence[int] = (0,)) -> float:
        """The loss on ``batch`` without updating anything, averaged over fixed random draws.

        For monitoring (e.g. a held-out batch) with the current strategy's default device.

        Args:
            batch: a (images, token_ids) or (images,) tuple of tensors or arrays.
            seeds: each seed fixes one draw of noise, timesteps and caption dropout.
        """
        if self._loss_fn is None:
            if keras.backend.backend() == "jax":
                from tf_diffusion.training.jax_step import build_loss

                self._loss_fn = build_loss(self)
            else:
                self._loss_fn = tf.function(
                    lambda batch, seed: self._replica_loss(batch, seed)[0], autograph=False
                )
        batch = tuple(tf.convert_to_tensor(np.asarray(b)) for b in batch)
        losses = [
            float(np.asarray(self._loss_fn(batch, tf.constant([self.config.seed, s], tf.int64))))
            for s in seeds
        ]
        return float(np.mean(losses))

    # --------------------------------------------------------------- fit

    def fit(
        self,
        data,
        steps: int,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_s: float = 300.0,
        keep_checkpoints: int = 2,
        time_limit_s: float | None = None,
        callbacks: Sequence[Callable] = (),
        progress: bool = True,
        log_file: str | os.PathLike | None = None,
    ) -> list[dict]:
        """Train until ``steps`` optimizer updates are done (counting resumed ones).

        With ``checkpoint_dir``, the newest checkpoint there is restored first and a new one is
        written every ``checkpoint_every_s`` seconds and at the end.

        Args:
            data: a ``tf.data.Dataset`` (or iterable) of global batches, or a callable
                ``data(start_step)`` returning one that starts at that step (so a resumed run
                continues the data stream instead of repeating it).
            steps: total number of updates to reach.
            checkpoint_dir: where checkpoints live; None writes none.
            checkpoint_every_s: seconds between checkpoints.
            keep_checkpoints: how many of the newest checkpoints to keep.
            time_limit_s: stop (and checkpoint) after this many seconds even if ``steps`` is not reached.
            callbacks: called as ``callback(trainer, step, logs)`` after every step.
            progress: show a progress bar.
            log_file: append one JSON line of logs per 10 steps to this file.

        Returns:
            The logs of the steps run, one dict per step.
        """
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
            latest = latest_checkpoint(checkpoint_dir)
            if latest is not None:
                self.load_checkpoint(latest)
        start = self.step
        dataset = data(start) if callable(data) else data
        if isinstance(dataset, tf.data.Dataset) and self.strategy.num_replicas_in_sync > 1:
            dataset = self.strategy.experimental_distribute_dataset(dataset)
        history: list[dict] = []
        bar = _Progress(steps, start, progress, self.kind)
        t0 = last_ckpt = time.monotonic()
        log = open(log_file, "a") if log_file is not None else None  # noqa: SIM115 - closed below
        try:
            iterator = iter(dataset)
            while self.step < steps:
                logs = self.train_step(next(iterator))
                step = self.step
                history.append(logs)
                bar.update({k: v for k, v in logs.items() if k in ("loss", "rec", "kl")})
                if log is not None and step % 10 == 0:
                    log.write(json.dumps({"step": step, "time": time.time(), **logs}) + "\n")
                    log.flush()
                for callback in callbacks:
                    callback(self, step, logs)
                now = time.monotonic()
                if checkpoint_dir is not None and now - last_ckpt >= checkpoint_every_s:
                    self.save_checkpoint(checkpoint_dir, keep=keep_checkpoints)
                    last_ckpt = now
                if time_limit_s is not None and now - t0 >= time_limit_s:
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
        if checkpoint_dir is not None and history:
            self.save_checkpoint(checkpoint_dir, keep=keep_checkpoints)
        return history

    # ------------------------------------------------------------- EMA

    @contextlib.contextmanager
    def ema_weights(self):
        """Context in which the trained models hold their EMA weights (e.g. to sample or export)."""
        if not self.ema_variables:
            yield
            return
        saved = [v.numpy() for v in self.trainable_variables]
        for v, ema in zip(self.trainable_variables, self.ema_variables, strict=True):
            v.assign(ema.numpy())
        try:
            yield
        finally:
            for v, value in zip(self.trainable_variables, saved, strict=True):
                v.assign(value)

    def export_ema(self, dtype: str | None = None) -> dict[str, dict[str, np.ndarray]]:
        """The EMA weights (the raw weights when no EMA is kept) of each trained component.

        Args:
            dtype: cast floating arrays to this numpy dtype ("float16" for release files); None keeps float32.

        Returns:
            component name -> {checkpoint key: torch-layout array} of the trained keys (only the
            decoder's for "vae_decoder"), ready for ``save_safetensors``.
        """
        prefixes = TRAIN_PREFIXES.get(self.train, ("",))
        with self.ema_weights():
            out = {
                name: {k: v for k, v in state_dict(model).items() if k.startswith(prefixes)}
                for name, model in self.trained.items()
            }
        if dtype is not None:
            out = {n: {k: v.astype(dtype) for k, v in sd.items()} for n, sd in out.items()}
        return out

    # ------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: str | os.PathLike, keep: int = 2) -> str:
        """Write ``ckpt-<step>.safetensors`` into ``folder`` atomically and keep the ``keep`` newest.

        The file holds the trained weights (``model/<component>/<key>``), their EMA
        (``ema/<component>/<key>``, Keras layout), the optimizer variables (``optimizer/<index>``)
        and, as metadata, the step, the trainer kind and the TrainingConfig.

        Returns:
            The path written.
        """
        tensors = {}
        for (name, key, v), ema in zip(
            self._params, self.ema_variables or [None] * len(self._params), strict=True
        ):
            tensors[f"model/{name}/{key}"] = np.asarray(v.numpy())
            if ema is not None:
                tensors[f"ema/{name}/{key}"] = ema.numpy()
        for i, v in enumerate(self._optimizer_variables()):
            tensors[f"optimizer/{i:05d}"] = np.asarray(keras.ops.convert_to_numpy(v))
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "train": self.train,
            "step": str(self.step),
            "training_config": json.dumps(to_dict(self.config)),
            **self._checkpoint_metadata(),
        }
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(os.fspath(folder), f"ckpt-{self.step:08d}.safetensors")
        save_safetensors(tensors, path, metadata=metadata, overwrite=True)
        for old in _checkpoints(folder)[:-keep] if keep > 0 else []:
            with contextlib.suppress(FileNotFoundError):
                os.remove(old)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore weights, EMA, optimizer state and step from a ``save_checkpoint`` file.

        Raises:
            ValueError: if the file is not a checkpoint of this trainer kind, or a tensor is missing
                or has the wrong shape.
        """
        from tf_diffusion.weights.safetensors_io import open_safetensors

        with open_safetensors(path) as f:
            meta = dict(f.metadata or {})
        if (
            meta.get("format") != CHECKPOINT_FORMAT
            or meta.get("kind") != self.kind
            or meta.get("train") != self.train
        ):
            raise ValueError(
                f"{path}: not a {self.kind} checkpoint training {self.train!r} "
                f"(format={meta.get('format')!r}, kind={meta.get('kind')!r}, train={meta.get('train')!r})"
            )
        own = self._checkpoint_metadata()
        differ = {k: (meta.get(k), v) for k, v in own.items() if meta.get(k) != v}
        if differ:
            raise ValueError(
                f"{path}: checkpoint of another setup: "
                + "; ".join(f"{k}: file {a!r}, this trainer {b!r}" for k, (a, b) in differ.items())
            )
        tensors = load_safetensors(path)
        pairs = []
        for i, (name, key, v) in enumerate(self._params):
            pairs.append((f"model/{name}/{key}", v))
            if self.ema_variables:
                pairs.append((f"ema/{name}/{key}", self.ema_variables[i]))
        pairs += [(f"optimizer/{i:05d}", v) for i, v in enumerate(self._optimizer_variables())]
        problems = [
            f"{k}: missing"
            if k not in tensors
            else f"{k}: shape {tensors[k].shape}, expected {tuple(v.shape)}"
            for k, v in pairs
            if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape)
        ]
        if problems:
            raise ValueError(
                f"{path}: checkpoint does not fit this trainer:\n  " + "\n  ".join(problems[:20])
            )
        for k, v in pairs:
            v.assign(tensors[k])


def _check_backend(strategy) -> None:
    """Refuse a backend the trainers have no step for, and ``tf.distribute`` strategies outside TensorFlow."""
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise ValueError(
            f"training runs on the TensorFlow and JAX Keras backends; KERAS_BACKEND={backend!r} is not supported"
        )
    if backend == "jax" and strategy is not None and strategy is not tf.distribute.get_strategy():
        raise ValueError(
            f"strategy={type(strategy).__name__} is a tf.distribute strategy, which the JAX backend does not "
            "run; under KERAS_BACKEND=jax set a keras.distribution (e.g. DataParallel) instead"
        )


def _ema_variable(variable, name: str):
    """A copy of ``variable`` for its moving average: a ``tf.Variable`` on TensorFlow (the step assigns it
    inside ``tf.function`` and a strategy mirrors it), a ``keras.Variable`` holding a JAX array on JAX."""
    if keras.backend.backend() == "jax":
        return keras.Variable(np.asarray(variable.numpy()), trainable=False, name=name)
    return tf.Variable(variable.value, trainable=False, name=name)


def _latent_noise_shape(images, factor: int, channels: int):
    """The posterior's shape (B, H/f, W/f, C) for ``images``, static where the images' shape is."""
    static, dynamic = images.shape, tf.shape(images)
    dims = [static[0] if static[0] is not None else dynamic[0]]
    dims += [static[i] // factor if static[i] is not None else dynamic[i] // factor for i in (1, 2)]
    return tf.stack([*dims, channels])


def _pixels(images):
    """H * W * channels of (B, H, W, C) images as a float32 scalar."""
    shape = images.shape[1:]
    if None not in shape:
        return float(np.prod(shape))
    return ops.cast(ops.prod(ops.convert_to_tensor(ops.shape(images)[1:])), "float32")


def _checkpoints(folder) -> list[str]:
    """Checkpoint paths in ``folder``, oldest first."""
    paths = glob.glob(os.path.join(os.fspath(folder), "ckpt-*.safetensors"))
    return sorted(p for p in paths if re.fullmatch(r"ckpt-\d+\.safetensors", os.path.basename(p)))


def latest_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest ``ckpt-<step>.safetensors`` in ``folder``, or None."""
    found = _checkpoints(folder) if os.path.isdir(folder) else []
    return found[-1] if found else None


class VAETrainer(_TrainerBase):
    """Train an AutoencoderKL on images in [-1, 1]: reconstruction of a posterior sample plus KL.

    Args:
        vae: the AutoencoderKL to train (built inside ``strategy.scope()`` for a multi-device strategy).
        config: optimisation settings (``reconstruction_loss`` and ``kl_weight`` apply here).
        strategy: a ``tf.distribute`` strategy; default: the current one.
        train: "vae" (everything) or "vae_decoder" (decoder and post_quant_conv only: the encoder,
            and so the latent space a UNet was trained on, stays fixed; the KL term is then constant).

    The data yields ``(images,)`` or ``(images, token_ids)`` batches; token ids are ignored.
    """

    kind = "vae"

    def __init__(self, vae, config: TrainingConfig | None = None, strategy=None, train: str = "vae"):
        if train not in ("vae", "vae_decoder"):
            raise ValueError(f"train={train!r} is not allowed; expected 'vae' or 'vae_decoder'")
        super().__init__({"vae": vae}, train, config or TrainingConfig(), strategy)
        self.vae = vae

    def _draw(self, batch, seed):
        images = tf.cast(tf.convert_to_tensor(batch[0]), tf.float32)
        cfg = self.vae.config
        shape = _latent_noise_shape(images, cfg.downsample_factor, cfg.latent_channels)
        return {"latent_noise": tf.random.stateless_normal(shape, seed=seed)}

    def _loss(self, batch, draws):
        images = ops.cast(batch[0], "float32")  # (B, H, W, 3) in [-1, 1]
        posterior = self.vae.encode(images)
        z = posterior.sample(noise=draws["latent_noise"])
        if self.train == "vae_decoder":
            z = ops.stop_gradient(z)
        recon = ops.cast(self.vae.decode(z), "float32")
        diff = recon - images
        kind = self.config.reconstruction_loss
        rec = ops.convert_to_tensor(0.0, "float32")
        if "l1" in kind:
            rec += ops.mean(ops.abs(diff))
        if "l2" in kind:
            rec += ops.mean(ops.square(diff))
        # KL(N(mu, var) || N(0, 1)) summed over latent elements, per image, in per-pixel-value units.
        kl = 0.5 * ops.sum(
            ops.square(posterior.mean) + posterior.var - 1.0 - posterior.logvar, axis=[1, 2, 3]
        )
        kl = ops.mean(kl) / _pixels(images)
        loss = rec + self.config.kl_weight * kl
        return loss, {"rec": rec, "kl": kl}


class DiffusionTrainer(_TrainerBase):
    """Train the UNet (and optionally the text encoder) of a StableDiffusion with the diffusion loss.

    Per example: latents = VAE posterior sample * scaling_factor; t ~ U{0, T-1}; noise ~ N(0, I);
    x_t = sqrt(abar_t) latents + sqrt(1 - abar_t) noise with the pipeline's training schedule;
    loss = mean((unet(x_t, t, text(caption)) - target)^2), target = noise ("epsilon"),
    sqrt(abar_t) noise - sqrt(1 - abar_t) latents ("v_prediction") or latents ("sample").
    Captions are replaced by "" with probability ``config.caption_dropout``. DreamBooth's prior preservation
    (``config.prior_loss_weight`` > 0): batches also carry class images and captions (``dataset_with_prior``),
    and loss = instance loss + prior_loss_weight * class loss, each the mean over its own examples.

    Args:
        pipeline: a ``StableDiffusion`` (its components built inside ``strategy.scope()`` for a
            multi-device strategy). The VAE is always frozen.
        train: "unet" or "unet+text_encoder".
        config: optimisation settings.
        strategy: a ``tf.distribute`` strategy; default: the current one.

    The data yields ``(images, token_ids)``: (B, H, W, 3) float in [-1, 1] and (B, 77) int32 ids
    from ``pipeline.tokenizer`` (``tokenize``). SDXL base models train too: ids (B, 2, 77) from both
    tokenizers, the context of both encoders' penultimate states, the pooled embedding and the time ids
    of uncropped images (``_time_ids``), as diffusers' SDXL training scripts condition the UNet.
    """

    kind = "diffusion"
    _targets = ("unet", "unet+text_encoder")

    def __init__(
        self,
        pipeline,
        train: str = "unet",
        config: TrainingConfig | None = None,
        strategy=None,
        *,
        params: list | None = None,
    ):
        if train not in self._targets:
            raise ValueError(
                f"train={train!r} is not allowed; expected " + " or ".join(repr(t) for t in self._targets)
            )
        cfg = pipeline.config
        if cfg.is_sdxl and cfg.requires_aesthetics_score:
            raise ValueError(
                f"{cfg.name}: training an SDXL refiner (aesthetic-score time ids) is not supported; "
                "train the base model"
            )
        if cfg.is_sdxl and params is None and train != "unet":
            raise ValueError(
                f"{cfg.name}: fine-tuning SDXL's text encoders is not supported; use train='unet', or "
                "train both encoders with LoRA (LoraTrainer(..., train='unet+text_encoder'))"
            )
        if cfg.is_sdxl and pipeline.text_encoder is None:
            raise ValueError(f"{cfg.name}: training needs both SDXL text encoders; this model has one")
        self.pipeline = pipeline
        components = self._components(pipeline)
        super().__init__(components, train, config or TrainingConfig(), strategy, params)
        # The schedule the samplers use (diffusers' float32 table), its square roots taken in float64.
        abar = alphas_cumprod(cfg.scheduler, rescale=True).astype(np.float64)
        self._sqrt_abar = np.sqrt(abar).astype(np.float32)  # (T,)
        self._sqrt_one_minus = np.sqrt(1.0 - abar).astype(np.float32)  # (T,)
        self._empty_ids = tf.constant(self.tokenize([""])[0], tf.int32)  # (L,) or SDXL's (2, L)

    def _components(self, pipeline) -> dict:
        """Component name -> model, for the trained ones and the checkpoint's names."""
        return {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder, "vae": pipeline.vae}

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """Captions -> the token ids the data carries: (B, L) from ``pipeline.tokenizer``; for SDXL
        (B, 2, L), the ids of ``tokenizer`` and ``tokenizer_2`` (which pad differently) stacked."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.asarray(self.pipeline.tokenizer(texts), np.int32)
        if not self.pipeline.config.is_sdxl:
            return ids
        return np.stack([ids, np.asarray(self.pipeline.tokenizer_2(texts), np.int32)], axis=1)

    def _draw(self, batch, seed):
        """The examples (DreamBooth: instance then class ones), their ids after caption dropout, and the
        posterior noise, timesteps and noise; TensorFlow stateless draws on either backend."""
        images = tf.cast(tf.convert_to_tensor(batch[0]), tf.float32)
        token_ids = tf.cast(tf.convert_to_tensor(batch[1]), tf.int32)
        if self.config.prior_loss_weight > 0:
            # DreamBooth: instance and class examples run as one batch; each half has its own mean.
            if len(batch) != 4:
                raise ValueError(
                    f"prior_loss_weight={self.config.prior_loss_weight} needs (images, ids, class_images, "
                    f"class_ids) batches (dataset_with_prior); got {len(batch)} parts"
                )
            images = tf.concat([images, tf.cast(tf.convert_to_tensor(batch[2]), tf.float32)], axis=0)
            token_ids = tf.concat([token_ids, tf.cast(tf.convert_to_tensor(batch[3]), tf.int32)], axis=0)
        cfg = self.pipeline.config
        seeds = tf.random.experimental.stateless_split(seed, 4)
        token_ids = drop_captions(token_ids, self._empty_ids, self.config.caption_dropout, seeds[0])
        shape = _latent_noise_shape(images, cfg.vae.downsample_factor, cfg.vae.latent_channels)
        t = draw_timesteps(
            seeds[2],
            shape[0],
            cfg.scheduler.num_train_timesteps,
            self.config.high_noise_fraction,
            self.config.high_noise_start,
        )
        return {
            "images": images,
            "token_ids": token_ids,
            "latent_noise": tf.random.stateless_normal(shape, seed=seeds[1]),
            "t": t,
            "noise": tf.random.stateless_normal(shape, seed=seeds[3]),
        }

    def _loss(self, batch, draws):
        cfg = self.pipeline.config
        images = draws["images"]
        posterior = self.pipeline.vae.encode(images)
        z = posterior.sample(noise=draws["latent_noise"])
        z = ops.stop_gradient(z * cfg.vae.scaling_factor)  # (B, h, w, C)
        time_ids = self._time_ids(images) if cfg.is_sdxl else None
        out, target = self.prediction_and_target(
            z, draws["t"], draws["noise"], draws["token_ids"], time_ids, batch=batch
        )
        if not self.config.prior_loss_weight > 0:
            return ops.mean(ops.square(out - target)), {}
        count = ops.shape(batch[0])[0]
        instance = ops.mean(ops.square(out[:count] - target[:count]))
        prior_loss = ops.mean(ops.square(out[count:] - target[count:]))
        return instance + self.config.prior_loss_weight * prior_loss, {
            "instance": instance,
            "prior": prior_loss,
        }

    def prediction_and_target(self, latents, t, noise, token_ids, time_ids=None, batch=()):
        """The model's prediction at x_t and what it is trained towards, both (B, h, w, C) float32.

        Args:
            latents: (B, h, w, C) scaled VAE latents (constants).
            t: (B,) int32 timesteps.
            noise: (B, h, w, C) the noise mixed in.
            token_ids: (B, L) ids, or SDXL's (B, 2, L) (after caption dropout).
            time_ids: SDXL only: (B, 6) micro-conditioning (``_time_ids`` of the images).
            batch: the whole batch, for trainers whose model reads more of it (a ControlNet's hints).

        The loss is the mean squared difference; ``_replica_loss`` draws the inputs.
        """
        a = ops.take(self._sqrt_abar, t, axis=0)[:, None, None, None]
        s = ops.take(self._sqrt_one_minus, t, axis=0)[:, None, None, None]
        x_t = a * latents + s * noise
        prediction = self.pipeline.config.scheduler.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = a * noise - s * latents
        else:
            target = latents
        out = self._predict(x_t, t, self._conditioning(token_ids, time_ids), batch)
        return ops.cast(out, "float32"), target

    def _conditioning(self, token_ids, time_ids) -> tuple:
        """The UNet's inputs after (x_t, t): (context,), or SDXL's (context, pooled, time ids)."""
        if self.pipeline.config.is_sdxl:
            context, pooled = self._encode_text_sdxl(token_ids)
            return context, pooled, time_ids
        return (self._encode_text(token_ids),)  # context (B, L, D)

    def _predict(self, x_t, t, conditioning: tuple, batch):
        """The model output the loss compares with the target (B, h, w, C)."""
        del batch  # the UNet reads only the conditioning
        return self.pipeline.unet(x_t, t, *conditioning)

    def _encode_text(self, token_ids):
        """(B, L, D) text-encoder states of the (caption-dropped) ids; a constant unless it is trained."""
        context = self.pipeline.text_encoder(token_ids)
        return context if "text_encoder" in self.trained else ops.stop_gradient(context)

    def _encode_text_sdxl(self, token_ids):
        """SDXL's conditioning from (B, 2, L) ids, as ``sdxl.encode_prompts`` builds it for one chunk:
        both encoders' penultimate states side by side (B, L, 768 + 1280) and the second's projected
        pooled output (B, 1280); constants unless the text encoders train (their LoRAs)."""
        first = self.pipeline.text_encoder(token_ids[:, 0], clip_skip=1, final_norm=False)
        second, pooled = self.pipeline.text_encoder_2(
            token_ids[:, 1], clip_skip=1, final_norm=False, pooled=True
        )
        context = ops.concatenate([ops.cast(first, "float32"), ops.cast(second, "float32")], axis=-1)
        pooled = ops.cast(pooled, "float32")
        if "text_encoder" in self.trained:
            return context, pooled
        return ops.stop_gradient(context), ops.stop_gradient(pooled)

    def _time_ids(self, images):
        """SDXL's micro-conditioning of each training image: original size = target size = the image's
        (H, W), crop (0, 0), as diffusers' SDXL training scripts record images that were not cropped."""
        shape = ops.shape(images)
        size = ops.cast(ops.convert_to_tensor(shape[1:3]), "float32")  # (H, W)
        row = ops.concatenate([size, ops.zeros((2,), "float32"), size], axis=0)  # (6,)
        return ops.tile(row[None], [shape[0], 1])


def training_config_from_checkpoint(path: str | os.PathLike) -> TrainingConfig:
    """The TrainingConfig stored in a checkpoint's metadata."""
    from tf_diffusion.weights.safetensors_io import open_safetensors

    with open_safetensors(path) as f:
        meta = dict(f.metadata or {})
    if "training_config" not in meta:
        raise ValueError(
            f"{path}: no training_config in the metadata; not a tf_diffusion training checkpoint"
        )
    return from_dict(TrainingConfig, json.loads(meta["training_config"]))
