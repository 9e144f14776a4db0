"""``tf-diffusion serve``: the A1111 API driven by the real ``webuiapi`` client, on the tiny-shapes model.

One uvicorn server in a thread on a free port serves every test (graph mode, 32x32 images, few steps);
bad input, authentication and body limits are also checked through the application in-process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest

webuiapi = pytest.importorskip("webuiapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from tf_diffusion.serve import ModelRegistry, Server, ServerState, create_app  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
ERROR_KEYS = {"error", "detail", "body", "errors"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    os.symlink(os.path.join(ROOT, "weights", "tiny-shapes"), folder / "tiny-shapes-b")
    return folder


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    """A random ControlNet shaped for tiny-shapes' UNet, in the original single-file layout."""
    from tf_diffusion.controlnet import ControlNet, ControlNetConfig
    from tf_diffusion.models import folder_config, resolve_model
    from tf_diffusion.testing import random_state_dict
    from tf_diffusion.weights import load_state_dict, manifest
    from tf_diffusion.weights.safetensors_io import save_safetensors

    folder = tmp_path_factory.mktemp("controlnet")
    unet = folder_config(resolve_model("tiny-shapes")).unet
    net = ControlNet(ControlNetConfig(unet=unet, hint_channels=(16, 32, 64)))  # the tiny VAE scales by 4
    weights = random_state_dict(manifest(net), 3)
    load_state_dict(net, weights)
    save_safetensors(
        {f"control_model.{k}": v for k, v in weights.items()}, folder / "control_tiny.safetensors"
    )
    return folder


@pytest.fixture(scope="module")
def server(models_dir, controlnet_dir, tmp_path_factory):
    registry = ModelRegistry(
        "tiny-shapes", models_dir=models_dir, keep_loaded=2, controlnet_dir=controlnet_dir
    )
    registry.load()
    outputs = tmp_path_factory.mktemp("outputs")
    srv = Server(ServerState(registry, queue_size=2, outputs=str(outputs)), port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server.port, sampler="Euler a", steps=4)


def _generate(sd, **kwargs):
    return np.asarray(sd.generate(progress=False, jit_compile=False, **kwargs))


def test_txt2img_matches_generate(server, api):
    result = api.txt2img(
        prompt="a red circle",
        negative_prompt="blurry",
        seed=11,
        batch_size=2,
        n_iter=2,
        width=SIZE,
        height=SIZE,
        cfg_scale=4,
        sampler_name="DPM++ 2M Karras",
    )
    assert result.info["all_seeds"] == [11, 12, 13, 14]
    assert len(result.images) == 4
    sd = server.state.registry.sd
    for k in range(2):
        expected = _generate(
            sd,
            prompt="a red circle",
            negative_prompt="blurry",
            seed=11 + 2 * k,
            num_images=2,
            height=SIZE,
            width=SIZE,
            guidance_scale=4.0,
            num_steps=4,
            scheduler="dpmpp_2m_karras",
        )
        for b in range(2):
            got = np.asarray(result.images[2 * k + b].convert("RGB"))
            np.testing.assert_array_equal(got, expected[b])  # pixel-exact: the same graph-mode computation
    text = result.images[3].info["parameters"]
    assert text.startswith(
        "a red circle\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 4"
    )
    assert "Seed: 14, Size: 32x32" in text and "Batch size: 2, Batch pos: 1" in text
    assert result.info["infotexts"][3] == text
    assert result.parameters["prompt"] == "a red circle"
    # seed -1: drawn, reported, reproducible (batch 2 again: the traced program serves)
    drawn = api.txt2img(
        prompt="a blue star", seed=-1, batch_size=2, width=SIZE, height=SIZE, sampler_name="DPM++ 2M Karras"
    )
    seed = drawn.info["seed"]
    assert 0 <= seed < 2**32 and drawn.info["all_seeds"] == [seed, seed + 1]
    expected = _generate(
        sd,
        prompt="a blue star",
        seed=seed,
        num_images=2,
        height=SIZE,
        width=SIZE,
        guidance_scale=7.0,
        num_steps=4,
        scheduler="dpmpp_2m_karras",
    )
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(drawn.images[b].convert("RGB")), expected[b])


