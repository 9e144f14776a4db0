"""The web page at ``/``: Gradio (what the AUTOMATIC1111 web UI is built on), mounted on the API's app.

Tabs txt2img, img2img (inpainting with a mask painted on the picture) and PNG info. A generation from the
page is the same request an API client sends (``schema.Txt2ImgRequest`` / ``Img2ImgRequest``), checked
by the same functions and run as a job of the same queue, so the page and the API share one generation
at a time, the queue's bound (a full queue: an error on the page) and the same PNG parameters. While a
job runs the page shows its step and a preview of the latents (``generation.preview``) every
``PREVIEW_EVERY`` seconds; Interrupt stops the browser session's own job. A page that is closed
mid-generation cancels its job, as an API client that disconnects does.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr

from tf_diffusion.serve import generation, schema
from tf_diffusion.serve.generation import ApiError
from tf_diffusion.serve.jobs import QueueFull

PREVIEW_EVERY = 0.25  # seconds between progress updates on the page
MAX_SIZE = 2048


def mount(app, state):
    """Mount the page on ``app`` at ``/`` (after the API routes, which keep precedence)."""
    from PIL import Image

    page = WebPage(state)
    # Gradio decodes the page's uploads (the img2img picture, the ControlNet hint) with Pillow before our
    # handlers see them: Pillow's own bomb check, which reads the header first, refuses what is over the
    # server's pixel limit (it raises beyond twice MAX_IMAGE_PIXELS). It is process-wide: this process
    # serves, and nothing in it should decode more than the limit.
    Image.MAX_IMAGE_PIXELS = state.max_image_pixels / 2
    return gr.mount_gradio_app(
        app,
        page.build(),
        path="/",
        ssr_mode=False,
        footer_links=[],
        css=_CSS,
        mcp_server=False,
        max_file_size=state.max_body_bytes,
    )


_CSS = """
#tfd-progress progress { width: 100%; height: 1.2em; }
"""


def _progress_html(job) -> str:
    p = job.progress
    if job.started is None:
        text = "waiting in the queue"
        return f'<div id="tfd-progress" data-state="queued"><progress></progress> {html.escape(text)}</div>'
    total = max(p.job_count, 1) * max(p.sampling_steps, 1)
    done = p.job_no * max(p.sampling_steps, 1) + p.sampling_step
    text = p.textinfo or f"batch {min(p.job_no + 1, max(p.job_count, 1))}/{max(p.job_count, 1)}"
    return (
        f'<div id="tfd-progress" data-state="running" data-task="{html.escape(job.id)}" '
        f'data-step="{p.sampling_step}" '
        f'data-steps="{p.sampling_steps}"><progress max="{total}" value="{min(done, total)}"></progress> '
        f"step {p.sampling_step}/{p.sampling_steps}, {html.escape(text)}</div>"
    )


def _done_html(info: dict, seconds: float) -> str:
    n = len(info["all_seeds"])
    word = "interrupted" if info["interrupted"] else "done"
    return (
        f'<div id="tfd-progress" data-state="done" data-task="{html.escape(info["task_id"])}"><progress max="1" value="1"></progress> '
        f"{word}: {n} image{'s' if n != 1 else ''} in {seconds:.1f} s</div>"
    )


def _enlarged(picture, at_least: int = 128):
    """The latent preview (one pixel per latent) repeated to ``at_least`` pixels: blocks, not a blur."""
    import numpy as np

    if picture is None:
        return None
    k = max(1, -(-at_least // max(picture.shape[:2])))
    return np.repeat(np.repeat(picture, k, axis=0), k, axis=1)


def _decode(b64: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


class WebPage:
    """The Gradio page over a ``ServerState``; jobs by browser session for Interrupt."""

    def __init__(self, state):
        self.state = state
        self._jobs: dict[str, object] = {}  # session hash -> its running or queued job
        self._lock = threading.Lock()

    # ---- what the pickers list ----------------------------------------------------------------------
    def model_titles(self) -> list[str]:
        return [e.title for e in self.state.registry.refresh()]

    def current_model(self) -> str:
        current = self.state.registry.current or self.state.registry.entries[0]
        return current.title

    def lora_names(self) -> list[str]:
        return [item["name"] for item in self.state.registry.loras()]

    def embedding_names(self) -> list[str]:
        from tf_diffusion.adapters.textual_inversion import EMBEDDING_SUFFIXES, loaded_embeddings

        if self.state.registry.sd is not None:
            words = list(loaded_embeddings(self.state.registry.sd))
            if words:
                return words
        return [p.stem for p in self.state.registry.embedding_files(EMBEDDING_SUFFIXES)]

    def default_size(self) -> int:
        sd = self.state.registry.sd
        return 512 if sd is None else int(sd.config.default_size)

    # ---- jobs ---------------------------------------------------------------------------------------
    def _submit(self, session: str, fn, kind: str):
        try:
            job = self.state.queue.submit(fn, kind)
        except QueueFull as e:
            raise gr.Error(str(e)) from None
        with self._lock:
            self._jobs[session] = job
        return job

    def interrupt(self, request: gr.Request) -> None:
        with self._lock:
            job = self._jobs.get(_session(request))
        if job is not None:
            job.interrupt()

    def skip(self, request: gr.Request) -> None:
        with self._lock:
            job = self._jobs.get(_session(request))
        if job is not None:
            job.skip()

    def _follow(self, session: str, job):
        """Yield (progress html, preview) while ``job`` runs; cancel it if the page goes away."""
        shown_step = None
        try:
            while True:
                try:
                    job.future.result(timeout=PREVIEW_EVERY)
                    return
                except TimeoutError:
                    pass
                except Exception:  # noqa: BLE001 - reported by the caller from the future
                    return
                p = job.progress
                preview = None
                if p.latents is not None and p.sampling_step != shown_step:
                    shown_step = p.sampling_step
                    preview = _enlarged(generation.preview(p.latents))
                yield _progress_html(job), preview
        except GeneratorExit:
            job.cancel()  # the browser left: do not run its job for nobody
            raise
        finally:
            with self._lock:
                if self._jobs.get(session) is job:
                    del self._jobs[session]

    def generate(self, kind: str, req, session: str, init=None, mask=None):
        """Run ``req`` as a queued job; yields page updates and finally the gallery."""
        try:
            generation.check_request(req, self.state.registry, self.state.options())
        except (ApiError, ValueError) as e:
            raise gr.Error(getattr(e, "detail", str(e))) from None
        started = time.time()
        job = self._submit(session, self.state.work(req, init, mask), kind)
        for progress, preview in self._follow(session, job):
            yield (
                progress,
                gr.skip() if preview is None else preview,
                gr.skip(),
                gr.skip(),
                gr.skip(),
                gr.skip(),
            )
        try:
            result = job.future.result()
        except ApiError as e:
            raise gr.Error(e.detail) from None
        except ValueError as e:
            raise gr.Error(str(e)) from None
        info = json.loads(result["info"])
        images = [_decode(b64) for b64 in result["images"]]
        gallery = [(image, text) for image, text in zip(images, info["infotexts"], strict=True)]
        first = info["infotexts"][0] if info["infotexts"] else ""
        last_seed = info["all_seeds"][0] if info["all_seeds"] else -1
        yield (
            _done_html(info, time.time() - started),
            gr.skip(),
            gallery,
            first,
            info["infotexts"],
            last_seed,
        )

    def switch_model(self, title: str, request: gr.Request):
        """Make ``title`` the current model (a job of the queue, after what is queued before it)."""
        registry = self.state.registry
        if registry.current is not None and title == registry.current.title:
            return f"model: {title}"
        try:
            entry = registry.lookup(title)
        except (LookupError, ValueError) as e:
            raise gr.Error(str(e)) from None
        job = self._submit(_session(request), lambda job: registry.load(entry) and None, "load model")
        try:
            job.future.result()
        except Exception as e:  # noqa: BLE001 - shown on the page; the server goes on
            raise gr.Error(f"model {title!r} could not be loaded: {e}") from None
        return f"model: {title}"

    # ---- the page -----------------------------------------------------------------------------------
    def build(self):
        from tf_diffusion.infotext import A1111_SAMPLERS

        samplers = list(A1111_SAMPLERS.values())
        schedules = list(generation.SCHEDULES.values())
        size = self.default_size()
        with gr.Blocks(title="tf_diffusion", analytics_enabled=False) as page:
            with gr.Row():
                model = gr.Dropdown(
                    self.model_titles(),
                    value=self.current_model(),
                    label="Model",
                    elem_id="tfd-model",
                    scale=3,
                )
                refresh = gr.Button("Refresh", elem_id="tfd-refresh", scale=0)
                model_status = gr.Markdown(f"model: {self.current_model()}", elem_id="tfd-model-status")
            with gr.Tabs(elem_id="tfd-tabs") as tabs:
                t2i = self._generation_tab(gr, "txt2img", samplers, schedules, size)
                i2i = self._generation_tab(gr, "img2img", samplers, schedules, size)
                with gr.Tab("PNG info", id="png-info", elem_id="tfd-png-info-tab"):
                    with gr.Row():
                        png = gr.File(
                            label="PNG (ours or AUTOMATIC1111's)",
                            file_types=[".png", ".jpg", ".jpeg", ".webp"],
                            type="filepath",
                            elem_id="tfd-png-file",
                        )
                        with gr.Column():
                            png_text = gr.Textbox(label="Parameters", lines=6, elem_id="tfd-png-text")
                            png_fields = gr.JSON(label="Fields", elem_id="tfd-png-fields")
                            send = gr.Button("Send to txt2img", elem_id="tfd-png-send")

            refresh.click(lambda: gr.update(choices=self.model_titles()), outputs=model)
            model.change(self.switch_model, inputs=model, outputs=model_status, concurrency_limit=None)
            self._wire(gr, t2i, "txt2img")
            self._wire(gr, i2i, "img2img")
            png.change(self.png_info, inputs=png, outputs=[png_text, png_fields])
            fields = t2i["fields"]
            send.click(
                self.send_to_txt2img,
                inputs=png_fields,
                outputs=[
                    fields["prompt"],
                    fields["negative_prompt"],
                    fields["sampler"],
                    fields["schedule"],
                    fields["steps"],
                    fields["cfg_scale"],
                    fields["width"],
                    fields["height"],
                    fields["seed"],
                    tabs,
                ],
            )
        return page

    def _generation_tab(self, gr, kind: str, samplers, schedules, size) -> dict:
        c: dict = {}
        with gr.Tab(kind, id=kind, elem_id=f"tfd-{kind}-tab"):
            with gr.Row():
                with gr.Column(scale=3):
                    c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id=f"tfd-{kind}-prompt")
                    c["negative_prompt"] = gr.Textbox(
                        label="Negative prompt", lines=1, elem_id=f"tfd-{kind}-negative"
                    )
                with gr.Column(scale=1, min_width=160):
                    c["generate"] = gr.Button("Generate", variant="primary", elem_id=f"tfd-{kind}-generate")
                    with gr.Row():
                        c["interrupt"] = gr.Button("Interrupt", elem_id=f"tfd-{kind}-interrupt")
                        c["skip"] = gr.Button("Skip", elem_id=f"tfd-{kind}-skip")
            with gr.Row():
                with gr.Column():
                    if kind == "img2img":
                        c["editor"] = gr.ImageEditor(
                            label="Image (paint over it to inpaint: the painted area is repainted)",
                            type="pil",
                            image_mode="RGBA",
                            sources=["upload", "clipboard"],
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=8),
                            transforms=(),
                            layers=False,
                            elem_id="tfd-img2img-editor",
                        )
                        with gr.Row():
                            c["denoising_strength"] = gr.Slider(
                                0,
                                1,
                                value=0.75,
                                step=0.01,
                                label="Denoising strength",
                                elem_id="tfd-strength",
                            )
                            c["mask_blur"] = gr.Slider(
                                0, 64, value=4, step=1, label="Mask blur", elem_id="tfd-img2img-mask-blur"
                            )
                        with gr.Row():
                            c["resize_mode"] = gr.Radio(
                                [name.capitalize() for name in generation.RESIZE_MODES.values()],
                                value="Just resize",
                                label="Resize mode",
                                type="index",
                            )
                            c["masked_content"] = gr.Radio(
                                list(generation.INPAINTING_FILLS.values()),
                                value="original",
                                label="Masked content",
                                type="index",
                            )
                        with gr.Row():
                            c["inpaint_area"] = gr.Radio(
                                ["Whole picture", "Only masked"], value="Whole picture", label="Inpaint area"
                            )
                            c["padding"] = gr.Slider(0, 256, value=32, step=4, label="Only masked padding")
                    with gr.Row():
                        c["sampler"] = gr.Dropdown(
                            samplers, value="Euler a", label="Sampling method", elem_id=f"tfd-{kind}-sampler"
                        )
                        c["schedule"] = gr.Dropdown(schedules, value="Automatic", label="Schedule type")
                    c["steps"] = gr.Slider(
                        1, 150, value=20, step=1, label="Steps", elem_id=f"tfd-{kind}-steps"
                    )
                    with gr.Row():
                        c["width"] = gr.Slider(
                            8, MAX_SIZE, value=size, step=8, label="Width", elem_id=f"tfd-{kind}-width"
                        )
                        c["height"] = gr.Slider(
                            8, MAX_SIZE, value=size, step=8, label="Height", elem_id=f"tfd-{kind}-height"
                        )
                    with gr.Row():
                        c["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count")
                        c["batch_size"] = gr.Slider(
                            1, 8, value=1, step=1, label="Batch size", elem_id=f"tfd-{kind}-batch-size"
                        )
                    c["cfg_scale"] = gr.Slider(1, 30, value=7, step=0.5, label="CFG scale")
                    with gr.Row():
                        c["seed"] = gr.Number(
                            -1, precision=0, label="Seed (-1: random)", elem_id=f"tfd-{kind}-seed", scale=3
                        )
                        c["random_seed"] = gr.Button("Random", elem_id=f"tfd-{kind}-random-seed", scale=0)
                        c["reuse_seed"] = gr.Button(
                            "Reuse last seed", elem_id=f"tfd-{kind}-reuse-seed", scale=0
                        )
                    with gr.Row():
                        c["lora"] = gr.Dropdown(
                            self.lora_names(),
                            value=None,
                            label="Add a LoRA to the prompt",
                            elem_id=f"tfd-{kind}-lora",
                        )
                        c["embedding"] = gr.Dropdown(
                            self.embedding_names(), value=None, label="Add an embedding to the prompt"
                        )
                    with gr.Accordion("ControlNet", open=False, elem_id=f"tfd-{kind}-controlnet"):
                        c["cn_enabled"] = gr.Checkbox(False, label="Enable", elem_id=f"tfd-{kind}-cn-enabled")
                        c["cn_image"] = gr.Image(
                            label="Hint image (used as it is: module none)",
                            type="pil",
                            image_mode="RGB",
                            sources=["upload", "clipboard"],
                            elem_id=f"tfd-{kind}-cn-image",
                            height=160,
                        )
                        titles = self.state.registry.controlnet_titles()
                        c["cn_model"] = gr.Dropdown(
                            titles,
                            value=titles[0] if titles else None,
                            label="Model",
                            elem_id=f"tfd-{kind}-cn-model",
                        )
                        with gr.Row():
                            c["cn_weight"] = gr.Slider(0, 2, value=1, step=0.05, label="Control weight")
                            c["cn_start"] = gr.Slider(0, 1, value=0, step=0.01, label="Starting control step")
                            c["cn_end"] = gr.Slider(0, 1, value=1, step=0.01, label="Ending control step")
                        with gr.Row():
                            c["cn_mode"] = gr.Radio(
                                [generation.CONTROL_MODES[0], generation.CONTROL_MODES[2]],
                                value=generation.CONTROL_MODES[0],
                                label="Control mode",
                            )
                            c["cn_resize"] = gr.Radio(
                                ["Just Resize", "Crop and Resize", "Resize and Fill"],
                                value="Crop and Resize",
                                label="Resize mode",
                            )
                with gr.Column():
                    c["progress"] = gr.HTML(
                        '<div id="tfd-progress" data-state="idle"></div>', elem_id=f"tfd-{kind}-progress"
                    )
                    c["preview"] = gr.Image(
                        label="Preview", interactive=False, elem_id=f"tfd-{kind}-preview", height=150
                    )
                    c["gallery"] = gr.Gallery(
                        label="Results", format="png", columns=4, elem_id=f"tfd-{kind}-gallery", height=260
                    )
                    c["info"] = gr.Textbox(
                        label="Parameters of the selected image", lines=4, elem_id=f"tfd-{kind}-info"
                    )
            c["infotexts"] = gr.State([])  # inside the tab: a Tabs block holds only tabs
            c["last_seed"] = gr.State(-1)
        c["fields"] = c
        return c

    def _wire(self, gr, c: dict, kind: str) -> None:
        inputs = [
            c["prompt"],
            c["negative_prompt"],
            c["sampler"],
            c["schedule"],
            c["steps"],
            c["cfg_scale"],
            c["width"],
            c["height"],
            c["seed"],
            c["n_iter"],
            c["batch_size"],
            *(c[k] for k in _CONTROL_FIELDS),
        ]
        if kind == "img2img":
            inputs += [
                c["editor"],
                c["denoising_strength"],
                c["mask_blur"],
                c["inpaint_area"],
                c["padding"],
                c["resize_mode"],
                c["masked_content"],
            ]
        outputs = [c["progress"], c["preview"], c["gallery"], c["info"], c["infotexts"], c["last_seed"]]
        run = self._txt2img if kind == "txt2img" else self._img2img
        for trigger in (c["generate"].click, c["prompt"].submit):
            trigger(run, inputs=inputs, outputs=outputs, concurrency_limit=None, show_progress="hidden")
        c["interrupt"].click(self.interrupt, concurrency_limit=None, queue=False)
        c["skip"].click(self.skip, concurrency_limit=None, queue=False)
        c["random_seed"].click(lambda: -1, outputs=c["seed"], queue=False)
        c["reuse_seed"].click(lambda s: s, inputs=c["last_seed"], outputs=c["seed"], queue=False)
        c["gallery"].select(_selected_info, inputs=c["infotexts"], outputs=c["info"], queue=False)
        c["lora"].input(_add_lora, [c["prompt"], c["lora"]], [c["prompt"], c["lora"]], queue=False)
        c["embedding"].input(
            _add_word, [c["prompt"], c["embedding"]], [c["prompt"], c["embedding"]], queue=False
        )

    def _fields(self, prompt, negative, sampler, schedule, steps, cfg, width, height, seed, n_iter, batch):
        return {
            "prompt": prompt or "",
            "negative_prompt": negative or "",
            "sampler_name": sampler,
            "scheduler": None if schedule in (None, "Automatic") else schedule,
            "steps": int(steps),
            "cfg_scale": float(cfg),
            "width": int(width),
            "height": int(height),
            "seed": -1 if seed is None else int(seed),
            "n_iter": int(n_iter),
            "batch_size": int(batch),
        }

    def _txt2img(
        self,
        prompt,
        negative,
        sampler,
        schedule,
        steps,
        cfg,
        width,
        height,
        seed,
        n_iter,
        batch,
        cn_enabled,
        cn_image,
        cn_model,
        cn_weight,
        cn_start,
        cn_end,
        cn_mode,
        cn_resize,
        request: gr.Request,
    ):
        values = (prompt, negative, sampler, schedule, steps, cfg, width, height, seed, n_iter, batch)
        control = _control(cn_enabled, cn_image, cn_model, cn_weight, cn_start, cn_end, cn_mode, cn_resize)
        try:
            req = schema.Txt2ImgRequest(**self._fields(*values), alwayson_scripts=control)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        yield from self.generate("txt2img", req, _session(request), None, None)

    def _img2img(
        self,
        prompt,
        negative,
        sampler,
        schedule,
        steps,
        cfg,
        width,
        height,
        seed,
        n_iter,
        batch,
        cn_enabled,
        cn_image,
        cn_model,
        cn_weight,
        cn_start,
        cn_end,
        cn_mode,
        cn_resize,
        editor,
        strength,
        blur,
        area,
        padding,
        resize_mode,
        masked_content,
        request: gr.Request,
    ):
        import numpy as np
        from PIL import Image

        common = (prompt, negative, sampler, schedule, steps, cfg, width, height, seed, n_iter, batch)
        if not editor or editor.get("background") is None:
            raise gr.Error("img2img: drop a picture to start from in the image box")
        background = editor["background"]
        check = self.state.max_image_pixels
        if background.width * background.height > check:
            raise gr.Error(f"the picture has more than the server's limit of {check:,} pixels")
        mask = None
        painted = [layer for layer in editor.get("layers") or [] if layer is not None]
        if painted:
            alpha = np.zeros((background.height, background.width), bool)
            for layer in painted:
                a = np.asarray(layer.convert("RGBA"))[..., 3]
                if a.shape == alpha.shape:
                    alpha |= a > 0
            if alpha.any():
                mask = Image.fromarray(alpha.astype(np.uint8) * 255, "L")
        init = background.convert("RGBA")
        white = Image.new("RGBA", init.size, (255, 255, 255, 255))
        init = Image.alpha_composite(white, init).convert("RGB")  # transparent areas as white
        fields = self._fields(*common)
        fields["alwayson_scripts"] = _control(
            cn_enabled, cn_image, cn_model, cn_weight, cn_start, cn_end, cn_mode, cn_resize
        )
        fields.update(
            denoising_strength=float(strength), mask_blur=int(blur), resize_mode=int(resize_mode or 0)
        )
        if mask is not None:
            fields.update(
                inpainting_fill=1 if masked_content is None else int(masked_content),
                inpaint_full_res=area == "Only masked",
                inpaint_full_res_padding=int(padding),
            )
        try:
            req = schema.Img2ImgRequest(**fields)
            generation.check_img2img(req, mask is not None)
            init, mask = generation.prepare_images(init, mask, req)
        except ApiError as e:
            raise gr.Error(e.detail) from None
        except ValueError as e:
            raise gr.Error(str(e)) from None
        yield from self.generate("img2img", req, _session(request), init, mask)

    # ---- PNG info -----------------------------------------------------------------------------------
    def png_info(self, path):
        from tf_diffusion.infotext import parse_parameters

        if not path:
            return "", None
        with open(path, "rb") as f:
            data = f.read()
        try:
            image = generation.decode_image(
                base64.b64encode(data).decode("ascii"), "image", self.state.max_image_pixels
            )
        except ApiError as e:
            raise gr.Error(e.detail) from None
        text = image.info.get("parameters", "")
        if not isinstance(text, str) or not text:
            return "", {"error": "this image has no generation parameters"}
        try:
            return text, parse_parameters(text)
        except ValueError as e:
            return text, {"error": f"the parameters cannot be read: {e}"}

    def send_to_txt2img(self, fields):
        from tf_diffusion.infotext import A1111_SAMPLERS

        if not fields or "error" in fields:
            raise gr.Error("PNG info: no parameters to send (drop a PNG with generation parameters)")
        extra = fields.get("extra", {})
        sampler = fields.get("sampler")
        schedule = extra.get("Schedule type")
        keep = gr.skip()
        return (
            fields.get("prompt", ""),
            fields.get("negative_prompt", ""),
            sampler if sampler in A1111_SAMPLERS.values() else keep,
            schedule if schedule in generation.SCHEDULES.values() else keep,
            fields.get("steps", keep),
            fields.get("cfg_scale", keep),
            fields.get("width", keep),
            fields.get("height", keep),
            fields.get("seed", keep),
            gr.Tabs(selected="txt2img"),
        )


_CONTROL_FIELDS = (
    "cn_enabled",
    "cn_image",
    "cn_model",
    "cn_weight",
    "cn_start",
    "cn_end",
    "cn_mode",
    "cn_resize",
)


def _control(enabled, image, model, weight, start, end, mode, resize) -> dict:
    """The page's ControlNet unit as the API's ``alwayson_scripts`` (checked by ``control_units``)."""
    if not enabled:
        return {}
    if image is None:
        raise gr.Error("ControlNet: drop a hint image, or untick Enable")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    unit = {
        "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "model": model,
        "module": "none",
        "weight": float(weight),
        "guidance_start": float(start),
        "guidance_end": float(end),
        "control_mode": mode,
        "resize_mode": resize,
    }
    return {"ControlNet": {"args": [unit]}}


def _add_lora(prompt: str, name: str | None):
    """Append ``<lora:NAME:1>`` (the web UI's extra-network tag) and clear the picker."""
    if not name:
        return gr.skip(), gr.skip()
    return f"{prompt or ''} <lora:{name}:1>".strip(), None


def _add_word(prompt: str, word: str | None):
    if not word:
        return gr.skip(), gr.skip()
    return f"{prompt or ''} {word}".strip(), None


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _selected_info(infotexts, evt: gr.SelectData):
    if not infotexts:
        return ""
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    return infotexts[index] if 0 <= index < len(infotexts) else ""
