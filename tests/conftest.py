"""Shared test setup: quiet TensorFlow logs, a fixtures path and the Hypothesis budgets.

Property tests (fuzzers) run a short budget by default; ``TF_DIFFUSION_FUZZ=long`` runs many more examples
per test (for a nightly or a pre-release run).
"""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Autotuning results stay in memory: tests never write the user's cache file.
os.environ.setdefault("TF_DIFFUSION_AUTOTUNE_CACHE", "")

import pytest  # noqa: E402

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the `test` extra; tests that need it import it themselves
    settings = None

if settings is not None:
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("default-tf", max_examples=200, deadline=None, suppress_health_check=_quiet)
    settings.register_profile("long-tf", max_examples=5_000, deadline=None, suppress_health_check=_quiet)
    fuzz = os.environ.get("TF_DIFFUSION_FUZZ", "")
    if fuzz not in ("", "long"):
        raise ValueError(f"TF_DIFFUSION_FUZZ={fuzz!r} is not allowed; use 'long' or leave it unset")
    settings.load_profile("long-tf" if fuzz == "long" else "default-tf")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


def run_notebook(
    path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch, env: dict[str, str]
) -> tuple[object, str]:
    """Execute the notebook at ``path`` in a fresh kernel (nbclient) with ``env`` set, in ``tmp_path``.

    The kernel also gets the repository on ``PYTHONPATH``, quiet TensorFlow logs and the kernel
    autotuner off (a timing under load could pick another, equally valid, differently rounded kernel
    for one of two runs a test compares). Returns the executed notebook and everything its code cells
    printed. Skips when nbclient, nbformat or ipykernel is missing.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for name, value in {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]),
        "TF_DIFFUSION_AUTOTUNE": "0",
        **env,
    }.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    printed = "".join(
        o.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )
    return notebook, printed


@pytest.fixture(scope="module")
def tiny_sdxl():
    """The tiny SDXL base pipeline (tests/fixtures/sdxl/sdxl-diffusers), one per test module; any LoRA a
    test left loaded is unloaded when the module ends."""
    from tf_diffusion import StableDiffusion

    model = StableDiffusion.from_pretrained(FIXTURES / "sdxl" / "sdxl-diffusers")
    yield model
    model.unload_lora_weights()


def _memory_gib() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and at its peak (VmHWM), in GiB; empty off Linux."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return {}
    return {k: int(v.split()[0]) / 2**20 for k, v in fields.items()}


def _process_report() -> dict:
    """This process's memory (``_memory_gib``) and memory mappings (used, limit), as far as known."""
    from tf_diffusion.execution.compiling import memory_mappings

    return {"memory": _memory_gib(), "mappings": memory_mappings()}


@pytest.hookimpl(optionalhook=True)  # xdist's hooks: known only where pytest-xdist is installed
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's default): one worker per CPU core, but no more than the memory holds.

    A worker holds its test module's pipelines and every XLA program it compiled (about 9 GiB at the
    peak of the heaviest modules), so a machine gets one worker per 9 GiB of available memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))
        by_memory = int(available / 2**20 // 9)
    except (OSError, StopIteration, ValueError):
        by_memory = cores
    return max(1, min(cores, by_memory))


def pytest_sessionfinish(session):
    """A worker of ``pytest -n`` sends its memory figures to the controller (``pytest_testnodedown``)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["process_report"] = _process_report()


_WORKER_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    report = getattr(node, "workeroutput", {}).get("process_report")
    if report is not None:
        node.config.stash.setdefault(_WORKER_REPORTS, {})[node.gateway.id] = report


def pytest_terminal_summary(terminalreporter, config):
    """How many memory mappings each test process left: XLA's compiled code is never freed, and a process
    at vm.max_map_count crashes in XLA, so this is the headroom for more XLA compiles. And each process's
    resident memory, now and at its peak (with ``-n``: each worker's; without: the one process's)."""
    reports = config.stash.get(_WORKER_REPORTS, None) or {"main": _process_report()}
    for name, report in sorted(reports.items()):
        memory, counts, parts = report["memory"], report["mappings"], []
        if memory:
            parts.append(
                f"resident memory at the end: {memory['VmRSS']:.1f} GiB, peak {memory['VmHWM']:.1f} GiB"
            )
        if counts is not None:
            parts.append(f"memory mappings at the end: {counts[0]} of {counts[1]} (vm.max_map_count)")
        if parts:
            prefix = f"{name}: " if len(reports) > 1 else ""
            terminalreporter.write_line(prefix + "; ".join(parts))


@pytest.fixture(autouse=True, scope="module")
def _pillow_pixel_limit():
    """Pillow's process-wide bomb limit as each test module found it (the served web page lowers it to the
    server's limit, as a serving process should; other modules must not inherit that)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = previous


@pytest.fixture(autouse=True)
def _webuiapi_defaults():
    """webuiapi's txt2img/img2img write into their shared ``alwayson_scripts={}`` default (a ControlNet
    unit sent once is sent again by every later call that names none); each test starts from empty ones."""
    yield
    import sys

    module = sys.modules.get("webuiapi.webuiapi")
    if module is None:
        return
    for name in ("txt2img", "img2img"):
        for default in getattr(module.WebUIApi, name).__defaults__ or ():
            if isinstance(default, (dict, list)):
                default.clear()
