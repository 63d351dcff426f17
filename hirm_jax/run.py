"""The erase command as a function: train, then the loss curve and the text report, in memory.

    from hirm_jax.run import train_and_evaluate
    result = train_and_evaluate(config, workdir)       # erase.loop.TrainResult; result["status"]

`hirm-jax erase --config=... --workdir=...` calls this. The trainer (`erase.loop.train`) hands
each finished job to the text report as its chunk ends (`report.textreport.TrainingReporter`),
so nothing written a moment earlier is read back; `keep_trained=True` also keeps every job's
trained leaves in the result (`result.erased_run(job)`, for an export in the same process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import ml_collections

from hirm_jax.erase import sharding
from hirm_jax.erase.loop import TrainResult, train
from hirm_jax.erase.workdir import Workdir
from hirm_jax.report.loss_plot import plot_loss
from hirm_jax.report.textreport import TrainingReporter


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, stop_after: Optional[int] = None,
                       mesh=None, keep_trained: bool = False) -> TrainResult:
    """Erase (see `erase.loop.train` for `stop_after`, `mesh`, `keep_trained`), then write loss.png
    and, when config.report.enabled, the text report into the workdir."""
    reporter = TrainingReporter() if config.report.enabled else None
    result = train(config, workdir, stop_after=stop_after, mesh=mesh, keep_trained=keep_trained, on_job=reporter)
    if result.status == "done" and sharding.is_writer():
        plot_loss(Workdir(workdir))
        if reporter is not None:
            reporter.finish(workdir, joint=result.plan.config.joint)
    sharding.barrier("hirm_jax report done")
    return result
