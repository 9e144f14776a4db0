"""Generation on a TF Serving deployment of an exported model: ``tf-diffusion serve --backend tf-serving://``.

The server then holds no model of its own: each text-to-image request becomes one call of the export's
``serving_default`` signature over TF Serving's REST API (``POST /v1/models/MODEL:predict``), so the web UI
and the A1111 API scale with the model server's replicas. What the export fixed (sampler, steps, image size,
precision) is read once from its ``describe`` signature; a request asking for something else is refused
with the served values named, never silently changed. The seeds are ``generate()``'s: image ``b`` of a
request with seed ``s`` comes from seed ``s + b`` and equals what a local model gives for it (the export
draws the same noise in its graph), up to the export's plain-text tokenizer (docs/serving.md, "Prompts").

Not through this backend (each refused with a clear message): image-to-image, inpainting, ControlNet,
LoRA tags, embeddings, progress previews and interrupting a running request (one predict call is atomic).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re

import numpy as np

SCHEME = "tf-serving://"
_ADDRESS = re.compile(
    r"^(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d+)/(?P<model>[A-Za-z0-9._-]+)$"
)
_VERSIONED = re.compile(r"^(?P<rest>.+)/versions/(?P<version>\d+)$")
FORM = "tf-serving://HOST:PORT/MODEL or tf-serving://HOST:PORT/MODEL/versions/N (TF Serving's REST port)"


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where a TF Serving model answers: its REST address, model name and optional pinned version."""

    host: str
    port: int
    model: str
    version: int | None = None

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.host}:{self.port}/{self.model}" + (
            "" if self.version is None else f"/versions/{self.version}"
        )

    @property
    def predict_url(self) -> str:
        path = f"/v1/models/{self.model}" + ("" if self.version is None else f"/versions/{self.version}")
        return f"http://{self.host}:{self.port}{path}:predict"


def is_backend(value) -> bool:
    """Whether a model argument names a TF Serving backend."""
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_backend(value: str) -> Backend:
    """``tf-serving://HOST:PORT/MODEL[/versions/N]`` as a Backend; ValueError naming the value otherwise."""
    if not is_backend(value):
        raise ValueError(f"backend {value!r}: must look like {FORM}")
    rest, version = value[len(SCHEME) :].rstrip("/"), None
    pinned = _VERSIONED.match(rest)
    if pinned:
        rest, version = pinned["rest"], int(pinned["version"])
    match = _ADDRESS.match(rest)
    if not match:
        raise ValueError(f"backend {value!r}: must look like {FORM}")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"backend {value!r}: port {port} must be in [1, 65535]")
    if version is not None and version < 1:
        raise ValueError(f"backend {value!r}: version {version} must be >= 1")
    return Backend(match["host"], port, match["model"], version)


class BackendError(RuntimeError):
    """TF Serving could not be reached or refused a call; the message names the URL and its answer."""


