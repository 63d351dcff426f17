"""loss.png of an erase workdir: the misdirection (and preservation) loss per step.

    plot_loss(Workdir("workdirs/vangogh"))
"""

from __future__ import annotations

import numpy as np

from hirm_jax.erase.workdir import Workdir
from hirm_jax.fileio import atomic_file


def plot_loss(wd: Workdir) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = wd.read_metrics()
    last = {(r.get("chunk", 0), r["step"]): r for r in rows}  # a resumed run may log a step twice: keep the last
    by_step = {}  # chunked runs: the mean over chunks
    for (_, step), r in last.items():
        by_step.setdefault(step, []).append(r)
    by_step = {s: {k: float(np.mean([r[k] for r in rs])) for k in ("misdirection", "preservation")}
               for s, rs in by_step.items()}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, [by_step[s]["misdirection"] for s in steps], label="misdirection")
    if any(by_step[s]["preservation"] for s in steps):
        ax.plot(steps, [by_step[s]["preservation"] for s in steps], label="preservation")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over jobs)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(wd.loss_plot_path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
