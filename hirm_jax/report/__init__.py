"""Stage 4, text-space reports of an erasure (no images): the text report, the loss curve, joint
erasure against averaged deltas."""
