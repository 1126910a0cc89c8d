"""GSM8K ships inside the repository: a fresh clone's environment finds it by default."""

from __future__ import annotations

from environments.gsm8k_server import DEFAULT_DATA_PATH, load_gsm8k
from tests.helpers import ROOT


def test_default_data_is_inside_the_repository_and_loads():
    assert DEFAULT_DATA_PATH.resolve().is_relative_to(ROOT)
    assert (DEFAULT_DATA_PATH / "LICENSE").read_text().startswith("MIT")
    data = load_gsm8k(DEFAULT_DATA_PATH)
    assert (len(data["train"]), len(data["test"])) == (7473, 1319)
    assert "####" in data["test"][0]["answer"]
