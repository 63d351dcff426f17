"""Stage 5, images: diffusers pipelines (torch) with HiRM deltas applied, prompt files, seeds."""
