"""Every test runs with 8 fake CPU devices, so sharded code paths are exercised on a laptop."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after XLA_FLAGS)

assert jax.device_count() == 8, f"tests expect 8 fake CPU devices, found {jax.device_count()}"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """A tiny random CLIP text encoder folder (3 layers, width 64) with a real CLIP tokenizer."""
    from hirm_jax.encoder.clip import TextEncoderConfig
    from hirm_jax.encoder.testing import random_encoder_folder
    config = TextEncoderConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    return random_encoder_folder(tmp_path_factory.mktemp("tiny_encoder") / "encoder", config, seed=1)


@pytest.fixture(autouse=True)
def _messages_as_the_cli_shows_them():
    """The CLI's one stderr handler (hirm_jax.log), so tests read messages where users see them."""
    from hirm_jax import log
    log.install_handler()


@pytest.fixture(autouse=True)
def _user_errors_print_one_line(monkeypatch):
    """Every test starts with --debug off (HIRM_JAX_DEBUG=0; a test or a command's --debug that
    sets it is undone afterwards), so exit codes and one-line errors are what users get."""
    monkeypatch.setenv("HIRM_JAX_DEBUG", "0")


# `make test` sets HIRM_JAX_NO_SKIP=1: there the tests plain pytest may skip (NudeNet, the
# transformers 4.x environment, torch) must run, and any skip but those listed fails the session.
ALLOWED_SKIPS = ("root writes into read-only folders",)  # a root CI user cannot make a folder read-only
_unexpected_skips: list = []


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("HIRM_JAX_NO_SKIP") == "1":
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips:
        print("\nHIRM_JAX_NO_SKIP=1 and these tests skipped (make test runs every test):\n  "
              + "\n  ".join(_unexpected_skips))
        session.exitstatus = 1


def pytest_collection_modifyitems(items):
    """The longest tests (a `seconds=` on their `slow` mark) first, longest first: under
    `make test`'s two workers (pytest-xdist) they run beside the rest instead of after it."""
    def seconds(item):
        mark = item.get_closest_marker("slow")
        return mark.kwargs.get("seconds", 0) if mark else 0
    items.sort(key=seconds, reverse=True)  # stable: the others keep their order
