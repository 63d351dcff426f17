"""Stage 2, erasure: concepts and prompts -> jobs and targets -> the jitted, sharded step ->
the loop with checkpoints -> the workdir (its typed on-disk contract)."""
