"""`ray job submit --working-dir .` of jobs/run_sequence.py against a local `ray start --head` of its own.

The head runs on free ports with its own temp dir, so it never meets the session's `ray_cluster` (tests/conftest.py)
or another Ray on the machine. It is started with `--block` in a new process group and stopped by signalling that
group in teardown: `ray stop` would stop every Ray instance on the host, the session's own included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def job_env() -> dict[str, str]:
    # RAY_API_SERVER_ADDRESS: the session's pin (sequence.pin_state_api) would override `ray job submit --address`
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the entrypoint's `python`
    # a throwaway cluster on 127.0.0.1: no token auth, so the test does not depend on a token file on the machine
    env.update(RAY_TRAIN_V2_ENABLED="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    return env


def rest(address: str, path: str):
    """GET from the Jobs REST API (the job server of the dashboard) as JSON."""
    with urllib.request.urlopen(address + path, timeout=30) as response:
        return json.loads(response.read())


def start_head(temp: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports in its own process group; returns it and its job server address."""
    gcs, dash, client, nm, om, metrics, agent, agent_grpc, renv = free_ports(9)
    with (temp / "head.log").open("a") as log:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=3", f"--temp-dir={temp / 'ray'}",
             f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
             f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
             f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={renv}"],
            stdout=log, stderr=subprocess.STDOUT, env=job_env(), start_new_session=True, cwd=temp,
        )
    return proc, f"http://127.0.0.1:{dash}"


def stop_head(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group of the `ray start` we launched: its GCS, raylet, workers
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def why_it_exited(temp: Path) -> str:
    """What `ray start` said besides the dashboard's module-loading chatter, and Ray's own process-exit log."""
    lines = [line for line in (temp / "head.log").read_text(errors="replace").splitlines()
             if not re.search(r"INFO (head|utils)\.py", line)]
    exits = "\n".join(p.read_text(errors="replace") for p in (temp / "ray").glob("session_*/logs/ray_process_exit.log"))
    return "\n".join(lines[-40:]) + "\n" + exits[-2000:]


@pytest.fixture
def head():
    """A local head node: yields its dashboard (job server) address; all its processes are stopped afterwards.

    On a loaded box a head process (the dashboard) can die during start-up, and `ray start --block` then exits 1;
    that is the machine, not the code under test, so the start is tried up to three times (each fresh)."""
    temp = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108 chars
    proc = None
    try:
        for attempt in range(3):
            proc, address = start_head(temp)
            deadline = time.time() + 600  # a loaded 2-core box can take minutes to bring up the dashboard
            while proc.poll() is None:
                try:
                    rest(address, "/api/jobs/")  # the job server answers
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(2)
            if proc.poll() is None:
                break
            if attempt == 2:
                pytest.fail(f"ray start --head exited with {proc.returncode} three times:\n{why_it_exited(temp)}")
            stop_head(proc)
        yield address
    finally:
        if proc is not None:
            stop_head(proc)
        shutil.rmtree(temp, ignore_errors=True)


def job_exists(head: str, job_id: str) -> bool:
    try:
        rest(head, f"/api/jobs/{job_id}")
        return True
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise


def submit(cmd: list[str], head: str, job_id: str) -> subprocess.CompletedProcess:
    """`ray job submit --no-wait`, again while the head is not ready to take it: its job server answers before its
    dashboard agent (which runs jobs) has registered, and on a loaded box the server can drop the upload's
    connection. A job the server did create is never submitted twice."""
    deadline = time.time() + 600
    while True:
        done = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=900)
        if done.returncode == 0 or job_exists(head, job_id):
            return done
        transient = any(m in done.stderr for m in ("No available agent to submit job", "Connection aborted",
                                                     "RemoteDisconnected", "ConnectionError"))
        assert transient and time.time() < deadline, f"ray job submit: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        time.sleep(5)


def wait_for_job(head: str, job_id: str, limit_s: float = 1800) -> dict:
    """The job's record from the Jobs REST API once it has ended (or after `limit_s`, whatever its status)."""
    deadline = time.time() + limit_s
    while True:
        try:
            info = rest(head, f"/api/jobs/{job_id}")
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
                return info
        except OSError:  # the dashboard itself slow to answer on a loaded box: ask again
            if time.time() > deadline:
                raise
        time.sleep(5)


@pytest.mark.ray
@pytest.mark.timeout(2400)  # ~340 s quiet; the head's start-up and the job's own install of DeepSpeed's op slow a loaded box
def test_ray_job_submit_run_sequence(head, tmp_path):
    out = tmp_path / "out"
    job_id = f"saefd-test-{os.getpid()}"
    tasks = ("[{name: rule_a, format: synthetic, generator: rule_a, max_train: 16, max_test: 8},"
             " {name: rule_b, format: synthetic, generator: rule_b, max_train: 16, max_test: 8}]")
    sets = [f"output.root={out}", "output.run_name=submitted", f"model.cache_dir={tmp_path / 'cache'}",
            f"tasks.sequence={tasks}", "training.epochs=1", "training.batch_size=8", "training.max_prompt_len=48",
            "model.tiny.vocab_size=512", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
            "model.tiny.num_layers=2", "model.tiny.num_heads=2", "model.tiny.pretrain_epochs=1",
            "lora.r=4", "distributed.num_workers=[1, 1]",  # the elastic form reaches ScalingConfig as a tuple
            "distributed.max_failures=0"]
    cmd = [RAY, "job", "submit", "--address", head, "--working-dir", ".", "--runtime-env", "runtime_env.yaml",
           "--submission-id", job_id, "--no-wait", "--", "python", "jobs/run_sequence.py"]
    for item in sets:
        cmd += ["--set", item]
    done = submit(cmd, head, job_id)
    info = wait_for_job(head, job_id)
    logs = rest(head, f"/api/jobs/{job_id}/logs").get("logs", "")
    assert info["status"] == "SUCCEEDED", f"{info['status']}: {logs[-4000:]}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    results = json.loads((out / "submitted" / "results.json").read_text())
    assert results["tasks"] == ["rule_a", "rule_b"] and len(results["r_matrix"]) == 3
    assert results["config"]["distributed"]["num_workers"] == [1, 1]
    assert results["summary"]["complete"] is True and results["summary"]["bwt"] is not None
    # the job ran from the uploaded working dir (a copy under the head's temp dir), not from this checkout,
    # and the upload left outputs and virtualenvs behind
    assert info["runtime_env"]["working_dir"].startswith("gcs://")
    assert {"/runs/", "/.venv*/", "/data/", "*.safetensors"} <= set(info["runtime_env"]["excludes"])
    assert info["runtime_env"]["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert "training on 16 examples" in logs
