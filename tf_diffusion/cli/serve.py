"""``tf-diffusion serve``: a web page and the AUTOMATIC1111 web UI's HTTP API (``/sdapi/v1``) over one model.

    tf-diffusion serve                                   # tiny-shapes: the page on http://127.0.0.1:7860
    tf-diffusion serve --model sd15.safetensors --models-dir models/ --lora-dir loras/ --outputs outputs/
    tf-diffusion serve --host 0.0.0.0 --api-auth alice:secret   # beyond localhost: authentication required
    tf-diffusion serve --backend tf-serving://serving:8501/sd   # generation sent to a TF Serving export

The page (Gradio, at ``/``; ``--nowebui``: the API alone) has txt2img, img2img with inpainting and PNG
info tabs. Any A1111 client works unchanged, e.g. ``webuiapi.WebUIApi(port=7860).txt2img(prompt=...)``.
The model is loaded once; one generation runs at a time and up to ``--queue-size`` wait (more are
answered 503). On a CPU the server runs graph mode (no XLA): each XLA program keeps memory mappings for
the life of the process, which a long-running server must not pile up.
"""

from __future__ import annotations

import argparse
import ipaddress
import os

from tf_diffusion.cli._common import PRECISIONS, UsageError, check_model, import_tensorflow, positive_int
from tf_diffusion.images import DEFAULT_MAX_PIXELS
from tf_diffusion.models import DEFAULT_MODEL


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on the tf-diffusion command's subparsers."""
    p = subparsers.add_parser("serve", help="serve the AUTOMATIC1111 HTTP API (/sdapi/v1) over one model")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the model to start with: a name in --models-dir, a shipped model, a checkpoint or folder",
    )
    p.add_argument("--models-dir", default=None, help="checkpoints and model folders clients may switch to")
    p.add_argument(
        "--backend",
        default=None,
        metavar="tf-serving://HOST:PORT/MODEL",
        help="send text-to-image to a TF Serving deployment of a `tf-diffusion export` (REST port) instead of "
        "loading a model here; its sampler, steps and size are the export's",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--lora-dir", default=None, help="the folder <lora:NAME:WEIGHT> tags name")
    p.add_argument("--embedding-dir", default=None, help="load every embedding in this folder")
    p.add_argument(
        "--controlnet-dir",
        default=None,
        help='the ControlNet models that alwayson_scripts["ControlNet"] units name',
    )
    p.add_argument("--outputs", default=None, help="where save_images=true writes (default: nothing saved)")
    p.add_argument(
        "--api-auth",
        default=None,
        metavar="USER:PASS[,USER:PASS]",
        help="HTTP basic authentication, as the web UI's --api-auth; required beyond localhost",
    )
    p.add_argument("--queue-size", type=int, default=8, help="requests that may wait (default: %(default)s)")
    p.add_argument(
        "--max-body-mb", type=int, default=64, help="largest request body in MiB (default: %(default)s)"
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="largest image accepted in a request, checked before decoding (default: %(default)s = 4096x4096)",
    )
    p.add_argument(
        "--models-in-memory",
        type=int,
        default=1,
        help="models kept loaded for quick switching, as the web UI's sd_checkpoints_limit (default: %(default)s)",
    )
    p.add_argument(
        "--nowebui",
        action="store_true",
        help="serve the API alone, without the web page at / (as the web UI's)",
    )
    p.add_argument("--precision", choices=PRECISIONS, default="float32", help="compute precision")
    p.set_defaults(func=run, option_names={})
    return p


def parse_auth(value: str | None) -> dict | None:
    """``user:pass[,user:pass]`` -> {user: pass}."""
    if value is None:
        return None
    credentials = {}
    for item in value.split(","):
        user, colon, password = item.partition(":")
        if not colon or not user or not password:
            raise UsageError(f"--api-auth {item!r}: expected USER:PASSWORD (several separated by ',')")
        credentials[user] = password
    return credentials


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_arguments(args: argparse.Namespace) -> tuple[str, dict | None]:
    """Every check that needs no model; returns (model argument, credentials)."""
    positive_int(args.queue_size, "--queue-size")
    positive_int(args.models_in_memory, "--models-in-memory")
    positive_int(args.max_body_mb, "--max-body-mb")
    positive_int(args.max_image_pixels, "--max-image-pixels")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be in [0, 65535]")
    credentials = parse_auth(args.api_auth)
    if credentials is None and not is_loopback(args.host):
        raise UsageError(
            f"--host {args.host} listens beyond this machine: pass --api-auth USER:PASS (HTTP basic "
            f"authentication), or keep the default --host 127.0.0.1"
        )
    for option, folder in (
        ("--models-dir", args.models_dir),
        ("--lora-dir", args.lora_dir),
        ("--embedding-dir", args.embedding_dir),
        ("--controlnet-dir", args.controlnet_dir),
    ):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{option} {folder}: no such folder")
    if args.outputs is not None and os.path.exists(args.outputs) and not os.path.isdir(args.outputs):
        raise UsageError(f"--outputs {args.outputs}: exists and is not a folder")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError(
            'tf-diffusion serve needs FastAPI and uvicorn: pip install "tf_diffusion[serve]"'
        ) from None
    if not args.nowebui:
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ImportError(
                'the web page of tf-diffusion serve needs gradio: pip install "tf_diffusion[serve]" '
                "(or pass --nowebui to serve the API alone)"
            ) from None
    if args.backend is not None:
        from tf_diffusion.serve.tf_serving import parse_backend

        try:
            parse_backend(args.backend)
        except ValueError as e:
            raise UsageError(f"--backend: {e}") from None
        given = [
            option
            for option, value in (
                ("--models-dir", args.models_dir),
                ("--lora-dir", args.lora_dir),
                ("--embedding-dir", args.embedding_dir),
                ("--controlnet-dir", args.controlnet_dir),
                ("--model", None if args.model == DEFAULT_MODEL else args.model),
                ("--precision", None if args.precision == "float32" else args.precision),
            )
            if value is not None
        ]
        if given:
            raise UsageError(
                f"--backend {args.backend} serves the export's model: {', '.join(given)} cannot be used with it"
            )
        return args.backend, credentials
    model = args.model
    in_folder = args.models_dir is not None and os.path.exists(os.path.join(args.models_dir, model))
    if not in_folder:
        model = check_model(model, "--model")
    return model, credentials


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    model, credentials = check_arguments(args)
    import_tensorflow()
    from tf_diffusion.pipeline import has_accelerator
    from tf_diffusion.serve import ModelRegistry, Server, ServerState

    dtype = None if args.precision == "float32" else args.precision
    registry = ModelRegistry(
        model,
        models_dir=args.models_dir,
        lora_dir=args.lora_dir,
        embedding_dir=args.embedding_dir,
        controlnet_dir=args.controlnet_dir,
        dtype=dtype,
    )
    registry.load()
    state = ServerState(
        registry,
        queue_size=args.queue_size,
        outputs=args.outputs,
        credentials=credentials,
        max_body_bytes=args.max_body_mb * 1024 * 1024,
        max_image_pixels=args.max_image_pixels,
        # Graph mode on a CPU: XLA programs keep memory mappings for the process's life.
        jit_compile=None if has_accelerator() else False,
        webui=not args.nowebui,
    )
    server = Server(state, host=args.host, port=args.port, log_level="info")
    url = f"http://{args.host}:{args.port}"
    where = f"the API on {url}/sdapi/v1" + ("" if args.nowebui else f", the page on {url}/")
    print(f"tf-diffusion serve: {registry.current.title}: {where}", flush=True)
    server.run()
    return 0
