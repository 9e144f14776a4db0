"""What the subcommands share: the usage error, checks of option values, model-source options, the quiet import
of TensorFlow and the translation of library messages into command-line names.

Nothing here imports TensorFlow at module level: every check runs before it is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Mapping

VERBOSE_ENV = "TF_DIFFUSION_VERBOSE"
_TRUE = {"1", "on", "yes", "true"}
# The registry names of tf_diffusion.schedulers.SAMPLERS, known here without importing TensorFlow
# (tests/test_cli_fast.py keeps the two equal).
SAMPLER_NAMES = (
    "ddim",
    "pndm",
    "ddpm",
    "euler",
    "euler_a",
    "heun",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "unipc",
    "lcm",
    "tcd",
    "flow_euler",
    "flow_heun",
    "flow_dpmpp_2m",
    "flow_dpmpp_2m_sde",
)


# Compute precisions of --precision: float32; "bfloat16" keeps the weights in bfloat16 as well (half the
# memory of float32, the same numbers as "mixed_bfloat16", which keeps float32 weights and casts them per use);
# "mixed_float16" (the VAE stays float32 so decoding never overflows).
PRECISIONS = ("float32", "bfloat16", "mixed_bfloat16", "mixed_float16")


class UsageError(ValueError):
    """A bad option value or combination, found before any work is done (exit status 2)."""


def positive_int(value: int | None, option: str, minimum: int = 1) -> None:
    """Refuse ``value`` below ``minimum`` (None passes: the model's default applies)."""
    if value is not None and value < minimum:
        raise UsageError(f"{option} {value}: must be an integer >= {minimum}")


def finite_float(
    value: float | None, option: str, low: float | None = None, high: float | None = None
) -> None:
    """Refuse a non-finite ``value`` or one outside [low, high] (None passes)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{option} {value}: must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f"in [{low:g}, {high:g}]" if low is not None and high is not None else f">= {low:g}"
        raise UsageError(f"{option} {value:g}: must be {allowed}")


def check_size(height: int | None, width: int | None, multiple: int | None) -> None:
    """Refuse non-positive sizes, and sizes not a multiple of the VAE's factor when it is known."""
    for option, value in (("--height", height), ("--width", width)):
        if value is None:
            continue
        if value <= 0:
            raise UsageError(f"{option} {value}: must be a positive integer")
        if multiple and value % multiple:
            raise UsageError(
                f"{option} {value}: not a multiple of {multiple}, the model's VAE downsampling factor; "
                f"allowed: positive multiples of {multiple}"
            )


def check_sampler(name: str | None, option: str = "--scheduler") -> None:
    """Refuse a sampler name that neither our registry nor diffusers' class names know."""
    if name is None or name in SAMPLER_NAMES or name.endswith("Scheduler"):
        return
    raise UsageError(f"{option} {name}: unknown sampler; allowed: {', '.join(SAMPLER_NAMES)}")


def check_model(value: str, option: str) -> str:
    """``models.check_source`` with the option (if any) named in its error: "--model x.ckpt: no such file"."""
    from tf_diffusion.models import check_source

    prefix = f"{option} " if option else ""
    try:
        return check_source(value)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{prefix}{e}") from None
    except ValueError as e:
        raise UsageError(f"{prefix}{e}") from None


def model_factor(source: str) -> tuple[int | None, int | None]:
    """(VAE downsampling factor, default size) of a tf_diffusion folder, else (None, None): known cheaply."""
    from tf_diffusion.models import folder_config

    config = folder_config(source)
    if config is None:
        return None, None
    return config.vae.downsample_factor, config.default_size


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """The options that say how to read a checkpoint (info, convert)."""
    parser.add_argument(
        "--config", help="preset name or diffusers / tf_diffusion folder to take the architecture from"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer folder (vocab.json, merges.txt) to use instead of the detected one"
    )
    parser.add_argument("--variant", help='diffusers weight variant, e.g. "fp16"')
    parser.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    parser.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample"),
        help="what the UNet predicts (single files cannot show it)",
    )
    parser.add_argument(
        "--use-ema", action="store_true", help="take the EMA UNet weights of a full single file"
    )


def source_kwargs(args: argparse.Namespace) -> dict:
    """``load_pipeline_weights`` keyword arguments from the source options."""
    config = args.config
    if config is not None:
        from tf_diffusion.models import resolve_model
        from tf_diffusion.presets import PRESETS

        # A shipped model's name means its folder here too; a preset name stays a preset.
        config = config if config in PRESETS else resolve_model(config)
    return dict(
        config=config,
        tokenizer=args.tokenizer,
        variant=args.variant,
        revision=args.revision,
        prediction_type=args.prediction_type,
        use_ema=True if args.use_ema else None,
    )


def check_source_paths(args: argparse.Namespace) -> None:
    """Refuse a missing --tokenizer folder before anything is loaded."""
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such folder")


def verbose() -> bool:
    """Whether TensorFlow's own log lines should be shown (``--verbose`` sets $TF_DIFFUSION_VERBOSE)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in _TRUE


def quiet_environment() -> None:
    """Ask TensorFlow for errors only, unless the user set its log level or asked for ``--verbose``."""
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


_NATIVE_LOG = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog)")


def import_tensorflow():
    """Import TensorFlow (and set up its devices) with its native start-up log lines held back.

    TensorFlow's C++ runtime writes lines such as ``I0000 ... oneDNN custom operations are on`` and
    ``E0000 ... failed call to cuInit`` straight to file descriptor 2 before its log level applies, so
    they are captured there; anything else written meanwhile is passed on. ``--verbose`` shows all.

    Returns:
        The ``tensorflow`` module.
    """
    if verbose() or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    with _native_stderr_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()  # device discovery is where the cuInit "error" is printed
        import keras  # noqa: F401

    tf.get_logger().setLevel("ERROR")
    return tf


@contextlib.contextmanager
def _native_stderr_filtered():
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not _NATIVE_LOG.match(line) and not line.startswith("To enable the following instructions")
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# Library argument names -> command-line options, for messages raised below the command line.
_COMMON_NAMES = {"overwrite": "--overwrite"}


def to_cli_names(message: str, names: Mapping[str, str]) -> str:
    """A library message in command-line terms: ``num_steps=0`` becomes ``--steps 0``.

    Args:
        message: the error text.
        names: library argument name -> option (``{"num_steps": "--steps"}``).

    Returns:
        The message with each ``name=value`` of a known name written as ``--option value``.
    """
    names = {**_COMMON_NAMES, **names}
    # "overwrite=True (--overwrite)" names the option twice; keep the option.
    message = re.sub(r"\b(\w+)=True \((--[\w-]+)\)", lambda m: m.group(2), message)

    def option(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        flag = names.get(name)
        if flag is None:
            return match.group(0)
        if value in ("True", "...") or value == "":
            return flag
        return f"{flag} {value.strip(chr(39))}"

    return re.sub(r"(?<![\w$-])([a-z_]+)=('[^']*'|[^\s,;:)]*)", option, message)
