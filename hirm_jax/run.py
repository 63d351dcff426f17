"""The erase command as a function: train, then the loss curve and the text report, in memory.

    from hirm_jax.run import train_and_evaluate
    result = train_and_evaluate(config, workdir)       # erase.loop.TrainResult; result["status"]

`hirm-jax erase --config=... --workdir=...` calls this. The trainer (`erase.loop.train`) hands
each finished job to the text report as its chunk ends (`report.textreport.TrainingReporter`),
so nothing written a moment earlier is read back; `keep_trained=True` also keeps every job's
trained leaves in the result (`result.erased_run(job)`, for an export in the same process).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import ml_collections

from hirm_jax import config_lib, log
from hirm_jax.erase import sharding
from hirm_jax.erase.loop import SummaryMapping, TrainResult, train
from hirm_jax.erase.workdir import Workdir
from hirm_jax.report.loss_plot import plot_loss
from hirm_jax.report.textreport import TrainingReporter

_log = log.get(__name__)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, stop_after: Optional[int] = None,
                       mesh=None, keep_trained: bool = False) -> "TrainResult | ComponentsResult":
    """Erase (see `erase.loop.train` for `stop_after`, `mesh`, `keep_trained`), then write loss.png
    and, when config.report.enabled, the text report into the workdir. A config with
    `components` erases each component in turn and returns a `ComponentsResult`."""
    if config.components:
        return _train_components(config, Path(workdir), stop_after, mesh, keep_trained)
    reporter = TrainingReporter() if config.report.enabled else None
    result = train(config, workdir, stop_after=stop_after, mesh=mesh, keep_trained=keep_trained, on_job=reporter)
    if result.status == "done" and sharding.is_writer():
        plot_loss(Workdir(workdir))
        if reporter is not None:
            reporter.finish(workdir, joint=result.plan.config.joint)
    sharding.barrier("hirm_jax report done")
    return result


@dataclasses.dataclass(frozen=True)
class ComponentsResult(SummaryMapping):
    """A several-encoder erase: one TrainResult per component. As a mapping: status and the
    components' summaries (the 0.1 return value's shape)."""
    workdir: Path
    components: dict  # component -> TrainResult (those trained in this call)
    status: str

    @property
    def summary(self) -> dict:
        return dict(status=self.status, components={c: dict(r) for c, r in self.components.items()})

    def erased_runs(self) -> list:
        """Every component's ErasedRun, in memory (needs keep_trained=True)."""
        return [result.erased_run() for result in self.components.values()]


def _train_components(config: ml_collections.ConfigDict, workdir: Path, stop_after, mesh,
                      keep_trained: bool) -> ComponentsResult:
    """Each component into WORKDIR/components/<component>/ (each resumable on its own), after
    the whole config is checked and recorded in WORKDIR/config.json."""
    config_lib.validate(config)
    wd = Workdir(workdir)
    wd.check_kind()
    resolved = json.loads(config.to_json())
    wd.check_same_config(resolved)
    if sharding.is_writer():
        wd.path.mkdir(parents=True, exist_ok=True)
        wd.write_config(resolved)
    results, status = {}, "done"
    for component, component_wd in wd.component_workdirs().items():
        _log.info(f"component {component}")
        results[component] = train_and_evaluate(config_lib.component_config(config, component), component_wd.path,
                                                stop_after=stop_after, mesh=mesh, keep_trained=keep_trained)
        if results[component].status != "done":
            status = results[component].status
            break
    return ComponentsResult(wd.path, results, status)
