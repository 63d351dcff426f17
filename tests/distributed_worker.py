"""One process of a real multi-process run (see tests/test_distributed.py).

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
    python tests/distributed_worker.py ENCODER_DIR WORKDIR MESH OUT_JSON CONCEPTS_PER_CHUNK

MESH is "concept,data,fsdp" (e.g. "2,2,1"). The worker runs `train_and_evaluate` on the config
of `make_config` and writes OUT_JSON: what `sharding.put` placed and which slices of the host
arrays it asked for (each process must materialise only the shards its devices hold).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CONCEPTS = ("Van Gogh", "Monet", "Picasso")
TEMPLATES = ("{}", "a painting by {}")  # 2 prompts per job: the batch splits over data=2


def make_config(encoder_dir, concept=1, data=1, fsdp=1, concepts_per_chunk=0):
    """The batch (joint=False) config every process of the test runs."""
    from configs import tiny  # noqa: PLC0415
    c = tiny.get_config("hirm_s")
    c.encoder.path = str(encoder_dir)
    c.concepts = CONCEPTS
    c.super_categories = {name: "painting" for name in CONCEPTS}
    c.templates = TEMPLATES
    c.joint = False
    c.train.epochs = 6
    c.train.log_every = 3
    c.train.checkpoint_every = 3
    c.report.enabled = False
    c.train.concepts_per_chunk = concepts_per_chunk
    c.mesh.concept, c.mesh.data, c.mesh.fsdp = concept, data, fsdp
    return c


def _slices(index) -> list:
    return [[s.start, s.stop] if isinstance(s, slice) else s for s in index]


def main(argv: list[str]) -> int:
    encoder_dir, workdir, mesh, out, chunk = argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # noqa: PLC0415  (after the environment)

    from hirm_jax.erase import sharding  # noqa: PLC0415
    from hirm_jax.run import train_and_evaluate  # noqa: PLC0415

    placed, requested = [], []
    make_array = jax.make_array_from_callback

    def recording_make_array(shape, array_sharding, callback, *args, **kwargs):
        asked = []
        requested.append(asked)
        return make_array(shape, array_sharding, lambda index: (asked.append(_slices(index)), callback(index))[1],
                          *args, **kwargs)

    put = sharding.put

    def recording_put(tree, shardings):
        start = len(requested)
        result = put(tree, shardings)
        leaves = jax.tree_util.tree_leaves(result)
        assert len(requested) - start == len(leaves), "sharding.put no longer calls make_array_from_callback per leaf"
        for leaf, asked in zip(leaves, requested[start:]):
            placed.append(dict(
                shape=list(leaf.shape), spec=str(leaf.sharding.spec), addressable=len(leaf.addressable_shards),
                fully_addressable=bool(leaf.is_fully_addressable),
                held=sorted({json.dumps(_slices(s.index)) for s in leaf.addressable_shards}),
                requested=sorted({json.dumps(index) for index in asked})))
        return result

    jax.make_array_from_callback = recording_make_array
    sharding.put = recording_put
    concept, data, fsdp = (int(x) for x in mesh.split(","))
    summary = train_and_evaluate(make_config(encoder_dir, concept, data, fsdp, int(chunk)), workdir)
    report = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                  device_count=jax.device_count(), local_device_count=jax.local_device_count(),
                  status=summary["status"], placed=placed)
    Path(out).write_text(json.dumps(report))
    print(f"worker {jax.process_index()}: done", file=sys.stderr)
    return 0


if __name__ == "__main__":  # run with PYTHONPATH=<repo root> (for `configs`), as the test does
    sys.exit(main(sys.argv[1:]))
