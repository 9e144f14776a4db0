"""tf_diffusion.execution: the options context, the autotuner, and thread-safe tracing."""

import json
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_diffusion import execution, layers
from tf_diffusion.execution import autotune, compiling, cpu
from tf_diffusion.execution.options import in_xla


class FakeClock:
    """A clock that only moves when a fake candidate runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake(clock, seconds, runs):
    """A candidate builder whose runner takes ``seconds`` on ``clock`` and counts its runs."""

    def build():
        def run():
            runs.append(seconds)
            clock.now += seconds

        return run

    return build


def test_autotuner_picks_the_faster_candidate_and_caches_it(tmp_path):
    clock, runs = FakeClock(), []
    path = tmp_path / "autotune.json"
    tuner = autotune.Autotuner(path, reps=3, clock=clock, fingerprint="cpu A")
    candidates = [("direct", fake(clock, 2.0, runs)), ("f4", fake(clock, 1.0, runs))]
    assert tuner.choose("conv3x3", (2, 64, 64, 320), candidates) == "f4"
    assert len(runs) == 2 * (1 + 3)  # a warm-up and three timed runs each
    assert tuner.choose("conv3x3", (2, 64, 64, 320), candidates) == "f4"
    assert len(runs) == 8  # remembered, not measured again
    # The conservative first candidate keeps gains within the margin (10%).
    slow_first = [("direct", fake(clock, 1.0, runs)), ("f4", fake(clock, 0.97, runs))]
    assert tuner.choose("conv3x3", (2, 8, 8, 16), slow_first) == "direct"
    # The JSON file: another process on the same CPU reads the winners without measuring.
    data = json.loads(path.read_text())
    assert data["cpu A"]["conv3x3|2,64,64,320"]["winner"] == "f4"
    again = autotune.Autotuner(path, clock=clock, fingerprint="cpu A")
    before = len(runs)
    assert again.choose("conv3x3", (2, 64, 64, 320), candidates) == "f4"
    assert len(runs) == before
    # Another CPU (or TensorFlow version) measures again.
    other = autotune.Autotuner(path, clock=clock, fingerprint="cpu B")
    reversed_costs = [("direct", fake(clock, 1.0, runs)), ("f4", fake(clock, 3.0, runs))]
    assert other.choose("conv3x3", (2, 64, 64, 320), reversed_costs) == "direct"
    assert len(runs) == before + 8
    assert set(json.loads(path.read_text())) == {"cpu A", "cpu B"}


def test_autotuner_without_file_and_with_one_candidate(tmp_path):
    clock, runs = FakeClock(), []
    tuner = autotune.Autotuner(None, clock=clock, fingerprint="x")
    assert tuner.choose("op", (1,), [("only", fake(clock, 1.0, runs))]) == "only"
    assert runs == []  # nothing to compare: never run
    with pytest.raises(ValueError, match="no candidates"):
        tuner.choose("op", (1,), [])
    (tmp_path / "bad.json").write_text("{not json")
    broken = autotune.Autotuner(tmp_path / "bad.json", clock=clock, fingerprint="x")
    assert broken.choose("op", (2,), [("a", fake(clock, 2.0, runs)), ("b", fake(clock, 1.0, runs))]) == "b"


def test_fingerprint_names_the_cpu_and_tensorflow():
    fingerprint = autotune.cpu_fingerprint()
    assert f"tf {tf.__version__}" in fingerprint and "flags" in fingerprint


def test_autotune_off_takes_the_conservative_candidate(monkeypatch):
    # TF_DIFFUSION_AUTOTUNE=0 (or autotune=False): direct convolutions, nothing measured.
    measured = []
    monkeypatch.setattr(autotune.Autotuner, "choose", lambda self, *a: measured.append(a) or "f4")
    conv = layers.Conv2d(16, 8, 3, padding=1)
    from tf_diffusion.execution.options import _scope

    monkeypatch.setenv("TF_DIFFUSION_AUTOTUNE", "0")
    with execution.options(execution.ExecutionOptions(compile="xla", winograd=True)), _scope(in_xla=True):
        assert cpu.conv_tile(conv, (2, 16, 16, 16)) == 0
    monkeypatch.delenv("TF_DIFFUSION_AUTOTUNE")
    opts = execution.ExecutionOptions(compile="xla", winograd=True, autotune=False)
    with execution.options(opts), _scope(in_xla=True):
        assert cpu.conv_tile(conv, (2, 16, 16, 16)) == 0
    assert measured == []
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner(None, fingerprint="t"))
    with execution.options(opts.replace(autotune=True)), _scope(in_xla=True):
        assert cpu.conv_tile(conv, (2, 16, 16, 16)) == 4  # measured (here: the fake says f4)
    assert len(measured) == 1


def test_autotuned_convolution_paths_give_the_same_numbers(monkeypatch):
    # Measured for real on a small convolution (whatever wins), every candidate within bound.
    monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner(None, reps=1))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((2, 8, 8, 16)).astype(np.float32))
    conv = execution.apply(layers.Conv2d(16, 8, 3, padding=1))
    want = np.asarray(conv(x))
    for choice in ("direct", "f2", "f4", None):
        opts = execution.ExecutionOptions(
            compile="xla",
            winograd=True,
            autotune=True,
            choose=None if choice is None else (lambda *a, c=choice: c),
        )
        got = np.asarray(execution.compile(conv, opts)(x))
        assert np.abs(got - want).max() / np.abs(want).max() <= 3e-5, choice
    assert autotune.tuner().cached("conv3x3", (2, 8, 8, 16, 8, "float32")) in ("direct", "f2", "f4")


def test_options_are_validated_and_scoped():
    with pytest.raises(ValueError, match=r"compile='islandz' must be one of"):
        execution.ExecutionOptions(compile="islandz")
    with pytest.raises(ValueError, match=r"attention='bogus' must be one of"):
        execution.ExecutionOptions(attention="bogus")
    with pytest.raises(ValueError, match="post_attention_tokens=0"):
        execution.ExecutionOptions(post_attention_tokens=0)
    with pytest.raises(ValueError, match="ExecutionOptions"):
        execution.compile(lambda x: x, "xla")
    opts = execution.ExecutionOptions(compile="islands")
    assert execution.current() == execution.ExecutionOptions()
    with execution.options(opts):
        assert execution.current() is opts
    assert execution.current() == execution.ExecutionOptions()


def test_default_options_follow_generates_defaults():
    from tf_diffusion.config import UNetConfig
    from tf_diffusion.unet import UNetModel

    cfg = UNetConfig(model_channels=8, channel_mult=(1,), attention_levels=(False,), norm_groups=4)
    unet, half = UNetModel(cfg), UNetModel(cfg, dtype="bfloat16")
    small, big = (1, 32, 32, 4), (1, 33, 32, 4)
    assert execution.default_options(unet, small, accelerator=False) == execution.ExecutionOptions(
        compile="xla", winograd=True
    )
    assert execution.default_options(unet, big, accelerator=False).compile == "islands"
    assert execution.default_options(unet, big, accelerator=False, jit_compile=True).compile == "xla"
    assert execution.default_options(unet, big, accelerator=False, jit_compile=False).compile == "graph"
    assert execution.default_options(half, big, accelerator=False).compile == "graph"
    assert execution.default_options(unet, big, accelerator=True) == execution.ExecutionOptions(compile="xla")
    with pytest.raises(ValueError, match=r"jit_compile='islands' must be True, False or None"):
        execution.default_options(unet, big, jit_compile="islands")


def test_two_threads_tracing_at_once_keep_their_own_options(monkeypatch):
    # Thread A traces under XLA with Winograd forced, thread B under XLA with direct convolutions,
    # at the same time (each waits inside its trace until the other is tracing too): each
    # convolution sees its own thread's options, and both give the same numbers.
    barrier = threading.Barrier(2, timeout=60)
    seen = {}
    original = cpu.winograd_conv3x3

    def winograd(x, w, m):
        seen.setdefault(threading.current_thread().name, []).append(m)
        return original(x, w, m)

    monkeypatch.setattr(cpu, "winograd_conv3x3", winograd)

    def choose(tile):
        def pick(op, key, names):
            barrier.wait()  # both threads are inside a trace now
            return tile

        return pick

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((1, 8, 8, 16)).astype(np.float32))
    conv = execution.apply(layers.Conv2d(16, 8, 3, padding=1))
    results, errors = {}, []

    def trace(name, tile):
        try:
            opts = execution.ExecutionOptions(compile="xla", winograd=True, choose=choose(tile))
            results[name] = (np.asarray(execution.compile(conv, opts)(x)), execution.current(), in_xla())
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=trace, name=n, args=(n, t)) for n, t in (("A", "f4"), ("B", "direct"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert seen == {"A": [4]}  # B never took Winograd
    for name in "AB":
        assert results[name][1] == execution.ExecutionOptions() and not results[name][2]
    np.testing.assert_allclose(results["A"][0], results["B"][0], atol=1e-5)


def test_memory_mappings_read_from_proc():
    counts = compiling.memory_mappings()
    assert counts is not None and 0 < counts[0] < counts[1]


def test_xla_is_not_chosen_or_compiled_near_the_mapping_limit(monkeypatch):
    """XLA code is never freed and a process at vm.max_map_count segfaults in XLA: near the limit the
    default is graph mode (one warning), an explicit XLA compile a clear error, graph mode still runs."""
    model = keras.layers.Dense(2)
    model.build((None, 2))
    assert execution.default_options(model, accelerator=False).compile == "xla"
    monkeypatch.setattr(compiling, "memory_mappings", lambda: (50_000, 65_530))
    monkeypatch.setattr(compiling, "_warned", [])
    with pytest.warns(RuntimeWarning, match="50000 of its 65530 memory mappings"):
        assert execution.default_options(model, accelerator=False).compile == "graph"
    assert execution.default_options(model, jit_compile=True, accelerator=False).compile == "xla"
    x = np.ones((1, 2), np.float32)
    graph = execution.compile(lambda v: v * 2.0, execution.ExecutionOptions(compile="graph"))
    np.testing.assert_array_equal(graph(x), x * 2.0)
    monkeypatch.setattr(compiling, "memory_mappings", lambda: (60_000, 65_530))
    xla = execution.compile(lambda v: v * 3.0, execution.ExecutionOptions(compile="xla"))
    with pytest.raises(RuntimeError, match=r"60000 of its 65530 memory mappings.*jit_compile=False"):
        xla(x)
