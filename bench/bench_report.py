"""The text report of a batch erasure (one delta per concept), CLIP-L shapes, random weights:
seconds per concept, and where they go.

    python bench/bench_report.py [--n 4] [--ordinary 220] [--repeats 3]

Erases N concepts in one batch run (1 epoch: the report's cost does not depend on training),
then times `textreport.report_for_run` on the workdir `--repeats` times (median). Each concept's
report encodes its target prompts, the held-out paraphrases and the ordinary prompts with the
erased encoder; the base encoder's side is shared by all concepts. Not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from hirm_jax.encoder.clip import TextEncoderConfig
from hirm_jax.encoder.testing import random_encoder_folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--ordinary", type=int, default=220, help="report.max_ordinary_prompts")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from hirm_jax.config_lib import base_config
    from hirm_jax.report.textreport import report_for_run
    from hirm_jax.run import train_and_evaluate

    root = Path(tempfile.mkdtemp(prefix="bench_report_"))
    base = random_encoder_folder(root / "clip_l", TextEncoderConfig.clip_l())
    names = [f"concept number {i}" for i in range(args.n)]
    c = base_config()
    c.encoder.path, c.encoder.component = str(base), ""
    c.concepts = tuple(names)
    c.super_categories = {name: "painting" for name in names}
    c.joint = False
    c.train.epochs = 1
    c.report.enabled = False
    c.report.max_ordinary_prompts = args.ordinary
    train_and_evaluate(c, root / "run")
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        reports = report_for_run(root / "run")
        times.append(time.perf_counter() - t0)
    sets = reports[0]["sets"]
    counts = {name: s["num_prompts"] for name, s in sets.items()}
    total = statistics.median(times)
    print(f"Text report of a batch erasure, CLIP-L shapes, N={args.n}, prompts per concept {counts}; "
          f"median of {args.repeats}")
    print("| N | report s (all) | s per concept | runs s |")
    print("|---|---|---|---|")
    print(f"| {args.n} | {total:.1f} | {total / args.n:.2f} | {', '.join(f'{t:.1f}' for t in times)} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
