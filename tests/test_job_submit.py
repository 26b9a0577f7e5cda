"""`ray job submit --working-dir .` of jobs/run_sequence.py against a local `ray start --head` of its own.

The head runs on free ports with its own temp dir, so it never meets the session's `ray_cluster` (tests/conftest.py)
or another Ray on the machine. It is started with `--block` in a new process group and stopped by signalling that
group in teardown: `ray stop` would stop every Ray instance on the host, the session's own included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


@pytest.fixture
def head():
    """A local head node: yields its dashboard (job server) address; all its processes are stopped afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108 chars
    gcs, dash, client, nm, om, metrics, agent, agent_grpc, renv = free_ports(9)
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=3", f"--temp-dir={temp / 'ray'}",
         f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
         f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={renv}"],
        stdout=log, stderr=subprocess.STDOUT, env=job_env(), start_new_session=True, cwd=temp,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 600  # a loaded 2-core box can take minutes to bring up the dashboard
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {proc.returncode}: {(temp / 'head.log').read_text()[-3000:]}")
            try:
                rest(address, "/api/jobs/")  # the job server answers
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        yield address
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the group of the `ray start` we launched: its GCS, raylet, workers
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


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
           "--submission-id", job_id, "--", "python", "jobs/run_sequence.py"]
    for item in sets:
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=1500)
    info = rest(head, f"/api/jobs/{job_id}")
    logs = rest(head, f"/api/jobs/{job_id}/logs").get("logs", "")
    assert info["status"] == "SUCCEEDED", f"{info['status']}: {logs[-4000:]}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.returncode == 0

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
