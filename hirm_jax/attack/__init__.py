"""Stage between the encoders and erasure: prompt attacks on an erased text encoder, in text
space (GCG-style token search, continuous soft prompts, probes from a file). Imports only the
encoder stage and the core, so the erase loop can call it (robust HiRM)."""
