"""The environment is read once, at the edge: every METIS_* variable lands in one record, and the
library reads none of them itself."""

import ast
from pathlib import Path

import pytest

from metis.budget import RequestLimits
from metis.serving.requests import BatchLimits
from metis.settings import PublicLimits, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_variable_lands_in_the_record():
    env = {"METIS_MODEL": "out/ckpt", "METIS_ROUTER": "r", "METIS_THINK_URL": "http://t", "METIS_DIRECT_URL": "http://d",
           "METIS_MAX_PROMPT_TOKENS": "4096", "METIS_PROMPT_OVERFLOW": "trim", "METIS_MAX_SECONDS": "30.5",
           "METIS_MAX_BATCH": "4", "METIS_MAX_BATCH_TOKENS": "999", "METIS_MAX_KV_TOKENS": "50000",
           "METIS_CLIENT_REQUESTS": "2", "METIS_QUEUE_SIZE": "8", "METIS_FINETUNE": "off",
           "METIS_OFFLOAD": "1", "METIS_ALLOW_CPU": "1", "METIS_DECODE_TOKENS_PER_S": "42.5"}
    assert Settings.from_env(env) == Settings(
        model="out/ckpt", router="r", think_url="http://t", direct_url="http://d",
        requests=RequestLimits(4096, "trim", 30.5), batch=BatchLimits(4, 999, 50000),
        public=PublicLimits(2, 8, finetune=False), offload=True, allow_cpu=True, decode_tokens_per_s=42.5)


def test_no_variable_means_the_library_defaults():
    assert Settings.from_env({}) == Settings()


def test_a_bad_value_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="overflow must be refuse or trim"):
        Settings.from_env({"METIS_PROMPT_OVERFLOW": "maybe"})


def test_the_library_reads_no_metis_variable_itself():
    """Only metis/settings.py (and the app and CLI, through it) read METIS_* variables."""
    readers = []
    for path in (ROOT / "metis").rglob("*.py"):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("METIS_") \
                    and " " not in node.value:
                readers.append(f"{path.relative_to(ROOT)}: {node.value}")
    assert not readers, readers
