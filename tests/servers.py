"""Real OpenAI-compatible servers on 127.0.0.1 for the tests and the benchmark: llama-cpp-python's
own `python -m llama_cpp.server` (its `server` extra) serving a GGUF file."""

import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A llama_cpp.server process. Flash attention over an f16 KV cache, as the local backend uses, so the two agree."""

    def __init__(self, model, port: int | None = None, threads: int | None = None, embedding: bool = False):
        from magpie_local.cpu import default_threads

        self.model, self.port, self.embedding = model, port or free_port(), embedding
        self.threads = threads or default_threads()  # the cores this process may use (one an xdist worker)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
                "--port", str(self.port), "--n_ctx", "1024", "--type_k", "1", "--type_v", "1", "--flash_attn", "true",
                "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
                *(["--embedding", "true"] if self.embedding else [])]

    def start(self) -> "Server":
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "llama_cpp.server exited while starting"
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise AssertionError(f"{self.command()[0]} did not start in 120 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class LlamaServer(Server):
    """llama.cpp's own `llama-server` binary: continuous batching over `slots` sequences."""

    def __init__(self, binary, model, port: int | None = None, threads: int | None = None, slots: int = 4):
        super().__init__(model, port, threads)
        self.binary, self.slots = str(binary), slots

    def command(self) -> list[str]:
        return [self.binary, "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                "-c", str(1024 * self.slots), "-np", str(self.slots), "-t", str(self.threads)]
