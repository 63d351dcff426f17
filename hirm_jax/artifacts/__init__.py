"""Stage 3, what erasure hands to users: exported encoders, pipeline copies and deltas (applying
a delta needs numpy and safetensors only)."""
