"""Trainers of small additions to a frozen model: LoRA factors and textual-inversion vectors.

Both run the diffusion loss of ``DiffusionTrainer`` (and so its loop, mixed precision, ``tf.distribute``
strategies, EMA, progress bar and exactly-resuming checkpoints) with only their own variables trained:

- ``LoraTrainer``: a ``LoraNetwork`` (``tf_diffusion.adapters.lora_training``) on the UNet and optionally
  the text encoder, with the text encoder's factors at ``TrainingConfig.text_encoder_learning_rate``;
  ``save_lora`` writes a kohya / A1111 or diffusers / PEFT file.
- ``TextualInversionTrainer``: n new vectors for a new prompt word (the text encoder's table untouched, as
  ``adapters.textual_inversion`` feeds embeddings); ``save_embedding`` writes A1111's ``.safetensors``
  layout (``emb_params``), which our loader and diffusers' ``load_textual_inversion`` read.

Example:
    >>> trainer = LoraTrainer(sd, "unet", TrainingConfig(learning_rate=1e-4, ema_decay=None),
    ...                       lora=LoraTrainingConfig(rank=8, alpha=8))
    >>> trainer.fit(dataset_from_arrays(images, captions, sd.tokenizer, 4), steps=1000)
    >>> trainer.save_lora("my_lora.safetensors")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from tf_diffusion.config import to_dict
from tf_diffusion.training.config import LoraTrainingConfig, TrainingConfig
from tf_diffusion.training.trainers import DiffusionTrainer


class LoraTrainer(DiffusionTrainer):
    """Train LoRA factors on a frozen ``StableDiffusion`` with the diffusion loss.

    Args:
        pipeline: the ``StableDiffusion`` (SD 1.x / 2.x, or an SDXL base model); its weights stay as they are.
        train: "unet" (UNet LoRA only) or "unet+text_encoder" (also the text encoder's; SDXL: both
            encoders').
        config: optimisation settings; ``text_encoder_learning_rate`` is the text encoder's LoRA rate.
        strategy: a ``tf.distribute`` strategy; default: the current one.
        lora: rank, alpha, target modules and the init seed.

    While the trainer lives its ``network`` is attached (the pipeline computes with the LoRA); call
    ``network.detach()`` to get the base model back, and load the saved file with ``load_lora_weights``.
    """

    kind = "lora"

    def __init__(
        self,
        pipeline,
        train: str = "unet",
        config: TrainingConfig | None = None,
        strategy=None,
        *,
        lora: LoraTrainingConfig | None = None,
    ):
        from tf_diffusion.adapters.lora_training import (
            DEFAULT_TEXT_TARGETS,
            DEFAULT_UNET_TARGETS,
            LoraNetwork,
        )

        if train not in ("unet", "unet+text_encoder"):
            raise ValueError(f"train={train!r} is not allowed; expected 'unet' or 'unet+text_encoder'")
        self.lora = lora or LoraTrainingConfig()
        strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        text_targets = None
        if train == "unet+text_encoder":
            text_targets = self.lora.text_encoder_targets or DEFAULT_TEXT_TARGETS
        with strategy.scope():
            self.network = LoraNetwork.attach(
                pipeline,
                self.lora.rank,
                self.lora.alpha,
                unet_targets=self.lora.unet_targets or DEFAULT_UNET_TARGETS,
                text_encoder_targets=text_targets,
                seed=self.lora.seed,
            )
        try:
            super().__init__(pipeline, train, config, strategy, params=self.network.named_variables())
        except BaseException:
            self.network.detach()
            raise

    def _checkpoint_metadata(self) -> dict[str, str]:
        return {"lora": json.dumps(to_dict(self.lora), sort_keys=True)}

    def export_ema(self, dtype: str | None = None, format: str = "kohya") -> dict[str, dict[str, np.ndarray]]:
        """{"lora": the file's tensors in ``format``} from the EMA factors (the factors when no EMA is kept)."""
        with self.ema_weights():
            return {"lora": self.network.state_dict(format, dtype)}

    def save_lora(
        self,
        path: str | os.PathLike,
        format: str = "kohya",
        *,
        dtype: str | None = None,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> str:
        """Write the (EMA) factors as a LoRA file (``adapters.lora_training.save_lora``), with kohya's
        training fields (``ss_learning_rate``, ``ss_unet_lr``, ``ss_text_encoder_lr``, ``ss_steps``, ...)."""
        from tf_diffusion.adapters.lora_training import save_lora

        extra = {}
        if format == "kohya":
            te_lr = self.config.text_encoder_learning_rate or self.config.learning_rate
            extra = {
                "ss_learning_rate": str(self.config.learning_rate),
                "ss_unet_lr": str(self.config.learning_rate),
                "ss_text_encoder_lr": str(te_lr if "text_encoder" in self.trained else 0.0),
                "ss_network_train_unet_only": str("text_encoder" not in self.trained),
                "ss_steps": str(self.step),
                "ss_seed": str(self.config.seed),
                "ss_mixed_precision": str(_policy_name()),
            }
        extra.update(metadata or {})
        with self.ema_weights():
            return save_lora(self.network, path, format, dtype=dtype, metadata=extra, overwrite=overwrite)


def _policy_name() -> str:
    import keras

    name = keras.config.dtype_policy().name
    return {"mixed_bfloat16": "bf16", "mixed_float16": "fp16"}.get(name, "no")


class TextualInversionTrainer(DiffusionTrainer):
    """Learn the vectors of a new prompt word with the diffusion loss; every model weight stays frozen.

    Args:
        pipeline: the ``StableDiffusion`` (SD 1.x / 2.x).
        token: the new word (e.g. "<my-cat>"); it must not be loaded as an embedding already.
        num_vectors: how many vectors (prompt tokens) the word stands for.
        init_text: the vectors start as the token embeddings of this text's tokens, repeated to
            ``num_vectors`` (A1111's "initialization text"; diffusers' ``initializer_token`` for one token).
        config: optimisation settings (``caption_dropout``: 0 is usual here).
        strategy: a ``tf.distribute`` strategy; default: the current one.

    Captions must be tokenized with ``trainer.tokenize`` (which knows the word):
    ``dataset_from_arrays(images, captions, trainer.tokenize, batch_size)``.

    Raises:
        ValueError: a bad token, count or an init text without tokens.
    """

    kind = "textual_inversion"

    def __init__(
        self,
        pipeline,
        token: str,
        num_vectors: int = 1,
        init_text: str = "*",
        config: TrainingConfig | None = None,
        strategy=None,
    ):
        import keras

        from tf_diffusion.adapters.textual_inversion import (
            Embedding,
            EmbeddingTokenizer,
            _token,
            loaded_embeddings,
        )

        if pipeline.config.is_sdxl:
            raise ValueError(
                f"{pipeline.config.name}: textual-inversion training is for SD 1.x / 2.x (one text encoder); "
                "SDXL embeddings need vectors for both encoders, which this trainer does not learn"
            )
        token = _token(token)
        if token.lower() in {w.lower() for w in loaded_embeddings(pipeline)}:
            raise ValueError(f"token {token!r} is already loaded as an embedding; choose another word")
        if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or not 1 <= num_vectors <= 75:
            raise ValueError(f"num_vectors={num_vectors!r} must be an integer in [1, 75]")
        init_ids = pipeline.tokenizer.encode(init_text) if isinstance(init_text, str) else []
        if not init_ids:
            raise ValueError(f"init_text={init_text!r} has no tokens; give a word such as 'cat' or '*'")
        self.token, self.num_vectors, self.init_text = token, num_vectors, init_text
        table = keras.ops.convert_to_numpy(pipeline.text_encoder.text_model.embeddings.token_embedding.weight)
        init = np.asarray(table, np.float32)[[init_ids[i % len(init_ids)] for i in range(num_vectors)]]
        strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        with strategy.scope():
            self.vectors = keras.Variable(init, dtype="float32", name="textual_inversion_vectors")  # (n, D)
        self._first_id = int(pipeline.config.text_encoder.vocab_size)
        placeholder = Embedding(token, init, "<training>")
        self._tokenizer = EmbeddingTokenizer(pipeline.tokenizer, [placeholder], self._first_id)
        super().__init__(
            pipeline, "unet", config, strategy, params=[("text_encoder", "emb_params", self.vectors)]
        )
        self.trained = {}  # no model weights train; the UNet and the text encoder are constants

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """(B, L) ids as ``pipeline.tokenizer`` gives them, the word as its vectors' ids (past the vocabulary)."""
        base = self.pipeline.tokenizer
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = base.max_length
        out = np.full((len(texts), length), base.pad_token_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [base.bos_token_id, *self._tokenizer.encode(text)[: length - 2], base.eos_token_id]
            out[row, : len(ids)] = ids
        return out

    def _checkpoint_metadata(self) -> dict[str, str]:
        return {
            "textual_inversion": json.dumps(
                {"token": self.token, "num_vectors": self.num_vectors, "init_text": self.init_text},
                sort_keys=True,
            )
        }

    def _encode_text(self, token_ids):
        import keras
        from keras import ops

        encoder = self.pipeline.text_encoder
        table = encoder.text_model.embeddings.token_embedding.weight  # (V, D)
        extra = token_ids >= self._first_id  # (B, L)
        # The pooled output's EOS search must not see the new ids (adapters.textual_inversion.pooling_ids).
        ids = ops.where(extra, 0, token_ids)
        rows = ops.cast(ops.take(ops.convert_to_tensor(table), ids, axis=0), "float32")  # (B, L, D)
        index = ops.clip(token_ids - self._first_id, 0, self.num_vectors - 1)
        learned = ops.take(ops.convert_to_tensor(self.vectors), index, axis=0)  # (B, L, D)
        embeds = ops.where(extra[..., None], learned, rows)
        return keras.ops.convert_to_tensor(encoder(ids, token_embeds=embeds))

    def export_ema(self, dtype: str | None = None) -> dict[str, dict[str, np.ndarray]]:
        """{"embedding": {"emb_params": (n, D)}} from the EMA vectors (the vectors when no EMA is kept)."""
        with self.ema_weights():
            vectors = np.asarray(self.vectors.numpy(), np.float32)
        return {"embedding": {"emb_params": vectors if dtype is None else vectors.astype(dtype)}}

    def save_embedding(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Write the (EMA) vectors as an A1111 ``.safetensors`` embedding (``emb_params`` (n, D) float32).

        The web UI names an embedding by its file stem, so name the file after the word.

        Raises:
            ValueError: a path not ending in ``.safetensors``.
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        from tf_diffusion.weights.safetensors_io import save_safetensors

        path = os.fspath(path)
        if not path.lower().endswith(".safetensors"):
            raise ValueError(f"embedding path {path!r} must end in .safetensors")
        metadata = {
            "name": self.token,
            "step": str(self.step),
            "sd_checkpoint_name": self.pipeline.config.name,
        }
        save_safetensors(self.export_ema()["embedding"], path, metadata=metadata, overwrite=overwrite)
        return path
