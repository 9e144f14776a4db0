"""``tf-diffusion serve``: the AUTOMATIC1111 web UI's HTTP API over one model, for the tools that speak it.

Built on FastAPI and uvicorn, as the web UI's own API is: the same request validation and error
behaviour come with them, its clients (the ``webuiapi`` package, Krita and Photoshop plugins, bots) see
what they expect, and both are small, well kept and installed with ``pip install -e ".[serve]"``. The web
page (Gradio, as the web UI's) is mounted on the same application at ``/`` (``ServerState(webui=True)``).

- ``app.create_app(ServerState(...))``: the application (routes, authentication, limits, errors).
- ``schema``: the request bodies, field names and defaults as the web UI takes them.
- ``generation``: a request as ``StableDiffusion.generate()`` calls, and the web UI's answer.
- ``jobs.JobQueue``: one generation at a time, a bounded queue, progress, interrupt and skip.
- ``registry.ModelRegistry``: the models folder, the LoRA and embedding folders, names confined to them.
- ``webui``: the page (txt2img, img2img with inpainting, PNG info), whose jobs go through the same queue.
- ``Server``: uvicorn running the application in a thread (tests, benchmarks) or in the foreground.

Example:
    >>> from tf_diffusion.serve import ModelRegistry, Server, ServerState
    >>> server = Server(ServerState(ModelRegistry("tiny-shapes")), port=7860).start()  # doctest: +SKIP
    >>> import webuiapi; webuiapi.WebUIApi(port=7860).txt2img(prompt="a red circle", width=64, height=64)  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time

from tf_diffusion.serve.app import ServerState, create_app
from tf_diffusion.serve.registry import ModelRegistry

__all__ = ["ModelRegistry", "Server", "ServerState", "create_app"]


class Server:
    """uvicorn serving ``create_app(state)`` on ``host:port`` (port 0: a free one, see ``port`` after start)."""

    def __init__(
        self, state: ServerState, host: str = "127.0.0.1", port: int = 7860, log_level: str = "warning"
    ):
        import uvicorn

        self.state = state
        self.app = create_app(state)
        config = uvicorn.Config(self.app, host=host, port=port, log_level=log_level, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> Server:
        """Serve in a background thread; returns once the socket listens."""
        self._thread = threading.Thread(target=self._server.run, name="tf-diffusion-serve", daemon=True)
        self._thread.start()
        deadline = time.time() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    def run(self) -> None:
        """Serve in the foreground until interrupted."""
        self._server.run()
        self.state.queue.close()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.state.queue.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
