"""A stand-in for TF Serving's model server, for tests: its REST predict API over a SavedModel folder.

TF Serving's binary (``tensorflow_model_server``) comes from Google's apt repository or a Docker image, neither
reachable from the test machines, so the tests of ``tf-diffusion serve --backend tf-serving://`` talk to this:
the same URLs (``GET /v1/models/NAME[/versions/N]``, ``POST .../NAME[/versions/N]:predict``), the columnar
request format (``{"signature_name", "inputs"}``), the answer's shape (``{"outputs": {...}}``, or the bare value
for a signature with one output), binary strings of outputs named ``*_bytes`` as ``{"b64": ...}``, and errors as
``{"error": "..."}`` with HTTP 400 / 404, as TF Serving's REST API documents them.
"""

from __future__ import annotations

import base64
import json
import pathlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:predict)?$")


class StandIn:
    """Serve ``base`` (``base/<version>/saved_model.pb``) as model ``name`` on 127.0.0.1 (a free port)."""

    def __init__(self, base, name: str):
        import tensorflow as tf

        self.tf = tf
        self.name = name
        self.versions = {
            int(p.name): tf.saved_model.load(str(p))
            for p in pathlib.Path(base).iterdir()
            if p.name.isdigit() and (p / "saved_model.pb").is_file()
        }
        self.calls: list[tuple[str, dict]] = []  # (signature, inputs) of every predict call
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()

    def _model(self, name: str, version: str | None):
        if name != self.name or not self.versions:
            return None, f"Servable not found for request: Latest({name})"
        key = max(self.versions) if version is None else int(version)
        if key not in self.versions:
            return None, f"Servable not found for request: Specific({name}, {version})"
        return self.versions[key], None

    def predict(self, model, body: dict) -> dict:
        tf = self.tf
        name = body.get("signature_name", "serving_default")
        if name not in model.signatures:
            raise KeyError(f'Serving signature name: "{name}" not found in signature def')
        fn = model.signatures[name]
        specs = fn.structured_input_signature[1]
        inputs = body.get("inputs")
        if not isinstance(inputs, dict):
            raise ValueError("Missing 'inputs' or 'instances' key")
        missing = sorted(set(specs) - set(inputs))
        if missing:
            raise ValueError(f"Missing input(s): {missing}")
        self.calls.append((name, inputs))
        args = {k: tf.constant(np.asarray(inputs[k]), dtype=spec.dtype) for k, spec in specs.items()}
        outputs = {}
        for key, value in fn(**args).items():
            array = value.numpy()
            if key.endswith("_bytes"):
                outputs[key] = [{"b64": base64.b64encode(v).decode("ascii")} for v in array.ravel()]
            elif array.dtype == object:
                outputs[key] = [v.decode("utf-8") for v in array.ravel()]
            else:
                outputs[key] = array.tolist()
        return {"outputs": outputs if len(outputs) > 1 else next(iter(outputs.values()))}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, verb: str):
                match = _PATH.match(self.path)
                if match is None or (match["verb"] is not None) != (verb == "POST"):
                    self._answer(404, {"error": f"Malformed request: {verb} {self.path}"})
                    return None
                model, error = standin._model(match["name"], match["version"])
                if model is None:
                    self._answer(404, {"error": error})
                return model

            def do_GET(self):
                if self._route("GET") is not None:
                    self._answer(200, {"model_version_status": [{"state": "AVAILABLE"}]})

            def do_POST(self):
                model = self._route("POST")
                if model is None:
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    self._answer(200, standin.predict(model, body))
                except Exception as e:  # TF Serving answers every bad request with 400 and its message
                    self._answer(400, {"error": str(e)})

        return Handler
