"""Side-by-side CPU speed of tf_diffusion, keras-cv and diffusers with the same random SD 1.5 weights.

Every measurement runs in its own fresh process, so peak memory (``ru_maxrss``) is per framework
and per case, and no framework's threads or caches disturb another's. The weights are keras-cv's
own random initialisation of its four SD 1.5 models, saved once as keras-cv's released ``.h5`` files; our
models read them with ``tf_diffusion.weights.keras_cv``, and diffusers / transformers receive the
same tensors renamed with ``tf_diffusion.weights.diffusers_folder``. Values do not change speed,
but the three frameworks compute the same network on the same numbers.

What is timed (inputs are fixed random arrays):
    unet    one guided step: the UNet at batch 2 (unconditional + conditional halves)
            ours: compiled as ``generate()`` compiles it by default on a CPU (float32: XLA
            islands above 32x32 latents, else one XLA program; bfloat16: graph mode), with
            the filters ``generate()`` prepares once per call prepared before the first call;
            keras-cv: ``DiffusionModel.predict_on_batch`` compiled as ``StableDiffusion`` compiles
            it (``jit_compile=True``); diffusers: ``UNet2DConditionModel`` in ``inference_mode``
            with its default SDPA attention.
    vae     VAE decode of one latent (keras-cv ``Decoder``, diffusers ``AutoencoderKL.decode``)
    text    text encoding of 2 x 77 tokens (keras-cv ``TextEncoder``, transformers ``CLIPTextModel``)
    e2e     ``generate()`` with 20 DPM-Solver++ (2M) steps against keras-cv ``text_to_image`` with its
            50 DDIM steps; guidance 7.5, one image, prompt encoding and decoding included.

Each case reports the first call (tracing / XLA compilation plus one run; this is the warm-up),
the timed runs after it, their median, ``compile_s`` = first call - median, the seconds spent
building and loading, and the process's peak resident memory.

Usage:
    python benchmarks/speed.py prepare                      # write the random weights (once, 4.3 GB)
    python benchmarks/speed.py case unet ours --size 512 --dtype bfloat16 --reps 3
    python benchmarks/speed.py all --out benchmarks/results/cpu.json   # every case, then the table
    python benchmarks/speed.py table benchmarks/results/cpu.json       # markdown table of a result file

bfloat16 means: ours with the "bfloat16" Keras policy (bfloat16 weights, norms and softmax in
float32), keras-cv with "mixed_bfloat16" (its documented mixed-precision mode; keras-cv is not
built for pure low-precision policies), diffusers / transformers with ``.to(torch.bfloat16)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEFAULT_WEIGHTS = pathlib.Path(os.environ.get("TFD_BENCH_WEIGHTS", "/tmp/tfd_bench/weights"))
# keras-cv's released layout: legacy Keras h5 files (``layer_names`` + ``weight_names``).
FILES = {
    "text_encoder": "kcv_encoder.h5",
    "diffusion_model": "kcv_diffusion_model.h5",
    "decoder": "kcv_decoder.h5",
    "image_encoder": "vae_encoder.h5",
}
PROMPT = "a photograph of an astronaut riding a horse"
# "ours-1block" is ours with the attention computed in one block (layers.ATTENTION_BLOCK_ELEMENTS = None),
# the form before row-blocked attention; "ours-xla" is ours compiled as one XLA program
# (``tf.function(jit_compile=True)``, as keras-cv compiles), "ours-graph" in plain graph mode.
# Run them with --frameworks.
OPTIONAL = ("ours-1block", "ours-xla", "ours-graph")
FRAMEWORKS = {
    "unet": ("ours", "keras-cv", "diffusers", "ours-1block", "ours-xla", "ours-graph"),
    "vae": ("ours", "keras-cv", "diffusers", "ours-xla", "ours-graph"),
}
FRAMEWORKS["text"] = ("ours", "keras-cv", "transformers")
FRAMEWORKS["e2e"] = ("ours", "keras-cv")


# --------------------------------------------------------------------------- weights


def prepare(folder: pathlib.Path) -> None:
    """Save keras-cv's random SD 1.5 models (fixed seed) in the layout of keras-cv's released files."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel
    from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder
    from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder

    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    builders = {
        "text_encoder": lambda: TextEncoder(77, download_weights=False),
        "diffusion_model": lambda: DiffusionModel(512, 512, 77, download_weights=False),
        "decoder": lambda: Decoder(512, 512, download_weights=False),
        "image_encoder": lambda: ImageEncoder(download_weights=False),
    }
    for part, build in builders.items():
        path = folder / FILES[part]
        if path.exists():
            continue
        model = build()
        tmp = path.with_name(path.name + ".partial")
        with h5py.File(tmp, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
        tmp.rename(path)
        del model
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)


