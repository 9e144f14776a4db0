"""The scanners' corpora as tests: every code-execution technique, in every layout and protocol, runs nothing.

picklescan, modelscan and fickling ship detectors, not samples (checked: their
wheels hold only code). So the samples are built here from the techniques
their deny-lists and analyses name (picklescan ``_unsafe_globals``, modelscan
``unsafe_globals``, fickling ``UNSAFE_IMPORTS``/``UNSAFE_MODULES``), plus the
opcode-level tricks of issue 26: each payload would create a marker file if
run. Every sample goes into torch.save's zip and legacy layouts at pickle
protocols 0-5 (and as a bare pickle from protocol 2); each must raise
``UnsafeCheckpointError``, leave no marker, and import no module.
"""

import sys

import pytest
from hostile_pickles import Call, G, New, Pid, Raw, dumps, tensor, torch_legacy, torch_zip

from tf_diffusion.weights.ckpt import UnsafeCheckpointError, load_ckpt


def techniques(marker: str) -> dict[str, object]:
    """name -> pickle value; each would write ``marker`` (or run a command) if a real unpickler ran it."""
    cmd = f"touch {marker}"
    py = f"open({marker!r}, 'w').close()"
    argv = ["touch", marker]
    nested = dumps(Call(G("os", "system"), cmd))  # a pickle inside the pickle
    getattr_ = G("builtins", "getattr")
    os_module = Call(G("builtins", "__import__"), "os")
    samples = {
        # Shell commands and processes.
        "os.system": Call(G("os", "system"), cmd),
        "posix.system": Call(G("posix", "system"), cmd),
        "nt.system": Call(G("nt", "system"), cmd),
        "os.popen": Call(G("os", "popen"), cmd),
        "os.execvp": Call(G("os", "execvp"), "touch", argv),
        "os.spawnlp": Call(G("os", "spawnlp"), 0, "touch", "touch", marker),
        "subprocess.Popen": Call(G("subprocess", "Popen"), argv),
        "subprocess.call": Call(G("subprocess", "call"), argv),
        "subprocess.run": Call(G("subprocess", "run"), argv),
        "subprocess.check_call": Call(G("subprocess", "check_call"), argv),
        "subprocess.check_output": Call(G("subprocess", "check_output"), argv),
        "subprocess.getoutput": Call(G("subprocess", "getoutput"), cmd),
        "commands.getoutput (py2)": Call(G("commands", "getoutput"), cmd),
        "pty.spawn": Call(G("pty", "spawn"), argv),
        "asyncio.create_subprocess_shell": Call(G("asyncio", "create_subprocess_shell"), cmd),
        "imaplib.IMAP4_stream": Call(G("imaplib", "IMAP4_stream"), cmd),
        "ensurepip._run_pip": Call(G("ensurepip", "_run_pip"), ["--version"]),
        # Evaluating Python source.
        "builtins.eval": Call(G("builtins", "eval"), py),
        "builtins.exec": Call(G("builtins", "exec"), py),
        "__builtin__.eval (py2)": Call(G("__builtin__", "eval"), py),
        "__builtin__.apply (py2)": Call(G("__builtin__", "apply"), G("os", "system"), (cmd,)),
        "builtins.compile+exec": Call(G("builtins", "exec"), Call(G("builtins", "compile"), py, "x", "exec")),
        "builtins.breakpoint": Call(G("builtins", "breakpoint")),
        "runpy._run_code": Call(G("runpy", "_run_code"), py, {}),
        "runpy.run_path": Call(G("runpy", "run_path"), marker),
        "runpy.run_module": Call(G("runpy", "run_module"), "this"),
        "code.InteractiveInterpreter.runsource": Call(
            G("code", "InteractiveInterpreter.runsource"), None, py
        ),
        "cProfile.run": Call(G("cProfile", "run"), py),
        "profile.run": Call(G("profile", "run"), py),
        "timeit.timeit": Call(G("timeit", "timeit"), py, "pass", None, 1),
        "pdb.run": Call(G("pdb", "run"), py),
        "bdb.Bdb.run": Call(G("bdb", "Bdb.run"), None, py),
        "doctest.debug_script": Call(G("doctest", "debug_script"), py),
        "idlelib.pyshell.ModifiedInterpreter.runcode": Call(
            G("idlelib.pyshell", "ModifiedInterpreter.runcode"), None, py
        ),
        "numpy.testing runstring": Call(G("numpy.testing._private.utils", "runstring"), py, {}),
        "numpy.f2py getlincoef": Call(G("numpy.f2py.crackfortran", "getlincoef"), py, {}),
        "lib2to3 Grammar.loads": Call(G("lib2to3.pgen2.grammar", "Grammar.loads"), None, nested),
        # Getting at os.system without naming it.
        "getattr(__import__('os'), 'system')": Call(Call(getattr_, os_module, "system"), cmd),
        "importlib.import_module": Call(
            Call(getattr_, Call(G("importlib", "import_module"), "os"), "system"), cmd
        ),
        "operator.attrgetter": Call(Call(G("operator", "attrgetter"), "system"), os_module),
        "_operator.attrgetter": Call(Call(G("_operator", "attrgetter"), "system"), os_module),
        "operator.methodcaller": Call(Call(G("operator", "methodcaller"), "system", cmd), os_module),
        "operator.itemgetter": Call(Call(G("operator", "itemgetter"), "system"), {"system": 1}),
        "functools.partial": Call(Call(G("functools", "partial"), G("os", "system"), cmd)),
        "functools.reduce": Call(G("functools", "reduce"), G("os", "system"), [cmd]),
        "builtins.map": Call(G("builtins", "list"), Call(G("builtins", "map"), G("os", "system"), [cmd])),
        "sys.modules": Call(Call(getattr_, G("sys", "modules"), "get"), "os"),
        "types.FunctionType": Call(G("types", "FunctionType"), None, {}),
        "types.CodeType": Call(G("types", "CodeType"), 0),
        "builtins.type": Call(G("builtins", "type"), "X", (), {"__reduce__": G("os", "system")}),
        "ctypes.CDLL": Call(G("ctypes", "CDLL"), "libc.so.6"),
        "ctypes.pythonapi": Call(getattr_, G("ctypes", "pythonapi"), "PyRun_SimpleString"),
        "cloudpickle subimport": Call(G("cloudpickle.cloudpickle", "subimport"), "os"),
        "cloudpickle _make_function": Call(G("cloudpickle.cloudpickle", "_make_function"), None, {}),
        "dill _create_function": Call(G("dill._dill", "_create_function"), None, {}),
        "copyreg._reconstructor": Call(
            G("copyreg", "_reconstructor"), G("os", "_wrap_close"), G("builtins", "object"), None
        ),
        "copyreg.__newobj__": Call(G("copyreg", "__newobj__"), G("subprocess", "Popen"), argv),
        # Files, network, browsers.
        "builtins.open": Call(G("builtins", "open"), marker, "w"),
        "io.open": Call(G("io", "open"), marker, "w"),
        "_io.FileIO": Call(G("_io", "FileIO"), marker, "w"),
        "pathlib.Path.touch": Call(G("pathlib", "Path.touch"), Call(G("pathlib", "Path"), marker)),
        "shutil.copyfile": Call(G("shutil", "copyfile"), __file__, marker),
        "shutil.move": Call(G("shutil", "move"), __file__ + ".nonexistent", marker),
        "logging.FileHandler": Call(G("logging", "FileHandler"), marker),
        "distutils.file_util.write_file": Call(G("distutils.file_util", "write_file"), marker, []),
        "tempfile.mkstemp": Call(G("tempfile", "mkstemp")),
        "socket.create_connection": Call(G("socket", "create_connection"), ("127.0.0.1", 9)),
        "ssl.get_server_certificate": Call(G("ssl", "get_server_certificate"), ("127.0.0.1", 9)),
        "webbrowser.open": Call(G("webbrowser", "open"), f"file://{marker}"),
        "httplib.HTTPConnection (py2)": Call(G("httplib", "HTTPConnection"), "127.0.0.1"),
        "requests.api.get": Call(G("requests.api", "get"), "http://127.0.0.1:9"),
        "aiohttp.client.request": Call(G("aiohttp.client", "request"), "GET", "http://127.0.0.1:9"),
        "urllib.request.urlopen": Call(G("urllib.request", "urlopen"), "http://127.0.0.1:9"),
        # Nested pickles and other loaders.
        "pickle.loads": Call(G("pickle", "loads"), nested),
        "_pickle.loads": Call(G("_pickle", "loads"), nested),
        "cPickle.loads (py2)": Call(G("cPickle", "loads"), nested),
        "pickle._loads": Call(G("pickle", "_loads"), nested),
        "marshal.loads": Call(G("marshal", "loads"), b"\xe3"),
        "numpy.load allow_pickle": Call(G("numpy", "load"), marker, None, True),
        "numpy _reconstruct + object array": Call(
            G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), (0,), b"O"
        ),
        "joblib.load": Call(G("joblib", "load"), marker),
        # torch.load and friends (what a torch checkpoint may name).
        "torch.load": Call(G("torch", "load"), marker),
        "torch.serialization.load": Call(G("torch.serialization", "load"), marker),
        "torch.storage._load_from_bytes": Call(G("torch.storage", "_load_from_bytes"), nested),
        "torch.jit.load": Call(G("torch.jit", "load"), marker),
        "torch.hub.load": Call(G("torch.hub", "load"), "evil/repo", "model"),
        "torch.fx reduce_graph_module": Call(G("torch.fx.graph_module", "reduce_graph_module"), {}, py),
        "torch.package importer": Call(G("torch.package.package_importer", "PackageImporter"), marker),
        "torch._C._jit_...": Call(G("torch._C", "_jit_pass_lower_all_tuples"), None),
        "torch.Tensor subclass rebuild": Call(
            G("torch._tensor", "_rebuild_from_type_v2"),
            G("torch._utils", "_rebuild_tensor_v2"),
            G("os", "system"),
            (),
            {},
        ),
        "tensor rebuilt by exec": Call(
            G("torch._tensor", "_rebuild_from_type_v2"),
            G("builtins", "exec"),
            G("torch", "Tensor"),
            (py,),
            {},
        ),
        "storage type os.system": {
            "w": tensor("0", 4, (4,), (1,), storage="FloatStorage"),
            "x": Pid(("storage", G("os", "system"), cmd, "cpu", 1)),
        },
        "persistent id string": Pid(cmd),
        "torch._utils._rebuild_device_tensor_from_numpy": Call(
            G("torch._utils", "_rebuild_device_tensor_from_numpy"), None, None, None, None
        ),
        "torch._utils._rebuild_meta_tensor_no_storage": Call(
            G("torch._utils", "_rebuild_meta_tensor_no_storage")
        ),
        "torch.nn.Module placeholderless": New(G("torch.nn.modules.module", "Module")),
        "lightning class with __setstate__": Call(G("pytorch_lightning.core.module", "LightningModule")),
        # Opcode forms of the same call.
        "INST os.system": Raw(b"(V" + cmd.encode() + b"\nios\nsystem\n"),
        "OBJ os.system": Raw(b"(cos\nsystem\nV" + cmd.encode() + b"\no"),
        "NEWOBJ subprocess.Popen": New(G("subprocess", "Popen"), argv),
        "STACK_GLOBAL os.system": Raw(b"Vos\nVsystem\n\x93V" + cmd.encode() + b"\n\x85R"),
        "EXT1 (registered or not)": Raw(b"\x82\x01V" + cmd.encode() + b"\n\x85R"),
        "EXT2": Raw(b"\x83\x01\x01V" + cmd.encode() + b"\n\x85R"),
        "EXT4": Raw(b"\x84\x01\x00\x00\x00V" + cmd.encode() + b"\n\x85R"),
        "allowed global, then os.system from the memo": Raw(
            b"ccollections\nOrderedDict\np0\n0cos\nsystem\np1\n0g1\n(V" + cmd.encode() + b"\ntR"
        ),
        "os.system as a dict key": {G("os", "system"): 1},
        "os.system inside a tensor's hooks": Call(
            G("torch._utils", "_rebuild_tensor_v2"),
            Pid(("storage", G("torch", "FloatStorage"), "0", "cpu", 4)),
            0,
            (4,),
            (1,),
            False,
            Call(G("os", "system"), cmd),
        ),
        "numpy object dtype": Call(G("numpy", "dtype"), "O8"),
        "numpy subarray dtype": Call(G("numpy", "dtype"), "(2,)O"),
        "_codecs.encode with a foreign codec": Call(G("_codecs", "encode"), py, "uu_codec"),
        "OrderedDict then BUILD __reduce__": Raw(
            b"ccollections\nOrderedDict\n)R}V__reduce__\ncos\nsystem\nsb"
        ),
    }
    return samples