def test_img2img_with_mask_matches_generate(server, api):
    from tf_diffusion.serve.generation import fill_masked

    sd = server.state.registry.sd
    init = Image.fromarray(
        _generate(
            sd, prompt="a green square", seed=3, height=SIZE, width=SIZE, num_steps=4, scheduler="euler_a"
        )[0]
    )
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    result = api.img2img(
        images=[init],
        mask_image=Image.fromarray(mask),
        prompt="a yellow heart",
        seed=21,
        width=SIZE,
        height=SIZE,
        steps=8,
        denoising_strength=0.5,
        mask_blur=2,
        inpainting_fill=1,
        inpaint_full_res=False,
        cfg_scale=5,
        sampler_name="Euler a",
    )
    expected = _generate(
        sd,
        prompt="a yellow heart",
        seed=21,
        image=init,
        mask=Image.fromarray(mask),
        strength=0.5,
        mask_blur=2.0,
        height=SIZE,
        width=SIZE,
        guidance_scale=5.0,
        num_steps=8,
        scheduler="euler_a",
    )
    got = np.asarray(result.image.convert("RGB"))
    np.testing.assert_array_equal(got, expected[0])
    assert not np.array_equal(got, np.asarray(init))
    text = result.image.info["parameters"]
    assert "Denoising strength: 0.5" in text and "Mask blur: 2" in text and "Sampler: Euler a," in text
    assert result.parameters["init_images"] is None  # include_init_images=False, as the web UI
    # latent noise / latent nothing: the pixels filled as for 0, then generate(masked_content=)
    for fill, content in ((2, "latent_noise"), (3, "latent_nothing")):
        got = api.img2img(
            images=[init],
            mask_image=Image.fromarray(mask),
            prompt="a yellow heart",
            seed=21,
            steps=4,
            denoising_strength=0.75,
            mask_blur=2,
            inpainting_fill=fill,
            inpaint_full_res=False,
            width=SIZE,
            height=SIZE,
            sampler_name="Euler a",
        )
        want = _generate(
            sd,
            prompt="a yellow heart",
            seed=21,
            image=fill_masked(init, Image.fromarray(mask)),
            mask=Image.fromarray(mask),
            masked_content=content,
            strength=0.75,
            mask_blur=2.0,
            height=SIZE,
            width=SIZE,
            guidance_scale=7.0,
            num_steps=4,
            scheduler="euler_a",
        )
        np.testing.assert_array_equal(np.asarray(got.image.convert("RGB")), want[0])
    # what is not done is refused by name, not done differently
    with pytest.raises(RuntimeError, match=r"inpainting_fill=7 is not supported; allowed: 0 \(fill\)"):
        api.img2img(
            images=[init], mask_image=Image.fromarray(mask), inpainting_fill=7, width=SIZE, height=SIZE
        )
    with pytest.raises(
        RuntimeError, match=r"resize_mode=3 \(just resize \(latent upscale\)\) is for img2img"
    ):
        api.img2img(images=[init], mask_image=Image.fromarray(mask), resize_mode=3, width=SIZE, height=SIZE)


