"""Peak memory and time of loading the hostile checkpoints of issue 26, one subprocess per file.

Each bomb is written to a temporary folder, then loaded by a fresh Python
process that imports only the checkpoint reader (not TensorFlow), reads every
tensor, and reports how it ended. The parent measures the child's peak
resident memory (``ru_maxrss`` from ``wait4``) and wall time. An address-space
limit (``--limit-gib``, default 4) keeps a runaway reader from hurting the
machine: an old reader that asks for 32 GB ends with a MemoryError instead.

    python benchmarks/hostile_memory.py                               # this checkout
    python benchmarks/hostile_memory.py --pythonpath /tmp/old_checkout # another one, for a before/after

Not a test: a table on stdout (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hostile_pickles import Build, Call, G, dumps, tensor, torch_zip  # noqa: E402

MiB = 1 << 20


def _deflated_storage(path, data_pkl: bytes, nbytes: int) -> None:
    """A torch zip whose storage '0' is nbytes of zeros, deflated, written in chunks."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as out:
            chunk = bytes(MiB)
            for _ in range(nbytes // MiB):
                out.write(chunk)
        zf.writestr("archive/version", "3\n")


def bombs(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """name -> file; the attacks of issue 26 items 1, 2 and 6."""
    out = {}

    def add(name, make):
        path = folder / f"{name}.ckpt"
        make(path)
        out[name] = path

    add(
        "benign (baseline)",
        lambda p: torch_zip(p, dumps({"w": tensor("0", 4, (4,), (1,))}), {"0": bytes(16)}),
    )
    for index in (150_000_000, 0x7FFFFFFF):
        add(
            f"memo index {index:#x}",
            lambda p, i=index: torch_zip(p, b"\x80\x02}r" + struct.pack("<I", i) + b"."),
        )
    n = 1 << 28  # 1 GiB of float32 zeros, deflated to ~1 MB
    add(
        "deflated 1 GiB storage",
        lambda p: _deflated_storage(p, dumps({"w": tensor("0", n, (n,), (1,))}), n * 4),
    )
    views, m = 369, 16 << 20  # 369 tensors over one 64 MiB deflated storage
    shared = dumps({f"t{i}": tensor("0", m, (1024, 1024), (1024, 1), offset=i * 1024) for i in range(views)})
    add("369 views of one deflated 64 MiB storage", lambda p: _deflated_storage(p, shared, m * 4))
    inner = Call(G("numpy", "dtype"), "f8", False, True)
    evil = Build(
        Call(G("numpy", "dtype"), "f8", False, True), (3, ">", (inner, (2**31 - 1,)), None, None, -1, -1, 0)
    )
    leak = dumps({"global_step": Call(G("numpy.core.multiarray", "scalar"), evil, bytes(8))})
    add("dtype subarray N=2**31-1", lambda p: torch_zip(p, leak))
    add(
        "4 bytes viewed as 2**28 floats",
        lambda p: torch_zip(p, dumps({"w": tensor("0", 1, (2**28,), (0,))}), {"0": bytes(4)}),
    )
    add(
        "4 bytes viewed as 2**63 floats",
        lambda p: torch_zip(p, dumps({"w": tensor("0", 1, (2**63,), (0,))}), {"0": bytes(4)}),
    )
    keys = b"".join(
        b"\x8a\x0a" + (k * (2**61 - 1)).to_bytes(10, "little", signed=True) + b"N" for k in range(1, 20001)
    )
    add("20k hash-colliding int keys", lambda p: torch_zip(p, b"\x80\x02}(" + keys + b"u."))
    add("400k-deep tuple as a dict key", lambda p: torch_zip(p, b"\x80\x02}N" + b"\x85" * 400_000 + b"Ns."))
    return out


CHILD = """
import resource, sys, types
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
weights = types.ModuleType("tf_diffusion.weights")  # skip the package __init__ (Keras, TensorFlow)
weights.__path__ = [{weights!r}]
sys.modules["tf_diffusion.weights"] = weights
from tf_diffusion.weights.ckpt import load_ckpt
from tf_diffusion.weights.lazy import read_all
try:
    read_all(load_ckpt({path!r}))
    print("loaded")
except BaseException as e:
    print(type(e).__name__ + ": " + str(e)[:150].replace(chr(10), " "))
"""


def measure(path: pathlib.Path, pythonpath: str, limit: int, timeout: float) -> dict:
    code = CHILD.format(
        limit=limit, weights=str(pathlib.Path(pythonpath) / "tf_diffusion" / "weights"), path=str(path)
    )
    env = dict(os.environ, PYTHONPATH=pythonpath, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode(errors="replace").strip()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode < 0:
        out = f"killed by signal {-proc.returncode}" + (" (timeout)" if wall > timeout else "")
    elif not out:
        out = f"exit {proc.returncode}: {proc.stderr.read().decode(errors='replace').strip()[-150:]}"
    return {
        "file_bytes": path.stat().st_size,
        "peak_mib": usage.ru_maxrss / 1024,
        "wall_s": wall,
        "outcome": (out.splitlines()[-1] if out else "").replace(f"{path}: ", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pythonpath", default=str(ROOT), help="checkout whose tf_diffusion is measured")
    parser.add_argument("--limit-gib", type=float, default=4.0, help="address-space limit of each load")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per load")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--only", nargs="*", help="names (substrings) of the bombs to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hostile_memory_") as tmp:
        files = bombs(pathlib.Path(tmp))
        results = {}
        print(f"{'bomb':44} {'file':>11} {'peak MiB':>9} {'wall s':>7}  outcome")
        for name, path in files.items():
            if args.only and not any(o in name for o in args.only) and "baseline" not in name:
                continue
            r = results[name] = measure(path, args.pythonpath, int(args.limit_gib * (1 << 30)), args.timeout)
            print(
                f"{name:44} {r['file_bytes']:>11,} {r['peak_mib']:>9.0f} {r['wall_s']:>7.1f}  {r['outcome'][:110]}"
            )
            sys.stdout.flush()
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps({"pythonpath": args.pythonpath, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
