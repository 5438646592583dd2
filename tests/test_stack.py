"""Processes end when they should: deployments/local.sh stop, and a CLI pipeline command that is
SIGKILLed or interrupted (its temporary Prefect server goes with it)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCAL = str(ROOT / "deployments" / "local.sh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """True while ``pid`` is a process that has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in listed.stdout.split()]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (a test's cleanup, whatever failed)."""
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return result


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """No configured Prefect API; Prefect's and Simfluence's state under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SIMFLUENCE_"))}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "SIMFLUENCE_HOME": str(tmp_path / "home")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the server dies with the command on Linux only")
def test_a_sigkilled_cli_command_leaves_no_temporary_server(tmp_path):
    # ingest has no input to check, so it starts its temporary server at once
    cli = subprocess.Popen([str(BIN / "simfluence"), "ingest"], env=isolated_env(tmp_path),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        server = wait_for(lambda: children(cli.pid), 180, "the temporary server")[0]
        assert "uvicorn" in Path(f"/proc/{server}/cmdline").read_text()
        assert cli.poll() is None
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=10)
        wait_for(lambda: not running(server), 5, "the temporary server to die with the command")
    finally:
        if cli.poll() is None:
            kill_tree(cli.pid)


def test_ctrl_c_ends_a_cli_command_within_seconds(tmp_path):
    """SIGINT to the command's process group, as a terminal's Ctrl-C: the command records its
    crashed flow run and exits 130 within seconds; its temporary server is gone."""
    cli = subprocess.Popen([str(BIN / "simfluence"), "collect", "--preset", "tiny", "--runs", "40", "--no-gradients"],
                           env=isolated_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(cli.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("train-run-tiny-0" in line for line in lines), 180, "the first training run")
        server = children(cli.pid)[0]
        started = time.monotonic()
        os.killpg(cli.pid, signal.SIGINT)
        cli.wait(timeout=30)
        seconds = time.monotonic() - started
        reader.join(timeout=5)
        assert cli.returncode == 130, "".join(lines[-20:])
        assert seconds < 15, f"{seconds:.1f} s after Ctrl-C"
        assert any("simfluence collect: interrupted" in line for line in lines)
        assert not running(server)
    finally:
        if cli.poll() is None:
            kill_tree(cli.pid)


def test_local_stack_stop_leaves_no_process(tmp_path):
    """start, a flow run on the cpu worker, stop while it runs: nothing of the stack is left,
    and status says so."""
    env = {**isolated_env(tmp_path), "SIMFLUENCE_PREFECT_PORT": str(free_port()), "SIMFLUENCE_STOP_SECONDS": "5"}
    state = tmp_path / "prefect" / "local"

    def local(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([LOCAL, *args], env=env, capture_output=True, text=True, timeout=timeout)

    started = local("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pids = {name: int((state / f"{name}.pid").read_text()) for name in ("server", "worker-cpu", "worker-gpu")}
        status = local("status").stdout
        assert "server: up at" in status and "worker-cpu: running" in status and "worker-gpu: running" in status
        api = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{env['SIMFLUENCE_PREFECT_PORT']}/api"}
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ingest-losses/default"], env=api,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        flow_run = wait_for(lambda: children(pids["worker-cpu"]), 180, "the worker's flow-run process")[0]

        stopped = local("stop", timeout=60)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped", stopped.stdout + stopped.stderr
        left = [pid for pid in [*pids.values(), flow_run] if running(pid)]
        assert not left, f"still running after stop: {left}"
        assert local("status").stdout.splitlines() == ["server: down", "worker-cpu: stopped", "worker-gpu: stopped"]
    finally:
        for pid_file in state.glob("*.pid"):  # never leave a stack behind, whatever failed above
            kill_tree(int(pid_file.read_text()))


def test_cli_commands_use_the_projects_local_server_when_it_is_up(tmp_path, monkeypatch):
    """A server answering /api/health on the project's port, with local.sh's pid file: the CLI's
    flows report to it; without the pid file (another project's server) they do not."""
    import http.server
    import threading

    from simfluence_platform.prefect_api import local_server_url

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("SIMFLUENCE_PROJECT_DIR", str(tmp_path))
        monkeypatch.setenv("SIMFLUENCE_PREFECT_PORT", str(server.server_address[1]))
        assert local_server_url() is None  # no local.sh state in this project
        (tmp_path / ".prefect" / "local").mkdir(parents=True)
        (tmp_path / ".prefect" / "local" / "server.pid").write_text("1")
        assert local_server_url() == f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()
    assert local_server_url() is None  # down: a temporary server instead