def test_fill_takes_the_colours_around_the_hole():
    from tf_diffusion.serve.generation import fill_masked

    x = np.zeros((SIZE, SIZE, 3), np.uint8)
    x[:] = (200, 40, 40)
    x[:, SIZE // 2 :] = (40, 40, 200)
    x[10:22, 4:28] = (0, 255, 0)  # what the mask hides: none of its green may show through
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[9:23, 3:29] = 255
    filled = np.asarray(fill_masked(Image.fromarray(x), Image.fromarray(m))).astype(int)
    np.testing.assert_array_equal(filled[m == 0], x[m == 0])  # kept pixels exact
    assert filled[..., 1][m > 0].max() <= 40  # no green
    # deep in the hole's left part red dominates, in its right part blue
    assert filled[16, 6, 0] > filled[16, 6, 2] + 60 and filled[16, 25, 2] > filled[16, 25, 0] + 60
    with_uniform = np.asarray(fill_masked(Image.fromarray(np.full_like(x, 77)), Image.fromarray(m)))
    assert np.abs(with_uniform.astype(int) - 77).max() <= 1  # a uniform surrounding fills uniformly


def test_img2img_fill_and_resize_modes(server, api):
    from tf_diffusion.serve.generation import fill_masked, resize_picture

    sd = server.state.registry.sd
    init = np.zeros((SIZE, SIZE, 3), np.uint8)
    init[:] = (200, 200, 200)
    init[8:24, 8:24] = (30, 30, 30)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[6:26, 6:26] = 255
    common = dict(prompt="a blue circle", seed=4, steps=6, cfg_scale=5, sampler_name="Euler", mask_blur=0)
    result = api.img2img(
        images=[Image.fromarray(init)],
        mask_image=Image.fromarray(mask),
        inpainting_fill=0,
        inpaint_full_res=False,
        denoising_strength=0.5,
        width=SIZE,
        height=SIZE,
        **common,
    )
    filled = fill_masked(Image.fromarray(init), Image.fromarray(mask))
    expected = _generate(
        sd,
        prompt="a blue circle",
        seed=4,
        image=filled,
        mask=Image.fromarray(mask),
        strength=0.5,
        mask_blur=0.0,
        height=SIZE,
        width=SIZE,
        guidance_scale=5.0,
        num_steps=6,
        scheduler="euler",
    )
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), expected[0])
    # resize modes, on a 2:1 picture (white | green | white quarters) made square: what generate() is given
    wide = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    wide[:] = 255
    wide[:, SIZE // 2 : 3 * SIZE // 2] = (0, 200, 0)
    results = {}
    for mode in (0, 1, 2):
        out = api.img2img(
            images=[Image.fromarray(wide)],
            resize_mode=mode,
            denoising_strength=0.3,
            width=SIZE,
            height=SIZE,
            **common,
        )
        results[mode] = np.asarray(out.image.convert("RGB"))
        expected = _generate(
            sd,
            prompt="a blue circle",
            seed=4,
            image=resize_picture(Image.fromarray(wide), (SIZE, SIZE), mode),
            strength=0.3,
            height=SIZE,
            width=SIZE,
            guidance_scale=5.0,
            num_steps=6,
            scheduler="euler",
        )
        np.testing.assert_array_equal(results[mode], expected[0])
    assert not np.array_equal(results[0], results[1]) and not np.array_equal(results[1], results[2])
    # 3, latent upscale: the picture encoded at its own size, the latents resized (generate(resize_latents=))
    out = api.img2img(
        images=[Image.fromarray(wide)],
        resize_mode=3,
        denoising_strength=0.6,
        width=SIZE,
        height=SIZE,
        **common,
    )
    expected = _generate(
        sd,
        prompt="a blue circle",
        seed=4,
        image=Image.fromarray(wide),
        resize_latents=True,
        strength=0.6,
        height=SIZE,
        width=SIZE,
        guidance_scale=5.0,
        num_steps=6,
        scheduler="euler",
    )
    np.testing.assert_array_equal(np.asarray(out.image.convert("RGB")), expected[0])
    assert not np.array_equal(np.asarray(out.image.convert("RGB")), results[0])


def test_resize_modes():
    from tf_diffusion.serve.generation import resize_picture

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:] = 255
    wide[:, 10:30] = (0, 200, 0)
    wide[:, 19:21] = (200, 0, 0)  # a red line down the middle
    picture = Image.fromarray(wide)
    stretched = np.asarray(resize_picture(picture, (20, 20), 0))
    np.testing.assert_array_equal(stretched, np.asarray(picture.resize((20, 20), Image.LANCZOS)))
    # crop and resize: scaled to cover (already 20 high), the sides cut evenly: the green middle, red centred
    cropped = np.asarray(resize_picture(picture, (20, 20), 1))
    np.testing.assert_array_equal(cropped, wide[:, 10:30])
    # resize and fill: scaled to fit (20x10), centred, the bands above and below its edge rows repeated
    filled = np.asarray(resize_picture(picture, (20, 20), 2))
    fitted = np.asarray(picture.resize((20, 10), Image.LANCZOS))
    np.testing.assert_array_equal(filled[5:15], fitted)
    np.testing.assert_array_equal(filled[:5], np.repeat(fitted[:1], 5, axis=0))
    np.testing.assert_array_equal(filled[15:], np.repeat(fitted[-1:], 5, axis=0))
    # a tall picture into a wide size: bands left and right
    tall = np.asarray(resize_picture(Image.fromarray(wide.transpose(1, 0, 2).copy()), (20, 20), 2))
    np.testing.assert_array_equal(tall[:, :5], np.repeat(tall[:, 5:6], 5, axis=1))


