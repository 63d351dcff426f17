"""Stage 1, the text encoders: Flax CLIP and T5, their one mapping table each, on-disk layouts,
weight files, tokenizers. Imports only the core modules (errors, fileio, config_lib, ...)."""
