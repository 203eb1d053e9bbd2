"""Two nodes on one machine: two torchrun agents (``--nnodes 2``, a c10d rendezvous on 127.0.0.1, one
gloo process each) train a DDP and an FSDP run; their states of step 2 are resumed on one node with two
processes and on one process (DCP reshards the FSDP state), and each resumed run ends bit-identical to
the two-node run. Then elastic ``--nnodes 1:2``: a node is lost mid-run (its agent and its worker
SIGKILLed), the other agent re-rendezvous alone and its worker resumes by itself from the newest state
on one process, again ending bit-identical. Results are read from the files the runs write (gloo may
abort at process exit)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from maskdit_fast.storage import latest_training_state, read_meta
from maskdit_fast.train.trainer import train
from tests.helpers import TINY_RUN, tiny_config
from tests.train.test_distributed import copy_run_until, final_state, torchrun
from tests.train.test_preemption import assert_same_training_state

ROOT = Path(__file__).resolve().parents[2]
DIST_WORKER, FAULT_WORKER = Path(__file__).with_name("dist_worker.py"), Path(__file__).with_name("fault_worker.py")
STATES = ["train.ckpt_every=2", "train.keep_last=0"]  # TINY_RUN's 6 steps, states of steps 2, 4 and 6
MODES = ("ddp", "fsdp")
# short rendezvous timeouts: complete a round 1 s after the minimum of nodes joined; a node whose agent sent
# no keep-alive for 3 s is dead (torch's defaults: 30 s and 3 x 5 s)
RDZV_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(nnodes: str, worker: list[str], logs: Path, *options: str, timeout: float = 300) -> list[tuple[int, str]]:
    """Two torchrun agents of one process each, as two nodes joining at 127.0.0.1:PORT; agent "a" hosts
    the rendezvous store (as the node named in --rdzv-endpoint does), agent "b" does not; each agent's
    environment names its node (``FAULT_NODE``). Returns each agent's (exit status, log)."""
    port, procs = free_port(), []
    for node, is_host in (("a", 1), ("b", 0)):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two-nodes-{port}",
                   "--rdzv-conf", f"is_host={is_host},{RDZV_CONF}", "--local-addr", "127.0.0.1", *options, *worker]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FAULT_NODE": node}
        with (logs / f"node-{node}.log").open("w") as sink:
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, (logs / f"node-{node}.log").read_text()) for proc, node in zip(procs, "ab")]


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory) -> Path:
    """A DDP and an FSDP run of 6 steps on two nodes (the uninterrupted runs), in one launch."""
    d = tmp_path_factory.mktemp("two-nodes")
    jobs = [{"train": str(d / mode), "overrides": [*STATES, f"parallel={mode}"]} for mode in MODES]
    (d / "jobs.json").write_text(json.dumps(jobs))
    agents = two_agents("2", [str(DIST_WORKER), str(d / "jobs.json")], d)
    for mode in MODES:
        assert final_state(d / mode, 6)["world_size"] == 2, agents[0][1][-4000:]
    return d


def test_two_node_states_resume_on_one_node_and_on_one_process_bit_for_bit(two_node_runs, tmp_path):
    for mode in MODES:
        for where in ("one-node", "one-process"):
            copy_run_until(two_node_runs / mode, tmp_path / f"{mode}-{where}", 2)
    jobs = [{"train": str(tmp_path / f"{mode}-one-node"), "overrides": [*STATES, f"parallel={mode}"], "resume": True}
            for mode in MODES]
    done = torchrun(jobs, tmp_path / "jobs.json", timeout=300)  # --standalone --nproc_per_node 2
    for mode in MODES:
        assert final_state(tmp_path / f"{mode}-one-node", 6)["world_size"] == 2, done.stderr[-4000:]
        assert_same_training_state(two_node_runs / mode, tmp_path / f"{mode}-one-node", 6)
        # one process: the global batch of 8 in the two micro-batches of 4 the two ranks had (kept by itself)
        train(tiny_config(*STATES, f"parallel={mode}"), tmp_path / f"{mode}-one-process", resume=True, progress=False)
        assert final_state(tmp_path / f"{mode}-one-process", 6)["world_size"] == 1
        assert_same_training_state(two_node_runs / mode, tmp_path / f"{mode}-one-process", 6)


def test_elastic_run_loses_a_node_and_goes_on_alone_from_the_last_state(two_node_runs, tmp_path):
    out = tmp_path / "elastic"
    argv = ["--out", str(out), "--no-progress", "--eval-samples", "0", *TINY_RUN, *STATES, "parallel=fsdp"]
    spec = tmp_path / "faults.json"
    spec.write_text(json.dumps({"argv": argv, "kill_node": {"node": "b", "step": 5}}))  # after the state of step 4
    (code_a, text), (code_b, _) = two_agents("1:2", [str(FAULT_WORKER), str(spec)], tmp_path, "--max-restarts", "1")
    assert code_b == -9 and code_a == 0, text[-4000:]
    assert "restarted by torchrun (restart 1): resuming from the newest training state" in text, text[-4000:]
    assert "step-0000004 at step 4 (written by 2 processes)" in text
    assert "resuming a state of 2 processes on 1: micro-batches of 4 kept, 2 per process and step" in text
    assert json.loads((out / "config.json").read_text()) == json.loads((two_node_runs / "fsdp" / "config.json").read_text())
    assert final_state(out, 6)["world_size"] == 1 and read_meta(latest_training_state(out))["micro_batch"] == 4
    assert_same_training_state(two_node_runs / "fsdp", out, 6)


def test_resumed_micro_batch_keeps_the_saved_split_when_it_fits(tmp_path):
    from maskdit_fast.train.loop import resumed_micro_batch

    def state(world_size: int, micro_batch: int | None, used: int | None = None) -> Path:
        path = tmp_path / f"step-{world_size}-{micro_batch}-{used}"
        path.mkdir(exist_ok=True)
        meta = {"world_size": world_size, "config": {"train": {"micro_batch": micro_batch}}}
        (path / "meta.json").write_text(json.dumps(meta if used is None else {**meta, "micro_batch": used}))
        return path

    assert resumed_micro_batch(state(2, None), 8, 1, None) == 4  # 2 ranks x 4 -> 1 process x 2 x 4
    assert resumed_micro_batch(state(4, None), 16, 2, None) == 4
    assert resumed_micro_batch(state(2, 2), 8, 1, None) == 2
    assert resumed_micro_batch(state(2, None), 8, 1, 8) == 8  # set by the user: as set
    assert resumed_micro_batch(state(1, None), 8, 2, None) is None  # 8 does not fit 4 per rank: the default
    assert resumed_micro_batch(state(2, 4), 8, 2, None) is None  # same world size: as configured
    assert resumed_micro_batch(None, 8, 1, None) is None
    # 4 ranks -> 2 (micro-batches of 4 kept: 2 per rank) -> 1: the size used, not the configured one
    assert resumed_micro_batch(state(2, None, used=4), 16, 1, None) == 4
