"""The errors a user can cause (bad config, files, prompts), which the CLI reports in one line."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from hirm_jax.config_lib import ConfigError
    from hirm_jax.tokenizer import PromptTooLongError
    from hirm_jax.weights import WeightsError
    found = [ConfigError, PromptTooLongError, WeightsError, FileNotFoundError, FileExistsError]
    for module, name in (("hirm_jax.delta", "DeltaError"), ("hirm_jax.export", "RunError"),
                         ("hirm_jax.train", "NonFiniteLossError")):
        found.append(getattr(__import__(module, fromlist=[name]), name))
    return tuple(found)


USER_ERRORS = _user_errors()
