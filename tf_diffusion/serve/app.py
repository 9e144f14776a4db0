"""The FastAPI application: the A1111 routes under ``/sdapi/v1``, authentication, limits and errors.

Every error is answered in the web UI's shape, ``{"error": type, "detail": message, "body": "",
"errors": message}`` with its HTTP status (validation errors keep FastAPI's list of problems under
``errors`` and put one readable line in ``detail``). Routes that generate are ``async``: they queue
the job, wait for it without holding a thread, and cancel it when the client goes away.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import os
import pathlib
import secrets
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tf_diffusion.serve import generation, preprocessors, schema
from tf_diffusion.serve.generation import ApiError
from tf_diffusion.serve.jobs import Interrupted, JobQueue, QueueFull
from tf_diffusion.serve.registry import ModelRegistry, NotFound

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


@dataclasses.dataclass
class ServerState:
    """What the routes share: the models, the job queue, limits, credentials, the outputs folder.

    Args:
        registry: the models (``ModelRegistry``); its model is loaded by the first job.
        queue_size: jobs that may wait besides the running one; more are answered 503.
        outputs: the folder ``save_images`` writes into (None: ``save_images`` is refused).
        credentials: ``{user: password}`` for HTTP basic authentication (None: no authentication).
        max_body_bytes: the largest request body accepted (413 beyond).
        max_image_pixels: the largest image accepted in a request, checked from its header (413 beyond).
        max_output_pixels: width x height x batch_size at most.
        jit_compile: passed to ``generate()``; False (graph mode) on a CPU by default: each XLA program
            keeps memory mappings for the life of the process, which a server must not pile up.
        webui: mount the web page (``serve.webui``, Gradio) at ``/``; False: the API alone.
    """

    registry: ModelRegistry
    queue_size: int = 8
    outputs: str | None = None
    credentials: dict | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_output_pixels: int = 2048 * 2048
    jit_compile: bool | None = False
    webui: bool = False
    queue: JobQueue = dataclasses.field(init=False)

    def __post_init__(self):
        self.queue = JobQueue(self.queue_size)
        self.started = time.time()

    def output_folder(self, kind: str) -> pathlib.Path:
        if self.outputs is None:
            raise ApiError(
                422, "save_images=true: this server was started without --outputs, so it saves nothing"
            )
        return pathlib.Path(self.outputs) / kind / time.strftime("%Y-%m-%d")

    def work(self, req, init=None, mask=None):
        """The job function that generates ``req`` on the worker (loading the model first if none is)."""

        def work(job):
            if self.registry.sd is None:
                job.progress.textinfo = "loading the model"
                self.registry.load()
            return generation.run(job, self, req, init, mask)

        return work

    def options(self) -> dict:
        current = self.registry.current
        entry = current or self.registry.entries[0]
        return {
            "sd_model_checkpoint": entry.title,
            "sd_checkpoint_hash": None,
            "samples_format": "png",
            "samples_save": self.outputs is not None,
            "outdir_samples": "",
            "outdir_txt2img_samples": ""
            if self.outputs is None
            else os.path.join(self.outputs, "txt2img-images"),
            "outdir_img2img_samples": ""
            if self.outputs is None
            else os.path.join(self.outputs, "img2img-images"),
            "CLIP_stop_at_last_layers": 1,
            "sd_vae": "Automatic",
            "eta_ddim": 0.0,
            "eta_ancestral": 1.0,
            "live_previews_enable": True,
            "show_progress_every_n_steps": 1,
        }


def error_body(error: str, detail, errors=None) -> dict:
    text = detail if isinstance(detail, str) else str(detail)
    return {"error": error, "detail": detail, "body": "", "errors": text if errors is None else errors}


def _error(status: int, error: str, detail, headers=None, errors=None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(error, detail, errors), headers=headers)


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413) before they are read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        message = f"request body over the server's limit of {self.limit:,} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, "PayloadTooLarge", message)(scope, receive, send)
        seen, over, replaced = 0, False, False

        async def limited():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            item = await receive()
            if item["type"] == "http.request":
                seen += len(item.get("body", b""))
                if seen > self.limit:
                    over = True  # stop reading; whatever the app answers becomes the 413 below
                    return {"type": "http.disconnect"}
            return item

        async def watch(item):
            nonlocal replaced
            if not over:
                return await send(item)
            if not replaced and item["type"] == "http.response.start":
                replaced = True
                await _error(413, "PayloadTooLarge", message)(scope, receive, send)

        try:
            await self.app(scope, limited, watch)
        except Exception:
            if not over:
                raise
        if over and not replaced:
            await _error(413, "PayloadTooLarge", message)(scope, receive, send)


class _BasicAuth:
    """HTTP basic authentication for every route, as the web UI's --api-auth (401 otherwise)."""

    def __init__(self, app, credentials: dict):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            refused = _check_auth(header, self.credentials)
            if refused is not None:
                return await refused(scope, receive, send)
        return await self.app(scope, receive, send)


