"""The Prefect API the command line's flows report to.

With a configured API (``PREFECT_API_URL`` in the environment or the active Prefect profile,
e.g. after ``eval "$(deployments/local.sh env)"``) the flows use it; otherwise the project's
local server when ``deployments/local.sh start`` has one up (so the command's runs appear in its
UI). Otherwise the command starts a temporary server of its own, as Prefect would, with two
differences:

- it lives in a session of its own, so Ctrl-C reaches the command only: the command records
  its crashed flow run on a server that still answers and ends within seconds (a server
  stopped by the same Ctrl-C left Prefect retrying for about a minute);
- on Linux it dies with the command (``PR_SET_PDEATHSIG``): a SIGKILLed command leaves no
  server behind (Prefect's own temporary server is stopped only at a normal exit).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies (Linux
    only; None elsewhere). The kernel sends it when the thread that started the child ends, so
    start it from the main thread. libc is loaded here, before the fork, not in the child."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_temporary_server(timeout: float) -> tuple[subprocess.Popen, str]:
    """Prefect's API (no UI, the services of a temporary server) on a free port of 127.0.0.1,
    in a session of its own and dying with this process: (process, API URL) once it answers."""
    import prefect
    from prefect.settings import get_current_settings

    port = free_port()
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           # what Prefect's own temporary server sets: no UI, only the services it needs
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env=env, start_new_session=True, preexec_fn=die_with_parent())
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(process)
                raise RuntimeError(f"the temporary Prefect server did not start within {timeout:.0f} s "
                                   f"(exit status {process.returncode})") from None
            time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def local_server_url() -> str | None:
    """The API URL of the project's local server (``deployments/local.sh start``) when it is
    up: its pid file is under ``<project>/.prefect/local/`` (the project is
    ``$SIMFLUENCE_PROJECT_DIR`` or the current folder) and it answers on 127.0.0.1 at
    ``$SIMFLUENCE_PREFECT_PORT`` (4200)."""
    project = Path(os.environ.get("SIMFLUENCE_PROJECT_DIR", "."))
    if not (project / ".prefect" / "local" / "server.pid").is_file():
        return None
    url = f"http://127.0.0.1:{os.environ.get('SIMFLUENCE_PREFECT_PORT', '4200')}/api"
    try:
        urllib.request.urlopen(f"{url}/health", timeout=2)
    except OSError:
        return None
    return url


def ensure_api() -> str:
    """The configured API's URL, or that of a temporary server started for this process
    (``PREFECT_API_URL`` set in this process; stopped at exit, after Prefect has sent its
    last logs and events)."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return settings.api.url
    url = local_server_url()
    if url is not None:  # the checkout's local server is up: the command's runs appear in its UI
        os.environ["PREFECT_API_URL"] = url
        refresh_global_settings_context()
        return url
    process, url = start_temporary_server(settings.server.ephemeral.startup_timeout_seconds)
    atexit.register(stop_server, process)  # registered before Prefect's exit handlers: runs after them
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()
    return url