class TFServingModel:
    """A model served by TF Serving, with the part of ``StableDiffusion``'s interface the server uses.

    Args:
        backend: a ``Backend`` or its ``tf-serving://`` URL.
        timeout: seconds one predict call may take.

    Raises:
        BackendError: the model server does not answer, or the model has no ``describe`` signature
            (exports older than it: export again).
    """

    def __init__(self, backend: Backend | str, timeout: float = 600.0):
        import httpx

        from tf_diffusion import config as config_lib

        self.backend = parse_backend(backend) if isinstance(backend, str) else backend
        self._client = httpx.Client(timeout=timeout)
        self.description = json.loads(self._predict("describe", {"batch": [0]})["description"][0])
        config = self.description["config"]
        # An SD3 export describes an SD3Config (its transformer in place of a UNet).
        kind = config_lib.SD3Config if "transformer" in config else config_lib.PipelineConfig
        self.config = config_lib.from_dict(kind, config)
        self.lora_dir = None  # LoRA tags name files the model server does not have
        if self.description.get("controlnet") is not None:
            raise BackendError(
                f"{self.backend.url}: the export has a ControlNet in its graph; the server's backend takes "
                f"text-to-image exports without one"
            )

    def __repr__(self) -> str:
        d = self.description
        return (
            f"TFServingModel({self.backend.url}: {d['model']}, {d['sampler']} {d['num_steps']} steps, "
            f"{d['width']}x{d['height']})"
        )

    def close(self) -> None:
        self._client.close()

    def _predict(self, signature: str, inputs: dict) -> dict:
        """One REST predict call in the columnar format; the ``outputs`` dict (``*_bytes`` as bytes)."""
        import httpx

        url = self.backend.predict_url
        try:
            response = self._client.post(url, json={"signature_name": signature, "inputs": inputs})
        except httpx.HTTPError as e:
            raise BackendError(f"TF Serving at {url} did not answer: {e}") from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:500]}
        if response.status_code != 200 or "outputs" not in body:
            raise BackendError(
                f"TF Serving at {url} refused signature {signature!r} (HTTP {response.status_code}): "
                f"{body.get('error', body)}"
            )
        outputs = body["outputs"]
        if not isinstance(outputs, dict):  # a signature with one output answers with it alone
            outputs = {"description" if signature == "describe" else "output": outputs}
        # TF Serving writes binary strings of outputs whose names end in "_bytes" as {"b64": ...}.
        return {
            name: [base64.b64decode(v["b64"]) for v in value] if name.endswith("_bytes") else value
            for name, value in outputs.items()
        }

    def _refuse(self, what: str) -> None:
        raise ValueError(f"{what} is not available through the TF Serving backend {self.backend.url}")

    def generate(
        self,
        prompt,
        negative_prompt=None,
        *,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        seed: int | None = None,
        scheduler=None,
        callback=None,
        progress: bool = False,
        jit_compile=None,
        **unsupported,
    ):
        """Text-to-image through ``serving_default``, as ``StableDiffusion.generate()`` for what it takes.

        Raises:
            ValueError: an argument the export did not fix that way (sampler, steps, size), or a task it
                does not have (image, mask, control image, LoRA tags), naming the served values.
            BackendError: the model server failed.
        """
        from tf_diffusion import noise as noise_lib
        from tf_diffusion.pipeline import GeneratedImages, GenerationInfo

        del callback, progress, jit_compile  # one atomic predict call: no steps to report or compile here
        d = self.description
        for name, value in unsupported.items():
            if value is not None:
                self._refuse(f"{name}= (image-to-image, inpainting and ControlNet)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt"
            )
        if any("<lora:" in p or "<lyco:" in p for p in prompts):
            self._refuse("a <lora:...> tag")
        served = f"{d['sampler']}, {d['num_steps']} steps, {d['width']}x{d['height']}"
        size = (d["height"] if height is None else height, d["width"] if width is None else width)
        if size != (d["height"], d["width"]):
            raise ValueError(f"height={size[0]}, width={size[1]}: this backend serves {served} only")
        steps = d["num_steps"] if num_steps is None else num_steps
        if steps != d["num_steps"]:
            raise ValueError(f"num_steps={steps}: this backend serves {served} only")
        if scheduler is not None and not _same_sampler(scheduler, d["sampler"], self.config):
            raise ValueError(
                f"sampler {getattr(scheduler, 'name', scheduler)!r}: this backend serves {served} only"
            )
        guidance = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        rows_p = [p for p in prompts for _ in range(num_images)]
        rows_n = [n for n in negatives for _ in range(num_images)]
        seeds = noise_lib.image_seeds(seed, len(rows_p))  # seed + b, as generate()
        out = self._predict(
            "serving_default",
            {
                "prompt": rows_p,
                "negative_prompt": rows_n,
                "seed": seeds,
                "guidance_scale": [guidance] * len(rows_p),
            },
        )
        images = np.stack([_png_pixels(png) for png in out["png_bytes"]])
        info = GenerationInfo(
            model=d["model"],
            mode="txt2img",
            prompts=tuple(rows_p),
            negative_prompts=tuple(rows_n),
            seeds=tuple(seeds),
            seeded_latents=True,
            sampler=d["sampler"],
            sampler_options={},
            num_steps=d["num_steps"],
            num_evals=d["num_evals"],
            guidance_scale=guidance,
            strength=None,
            mask_blur=None,
            height=d["height"],
            width=d["width"],
            output_type="uint8",
        )
        return GeneratedImages.wrap(images, info)


def _same_sampler(sampler, served: str, config) -> bool:
    """Whether a sampler object is the one the export was made with (same class, schedule and options)."""
    from tf_diffusion.schedulers import get_sampler

    expected = get_sampler(served, config.scheduler)
    return (
        type(sampler) is type(expected)
        and sampler.config == expected.config
        and dict(sampler.options()) == dict(expected.options())
    )


def _png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
