"""The app serves nothing outside assets/ and the upload cache; no code path runs remote code."""

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from loadtest import free_port

from metis.ui import build_demo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def url(engine):
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(ROOT / "assets" / "examples")])
    yield demo.local_url.rstrip("/")
    demo.close()


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize("path", ["/etc/passwd", str(ROOT / "app.py"), str(ROOT / "metis" / "loading.py"),
                                  str(ROOT / "assets" / "examples" / ".." / ".." / "app.py")])
def test_files_outside_allowed_paths_are_refused(url, path):
    assert status(f"{url}/gradio_api/file={path}") in (403, 404)


def test_bundled_examples_are_served(url):
    assert status(f"{url}/gradio_api/file={ROOT / 'assets' / 'examples' / 'chart.png'}") == 200


def test_no_remote_code_or_pickle_loading_in_the_project():
    found = subprocess.run(
        # tests/ may pickle the project's own objects on purpose (ZeroGPU pickles arguments and events)
        ["git", "grep", "-nE", r"trust_remote_code *= *True|torch\.load\(|pickle\.load", "--", "*.py", ":!tests/"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout
    assert found == ""
