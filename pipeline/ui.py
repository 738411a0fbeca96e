"""`r1flow ui`: a local Prefect server with its web UI, bound to localhost only.

Pipeline runs report to it while it is up when `PREFECT_API_URL` points at it:

    r1flow ui                                   # terminal 1, keeps serving until Ctrl-C
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    r1flow run                                  # terminal 2; open http://127.0.0.1:4200
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from stages.common import UserError

LOCALHOST = ("127.0.0.1", "localhost", "::1")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def ui_url(port: int = 4200, host: str = "127.0.0.1") -> str:
    """The address of the web UI, e.g. `http://127.0.0.1:4200`."""
    return f"http://{_url_host(host)}:{port}"


def api_url(port: int = 4200, host: str = "127.0.0.1") -> str:
    """The value for `PREFECT_API_URL`, e.g. `http://127.0.0.1:4200/api`."""
    return f"{ui_url(port, host)}/api"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and throwaway servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_healthy(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """True if a Prefect API answers `GET /api/health` on this port."""
    try:
        with urllib.request.urlopen(f"{api_url(port, host)}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the parent dies, so a killed
    `r1flow ui` or test run never leaves a server behind."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_server(host: str = "127.0.0.1", port: int = 4200, home: Path | None = None,
                 timeout: float = 90.0, log_path: Path | None = None) -> subprocess.Popen:
    """Start `prefect server start --host HOST --port PORT` with the UI on, and return once
    `/api/health` answers. `home` becomes `PREFECT_HOME` (the server's SQLite database lives there);
    None keeps Prefect's default (~/.prefect). Server output goes to `log_path` (default: a file
    in `home` or the temp dir). Stop it with `stop_server(proc)`."""
    problems = []
    if host not in LOCALHOST:
        problems.append(f"host: must be a loopback address {LOCALHOST} (got {host!r}); "
                        "the UI has no authentication")
    if not 0 < port < 65536:
        problems.append(f"port: must be in 1..65535 (got {port})")
    if problems:
        raise UserError(*problems)
    if _port_in_use(host, port):
        what = "a Prefect server" if is_healthy(port, host) else "another program"
        raise UserError(f"port {port}: already in use by {what}; pick another with --port")

    env = dict(os.environ)
    env.update({
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_SERVER_UI_API_URL": api_url(port, host),  # what the browser calls back
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    })
    env.pop("PREFECT_API_URL", None)  # the server must not talk to some other server
    if home is not None:
        home = Path(home).expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(home)
    if log_path is None:
        log_dir = home if home is not None else Path(tempfile.gettempdir())
        log_path = log_dir / f"prefect-server-{port}.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    with open(log_path, "wb") as log:
        # Own process group: Ctrl-C reaches only us, and stop_server() ends the whole group.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
    proc.log_path = log_path  # type: ignore[attr-defined]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"prefect server exited with status {proc.returncode}; "
                               f"log {log_path}:\n" + "\n".join(tail))
        if is_healthy(port, host, timeout=1.0):
            return proc
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"prefect server did not answer {api_url(port, host)}/health within "
                       f"{timeout:.0f} s; log: {log_path}")


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a server started by `start_server` (SIGTERM to its process group, then SIGKILL)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def main(port: int = 4200, host: str = "127.0.0.1", home: Path | None = None) -> int:
    """What `r1flow ui` runs: start the server, say how to use it, serve until Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too
    print(f"Starting Prefect server on {ui_url(port, host)} (localhost only) ...", flush=True)
    proc = start_server(host=host, port=port, home=home)
    print(f"Prefect UI:  {ui_url(port, host)}\n"
          f"Server log:  {proc.log_path}\n"  # type: ignore[attr-defined]
          "Point pipeline runs at it (in the shell where you run r1flow):\n"
          f"    export PREFECT_API_URL={api_url(port, host)}\n"
          "Then `r1flow run`; in the UI open Runs -> the pipeline flow run -> Artifacts, or the\n"
          "Artifacts page for each stage's history across runs. Ctrl-C stops the server.", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print("\nStopping Prefect server ...", flush=True)
        return 0
    finally:
        stop_server(proc)
