"""`transformers serve` for the exported experts on a machine without a working torchvision.

`AutoProcessor` builds Qwen2.5-VL's processor with a video processor, and transformers' only video
processor for it needs torchvision, which has no build for this project's CPU torch wheel. Where
torchvision imports (any GPU machine) run plain `transformers serve` or vLLM instead. Here the one
change is the processor: Qwen2.5-VL's own class with its image processor and tokenizer and no video
processor; the server, model loading, generation and streaming are transformers' unchanged.

    python deploy/transformers_serve.py OUT/think --host 127.0.0.1 --port 8001 --device cpu

`StockServer` runs it as a child process on 127.0.0.1 for the tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without the video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def main(argv: list[str]) -> None:
    if importlib.util.find_spec("torchvision") is None:
        AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)
    from transformers.cli.transformers import main as transformers_cli

    sys.argv = ["transformers", "serve", *argv]
    transformers_cli()


@contextlib.contextmanager
def stock_servers(*model_dirs, threads: int = 1):
    """Several servers started side by side (each load takes minutes on a busy CPU)."""
    servers = [StockServer(d, threads) for d in model_dirs]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            if hasattr(server, "process"):
                server.__exit__()


class StockServer:
    """`transformers serve` pinned to one exported expert, in a child process, for a `with` block.

    threads: torch threads of the server (1 matches the local engine's choice for small models).
    """

    def __init__(self, model_dir: str | Path, threads: int = 1, start_timeout_s: float = 900.0):
        self.model_dir, self.threads, self.start_timeout_s = str(model_dir), threads, start_timeout_s

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> StockServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1",
               "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="transformers-serve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.model_dir, "--host", "127.0.0.1", "--port", str(self.port),
             "--device", "cpu", "--log-level", "error"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        """The pinned model loads before the server listens, so an answer to /health means ready."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}; log: "
                                   + Path(self.log.name).read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"transformers serve did not start in {self.start_timeout_s:g} s")
            time.sleep(0.5)

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


if __name__ == "__main__":
    main(sys.argv[1:])
