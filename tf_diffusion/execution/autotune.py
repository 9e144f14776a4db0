"""Choose between equivalent implementations by timing them on the machine at hand, once.

A choice is keyed by (op, key): the op's name and everything its cost depends on (shapes,
dtype). The first time a key is met, every candidate runs once to warm up (tracing, XLA
compilation) and then ``reps`` timed times; the median decides. Candidates come ordered from the
most conservative to the most aggressive, and a later one wins only when it is faster than the
best so far by more than ``margin`` (noise does not flip a choice, extra memory must pay).
Winners are kept in memory and, unless turned off, in a JSON file keyed by a CPU fingerprint
(model name, a hash of the feature flags, TensorFlow's version): another machine, or this one
after an upgrade, measures again.

Environment:
    TF_DIFFUSION_AUTOTUNE: "0" turns measuring off (every choice takes its first candidate),
        unless ``ExecutionOptions.autotune`` says otherwise.
    TF_DIFFUSION_AUTOTUNE_CACHE: the JSON file; "" keeps the results in memory only. Default
        ``$XDG_CACHE_HOME/tf_diffusion/autotune.json`` (``~/.cache/...``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import statistics
import threading
import time
from collections.abc import Callable, Sequence

# A candidate: its name and a function that builds it and returns a zero-argument runner (the
# runner's first call warms up; later calls are timed).
Candidate = tuple[str, Callable[[], Callable[[], object]]]


def cpu_fingerprint() -> str:
    """CPU model name, a hash of its feature flags and the TensorFlow version, as one string."""
    model, flags = "unknown", ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name" and model == "unknown":
                model = value.strip()
            elif name in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    try:
        import tensorflow as tf

        version = tf.__version__
    except ImportError:
        version = "no-tf"
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model} | flags {digest} | tf {version}"


def default_cache_path() -> pathlib.Path | None:
    """The JSON file from ``TF_DIFFUSION_AUTOTUNE_CACHE`` (None when it is ""), else the user cache dir."""
    value = os.environ.get("TF_DIFFUSION_AUTOTUNE_CACHE")
    if value is not None:
        return pathlib.Path(value).expanduser() if value else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "tf_diffusion" / "autotune.json"


def enabled_by_env() -> bool:
    """Whether ``TF_DIFFUSION_AUTOTUNE`` allows measuring (anything but "0", "false", "off")."""
    return os.environ.get("TF_DIFFUSION_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


class Autotuner:
    """Measured choices, cached in memory and optionally in a JSON file.

    Args:
        path: the JSON file; None keeps results in memory only.
        reps: timed runs per candidate after the warm-up run.
        margin: how much faster (a fraction) a later candidate must be than the best so far.
        clock: the timer (seconds); tests pass a fake one.
        fingerprint: the machine key; default ``cpu_fingerprint()``.
    """

    def __init__(
        self,
        path: pathlib.Path | str | None = None,
        *,
        reps: int = 3,
        margin: float = 0.10,
        clock: Callable[[], float] = time.perf_counter,
        fingerprint: str | None = None,
    ):
        if reps < 1:
            raise ValueError(f"reps={reps} must be at least 1")
        self.path = None if path is None else pathlib.Path(path)
        self.reps, self.margin, self.clock = reps, margin, clock
        self.fingerprint = cpu_fingerprint() if fingerprint is None else fingerprint
        self._lock = threading.RLock()
        self._memory: dict[str, dict] = {}
        self._loaded = False

    @staticmethod
    def entry_key(op: str, key: Sequence) -> str:
        return f"{op}|{','.join(str(k) for k in key)}"

    def cached(self, op: str, key: Sequence) -> str | None:
        """The remembered winner for (op, key), or None."""
        with self._lock:
            self._load()
            entry = self._memory.get(self.entry_key(op, key))
            return None if entry is None else entry["winner"]

    def choose(self, op: str, key: Sequence, candidates: Sequence[Candidate]) -> str:
        """The fastest candidate's name for (op, key), measured the first time the key is met.

        Args:
            op: what is chosen ("conv3x3", "resblock", ...).
            key: everything the candidates' costs depend on (shapes, dtype).
            candidates: (name, build) pairs, most conservative first; ``build()`` returns a
                runner whose first call warms up.

        Returns:
            The winner's name. A single candidate is returned without measuring.

        Raises:
            ValueError: for no candidates.
        """
        if not candidates:
            raise ValueError(f"autotune {op} {tuple(key)}: no candidates")
        names = [name for name, _ in candidates]
        if len(candidates) == 1:
            return names[0]
        with self._lock:
            remembered = self.cached(op, key)
            if remembered in names:
                return remembered
            times = {name: self._time(build) for name, build in candidates}
            winner = names[0]
            for name in names[1:]:
                if times[name] < times[winner] * (1.0 - self.margin):
                    winner = name
            entry = {"winner": winner, "seconds": {n: round(t, 6) for n, t in times.items()}}
            self._memory[self.entry_key(op, key)] = entry
            self._save(self.entry_key(op, key), entry)
            return winner

    def _time(self, build) -> float:
        run = build()
        run()  # warm-up: tracing and compilation
        samples = []
        for _ in range(self.reps):
            start = self.clock()
            run()
            samples.append(self.clock() - start)
        return statistics.median(samples)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # an unreadable cache is measured again
        for k, v in data.get(self.fingerprint, {}).items():
            if isinstance(v, dict) and isinstance(v.get("winner"), str):
                self._memory.setdefault(k, v)

    def _save(self, entry_key: str, entry: dict) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(self.fingerprint, {})[entry_key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache dir: the choice stays in memory


_TUNER: Autotuner | None = None
_TUNER_LOCK = threading.Lock()


def tuner() -> Autotuner:
    """The process's autotuner (created on first use from ``default_cache_path()``)."""
    global _TUNER
    with _TUNER_LOCK:
        if _TUNER is None:
            _TUNER = Autotuner(default_cache_path())
        return _TUNER


def set_tuner(new: Autotuner | None) -> Autotuner | None:
    """Replace the process's autotuner (None: a fresh one on next use); returns the previous one."""
    global _TUNER
    with _TUNER_LOCK:
        previous, _TUNER = _TUNER, new
        return previous