def _components(folder: pathlib.Path) -> dict:
    """Our checkpoint keys -> lazy torch-layout tensors, per component (text_encoder, unet, vae)."""
    from tf_diffusion.weights.keras_cv import read_keras_cv

    return read_keras_cv(folder).components


def _to_torch(model, tensors) -> None:
    """Copy torch-layout arrays into a torch module one tensor at a time (keys must match exactly)."""
    import numpy as np
    import torch

    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(
            f"weights do not fit {type(model).__name__}: missing {missing[:5]}, extra {extra[:5]}"
        )
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(tensors[key]))))


# --------------------------------------------------------------------------- one case per process


def _inputs(component: str, size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    if component == "unet":
        return (
            rng.standard_normal((2, size // 8, size // 8, 4), dtype=np.float32),
            np.full((2,), 999, np.int32),
            rng.standard_normal((2, 77, 768), dtype=np.float32),
        )
    if component == "vae":
        return rng.standard_normal((1, size // 8, size // 8, 4), dtype=np.float32)
    ids = np.full((2, 77), 49407, np.int32)
    ids[:, 0] = 49406
    ids[1, 1:8] = np.arange(320, 327)
    return ids


def _policy(framework: str, dtype: str) -> str:
    if dtype == "float32":
        return "float32"
    return "mixed_bfloat16" if framework == "keras-cv" else "bfloat16"


# Facts a case's setup measures besides its timings (ours: the filters prepared before the steps).
_EXTRA = {}


def _ours_options(args, model, latent_shape):
    """How ours runs: as StableDiffusion.generate / decode choose by default (frameworks "ours",
    "ours-1block"), or forced to one XLA program ("ours-xla") or graph mode ("ours-graph")."""
    from tf_diffusion import execution

    jit = {"ours-xla": True, "ours-graph": False}.get(args.framework)
    return execution.default_options(model, latent_shape, jit_compile=jit)


def _ours(component, size, dtype, folder, args):
    import keras
    import tensorflow as tf

    from tf_diffusion import execution
    from tf_diffusion.presets import PRESETS
    from tf_diffusion.weights.state_dict import load_state_dict

    config = PRESETS["sd-v1-5"]
    policy = _policy("ours", dtype)
    if component == "e2e":
        from tf_diffusion.pipeline import StableDiffusion

        sd = StableDiffusion.from_pretrained(str(folder), dtype=policy)
        kwargs = dict(
            num_steps=args.ours_steps, scheduler="dpmpp_2m", height=size, width=size, seed=0, progress=False
        )
        warm = dict(kwargs, num_steps=2)
        return lambda: sd.generate(PROMPT, **warm), lambda: sd.generate(PROMPT, **kwargs)
    comps = _components(folder)
    if component == "unet":
        from tf_diffusion.unet import UNetModel

        model = execution.apply(UNetModel(config.unet, dtype=policy))
        load_state_dict(model, comps["unet"])
        x, t, ctx = (tf.constant(a) for a in _inputs("unet", size))
        opts = _ours_options(args, model, x.shape)
        _EXTRA["execution"] = opts.compile
        # As generate() does once per call, before its steps: this is not in the step's time (the
        # first call on a machine also autotunes here; later ones read the autotune cache).
        start = time.perf_counter()
        state = execution.prepare(model, x.shape, opts)
        _EXTRA["prepare_s"] = round(time.perf_counter() - start, 3)
        _EXTRA["prepared_filters_gb"] = round(sum(math.prod(f.shape) for f in state.values()) * 4 / 1e9, 3)
        fn = execution.compile(lambda x, t, ctx: model(x, t, ctx), opts)
        return None, lambda: keras.ops.convert_to_numpy(fn(x, t, ctx, execution_state=state))
    if component == "vae":
        from tf_diffusion.vae import AutoencoderKL

        model = execution.apply(AutoencoderKL(config.vae, dtype=policy))
        load_state_dict(model, comps["vae"])
        z = tf.constant(_inputs("vae", size))
        fn = execution.compile(model.decode, _ours_options(args, model, None))
        return None, lambda: keras.ops.convert_to_numpy(fn(z))
    from tf_diffusion.clip import CLIPTextEncoder

    model = CLIPTextEncoder(config.text_encoder, dtype=policy)
    load_state_dict(model, comps["text_encoder"], strict=False)
    ids = tf.constant(_inputs("text", size))
    fn = tf.function(model)
    return None, lambda: keras.ops.convert_to_numpy(fn(ids))


def _keras_cv(component, size, dtype, folder, args):
    import keras

    keras.config.set_dtype_policy(_policy("keras-cv", dtype))
    from keras_cv.src.models.stable_diffusion.clip_tokenizer import SimpleTokenizer
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel
    from keras_cv.src.models.stable_diffusion.stable_diffusion import StableDiffusion
    from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder

    def load(model, part):
        model.load_weights(folder / FILES[part])
        return model

    if component == "e2e":

        class LocalStableDiffusion(StableDiffusion):
            """keras-cv's StableDiffusion built from local weight files instead of downloads."""

            @property
            def tokenizer(self):
                # keras-cv downloads this vocabulary; tf_diffusion ships the same file.
                if self._tokenizer is None:
                    self._tokenizer = SimpleTokenizer(
                        str(ROOT / "tf_diffusion/data/bpe_simple_vocab_16e6.txt.gz")
                    )
                return self._tokenizer

            @property
            def text_encoder(self):
                if self._text_encoder is None:
                    self._text_encoder = load(TextEncoder(77, download_weights=False), "text_encoder")
                    self._text_encoder.compile(jit_compile=self.jit_compile)
                return self._text_encoder

            @property
            def diffusion_model(self):
                if self._diffusion_model is None:
                    model = DiffusionModel(self.img_height, self.img_width, 77, download_weights=False)
                    self._diffusion_model = load(model, "diffusion_model")
                    self._diffusion_model.compile(jit_compile=self.jit_compile)
                return self._diffusion_model

            @property
            def decoder(self):
                if self._decoder is None:
                    model = Decoder(self.img_height, self.img_width, download_weights=False)
                    self._decoder = load(model, "decoder")
                    self._decoder.compile(jit_compile=self.jit_compile)
                return self._decoder

        sd = LocalStableDiffusion(size, size, jit_compile=args.kcv_jit)
        sd.text_encoder, sd.diffusion_model, sd.decoder  # noqa: B018  (build and load before timing)
        return (
            lambda: sd.text_to_image(PROMPT, num_steps=2, seed=0),
            lambda: sd.text_to_image(PROMPT, num_steps=args.kcv_steps, seed=0),
        )
    if component == "unet":
        import numpy as np

        model = load(DiffusionModel(size, size, 77, download_weights=False), "diffusion_model")
        model.compile(jit_compile=args.kcv_jit)
        x, t, ctx = _inputs("unet", size)
        sd = StableDiffusion.__new__(StableDiffusion)  # only for its timestep embedding
        t_emb = np.asarray(sd._get_timestep_embedding(int(t[0]), 2))
        feed = {"latent": x, "timestep_embedding": t_emb, "context": ctx}
        return None, lambda: model.predict_on_batch(feed)
    if component == "vae":
        model = load(Decoder(size, size, download_weights=False), "decoder")
        model.compile(jit_compile=args.kcv_jit)
        z = _inputs("vae", size)
        return None, lambda: model.predict_on_batch(z)
    import numpy as np

    model = load(TextEncoder(77, download_weights=False), "text_encoder")
    model.compile(jit_compile=args.kcv_jit)
    ids = _inputs("text", size)
    feed = {"tokens": ids, "positions": np.tile(np.arange(77, dtype=np.int32), (2, 1))}
    return None, lambda: model.predict_on_batch(feed)


def _torch(component, size, dtype, folder, args):
    import numpy as np
    import torch

    from tf_diffusion.presets import PRESETS
    from tf_diffusion.weights.diffusers_folder import (
        text_config_to_transformers,
        unet_config_to_diffusers,
        unet_to_diffusers,
        vae_config_to_diffusers,
        vae_to_diffusers,
    )

    torch.set_num_threads(os.cpu_count())
    config = PRESETS["sd-v1-5"]
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    comps = _components(folder)
    if component == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_config(unet_config_to_diffusers(config.unet, size // 8))
        _to_torch(model, unet_to_diffusers(comps["unet"], config.unet))
        model = model.to(torch_dtype).eval()
        x, t, ctx = _inputs("unet", size)
        x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(torch_dtype)
        t, ctx = torch.from_numpy(t), torch.from_numpy(ctx).to(torch_dtype)

        def run():
            with torch.inference_mode():
                return model(x, t, encoder_hidden_states=ctx).sample.float().numpy()

        return None, run
    if component == "vae":
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_config(vae_config_to_diffusers(config.vae, size))
        _to_torch(model, vae_to_diffusers(comps["vae"], config.vae))
        model = model.to(torch_dtype).eval()
        z = torch.from_numpy(_inputs("vae", size).transpose(0, 3, 1, 2).copy()).to(torch_dtype)

        def run():
            with torch.inference_mode():
                return model.decode(z).sample.float().numpy()

        return None, run
    from transformers import CLIPTextConfig, CLIPTextModel

    from tf_diffusion.tokenizer import CLIPTokenizer

    cfg = text_config_to_transformers(config.text_encoder, CLIPTokenizer(config=config.tokenizer))
    model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    own = set(model.state_dict())
    tensors = {}
    for key, value in comps["text_encoder"].items():
        name = key if key in own else key.removeprefix("text_model.")
        tensors[name] = value
    for key in own - set(tensors):  # buffers such as position_ids keep their values
        tensors[key] = model.state_dict()[key].numpy()
    _to_torch(model, tensors)
    model = model.to(torch_dtype).eval()
    ids = torch.from_numpy(_inputs("text", size).astype(np.int64))

    def run():
        with torch.inference_mode():
            return model(ids).last_hidden_state.float().numpy()

    return None, run


def run_case(component: str, framework: str, size: int, dtype: str, reps: int, folder, args) -> dict:
    """Build, warm up and time one case in this process."""
    import numpy as np

    setup = {"ours": _ours, "keras-cv": _keras_cv, "diffusers": _torch, "transformers": _torch}
    setup["ours-1block"] = setup["ours-xla"] = setup["ours-graph"] = _ours
    args.framework = framework
    if framework == "ours-1block":
        from tf_diffusion import layers

        layers.ATTENTION_BLOCK_ELEMENTS = None
    setup = setup[framework]
    start = time.perf_counter()
    warm, run = setup(component, size, dtype, folder, args)
    load_s = time.perf_counter() - start
    peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    out = (warm or run)()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    out = np.asarray(out, dtype=np.float32)
    return {
        "component": component,
        "framework": framework,
        "size": size,
        "dtype": dtype,
        "policy": _policy(framework, dtype) if framework != "diffusers" else str(dtype),
        "load_s": round(load_s, 3),
        "first_call_s": round(first_s, 3),
        "times_s": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        # The warm-up of e2e runs 2 steps, not the timed call, so its compile time is not first - median.
        "compile_s": None if warm else round(max(first_s - median, 0.0), 3),
        # Other processes on the machine distort timings; the 1-minute load average shows them.
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        # The peak before the first call: building and loading alone.
        "peak_rss_after_load_gb": round(peak_after_load, 3),
        "output_finite": bool(np.isfinite(out).all()),
        **_EXTRA,
        "output_shape": list(out.shape),
    }


# --------------------------------------------------------------------------- driver


def environment() -> dict:
    import importlib.metadata as md

    cpu = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(
            line
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
        bf16 = "avx512_bf16" in flags
    except (OSError, StopIteration):
        bf16 = None
    versions = {}
    for name in ("tensorflow", "keras", "keras-cv", "torch", "diffusers", "transformers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_bf16": bf16,
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def subprocess_case(component, framework, size, dtype, reps, folder, kcv_jit, timeout) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "case",
        component,
        framework,
        "--size",
        str(size),
        "--dtype",
        dtype,
        "--reps",
        str(reps),
        "--weights",
        str(folder),
    ]
    if not kcv_jit:
        cmd.append("--no-kcv-jit")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "component": component,
            "framework": framework,
            "size": size,
            "dtype": dtype,
            "error": "timeout",
        }
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or done.stdout)[-1500:]
    return {"component": component, "framework": framework, "size": size, "dtype": dtype, "error": tail}


def merge_rounds(runs: list[dict]) -> dict:
    """One case's results from several rounds (fresh processes at different times) as one: every
    timed run pooled for the median, the median first call and load, the highest peak; each
    round's median kept in ``round_medians_s``. Rounds that failed are counted, not pooled."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    if len(runs) == 1:
        return ok[0]
    out = dict(ok[-1])
    times = [t for r in ok for t in r["times_s"]]
    out["times_s"] = times
    out["median_s"] = round(statistics.median(times), 3)
    out["round_medians_s"] = [r["median_s"] for r in ok]
    for key in ("first_call_s", "load_s"):
        out[key] = round(statistics.median(r[key] for r in ok), 3)
    compiles = [r["compile_s"] for r in ok if r.get("compile_s") is not None]
    out["compile_s"] = round(statistics.median(compiles), 3) if compiles else None
    for key in ("peak_rss_gb", "peak_rss_after_load_gb", "loadavg_1min_at_end"):
        out[key] = max(r[key] for r in ok)
    out["output_finite"] = all(r["output_finite"] for r in ok)
    out["rounds"] = len(runs)
    out["failed_rounds"] = len(runs) - len(ok)
    return out


def main_all(args) -> None:
    out = pathlib.Path(args.out)
    data = json.loads(out.read_text()) if out.exists() and args.resume else {"results": []}
    data["environment"] = environment()
    data["conditions"] = {
        "reps": args.reps,
        "e2e_reps": args.e2e_reps,
        "rounds": args.rounds,
        "keras_cv_jit_compile": args.kcv_jit,
        "notes": args.note,
    }
    done = {
        (r["component"], r["framework"], r["size"], r["dtype"]) for r in data["results"] if "error" not in r
    }
    for component in args.components:
        sizes = args.e2e_sizes if component == "e2e" else args.sizes
        wanted = args.frameworks or [f for f in FRAMEWORKS[component] if f not in OPTIONAL]
        for size in sizes:
            for dtype in args.dtypes:
                frameworks = [
                    f
                    for f in FRAMEWORKS[component]
                    if f in wanted and (component, f, size, dtype) not in done
                ]
                runs = {f: [] for f in frameworks}
                reps = args.e2e_reps if component == "e2e" else args.reps
                # Rounds interleave the frameworks (ours, keras-cv, diffusers, ours, ...), so a slow
                # spell of the machine falls on each of them rather than on one.
                for _ in range(args.rounds):
                    for framework in frameworks:
                        print(f"{component} {framework} {size} {dtype} ...", end=" ", flush=True)
                        result = subprocess_case(
                            component, framework, size, dtype, reps, args.weights, args.kcv_jit, args.timeout
                        )
                        print(result.get("median_s", result.get("error", "")[-300:]), flush=True)
                        runs[framework].append(result)
                        data["results"] = [
                            r
                            for r in data["results"]
                            if (r["component"], r["framework"], r["size"], r["dtype"])
                            != (component, framework, size, dtype)
                        ] + [merge_rounds(runs[framework])]
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


def table(data: dict) -> str:
    """Markdown: one row per component, size and dtype; medians, ratios, compile time, peak memory."""
    rows = {}
    for r in data["results"]:
        rows.setdefault((r["component"], r["size"], r["dtype"]), {})[r["framework"]] = r
    names = {"unet": "UNet step (batch 2)", "vae": "VAE decode (batch 1)", "text": "text encoder (2x77)"}
    names["e2e"] = "end to end"
    lines = [
        "| what | size | dtype | ours s | keras-cv s | diffusers / transformers s "
        "| keras-cv / ours | peer / ours | compile s (ours, kcv) | peak GB (ours, kcv, peer) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"unet": 0, "vae": 1, "text": 2, "e2e": 3}
    for (component, size, dtype), by in sorted(
        rows.items(), key=lambda kv: (order[kv[0][0]], -kv[0][1], kv[0][2])
    ):
        ours, kcv = by.get("ours", {}), by.get("keras-cv", {})
        peer = by.get("diffusers", by.get("transformers", {}))

        def med(r):
            return f"{r['median_s']:.3f}" if "median_s" in r else ("error" if r else "-")

        def ratio(r, ours=ours):
            if "median_s" in r and "median_s" in ours and ours["median_s"] > 0:
                return f"{r['median_s'] / ours['median_s']:.2f}"
            return "-"

        def field(r, key):
            value = r.get(key)
            return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

        what = names[component]
        if component == "e2e":
            what += " (ours 20 DPM++ steps, keras-cv 50 DDIM)"
        lines.append(
            f"| {what} | {size} | {dtype} | {med(ours)} | {med(kcv)} | {med(peer)} | {ratio(kcv)} | "
            f"{ratio(peer)} | {field(ours, 'compile_s')}, {field(kcv, 'compile_s')} | "
            f"{field(ours, 'peak_rss_gb')}, {field(kcv, 'peak_rss_gb')}, {field(peer, 'peak_rss_gb')} |"
        )
    lines += [
        "",
        "| what | size | dtype | framework (policy) | median s | min s | runs s | first call s | load s | peak GB "
        "| load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        data["results"], key=lambda r: (order[r["component"]], -r["size"], r["dtype"], r["framework"])
    ):
        if "median_s" not in r:
            lines.append(
                f"| {r['component']} | {r['size']} | {r['dtype']} | {r['framework']} | error | | | | |"
            )
            continue
        runs = ", ".join(f"{t:.2f}" for t in r["times_s"])
        lines.append(
            f"| {r['component']} | {r['size']} | {r['dtype']} | {r['framework']} ({r['policy']}) | "
            f"{r['median_s']:.3f} | {min(r['times_s']):.3f} | {runs} | {r['first_call_s']:.1f} | {r['load_s']:.1f} | "
            f"{r['peak_rss_gb']:.2f} | {r.get('loadavg_1min_at_end', '-')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write keras-cv's random SD 1.5 weights")
    p.add_argument("--weights", type=pathlib.Path, default=DEFAULT_WEIGHTS)
    c = sub.add_parser("case", help="time one case in this process and print JSON")
    c.add_argument("component", choices=sorted(FRAMEWORKS))
    c.add_argument(
        "framework",
        choices=["ours", "ours-1block", "ours-xla", "ours-graph", "keras-cv", "diffusers", "transformers"],
    )
    c.add_argument("--size", type=int, default=512)
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--weights", type=pathlib.Path, default=DEFAULT_WEIGHTS)
    c.add_argument("--no-kcv-jit", dest="kcv_jit", action="store_false")
    c.add_argument("--ours-steps", type=int, default=20, help="e2e: our DPM-Solver++ steps")
    c.add_argument("--kcv-steps", type=int, default=50, help="e2e: keras-cv's DDIM steps")
    a = sub.add_parser("all", help="every case in fresh processes; writes JSON and prints the table")
    a.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu.json"))
    a.add_argument(
        "--components", nargs="+", default=["unet", "vae", "text", "e2e"], choices=sorted(FRAMEWORKS)
    )
    a.add_argument("--frameworks", nargs="+", default=None)
    a.add_argument("--sizes", nargs="+", type=int, default=[512, 256])
    a.add_argument("--e2e-sizes", nargs="+", type=int, default=[256])
    a.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    a.add_argument("--reps", type=int, default=3)
    a.add_argument("--e2e-reps", type=int, default=1)
    a.add_argument(
        "--rounds", type=int, default=1, help="run each case this many times, frameworks interleaved"
    )
    a.add_argument("--weights", type=pathlib.Path, default=DEFAULT_WEIGHTS)
    a.add_argument("--timeout", type=float, default=1800)
    a.add_argument("--no-kcv-jit", dest="kcv_jit", action="store_false")
    a.add_argument("--resume", action="store_true", help="keep results already in --out, run the rest")
    a.add_argument("--note", default="")
    t = sub.add_parser("table", help="print the markdown table of a result file")
    t.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "prepare":
        prepare(args.weights)
    elif args.command == "case":
        if not (args.weights / FILES["diffusion_model"]).exists():
            raise SystemExit(f"no weights in {args.weights}; run `python {__file__} prepare` first")
        result = run_case(
            args.component, args.framework, args.size, args.dtype, args.reps, args.weights, args
        )
        print(json.dumps(result), flush=True)
    elif args.command == "all":
        main_all(args)
    else:
        print(table(json.loads(pathlib.Path(args.path).read_text())))


if __name__ == "__main__":
    main()
