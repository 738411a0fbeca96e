"""`r1flow ui`: a local Prefect server with its web UI, bound to localhost only.

Pipeline runs report to it while it is up:

    r1flow ui                                   # terminal 1, keeps serving until Ctrl-C
    r1flow run                                  # terminal 2; open http://127.0.0.1:4200

`r1flow ui` records its address in `~/.cache/r1flow/ui.json` (directory: `$R1FLOW_STATE_DIR`), and
the other commands use that server when no `PREFECT_API_URL` is configured (environment or Prefect
profile) and the server answers; with
`PREFECT_API_URL` set (e.g. `http://127.0.0.1:4200/api`) they use that instead. With neither,
Prefect starts a temporary server for the run (a few seconds) and the UI never sees the run.
"""

from __future__ import annotations

import json
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


def state_file() -> Path:
    """Where `r1flow ui` records the server it runs: `$R1FLOW_STATE_DIR/ui.json` (default
    `~/.cache/r1flow/ui.json`)."""
    return Path(os.environ.get("R1FLOW_STATE_DIR") or "~/.cache/r1flow").expanduser() / "ui.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_server(port: int, host: str = "127.0.0.1", pid: int | None = None) -> Path:
    """Write the state file for a server on `host:port` owned by process `pid` (atomically)."""
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"host": host, "port": port, "pid": pid or os.getpid(),
                               "api_url": api_url(port, host), "ui_url": ui_url(port, host)}))
    os.replace(tmp, path)
    return path


def forget_server(pid: int | None = None) -> None:
    """Remove the state file if it still names process `pid` (default: this one)."""
    path = state_file()
    try:
        if json.loads(path.read_text()).get("pid") == (pid or os.getpid()):
            path.unlink()
    except (OSError, ValueError):
        pass


def running_server() -> dict | None:
    """The server recorded by a running `r1flow ui` ({host, port, pid, api_url, ui_url}), or None when
    there is no record, its process is gone, it is not on localhost, or its API does not answer."""
    try:
        info = json.loads(state_file().read_text())
        host, port, pid = str(info["host"]), int(info["port"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host not in LOCALHOST or not _pid_alive(pid) or not is_healthy(port, host, timeout=1.0):
        return None
    return {"host": host, "port": port, "pid": pid, "api_url": api_url(port, host), "ui_url": ui_url(port, host)}


def use_running_server() -> str | None:
    """Point this process's Prefect client at the server of a running `r1flow ui` (sets
    `PREFECT_API_URL`) unless `PREFECT_API_URL` is already set; returns the UI address it chose."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    info = running_server()
    if info is None:
        return None
    os.environ["PREFECT_API_URL"] = info["api_url"]
    return info["ui_url"]


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


def stop_server(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a server started by `start_server`: SIGTERM to its process group, SIGKILL after `timeout`
    seconds (uvicorn's graceful shutdown waits for open event streams; SQLite needs no grace)."""
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
    # Ctrl-C stops it even when started from a script's background job (which inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"Starting Prefect server on {ui_url(port, host)} (localhost only) ...", flush=True)
    proc = start_server(host=host, port=port, home=home)
    record = record_server(port, host)
    print(f"Prefect UI:  {ui_url(port, host)}\n"
          f"Server log:  {proc.log_path}\n"  # type: ignore[attr-defined]
          f"r1flow commands on this machine report here while it runs (recorded in {record};\n"
          f"elsewhere: export PREFECT_API_URL={api_url(port, host)}).\n"
          "Run `r1flow run`, then in the UI open Runs -> the pipeline flow run -> Artifacts, or the\n"
          "Artifacts page for each stage's history across runs. Ctrl-C stops the server.", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print("\nStopping Prefect server ...", flush=True)
        return 0
    finally:
        forget_server()
        stop_server(proc)