def test_inpaint_only_masked(server, api):
    from tf_diffusion.serve.generation import crop_region

    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[20:26, 22:28] = 255
    # the mask's box (22..27 x 20..25) grown by the padding of 2, then to the request's aspect ratio
    assert crop_region(mask, 2, 32, 32) == (20, 18, 30, 28)
    assert crop_region(mask, 2, 32, 16) == (12, 18, 32, 28)  # 20 wide, moved left to stay inside
    sd = server.state.registry.sd
    init = _generate(
        sd, prompt="a green square", seed=3, height=SIZE, width=SIZE, num_steps=4, scheduler="euler_a"
    )[0]
    result = api.img2img(
        images=[Image.fromarray(init)],
        mask_image=Image.fromarray(mask),
        prompt="a yellow heart",
        seed=21,
        width=SIZE,
        height=SIZE,
        steps=8,
        denoising_strength=0.5,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=True,
        inpaint_full_res_padding=2,
        cfg_scale=5,
    )
    got = np.asarray(result.image.convert("RGB"))
    assert got.shape == init.shape
    keep = mask == 0
    np.testing.assert_array_equal(
        got[keep], init[keep]
    )  # no blur: every pixel outside the mask is the original
    assert np.abs(got[~keep].astype(int) - init[~keep]).mean() > 1  # the masked area was repainted
    assert "Inpaint area: Only masked, Masked area padding: 2" in result.image.info["parameters"]


def test_png_info_reads_parameters(api):
    result = api.txt2img(prompt="a red circle, (sharp:1.2)", seed=5, width=SIZE, height=SIZE)
    info = api.png_info(result.image)
    assert info.info == result.info["infotexts"][0]
    params = info.json["parameters"]
    assert params["Prompt"] == "a red circle, (sharp:1.2)"
    assert (params["Seed"], params["Steps"], params["Sampler"], params["Size-1"]) == (5, 4, "Euler a", SIZE)


