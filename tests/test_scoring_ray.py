"""`refimpl score --input --ray`: the data set spread over Ray workers gives the single process's
output file, byte for byte, in-process (`local`) and on a cluster from `ray start` that loses a
worker mid-run."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from refimpl.cli import main
from server_helpers import free_port

ray = pytest.importorskip("ray", reason="Ray is the optional extra: pip install -e '.[ray]' (make test installs it)")

RAY = Path(sys.executable).with_name("ray")
WORDS = ("the river rose in the hills and ran west through farmland past three mills and a chapel until it met "
         "the sea at a town with a harbour fishermen mended nets on the quay café 🙂 日本").split()


@pytest.fixture(scope="module")
def data_set(tmp_path_factory):
    """40 lines of 5 to 90 words, as text, token ids and messages, with one bad line."""
    path = tmp_path_factory.mktemp("ray") / "in.jsonl"
    lines = []
    for k in range(40):
        words = " ".join(WORDS[(k * 7 + j) % len(WORDS)] for j in range(5 + (k * 37) % 86))
        lines.append({"id": k, "text": words} if k % 3 else {"id": k, "messages": [{"role": "user", "content": words}]})
    lines[5] = {"id": 5, "token_ids": [19556, 905, 216, 33, 34, 35, 36, 37]}
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines) + '{"id": 40}\n')
    return path


@pytest.fixture(scope="module")
def single_process(data_set, default_model_dir):
    out = data_set.with_name("single.jsonl")
    assert main(["score", "--input", str(data_set), "--output", str(out), "--top", "3"]) == 1  # the bad line
    assert len(out.read_text().splitlines()) == 40
    return out.read_bytes()


def score(data_set, out, address, *extra):
    return subprocess.Popen([sys.executable, "-m", "refimpl", "score", "--input", str(data_set), "--output", str(out),
                             "--top", "3", "--ray", address, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_ray_in_process_writes_the_same_bytes(data_set, single_process, tmp_path):
    run = score(data_set, tmp_path / "out.jsonl", "local", "--workers", "2")
    log, _ = run.communicate(timeout=600)
    assert run.returncode == 1, log  # the bad line, reported as in a single process
    assert "in.jsonl:41: skipped" in log and "2 Ray workers" in log
    assert (tmp_path / "out.jsonl").read_bytes() == single_process


def test_a_cluster_that_cannot_be_reached_is_one_line_and_exit_2(data_set, tmp_path):
    run = score(data_set, tmp_path / "out.jsonl", f"127.0.0.1:{free_port()}")
    log, _ = run.communicate(timeout=300)
    assert run.returncode == 2 and "refimpl score: cannot join Ray at 127.0.0.1:" in log, log
    assert "Traceback" not in log


@pytest.fixture
def cluster():
    """A 2-CPU Ray cluster from `ray start` on loopback, in a process group of its own, which is
    what is stopped afterwards (`ray stop` would stop every Ray cluster on the machine)."""
    temp = tempfile.mkdtemp(prefix="/tmp/ray-")  # Ray's socket paths must stay short
    port = free_port()
    start = subprocess.Popen([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                              "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log, _ = start.communicate(timeout=180)
    assert start.returncode == 0, log
    yield f"127.0.0.1:{port}", start.pid
    everything = cluster_processes(start.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in everything:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


def cluster_processes(group):
    """The cluster's processes: those of `ray start`'s process group, and their descendants (Ray
    puts each worker in a process group of its own)."""
    parent, in_group = {}, set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry.name)] = int(fields[1])
            if int(fields[2]) == group:
                in_group.add(int(entry.name))
    found, grew = set(in_group), True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def scorer_pids(group):
    """The processes of Ray workers that hold a Scorer actor, in this cluster."""
    pids = []
    for pid in cluster_processes(group):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Scorer"):
                pids.append(pid)
        except OSError:
            pass
    return sorted(pids)


def test_a_cluster_that_loses_a_worker_still_writes_every_line_once(data_set, single_process, cluster, tmp_path):
    address, group = cluster
    out = tmp_path / "out.jsonl"
    run = score(data_set, out, address)
    deadline = time.monotonic() + 300
    while not (out.exists() and len(out.read_text().splitlines()) >= 3):  # wait for the run to be under way
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "no line was scored within 300 s"
        time.sleep(0.2)
    victims = scorer_pids(group)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    written_at_kill = len(out.read_text().splitlines())
    log, _ = run.communicate(timeout=600)
    assert written_at_kill < 40, "the run ended before the worker was killed: nothing was tested"
    assert run.returncode == 1, log
    assert out.read_bytes() == single_process  # every line once, in order, the same bits
    assert victims[0] not in scorer_pids(group)
