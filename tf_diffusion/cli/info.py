"""``tf-diffusion info``: describe a checkpoint (format, family, dtypes, parameters, anything unusual).

tf-diffusion info tiny-shapes
tf-diffusion info model.safetensors --config sd-v1-5 --json
tf-diffusion info control_v11p_sd15_canny.safetensors   # ControlNets too
tf-diffusion info sdxl_vae.safetensors                  # and VAE files
tf-diffusion info sd3.5_medium.safetensors              # SD3 / SD3.5 files and folders
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from tf_diffusion.cli._common import (
    add_source_options,
    check_model,
    check_source_paths,
    import_tensorflow,
    source_kwargs,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``info`` on the tf-diffusion command's subparsers."""
    p = subparsers.add_parser(
        "info", help="describe a checkpoint: format, family, dtypes, parameters, anything unusual"
    )
    p.add_argument("path", help="shipped model name, checkpoint file, folder or Hugging Face Hub id")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_source_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the report; returns the exit status."""
    source = check_model(args.path, "")
    check_source_paths(args)
    kwargs = source_kwargs(args)
    import_tensorflow()
    from tf_diffusion.family_hooks import describe_source
    from tf_diffusion.weights.controlnet import describe_controlnet
    from tf_diffusion.weights.ip_adapter import describe_ip_adapter, is_ip_adapter_file
    from tf_diffusion.weights.loading import load_pipeline_weights
    from tf_diffusion.weights.vae_file import describe_vae

    control = describe_ip_adapter(source) if is_ip_adapter_file(source) else describe_controlnet(source)
    if control is None:
        control = describe_vae(source)
    if control is None:  # a family with its own loaders (SD3) describes its files itself
        control = describe_source(source, revision=kwargs.get("revision"))
    if control is not None:
        if args.json:
            print(json.dumps(control, indent=2))
        else:
            print("\n".join(f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in control.items()))
        return 0

    with load_pipeline_weights(source, strict=False, **kwargs) as weights:
        report = weights.report
        if args.json:
            print(json.dumps(dataclasses.asdict(report), indent=2))
        else:
            print(report)
    return 0