def _check_auth(header: str, credentials: dict) -> JSONResponse | None:
    scheme, _, value = header.partition(" ")
    user = password = None
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user = None
    ok = False
    if user is not None:
        for name, secret in credentials.items():
            # compare every entry, so the time taken does not tell which user exists
            ok |= secrets.compare_digest(user.encode(), name.encode()) & secrets.compare_digest(
                password.encode(), secret.encode()
            )
    if ok:
        return None
    return _error(
        401, "HTTPException", "Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
    )


def create_app(state: ServerState) -> FastAPI:
    """The A1111 API application over ``state``, with the web page at ``/`` when ``state.webui``."""
    app = FastAPI(title="tf_diffusion", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(Exception)
    async def any_error(request, e: Exception):  # one answer; the server goes on
        return _error(500, type(e).__name__, str(e) or type(e).__name__)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e.status_code, "HTTPException", e.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return _error(e.status_code, "HTTPException", e.detail, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
            text = f"{where}: {item.get('msg')}"
            if (
                "input" in item
                and item.get("type") != "json_invalid"
                and not isinstance(item["input"], (dict, list))
            ):
                text += f" (got {item['input']!r})"[:200]
            problems.append(text)
        errors = [{k: v for k, v in item.items() if k in ("loc", "msg", "type")} for item in e.errors()]
        return _error(422, "RequestValidationError", "; ".join(problems), errors=errors)

    for exc, status in ((NotFound, 404), (ValueError, 422), (QueueFull, 503)):
        app.add_exception_handler(exc, _handler(status))

    _routes(app, state)
    if state.webui:  # after the API routes: they keep precedence over the page's catch-all mount
        from tf_diffusion.serve.webui import mount

        mount(app, state)
    if state.credentials is not None:
        app.add_middleware(_BasicAuth, credentials=state.credentials)
    app.add_middleware(_BodyLimit, limit=state.max_body_bytes)  # outermost: before anything reads the body
    return app


def _handler(status: int):
    async def handle(request, e):
        return _error(status, "HTTPException", str(e))

    return handle


async def _wait(request: Request, job):
    """Wait for ``job``; cancel it if the client disconnects."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.5)
        if done:
            break
        if await request.is_disconnected():
            job.cancel()
            await asyncio.wait({future})
            break
    try:
        return future.result()
    except Interrupted as e:
        raise ApiError(499, f"job {job.id} was cancelled: its client went away") from e


def _routes(app: FastAPI, state: ServerState) -> None:
    api = "/sdapi/v1"

    @app.post(f"{api}/txt2img")
    async def txt2img(req: schema.Txt2ImgRequest, request: Request):
        generation.check_request(req, state.registry, state.options())

        return await _wait(request, state.queue.submit(state.work(req), "txt2img", req.force_task_id))

    @app.post(f"{api}/img2img")
    async def img2img(req: schema.Img2ImgRequest, request: Request):
        generation.check_request(req, state.registry, state.options())
        if not req.init_images:
            raise ApiError(422, "init_images: give one base64 image (the picture to start from)")
        if len(req.init_images) != 1:
            raise ApiError(422, f"init_images has {len(req.init_images)} images; one is supported")

        def images():  # decoding and resizing take a while: off the event loop
            init = generation.decode_image(req.init_images[0], "init_images[0]", state.max_image_pixels)
            mask = None
            if req.mask:
                mask = generation.decode_image(req.mask, "mask", state.max_image_pixels)
            generation.check_img2img(req, mask is not None)
            return generation.prepare_images(init, mask, req)

        init, mask = await asyncio.to_thread(images)

        return await _wait(
            request, state.queue.submit(state.work(req, init, mask), "img2img", req.force_task_id)
        )

    @app.get(f"{api}/progress")
    async def progress(skip_current_image: bool = False, task_id: str | None = None):
        job = state.queue.find(task_id)
        if job is None:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": _state_dict(None, state),
                "current_image": None,
                "textinfo": None,
            }
        p = job.progress
        done = 0.01
        if p.job_count > 0:
            done += p.job_no / p.job_count
            if p.sampling_steps > 0:
                done += p.sampling_step / p.sampling_steps / p.job_count
        elapsed = time.time() - (job.started or time.time())
        image = None
        if not skip_current_image and p.latents is not None:
            picture = generation.preview(p.latents)
            image = generation.png_base64(picture, None)
        return {
            "progress": min(done, 1.0),
            "eta_relative": max(elapsed / done - elapsed, 0.0) if job.started else 0.0,
            "state": _state_dict(job, state),
            "current_image": image,
            "textinfo": p.textinfo,
        }

    @app.post(f"{api}/interrupt")
    async def interrupt(task_id: str | None = None):
        job = state.queue.find(task_id)
        if job is not None:
            job.interrupt()
        return {}

    @app.post(f"{api}/skip")
    async def skip(task_id: str | None = None):
        job = state.queue.find(task_id)
        if job is not None:
            job.skip()
        return {}

    @app.get(f"{api}/options")
    async def get_options():
        return state.options()

    @app.post(f"{api}/options")
    async def set_options(request: Request, body: dict):
        current = state.options()
        name = body.get("sd_model_checkpoint")
        for key, value in body.items():
            if key != "sd_model_checkpoint" and (key not in current or current[key] != value):
                raise ApiError(
                    422,
                    f"option {key!r} cannot be changed here; changeable: sd_model_checkpoint "
                    f"(others are accepted at their current value)",
                )
        if name is not None and name != current["sd_model_checkpoint"]:
            entry = state.registry.lookup(name)
            job = state.queue.submit(lambda job: state.registry.load(entry) and None, "load model")
            await _wait(request, job)
        return None

    @app.get(f"{api}/cmd-flags")
    async def cmd_flags():
        return {"api": True, "nowebui": not state.webui, "listen": False}

    @app.get(f"{api}/samplers")
    async def samplers():
        from tf_diffusion.infotext import A1111_SAMPLERS

        return [{"name": a1111, "aliases": [ours], "options": {}} for ours, a1111 in A1111_SAMPLERS.items()]

    @app.get(f"{api}/schedulers")
    async def schedulers():
        return [
            {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in generation.SCHEDULES.items()
        ]

    @app.get(f"{api}/sd-models")
    async def sd_models():
        return [_model_item(entry, state) for entry in state.registry.entries]

    @app.post(f"{api}/refresh-checkpoints")
    async def refresh_checkpoints():
        state.registry.refresh()
        return None

    @app.get(f"{api}/loras")
    async def loras():
        return state.registry.loras()

    @app.post(f"{api}/refresh-loras")
    async def refresh_loras():
        return None

    @app.get(f"{api}/embeddings")
    async def embeddings():
        loaded = {}
        if state.registry.sd is not None:
            from tf_diffusion.adapters.textual_inversion import loaded_embeddings

            for word, e in loaded_embeddings(state.registry.sd).items():
                loaded[word] = {
                    "step": None,
                    "sd_checkpoint": None,
                    "sd_checkpoint_name": None,
                    "shape": int(e.vectors.shape[-1]),
                    "vectors": e.num_vectors,
                }
        return {"loaded": loaded, "skipped": {}}

    @app.get(f"{api}/scripts")
    async def scripts():
        names = [] if state.registry.controlnet_dir is None else ["controlnet"]
        return {"txt2img": names, "img2img": list(names)}

    # The ControlNet extension's own routes, which its clients ask before sending units.
    @app.get("/controlnet/version")
    async def controlnet_version():
        return {"version": 2}

    @app.get("/controlnet/model_list")
    async def controlnet_models():
        return {"model_list": state.registry.controlnet_titles()}

    @app.get("/controlnet/module_list")
    async def controlnet_modules():
        modules = preprocessors.MODULES
        return {"module_list": list(modules), "module_detail": {k: m.detail() for k, m in modules.items()}}

    @app.post("/controlnet/detect")
    async def controlnet_detect(req: schema.DetectRequest):
        try:
            module = preprocessors.lookup(req.controlnet_module)
            values = preprocessors.settings(
                module, req.controlnet_processor_res, req.controlnet_threshold_a, req.controlnet_threshold_b
            )
        except ValueError as e:
            raise ApiError(422, f"controlnet_{e}") from None
        images = req.controlnet_input_images or req.controlnet_images
        if not images:
            raise ApiError(422, "controlnet_input_images: no image given (base64 pictures to preprocess)")
        if req.controlnet_masks:
            raise ApiError(422, "controlnet_masks: masks are not supported by these modules; allowed: none")

        def detect():
            out = []
            for k, text in enumerate(images):
                picture = generation.decode_image(
                    text, f"controlnet_input_images[{k}]", state.max_image_pixels
                )
                try:
                    hint = preprocessors.run(module, picture, values)
                except ValueError as e:
                    raise ApiError(422, f"controlnet_{e}") from None
                out.append(generation.png_base64(np.asarray(hint), None))
            return out

        return {"info": "Success", "images": await asyncio.to_thread(detect)}

    # What the web UI lists and this server has none of: empty lists, so that clients that ask find out.
    for route in (
        "sd-vae",
        "upscalers",
        "latent-upscale-modes",
        "hypernetworks",
        "face-restorers",
        "realesrgan-models",
        "prompt-styles",
        "extensions",
        "script-info",
    ):
        app.add_api_route(f"{api}/{route}", _empty_list, methods=["GET"], name=route)
    app.add_api_route(f"{api}/refresh-vae", _nothing, methods=["POST"], name="refresh-vae")

    @app.get(f"{api}/memory")
    async def memory():
        return _memory()

    @app.post(f"{api}/png-info")
    async def png_info(req: schema.PNGInfoRequest):
        from tf_diffusion.infotext import parse_parameters

        image = await asyncio.to_thread(generation.decode_image, req.image, "image", state.max_image_pixels)
        items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
        text = items.pop("parameters", "")
        parameters = {}
        if text:
            try:
                parsed = parse_parameters(text)
            except ValueError as e:
                raise ApiError(422, f"image: its parameters cannot be read: {e}") from None
            parameters = _a1111_fields(parsed)
        return {"info": text, "items": items, "parameters": parameters}


async def _empty_list():
    return []


async def _nothing():
    return None


def _model_item(entry, state) -> dict:
    digest = None
    if (
        entry.is_file
        and state.registry.current is not None
        and entry.filename == state.registry.current.filename
    ):
        digest = state.registry.short_hash(entry)
    return {
        "title": entry.title,
        "model_name": entry.model_name,
        "hash": digest,
        "sha256": None,
        "filename": entry.filename,
        "config": None,
    }


def _state_dict(job, state) -> dict:
    p = None if job is None else job.progress
    return {
        "skipped": bool(job and job.skipped),
        "interrupted": bool(job and job.interrupted),
        "job": "" if job is None else job.id,
        "job_count": 0 if p is None else p.job_count,
        "job_timestamp": "0" if job is None else time.strftime("%Y%m%d%H%M%S", time.localtime(job.submitted)),
        "job_no": 0 if p is None else p.job_no,
        "sampling_step": 0 if p is None else p.sampling_step,
        "sampling_steps": 0 if p is None else p.sampling_steps,
        "queued": state.queue.waiting,
    }


def _a1111_fields(parsed: dict) -> dict:
    """``parse_parameters``' result under the web UI's keys (``Prompt``, ``Size-1``, ...)."""
    out = {"Prompt": parsed.get("prompt", ""), "Negative prompt": parsed.get("negative_prompt", "")}
    names = {
        "steps": "Steps",
        "sampler": "Sampler",
        "cfg_scale": "CFG scale",
        "seed": "Seed",
        "model_hash": "Model hash",
        "model_name": "Model",
    }
    for ours, theirs in names.items():
        if ours in parsed:
            out[theirs] = parsed[ours]
    if "width" in parsed:
        out["Size-1"], out["Size-2"] = parsed["width"], parsed["height"]
    out.update(parsed.get("extra", {}))
    return out


def _memory() -> dict:
    info = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    rss = None
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    total = info.get("MemTotal")
    free = info.get("MemAvailable")
    ram = {"free": free, "used": rss, "total": total}
    from tf_diffusion.execution.compiling import memory_mappings

    mappings = memory_mappings()
    return {
        "ram": ram,
        "cuda": {"error": "no CUDA here: TensorFlow decides the device"},
        "memory_mappings": None if mappings is None else {"used": mappings[0], "limit": mappings[1]},
    }