def test_progress_preview_and_interrupt(server, api):
    out = {}
    thread = threading.Thread(
        target=lambda: out.update(
            r=api.txt2img(prompt="a red circle", seed=1, width=SIZE, height=SIZE, steps=1000)
        )
    )
    started = time.time()
    thread.start()
    progress = None
    while time.time() - started < 60:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
            break
        time.sleep(0.05)
    assert progress["state"]["sampling_steps"] == 1000 and 0 < progress["progress"] < 1
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    factor = server.state.registry.sd.config.vae.downsample_factor
    assert preview.size == (SIZE // factor, SIZE // factor) and np.asarray(preview).std() > 0
    api.interrupt()
    thread.join(60)
    result = out["r"]
    assert result.info["interrupted"] is True and result.images == []
    assert time.time() - started < 50  # 1000 steps would take far longer
    assert api.get_progress()["state"]["job_count"] == 0  # idle again


def _wait_for(api, ready, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        progress = api.get_progress()
        if ready(progress["state"]):
            return progress
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s: {progress}")


def test_skip_goes_on_with_the_next_batch(server, api):
    out = {}
    thread = threading.Thread(
        target=lambda: out.update(
            r=api.txt2img(prompt="x", seed=1, n_iter=2, width=SIZE, height=SIZE, steps=1000)
        )
    )
    thread.start()
    _wait_for(api, lambda s: s["job_no"] == 0 and s["sampling_step"] >= 2)
    api.skip()
    _wait_for(api, lambda s: s["job_no"] == 1 and s["sampling_step"] >= 2)
    api.interrupt()
    thread.join(60)
    info = out["r"].info
    assert info["skipped"] is True and info["interrupted"] is True and out["r"].images == []


def test_a_client_that_goes_away_cancels_its_job(server, api):
    state = server.state
    with httpx.Client(timeout=1.0) as client, pytest.raises(httpx.ReadTimeout):
        client.post(
            f"{server.url}/sdapi/v1/txt2img",
            json={
                "prompt": "x",
                "seed": 1,
                "width": SIZE,
                "height": SIZE,
                "steps": 1000,
                "sampler_name": "Euler a",
            },
        )
    deadline = time.time() + 20
    while state.queue.current is not None and time.time() < deadline:
        time.sleep(0.05)
    assert state.queue.current is None and state.queue.last.cancelled


def test_lora_folder_is_listed(server):
    from fastapi.testclient import TestClient

    folder = os.path.join(ROOT, "tests", "fixtures", "lora")
    state = ServerState(ModelRegistry("tiny-shapes", lora_dir=folder))
    try:
        loras = TestClient(create_app(state)).get("/sdapi/v1/loras").json()
    finally:
        state.queue.close()
    names = [item["name"] for item in loras]
    assert "lora_kohya" in names and "lycoris_loha" in names and "lora_configs" not in names


def test_models_samplers_and_switching(server, api):
    titles = api.util_get_model_names()
    assert titles == ["tiny-shapes", "tiny-shapes-b"]
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(names)
    from tf_diffusion.serve.generation import ApiError, sampler_for

    sd = server.state.registry.sd
    for name in names:  # every listed sampler is one of ours (with the schedule "automatic" means for it)
        if name == "DPM++ 2M SDE":  # "automatic" is the web UI's exponential schedule: refused by name
            with pytest.raises(ApiError, match="Exponential"):
                sampler_for(sd, name, None, "automatic")
            assert sampler_for(sd, name, None, "uniform").name == "dpmpp_2m_sde"
            continue
        assert sampler_for(sd, name, None, "automatic") is not None
    with pytest.raises(RuntimeError, match="Exponential"):  # and the client hears it
        api.txt2img(prompt="x", seed=1, width=SIZE, height=SIZE, sampler_name="DPM++ 2M SDE")
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "uniform", "karras"]
    api.util_set_model("tiny-shapes-b")
    assert api.util_get_current_model() == "tiny-shapes-b"
    result = api.txt2img(prompt="x", seed=1, width=SIZE, height=SIZE)
    assert "Model: tiny-shapes-b" in result.image.info["parameters"]
    # override_settings switches for the request (and stays, with restore_afterwards false)
    result = api.txt2img(
        prompt="x",
        seed=1,
        width=SIZE,
        height=SIZE,
        override_settings={"sd_model_checkpoint": "tiny-shapes"},
        override_settings_restore_afterwards=False,
    )
    assert "Model: tiny-shapes," in result.image.info["parameters"] + ","
    assert api.util_get_current_model() == "tiny-shapes"
    assert api.get_scripts() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    assert api.get_loras() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_memory()["ram"]["total"] > 0
    assert api.get_sd_vae() == [] and api.get_upscalers() == [] and api.get_prompt_styles() == []
    api.refresh_checkpoints()


def test_saved_outputs_never_overwrite(server, api):
    folder = server.state.output_folder("txt2img-images")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00004-1.png").write_bytes(b"not ours")
    result = api.txt2img(prompt="x", seed=9, n_iter=2, width=SIZE, height=SIZE, save_images=True)
    saved = result.info["saved_images"]
    assert [os.path.basename(p) for p in saved] == ["00005-9.png", "00006-10.png"]
    assert (folder / "00004-1.png").read_bytes() == b"not ours"
    assert Image.open(saved[1]).info["parameters"] == result.info["infotexts"][1]


def _tiny_png_header(width, height) -> bytes:
    """A PNG that declares width x height and holds no pixels: a decompression bomb's header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _check_error(response, status, text):
    assert response.status_code == status, response.text
    body = response.json()
    assert ERROR_KEYS <= set(body), body
    assert text in json.dumps(body), body


def test_bad_input_is_refused_and_the_server_goes_on(server):
    base = f"{server.url}/sdapi/v1"
    ok = {"prompt": "x", "seed": 1, "width": SIZE, "height": SIZE, "steps": 4, "sampler_name": "Euler a"}
    bomb = base64.b64encode(_tiny_png_header(30000, 30000)).decode()
    cases = [
        ("txt2img", b"{not json", 422, "JSON"),
        ("txt2img", {**ok, "sampler_name": "Euler z"}, 404, "Sampler not found"),
        ("txt2img", {**ok, "width": 33}, 422, "width=33 is not a multiple of 4"),  # tiny-shapes' VAE: 4
        ("txt2img", {**ok, "steps": -3}, 422, "steps"),
        ("txt2img", {**ok, "enable_hr": True}, 422, "enable_hr"),
        ("txt2img", {**ok, "scheduler": "beta"}, 422, "scheduler 'beta'"),
        ("txt2img", {**ok, "prompt": "<lora:../../etc/passwd:1>"}, 422, "lora"),
        ("img2img", {**ok, "init_images": [bomb]}, 413, "30000x30000"),
        ("img2img", {**ok, "init_images": ["%%%"]}, 422, "not valid base64"),
        ("png-info", {"image": bomb}, 413, "30000x30000"),
        ("options", {"sd_model_checkpoint": "../../etc/passwd"}, 422, "not a path"),
        ("options", {"sd_model_checkpoint": "/abs/model.safetensors"}, 422, "not a path"),
        ("options", {"sd_model_checkpoint": "nosuch"}, 404, "not found"),
        ("txt2img", {**ok, "override_settings": {"sd_model_checkpoint": "../x"}}, 422, "not a path"),
    ]
    with httpx.Client(timeout=60) as client:
        for route, body, status, text in cases:
            if isinstance(body, bytes):
                response = client.post(
                    f"{base}/{route}", content=body, headers={"content-type": "application/json"}
                )
            else:
                response = client.post(f"{base}/{route}", json=body)
            _check_error(response, status, text)
            assert client.get(f"{base}/sd-models").status_code == 200  # still serving
        done = client.post(f"{base}/txt2img", json=ok)
        assert done.status_code == 200 and len(done.json()["images"]) == 1


def test_full_queue_answers_503(server, api):
    state = server.state
    out = {}
    long = threading.Thread(
        target=lambda: out.update(r=api.txt2img(prompt="x", seed=1, width=SIZE, height=SIZE, steps=1000))
    )
    long.start()
    deadline = time.time() + 30
    while state.queue.current is None and time.time() < deadline:
        time.sleep(0.02)
    short = [
        threading.Thread(target=lambda: api.txt2img(prompt="x", seed=1, width=SIZE, height=SIZE))
        for _ in range(state.queue.size)
    ]
    for t in short:
        t.start()
    while state.queue.waiting < state.queue.size and time.time() < deadline:
        time.sleep(0.02)
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": SIZE, "height": SIZE}
        )
    _check_error(response, 503, "queue is full")
    api.interrupt()
    for t in [long, *short]:
        t.join(60)
    assert out["r"].info["interrupted"] is True
    assert api.txt2img(prompt="x", seed=1, width=SIZE, height=SIZE).images  # served again


def test_auth_and_body_limit(server):
    from fastapi.testclient import TestClient

    state = ServerState(server.state.registry, credentials={"alice": "secret"}, max_body_bytes=10_000)
    try:
        client = TestClient(create_app(state))
        url = "/sdapi/v1/sd-models"
        _check_error(client.get(url), 401, "Incorrect username or password")
        _check_error(client.get(url, auth=("alice", "wrong")), 401, "Incorrect username or password")
        _check_error(client.get(url, auth=("bob", "secret")), 401, "Incorrect username or password")
        assert client.get(url, auth=("alice", "secret")).status_code == 200
        big = {"prompt": "x" * 20_000}
        _check_error(client.post("/sdapi/v1/txt2img", json=big, auth=("alice", "secret")), 413, "limit")

        def chunks():  # no content-length: counted as it arrives
            yield b'{"prompt": "' + b"x" * 6000
            yield b"y" * 6000 + b'"}'

        chunked = client.post(
            "/sdapi/v1/txt2img",
            content=chunks(),
            headers={"content-type": "application/json"},
            auth=("alice", "secret"),
        )
        _check_error(chunked, 413, "limit")
        assert client.get(url, auth=("alice", "secret")).status_code == 200
    finally:
        state.queue.close()


def test_cli_refuses_open_host_without_auth(capsys):
    from tf_diffusion.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-auth" in capsys.readouterr().err
    assert main(["serve", "--api-auth", "nopassword"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err


def test_job_queue_one_at_a_time_and_cancelled_jobs_never_start():
    from tf_diffusion.serve.jobs import Interrupted, JobQueue, QueueFull

    queue = JobQueue(1)
    release, ran, running = threading.Event(), [], []

    def blocking(job):
        running.append(job.id)
        release.wait(10)
        return "first"

    try:
        first = queue.submit(blocking, "a")
        while not running:
            time.sleep(0.01)
        second = queue.submit(lambda job: ran.append(job.id), "b")
        with pytest.raises(QueueFull, match="queue is full"):
            queue.submit(lambda job: None, "c")
        second.cancel()
        release.set()
        assert first.future.result(10) == "first"
        with pytest.raises(Interrupted):
            second.future.result(10)
        assert ran == []  # cancelled while queued: never started
        third = queue.submit(lambda job: 1 / 0, "d")  # a failing job ...
        with pytest.raises(ZeroDivisionError):
            third.future.result(10)
        assert queue.submit(lambda job: "next", "e").future.result(10) == "next"  # ... and the worker goes on
    finally:
        queue.close()


def test_controlnet_units(server, api, controlnet_dir):
    from tf_diffusion.controlnet import ControlNet

    assert httpx.get(f"{server.url}/controlnet/model_list").json() == {"model_list": ["control_tiny"]}
    hint = np.zeros((2 * SIZE, 2 * SIZE, 3), np.uint8)
    hint[SIZE // 2 : 3 * SIZE // 2, SIZE // 2 : 3 * SIZE // 2] = 255  # a white square, 64x64: resized to 32
    unit = webuiapi.ControlNetUnit(
        image=Image.fromarray(hint),
        model="control_tiny [00000000]",
        weight=0.7,
        resize_mode="Just Resize",
        guidance_start=0.0,
        guidance_end=0.5,
    )
    common = dict(prompt="a red circle", seed=8, width=SIZE, height=SIZE, steps=4, cfg_scale=5)
    result = api.txt2img(controlnet_units=[unit], **common)
    small = Image.fromarray(hint).resize((SIZE, SIZE), Image.LANCZOS)
    net = ControlNet.from_pretrained(str(controlnet_dir / "control_tiny.safetensors"))
    kwargs = dict(
        prompt="a red circle",
        seed=8,
        height=SIZE,
        width=SIZE,
        num_steps=4,
        guidance_scale=5.0,
        scheduler="euler_a",
    )
    expected = _generate(
        server.state.registry.sd,
        controlnet=net,
        control_image=small,
        controlnet_conditioning_scale=0.7,
        control_guidance_end=0.5,
        **kwargs,
    )
    got = np.asarray(result.image.convert("RGB"))
    np.testing.assert_array_equal(got, expected[0])
    assert not np.array_equal(got, _generate(server.state.registry.sd, **kwargs)[0])  # the net acted
    text = result.image.info["parameters"]
    assert 'ControlNet 0: "Module: none, Model: control_tiny [' in text and "Weight: 0.7" in text
    assert "Guidance End: 0.5" in text
    # a disabled unit is no unit
    off = webuiapi.ControlNetUnit(image=Image.fromarray(hint), model="control_tiny", enabled=False)
    plain = api.txt2img(controlnet_units=[off], **common)
    np.testing.assert_array_equal(
        np.asarray(plain.image.convert("RGB")), _generate(server.state.registry.sd, **kwargs)[0]
    )
    # what is not there or not supported is refused by name
    for bad, message in (
        (dict(model="control_other"), "ControlNet model .*control_other.* not found"),
        (dict(model="../control_tiny"), "not a path"),
        (dict(model="control_tiny", module="depth_midas"), "module=.*depth_midas.* is not supported"),
        (
            dict(model="control_tiny", module="canny", threshold_a=300, threshold_b=200),
            r"threshold_a=300 \(Canny Low Threshold\) is out of range; allowed: 1 to 255",
        ),
        (
            dict(model="control_tiny", control_mode=1),
            "control_mode=.*My prompt is more important.* is not supported",
        ),
    ):
        with pytest.raises(RuntimeError, match=message):
            api.txt2img(
                controlnet_units=[webuiapi.ControlNetUnit(image=Image.fromarray(hint), **bad)], **common
            )


def _picture(width: int, height: int) -> Image.Image:
    """A grey picture with a bright disc and a dark bar, some texture: edges for Canny to find."""
    yy, xx = np.mgrid[0:height, 0:width]
    x = np.full((height, width, 3), 120, np.uint8)
    x[(xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 3) ** 2] = (240, 200, 60)
    x[height // 6 : height // 6 + 4, 2:-2] = (20, 30, 40)
    x = x + np.random.default_rng(1).integers(0, 12, x.shape, dtype=np.uint8)
    return Image.fromarray(x)


def test_controlnet_preprocessors(server, api, controlnet_dir):
    """Units with module "canny" / "invert", and /controlnet/detect, as the ControlNet extension runs them:
    the picture scaled to processor_res on its short side, then OpenCV's Canny (the reference here)."""
    cv2 = pytest.importorskip("cv2")
    from tf_diffusion.controlnet import ControlNet

    listed = httpx.get(f"{server.url}/controlnet/module_list").json()
    assert listed["module_list"] == ["none", "canny", "invert"]
    sliders = listed["module_detail"]["canny"]["sliders"]
    assert [(s["name"], s["value"]) for s in sliders] == [
        ("Preprocessor Resolution", 512),
        ("Canny Low Threshold", 100),
        ("Canny High Threshold", 200),
    ]
    picture = _picture(80, 64)
    detected = api.controlnet_detect(
        [picture], module="canny", processor_res=96, threshold_a=50, threshold_b=150
    )
    got = np.asarray(detected.image.convert("RGB"))  # webuiapi decodes the answer's images
    scaled = np.asarray(picture.resize((120, 96), Image.BICUBIC))  # short side 64 -> 96
    np.testing.assert_array_equal(got, np.repeat(cv2.Canny(scaled, 50, 150)[..., None], 3, axis=-1))
    inverted = httpx.post(
        f"{server.url}/controlnet/detect",
        json={
            "controlnet_module": "invert",
            "controlnet_input_images": [webuiapi.raw_b64_img(picture)],
            "controlnet_processor_res": 64,
        },
    ).json()
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(inverted["images"][0]))).convert("RGB"))
    np.testing.assert_array_equal(got, 255 - np.asarray(picture))
    for body, message in (
        ({"controlnet_module": "openpose"}, "controlnet_module='openpose' is not supported"),
        ({"controlnet_module": "canny", "controlnet_processor_res": 10}, "controlnet_processor_res=10"),
        ({"controlnet_module": "canny"}, "controlnet_input_images: no image given"),
    ):
        answer = httpx.post(f"{server.url}/controlnet/detect", json=body)
        assert answer.status_code == 422 and message in answer.json()["detail"]

    # a unit with module "canny": the hint the server makes is what generate() is given
    square = _picture(64, 64)
    unit = webuiapi.ControlNetUnit(
        image=square,
        module="canny",
        model="control_tiny",
        processor_res=64,
        threshold_a=60,
        threshold_b=140,
        resize_mode="Just Resize",
    )
    common = dict(prompt="a red circle", seed=9, width=SIZE, height=SIZE, steps=4, cfg_scale=5)
    result = api.txt2img(controlnet_units=[unit], **common)
    edges = np.repeat(cv2.Canny(np.asarray(square), 60, 140)[..., None], 3, axis=-1)
    hint = Image.fromarray(edges).resize((SIZE, SIZE), Image.LANCZOS)
    net = ControlNet.from_pretrained(str(controlnet_dir / "control_tiny.safetensors"))
    expected = _generate(
        server.state.registry.sd,
        controlnet=net,
        control_image=hint,
        prompt="a red circle",
        seed=9,
        height=SIZE,
        width=SIZE,
        num_steps=4,
        guidance_scale=5.0,
        scheduler="euler_a",
    )
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), expected[0])
    text = result.image.info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: control_tiny [' in text
    assert "Processor Res: 64, Threshold A: 60, Threshold B: 140" in text


def test_page_uploads_are_refused_over_the_pixel_limit(tmp_path):
    """Gradio decodes the page's uploads itself: with the page mounted, Pillow refuses a picture over the
    server's pixel limit from its header (no pixel buffer is allocated), and uploads over the body limit."""
    gr = pytest.importorskip("gradio", reason="the web page needs gradio (the [serve] extra)")
    from gradio.data_classes import ImageData
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_tiny_png_header(300, 200))
    previous = Image.MAX_IMAGE_PIXELS
    state = ServerState(
        ModelRegistry("tiny-shapes"), webui=True, max_image_pixels=100 * 100, max_body_bytes=5000
    )
    try:
        app = create_app(state)
        with pytest.raises(Image.DecompressionBombError, match="60000 pixels"):
            gr.Image(type="pil").preprocess(ImageData(path=str(bomb)))
        from fastapi.testclient import TestClient

        with TestClient(app) as client:
            big = client.post("/gradio_api/upload", files={"files": ("x.png", b"0" * 20000, "image/png")})
            assert big.status_code == 413
    finally:
        Image.MAX_IMAGE_PIXELS = previous
        state.queue.close()


def test_page_behind_basic_auth():
    """With --api-auth the web page, like the API, needs the credentials."""
    pytest.importorskip("gradio", reason="the web page needs gradio (the [serve] extra)")

    state = ServerState(ModelRegistry("tiny-shapes"), credentials={"alice": "secret"}, webui=True)
    try:
        from fastapi.testclient import TestClient

        with TestClient(create_app(state)) as client:
            assert client.get("/").status_code == 401
            assert client.get("/config").status_code == 401
            assert client.get("/", auth=("alice", "wrong")).status_code == 401
            page = client.get("/", auth=("alice", "secret"))
            assert page.status_code == 200 and "<html" in page.text
    finally:
        state.queue.close()