PROTOCOLS = [0, 1, 2, 3, 4, 5]
LAYOUTS = ["zip", "legacy", "bare"]


def _write(path, layout: str, data: bytes):
    storages = {"0": b"\0" * 16}
    if layout == "zip":
        return torch_zip(path, data, storages)
    if layout == "legacy":
        return torch_legacy(path, data, storages)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_technique_is_refused_and_runs_nothing(tmp_path, layout, protocol):
    if layout == "bare" and protocol < 2:
        pytest.skip("a bare pickle of protocol 0/1 is not a checkpoint at all (refused as such)")
    marker = tmp_path / "MARKER"
    samples = techniques(str(marker))
    before = set(sys.modules)
    refused = {}
    for name, value in samples.items():
        path = _write(tmp_path / "evil.ckpt", layout, dumps(value, protocol))
        try:
            load_ckpt(path)
        except UnsafeCheckpointError as e:
            refused[name] = str(e)
        except ValueError as e:  # caught for the report below: only UnsafeCheckpointError is acceptable
            refused[name] = f"ValueError, not UnsafeCheckpointError: {e}"
        assert not marker.exists(), f"{name}: the payload ran"
    wrong = {name: why for name, why in refused.items() if why.startswith("ValueError, not")}
    assert not wrong, wrong
    assert set(refused) == set(samples), sorted(set(samples) - set(refused))
    assert all("evil.ckpt" in why for why in refused.values())
    assert set(sys.modules) - before == set(), "loading imported modules"


def test_corpus_size():
    # What the report counts: techniques x layouts x protocols (bare pickles from protocol 2).
    n = len(techniques("/tmp/x"))
    assert n >= 100
    assert n * (2 * len(PROTOCOLS) + len(PROTOCOLS) - 2) >= 1600
