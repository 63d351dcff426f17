"""A real multi-process run: 2 CPU processes x 2 devices, connected by jax.distributed on localhost,
erase a batch of concepts into one shared workdir; the per-concept deltas must equal a
single-process, single-device run of the same config, and each process must have materialised
only the shards its own devices hold."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hirm_jax.run import train_and_evaluate
from tests.distributed_worker import CONCEPTS, make_config
from tests.test_scale import assert_close, mesh_of, trained

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
TIMEOUT_S = 600  # both workers together; a run takes well under a minute on 2 CPU cores

# jax.make_mesh lays the global devices (process 0's, then process 1's) out in order, so the
# mesh's FIRST axis is the one that crosses the process boundary.
MESHES = {
    "concepts_across_processes": "2,2,1",  # jobs split over processes: outputs not fully addressable
    "data_across_processes": "1,2,2",  # each step's prompts split over processes: gradients all-reduced
}
CASES = {  # (mesh, train.concepts_per_chunk)
    "concepts_across_processes": (MESHES["concepts_across_processes"], 0),
    "data_across_processes": (MESHES["data_across_processes"], 0),
    "chunks_of_2_across_processes": (MESHES["concepts_across_processes"], 2),  # 2 chunks, one job per process
    "auto_chunk_across_processes": (MESHES["concepts_across_processes"], -1),  # the processes agree on a fit
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(encoder_dir, workdir: Path, mesh: str, chunk: int, logs: Path) -> list[dict]:
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for i in range(NUM_PROCESSES):
        env = dict(os.environ,
                   JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(NUM_PROCESSES),
                   JAX_PROCESS_ID=str(i),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        stdout, stderr = open(logs / f"worker{i}.out", "w"), open(logs / f"worker{i}.err", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(encoder_dir), str(workdir), mesh,
                                        str(logs / f"worker{i}.json"), str(chunk)],
                                       cwd=REPO, env=env, stdout=stdout, stderr=stderr), stdout, stderr))
    deadline, failed = time.monotonic() + TIMEOUT_S, None
    while any(p.poll() is None for p, _, _ in procs):
        codes = [p.poll() for p, _, _ in procs]
        if any(c not in (None, 0) for c in codes) and failed is None:
            failed = time.monotonic()  # give the other worker a moment to fail on its own, then stop it
        if time.monotonic() > deadline or (failed is not None and time.monotonic() > failed + 20):
            for p, _, _ in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p, stdout, stderr in procs:
        p.wait()
        stdout.close()
        stderr.close()
    codes = [p.returncode for p, _, _ in procs]
    if codes != [0] * NUM_PROCESSES:
        tails = "\n".join(f"----- worker {i} (exit {c}) stderr -----\n{(logs / f'worker{i}.err').read_text()[-6000:]}"
                          for i, c in enumerate(codes))
        pytest.fail(f"multi-process run failed (exit codes {codes}, timeout {TIMEOUT_S}s):\n{tails}", pytrace=False)
    return [json.loads((logs / f"worker{i}.json").read_text()) for i in range(NUM_PROCESSES)]


@pytest.fixture(scope="module")
def single_process_run(encoder_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("distributed_reference") / "run"
    train_and_evaluate(make_config(encoder_dir), workdir, mesh=mesh_of(1))
    return workdir


@pytest.mark.parametrize("mesh, chunk", list(CASES.values()), ids=list(CASES))
@pytest.mark.slow
def test_two_processes_equal_single_process(encoder_dir, single_process_run, tmp_path, mesh, chunk):
    workdir = tmp_path / "run"
    reports = run_workers(encoder_dir, workdir, mesh, chunk, tmp_path / "logs")

    assert [r["process_index"] for r in reports] == list(range(NUM_PROCESSES))
    for r in reports:
        assert (r["status"], r["process_count"], r["device_count"], r["local_device_count"]) == \
            ("done", NUM_PROCESSES, NUM_PROCESSES * DEVICES_PER_PROCESS, DEVICES_PER_PROCESS)
        for leaf in r["placed"]:
            # a process holds shards on its own devices only, and read only those slices of the host arrays
            assert leaf["addressable"] == DEVICES_PER_PROCESS and not leaf["fully_addressable"], leaf
            assert leaf["requested"] == leaf["held"], leaf
    if MESHES["concepts_across_processes"] == mesh:
        # 3 jobs padded to 4 (chunks of 2: 2 slots), split over concept=2: process 0 holds the
        # first half of the slots, process 1 the second
        slots = chunk if chunk > 0 else 4  # (-1: everything fits, so one chunk of 3 jobs in 4 slots)
        per_job = [[leaf for leaf in r["placed"] if leaf["spec"] == "P('concept',)"] for r in reports]
        assert per_job[0] and len(per_job[0]) == len(per_job[1])
        for i, leaves in enumerate(per_job):
            for leaf in leaves:
                assert leaf["shape"][0] == slots
                half = slots // 2
                assert {json.dumps(json.loads(h)[0]) for h in leaf["held"]} == {json.dumps([half * i, half * (i + 1)])}, leaf

    # one set of outputs in the shared workdir, equal to the single-process run
    index = json.loads((workdir / "index.json").read_text())
    assert sorted(index["concepts"]) == sorted(CONCEPTS)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    chunks = 2 if chunk == 2 else 1
    assert [(r.get("chunk", 0), r["step"]) for r in rows] == [(c, s) for c in range(chunks) for s in range(1, 7)], \
        "every step is logged once (by one process)"
    for name in CONCEPTS:
        assert_close(trained(workdir, name), trained(single_process_run, name))
