"""Write tests/fixtures/hostile/: small hostile checkpoints kept as regression files (no torch needed).

Each ``NAME.ckpt`` comes with ``NAME.expected``: how the line printed by
tests/test_ckpt_hostile.py's subprocess loader must start ("OK" or
"ERROR <type>"). The files are the issue-26 reports that fit in a few KB and
the escapes the fuzzers found in the reader before it was rewritten:

- memo_bomb: the 9-byte data.pkl whose LONG_BINPUT 0x7fffffff asked CPython for ~32 GB;
- dtype_subarray_leak: numpy.dtype + BUILD of a subarray state + scalar, N = 2**31 - 1 (SIGSEGV);
- expanded_2pow63: a 4-byte storage viewed as 2**63 elements;
- ext_opcode: EXT1 of a code another import may have registered in copyreg;
- fuzz_deflate_flip: lightning.ckpt re-zipped with deflate, one bit flipped in a storage's
  deflate stream (raw zlib.error escaped; found by test_fuzz_mutated_zip_structure);
- fuzz_bad_stored_crc: lightning.ckpt with one byte of data.pkl changed (raw BadZipFile escaped).

Usage: python tools/make_hostile_pickles.py
"""

from __future__ import annotations

import pathlib
import struct
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hostile_pickles import Build, Call, G, dumps, tensor, torch_zip  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "hostile"
LIGHTNING = ROOT / "tests" / "fixtures" / "ckpt" / "lightning.ckpt"


def write(name: str, expected: str, make) -> None:
    path = OUT / f"{name}.ckpt"
    make(path)
    (OUT / f"{name}.expected").write_text(expected + "\n")
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes, expect {expected}")


def deflate_flip(path: pathlib.Path) -> None:
    with zipfile.ZipFile(LIGHTNING) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("lightning/data/0")
    blob[info.header_offset + 30 + len(info.filename) + 1] ^= 0x01
    path.write_bytes(bytes(blob))


def stored_crc(path: pathlib.Path) -> None:
    blob = bytearray(LIGHTNING.read_bytes())
    start = blob.index(b"lightning/data.pkl") + len("lightning/data.pkl")
    start = blob.index(b"\x80\x02", start)
    blob[start + 40] ^= 0x20
    path.write_bytes(bytes(blob))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write(
        "memo_bomb",
        "OK dict {}",
        lambda p: torch_zip(p, b"\x80\x02}r" + struct.pack("<I", 0x7FFFFFFF) + b"."),
    )
    inner = Call(G("numpy", "dtype"), "f8", False, True)
    evil = Build(
        Call(G("numpy", "dtype"), "f8", False, True), (3, ">", (inner, (2**31 - 1,)), None, None, -1, -1, 0)
    )
    write(
        "dtype_subarray_leak",
        "ERROR UnsafeCheckpointError",
        lambda p: torch_zip(
            p, dumps({"global_step": Call(G("numpy.core.multiarray", "scalar"), evil, b"\0" * 8)})
        ),
    )
    write(
        "expanded_2pow63",
        "ERROR ValueError",
        lambda p: torch_zip(p, dumps({"w": tensor("0", 1, (2**63,), (0,))}), {"0": b"\0" * 4}),
    )
    write("ext_opcode", "ERROR UnsafeCheckpointError", lambda p: torch_zip(p, b"\x80\x02\x82\x01)R."))
    write("fuzz_deflate_flip", "ERROR ValueError", deflate_flip)
    write("fuzz_bad_stored_crc", "ERROR ValueError", stored_crc)


if __name__ == "__main__":
    main()
