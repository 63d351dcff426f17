"""The errors a user can cause (bad config, files, prompts), which the CLI reports in one line.

Matched lazily: an error class can only have been raised if its module was imported, so
`hirm-jax apply` stays free of JAX.
"""

from __future__ import annotations

import sys

USER_ERROR_CLASSES = (
    ("hirm_jax.config_lib", "ConfigError"),
    ("hirm_jax.tokenizer", "PromptTooLongError"),
    ("hirm_jax.weights", "WeightsError"),
    ("hirm_jax.delta", "DeltaError"),
    ("hirm_jax.export", "RunError"),
    ("hirm_jax.train", "NonFiniteLossError"),
    ("hirm_jax.generate", "GenerationError"),
    ("hirm_jax.evaluation.suites", "SuiteError"),
    ("hirm_jax.world", "WorldError"),
)


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, FileExistsError)):
        return True
    for module, name in USER_ERROR_CLASSES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False
