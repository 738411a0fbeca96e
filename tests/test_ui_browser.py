"""The Prefect UI shows what a pipeline run reports.

A real `prefect server` (UI on, localhost, throwaway PREFECT_HOME) runs for this module; a stand-in
pipeline flow with one nested subflow per stage reports through `PrefectReporter`; headless
Debian Chromium, driven by Playwright, opens the runs' pages and reads the artifacts a person
would see. The "run something" part (`run_stand_in_pipeline`) and the "look in the browser" part
(`find_artifacts_in_ui`, `open_artifact`) are separate so the stand-in can be swapped for the real
tiny pipeline. Browser: `scripts/install_browser.sh` (Debian's chromium); never `playwright install`.

The first part of the file holds fast unit tests of `pipeline.reporting`'s pure helpers.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
import time
from pathlib import Path

import pytest
from conftest import ROOT, drain_prefect

from pipeline import reporting, ui
from stages.common import UserError
from pipeline.reporting import (
    PrefectReporter,
    artifact_key,
    clean_rows,
    image_markdown,
    lineage_markdown,
    link_to_folder,
    plot_curves,
    redact,
    summary_table,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STAGES = ["world", "cold-start", "reasoning-rl", "rejection-sft", "preference-rl"]
PIPELINE = "tiny"


# ---------------------------------------------------------------- pure helpers (fast)

@pytest.mark.parametrize("parts, expected", [
    (("tiny", "cold-start", "metrics"), "tiny-cold-start-metrics"),
    (("Tiny", "reasoning_rl", "eval"), "tiny-reasoning-rl-eval"),
    (("my pipeline", "stage 3", "funnel"), "my-pipeline-stage-3-funnel"),
    (("a--b", "-c-", "d"), "a-b-c-d"),
    (("GPU.Recipe", "preference/rl", "pass@1"), "gpu-recipe-preference-rl-pass-1"),
    (("ünïcode", "x", "y"), "n-code-x-y"),
    (("", "stage", "key"), "stage-key"),
    (("UPPER", "CASE", "KEY"), "upper-case-key"),
])
def test_artifact_key(parts, expected):
    key = artifact_key(*parts)
    assert key == expected
    assert re.fullmatch(r"[a-z0-9-]*", key)


@pytest.mark.parametrize("text, expected", [
    ("token hf_abcdefghijklmnopqrstuvwxyz123 here", "token *** here"),
    ("key sk-ABCDEFGHIJKLMNOPQRSTUVWX", "key ***"),
    ("ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123", "***"),
    ("pass@1 = 0.5, hf_short", "pass@1 = 0.5, hf_short"),
    ("nothing secret", "nothing secret"),
])
def test_redact(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("column, hidden", [
    ("hf_token", True), ("token", True), ("WANDB_API_KEY", True), ("api-key", True),
    ("db.password", True), ("client_secret", True), ("credentials", True),
    ("num_tokens", False), ("completions/mean_length", False), ("tokens_per_second", False),
    ("max_new_tokens", False), ("author", False), ("secretary_score", False),
])
def test_secret_columns_are_hidden(column, hidden):
    assert (clean_rows([{column: "value"}])[0][column] == "***") == hidden


def test_table_cells_escape_tags_so_the_ui_shows_them():
    (row,) = clean_rows([{"completion": "<think>t</think><answer>4</answer>", "n": 3, "cmp": "a > b"}])
    assert row == {"completion": "&lt;think>t&lt;/think>&lt;answer>4&lt;/answer>", "n": 3, "cmp": "a > b"}


def test_clean_rows_aligns_columns_and_cleans_cells():
    class Scalar:  # stands in for a numpy/torch scalar
        def item(self):
            return 0.123456789

    rows = clean_rows([
        {"stage": "a", "loss": 0.123456789, "path": Path("/x/y")},
        {"stage": "b", "reward": Scalar(), "hf_token": "hf_abcdefghijklmnopqrstuvwxyz",
         "nan": float("nan")},
    ])
    assert [list(r) for r in rows] == [["stage", "loss", "path", "reward", "hf_token", "nan"]] * 2
    assert rows[0] == {"stage": "a", "loss": 0.1235, "path": "/x/y", "reward": None,
                       "hf_token": None, "nan": None}
    assert rows[1]["reward"] == 0.1235 and rows[1]["hf_token"] == "***" and rows[1]["nan"] is None


@pytest.mark.parametrize("row, expected", [
    ({"stage": "cold-start", "version": "cold-start-abc", "cached": False, "seconds": 12.345,
      "metrics": {"pass@1": 0.25}},
     {"stage": "cold-start", "version": "cold-start-abc", "cached": False, "seconds": 12.3,
      "pass@1": 0.25}),
    ({"seconds": 3, "stage": "world", "version": "world-1", "cached": True, "n_train": 100},
     {"stage": "world", "version": "world-1", "cached": True, "seconds": 3.0, "n_train": 100}),
    ({"stage": "x"}, {"stage": "x", "version": None, "cached": None, "seconds": None}),
])
def test_summary_table_row(row, expected):
    assert summary_table([row]) == [expected]
    assert list(summary_table([row])[0])[:4] == ["stage", "version", "cached", "seconds"]


def test_summary_table_union_of_metric_columns():
    rows = summary_table([{"stage": "a", "metrics": {"pass@1": 0.1}},
                          {"stage": "b", "metrics": {"win_rate": 0.6}}])
    assert rows[0]["win_rate"] is None and rows[1]["pass@1"] is None


@pytest.mark.parametrize("parents, children, present, absent", [
    ({"world": "world-aaa", "cold-start": "cold-start-bbb"}, ["rejection-sft-ccc"],
     ["world: `world-aaa`", "cold-start: `cold-start-bbb`", "- `rejection-sft-ccc`"], ["- none"]),
    ([], None, ["- none"], ["world"]),
    (["world-aaa"], {"preference-rl": "preference-rl-ddd"},
     ["- `world-aaa`", "preference-rl: `preference-rl-ddd`"], ["- none"]),
])
def test_lineage_markdown(parents, children, present, absent):
    text = lineage_markdown("reasoning-rl-123", parents, children)
    assert text.startswith("**Version** `reasoning-rl-123`")
    assert "r1flow lineage reasoning-rl-123" in text
    for s in present:
        assert s in text
    for s in absent:
        assert s not in text


def test_lineage_markdown_accepts_version_objects():
    @dataclasses.dataclass
    class V:  # the shape of pipeline.store.Version
        id: str
        stage: str

    text = lineage_markdown(V("rejection-sft-1", "rejection-sft"),
                            [V("world-1", "world"), {"id": "cold-start-1", "stage": "cold-start"}],
                            [V("preference-rl-1", "preference-rl")])
    assert text.startswith("**Version** `rejection-sft-1`")
    for s in ("world: `world-1`", "cold-start: `cold-start-1`", "preference-rl: `preference-rl-1`"):
        assert s in text
    assert "V(" not in text


@pytest.mark.parametrize("target, uri, text", [
    ("https://example.org/x", "https://example.org/x", "https://example.org/x"),
    ("file:///data/run%201/ckpt", "file:///data/run%201/ckpt", "/data/run 1/ckpt"),
    ("/data/run 1/ckpt", "file:///data/run%201/ckpt", "/data/run 1/ckpt"),
    ("s3://bucket/key", "s3://bucket/key", "s3://bucket/key"),
])
def test_link_target(target, uri, text):
    assert reporting._link_target(target) == (uri, text)


def test_image_markdown(tmp_path, monkeypatch):
    png = plot_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], ["loss"], tmp_path / "c.png")
    md = image_markdown(png)
    data = md.split("base64,", 1)[1].split(")", 1)[0]
    assert md.startswith("![c](data:image/png;base64,")
    assert base64.b64decode(data) == png.read_bytes()
    assert f"`{png.resolve()}`" in md
    captioned = image_markdown(png, caption="training curves of `x-1`")
    assert captioned.endswith("\n\ntraining curves of `x-1`") and str(png.resolve()) not in captioned
    missing = image_markdown(tmp_path / "nope.png")
    assert missing.startswith("Picture missing: [nope.png](file://") and "base64" not in missing
    monkeypatch.setattr(reporting, "MAX_INLINE_PNG_BYTES", 100)
    assert image_markdown(png).startswith("Picture too large to embed: [c.png](file://")


@pytest.mark.parametrize("path", ["/tmp/a b/c", "relative/dir", "~/x"])
def test_link_to_folder(path):
    uri = link_to_folder(path)
    assert uri.startswith("file:///")
    assert " " not in uri
    assert Path(path).expanduser().resolve().as_uri() == uri


def test_plot_curves(tmp_path):
    history = [{"step": s, "loss": 2.0 / (s + 1), "reward": s / 10} for s in range(1, 30)]
    history.append({"train_runtime": 3.0})  # trainer summary row without the keys
    out = plot_curves(history, ["loss", "reward", "absent"], tmp_path / "sub" / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(out) as im:  # two subplots (absent key left out) -> taller than wide / 2
        two = im.size
    one = plot_curves(history, ["loss"], tmp_path / "one.png")
    with Image.open(one) as im:
        assert im.size[1] < two[1]
    empty = plot_curves([], ["loss"], tmp_path / "empty.png")
    assert empty.stat().st_size > 0


def test_reporter_outside_a_run_is_a_no_op(tmp_path, caplog):
    png = plot_curves([{"step": 1, "loss": 1.0}], ["loss"], tmp_path / "c.png")
    r = PrefectReporter(PIPELINE, "cold-start")
    caplog.set_level("DEBUG", logger="pipeline.reporting")
    r.progress(0.5, "half")
    r.table("metrics", [{"loss": 1.0}])
    r.markdown("summary", "text")
    r.link("checkpoint", str(tmp_path))
    r.image("curves", png)
    r.warning("reward-hacking", "suspicious")
    skipped = [rec.getMessage() for rec in caplog.records if "no Prefect run context" in rec.getMessage()]
    assert len(skipped) == 6, skipped  # every call skipped, none tried to reach an API
    assert not [rec for rec in caplog.records if rec.levelname in ("WARNING", "ERROR")]
    assert r._progress_id is None
    assert r.key("Pass@1 Table") == "tiny-cold-start-pass-1-table"


# ---------------------------------------------------------------- server + stand-in pipeline

@pytest.mark.parametrize("host, port, problem", [
    ("0.0.0.0", 4200, "host: must be a loopback address"),
    ("192.168.1.5", 4200, "host: must be a loopback address"),
    ("127.0.0.1", 0, "port: must be in 1..65535"),
    ("127.0.0.1", 70000, "port: must be in 1..65535"),
])
def test_start_server_rejects_bad_host_or_port(host, port, problem):
    with pytest.raises(UserError, match=re.escape(problem)):
        ui.start_server(host=host, port=port)


def test_start_server_refuses_a_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(UserError, match=r"port \d+: already in use by another program"):
            ui.start_server(port=s.getsockname()[1])


def _non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def _start_r1flow_ui(port: int, home: Path) -> tuple[subprocess.Popen, str]:
    """Run `pipeline.ui.main` (what `r1flow ui` runs) in a child process; return it and what it
    printed up to its "Ctrl-C" line."""
    code = f"from pipeline.ui import main; raise SystemExit(main(port={port}, home={str(home)!r}))"
    env = {**os.environ, "R1FLOW_STATE_DIR": str(home)}  # its record goes there, not to ~/.cache
    # started with SIGINT ignored, as from a script's background job: Ctrl-C must still stop it
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C" in line:
            break
    return proc, "".join(lines)


@pytest.fixture(scope="module")
def ui_process(tmp_path_factory):
    """`r1flow ui`'s server on a free localhost port with a throwaway PREFECT_HOME, as
    (process, port, printed text). At the end a Ctrl-C (SIGINT) must stop it and free the port."""
    port = ui.free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    proc, out = _start_r1flow_ui(port, home)
    try:
        assert ui.is_healthy(port), out
        yield proc, port, out, home
        drain_prefect()  # close this process's event stream to the server, or its shutdown waits for it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not ui.is_healthy(port)
        assert not ui._port_in_use("127.0.0.1", port)
        assert not (home / "ui.json").exists()  # the record goes with the server
    finally:
        if proc.poll() is None:
            proc.kill()  # the server follows its parent (PR_SET_PDEATHSIG)
            proc.wait()


@pytest.fixture(scope="module")
def server(ui_process):
    """The port of the module's Prefect server (UI on, localhost only)."""
    return ui_process[1]


def test_r1flow_ui_prints_how_to_connect_and_serves_localhost_only(ui_process):
    _, port, out, _ = ui_process
    assert f"export PREFECT_API_URL=http://127.0.0.1:{port}/api" in out, out
    assert f"Prefect UI:  http://127.0.0.1:{port}" in out
    with urllib.request.urlopen(ui.ui_url(port), timeout=5) as r:  # the UI itself is served
        assert "<html" in r.read().decode().lower()
    outside = _non_loopback_address()
    if outside:  # bound to localhost only: the machine's own network address is refused
        with pytest.raises(OSError):
            socket.create_connection((outside, port), timeout=2).close()


def _discover(state_dir: Path, **env) -> str:
    """What a new r1flow process would pick as its Prefect UI (`use_running_server`), and its API URL."""
    code = "import os; from pipeline.ui import use_running_server as u; print(u(), os.environ.get('PREFECT_API_URL'))"
    clean = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         env={**clean, "R1FLOW_STATE_DIR": str(state_dir), **env}, check=True)
    return out.stdout.strip()


def test_commands_find_the_running_ui_server(ui_process, tmp_path):
    """A running `r1flow ui` is found through its record; PREFECT_API_URL wins; stale or foreign
    records are ignored (a temporary server is used instead)."""
    proc, port, _, home = ui_process
    record = json.loads((home / "ui.json").read_text())
    assert record["pid"] == proc.pid and record["api_url"] == ui.api_url(port)
    assert _discover(home) == f"{ui.ui_url(port)} {ui.api_url(port)}"
    assert _discover(home, PREFECT_API_URL="http://127.0.0.1:1/api") == "None http://127.0.0.1:1/api"
    assert _discover(tmp_path) == "None None"  # no record
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for bad in ({**record, "pid": int(dead.stdout)}, {**record, "port": ui.free_port()},
                {**record, "host": "0.0.0.0"}, {"port": "x"}):
        (tmp_path / "ui.json").write_text(json.dumps(bad))
        assert _discover(tmp_path) == "None None", bad
    (tmp_path / "ui.json").write_text("not json")
    assert _discover(tmp_path) == "None None"
    # and a flow command's Prefect client then talks to that server, with no temporary server of its own
    code = ("from pipeline import cli; cli._start_prefect_api(); cli._prefect_api_ready()\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.server.api.server import SubprocessASGIServer as S\n"
            "print(str(get_client().api_url).rstrip('/'), S().running)")
    out = _run_python(code, tmp_path, R1FLOW_STATE_DIR=str(home))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [ui.api_url(port), "False"]
    assert "reporting to the Prefect UI at" in out.stderr
    # a server named in the Prefect profile wins over the record, like PREFECT_API_URL in the environment
    profile_home = tmp_path / "profile-home"
    profile_home.mkdir()
    (profile_home / "profiles.toml").write_text('active = "team"\n[profiles.team]\n'
                                                'PREFECT_API_URL = "http://127.0.0.1:1/api"\n')
    code = ("from pipeline import cli; cli._start_prefect_api()\n"
            "from prefect.settings import get_current_settings\nprint(get_current_settings().api.url)")
    out = _run_python(code, tmp_path, R1FLOW_STATE_DIR=str(home), PREFECT_HOME=str(profile_home))
    assert out.returncode == 0 and out.stdout.strip() == "http://127.0.0.1:1/api", (out.stdout, out.stderr[-2000:])


def _run_python(code: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with no Prefect server configured and no `r1flow ui` record."""
    clean = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          env={**clean, "R1FLOW_STATE_DIR": str(tmp_path), "PREFECT_HOME": str(tmp_path / "home"), **env},
                          timeout=120)


def test_flow_commands_start_the_temporary_server_early(tmp_path):
    """Without any server, a flow command starts Prefect's temporary server before loading its config,
    and Prefect's client then reuses that server (one server, answering, on localhost)."""
    code = ("from pipeline import cli; cli._start_prefect_api(); cli._prefect_api_ready()\n"
            "from prefect.server.api.server import SubprocessASGIServer as S\n"
            "import urllib.request\n"
            "s = S(); assert s.running, 'not started'\n"
            "assert s.api_url.startswith('http://127.0.0.1:'), s.api_url\n"
            "assert urllib.request.urlopen(s.api_url + '/health', timeout=5).status == 200\n"
            "from prefect.client.orchestration import get_client\n"
            "assert str(get_client().api_url).rstrip('/') == s.api_url.rstrip('/'), 'client uses another server'\n"
            "print('ok')")
    out = _run_python(code, tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert "telemetry" not in out.stderr


def _processes_with(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_user_error_in_a_flow_command_exits_fast_and_leaves_no_server(tmp_path):
    marker = f"R1FLOW_TEST_MARKER={os.getpid()}-{tmp_path.name}"
    key, value = marker.split("=")
    code = "import sys; from pipeline.cli import main; sys.exit(main(['-c', 'missing.yaml', 'stage', 'world']))"
    out = _run_python(code, tmp_path, **{key: value})
    assert out.returncode == 2
    assert "error: missing.yaml: config file not found" in out.stderr
    assert "Traceback" not in out.stderr
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(marker) == []  # the temporary server it had started is gone


def test_a_terminated_flow_command_leaves_no_server(tmp_path):
    """`kill` (SIGTERM) on a flow command mid-run stops the temporary Prefect server it had started
    (found orphaned after stopping `r1flow run`: Python's default SIGTERM skips the exit handlers)."""
    marker = f"R1FLOW_TEST_MARKER={os.getpid()}-{tmp_path.name}"
    key, value = marker.split("=")
    code = ("import argparse, sys, time\nfrom pipeline import cli\n"
            "def slow(args):\n    cli._prefect_api_ready(); print('ready', flush=True); time.sleep(120); return 0\n"
            "class Parser:\n    def parse_args(self, argv): return argparse.Namespace(command='stage', func=slow)\n"
            "cli.build_parser = Parser\nsys.exit(cli.main([]))")
    clean = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**clean, "R1FLOW_STATE_DIR": str(tmp_path), "PREFECT_HOME": str(tmp_path / "home"),
                                 key: value})
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(_processes_with(marker)) >= 2  # the command and its server
        proc.terminate()
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 15
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def _race_code(key: str, early_client: bool) -> str:
    """A flow command whose temporary server takes 3 s longer to start (in the window between Prefect's check that
    no server is running and its spawn of one); it runs three real flows as soon as it may,
    (early_client) after asking Prefect's client for the API while the server is still starting, and prints how
    many uvicorn processes carry the test's marker."""
    return ("import argparse, os, sys, time\nfrom pathlib import Path\nfrom prefect import flow\n"
            "from prefect.server.api import server as srv\nfrom pipeline import cli\n"
            "find = srv.SubprocessASGIServer.find_available_port\n"
            "def slow_find(self):\n"  # inside start(), between its `running` check and its spawn: the race window
            "    time.sleep(3); return find(self)\n"
            "srv.SubprocessASGIServer.find_available_port = slow_find\n"
            "@flow\ndef one(i: int) -> int:\n    return i\n"
            "def count():\n"
            "    n = 0\n"
            "    for p in Path('/proc').iterdir():\n"
            "        try:\n"
            "            if p.name.isdigit() and int(p.name) != os.getpid() and os.environ['" + key + "'].encode() in "
            "(p / 'environ').read_bytes() "
            "and b'uvicorn' in (p / 'cmdline').read_bytes(): n += 1\n"
            "        except OSError: pass\n"
            "    return n\n"
            "def run(args):\n"
            + ("    from prefect.client.orchestration import get_client\n    get_client()\n" if early_client else "")
            + "    cli._prefect_api_ready()\n"
            "    assert [one(i) for i in range(3)] == [0, 1, 2]\n"
            "    print('servers', count(), flush=True); return 0\n"
            "class Parser:\n    def parse_args(self, argv): return argparse.Namespace(command='stage', func=run)\n"
            "cli.build_parser = Parser\nsys.exit(cli.main([]))")


def _no_survivor(marker: str) -> None:
    deadline = time.monotonic() + 15
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = _processes_with(marker)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


@pytest.mark.parametrize("early_client", [False, True])
def test_a_slow_server_start_gives_one_server_and_no_survivor(tmp_path, early_client):
    """The race of issue 14 (on a busy machine one `r1flow run` started two temporary servers, the second died
    with `address already in use`, the first outlived the command), provoked: a slow server start, and a client
    asking for the API while it is starting. One server, no `address already in use`, no survivor. (Before the
    start was serialized, early_client gave two servers and left one running after the command, parent 1.)"""
    marker = f"R1FLOW_TEST_MARKER={os.getpid()}-{tmp_path.name}"
    key, value = marker.split("=")
    try:
        out = _run_python(_race_code(key, early_client), tmp_path, **{key: value})
        assert out.returncode == 0, out.stderr[-2000:]
        assert "servers 1" in out.stdout, (out.stdout, out.stderr[-2000:])
        assert "address already in use" not in out.stderr and "Errno 98" not in out.stderr
    finally:
        _no_survivor(marker)


def test_a_server_start_that_times_out_leaves_no_survivor(tmp_path):
    """A start that outlasts Prefect's startup timeout (here 2 s; uvicorn alone takes longer here) fails the
    command, and every uvicorn it spawned on the way is gone (before, each timed-out start stayed running)."""
    marker = f"R1FLOW_TEST_MARKER={os.getpid()}-{tmp_path.name}"
    key, value = marker.split("=")
    try:
        out = _run_python(_race_code(key, True), tmp_path, **{key: value},
                          PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="2")
        assert out.returncode != 0 and "servers" not in out.stdout
        assert "Timed out while attempting to connect to ephemeral Prefect API server" in out.stderr, out.stderr[-2000:]
    finally:
        _no_survivor(marker)


def test_server_dies_with_a_killed_parent(tmp_path):
    """A SIGKILLed `r1flow ui` (no chance to clean up) does not leave a server behind."""
    port = ui.free_port()
    proc, _ = _start_r1flow_ui(port, tmp_path)
    try:
        assert ui.is_healthy(port)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while ui._port_in_use("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not ui._port_in_use("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_running_prefect_server_is_named(server):
    with pytest.raises(UserError, match=f"port {server}: already in use by a Prefect server"):
        ui.start_server(port=server)


def _require_browser() -> None:
    """Skip without a browser, except under CI, where a missing browser is a failure."""
    problems = []
    if not Path(CHROMIUM).exists():
        problems.append(f"{CHROMIUM} missing (run scripts/install_browser.sh)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("python package playwright missing (pip install -e '.[test]')")
    if problems:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("browser test under CI: " + "; ".join(problems))
        pytest.skip("; ".join(problems))


def run_stand_in_pipeline(port: int, png: Path, cached: bool = False) -> str:
    """Run a stand-in for the tiny pipeline against the server on `port`: a `pipeline` flow with one
    nested subflow per stage (its flow run named after the stage, as in `pipeline.flows`)
    reporting through `PrefectReporter`. Returns the pipeline's flow run id."""
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @flow(name="stage", flow_run_name="{name}")
    def stage(name: str) -> dict:
        start = time.monotonic()
        r = PrefectReporter(PIPELINE, name)
        for i in range(11):
            r.progress(i / 10, f"step {i}/10")
        r.table("metrics", [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)], "training metrics")
        r.markdown("summary", f"## {name}\n\nSample completion:\n\n"
                              "```\n<think>2+2 is 4</think><answer>4</answer>\n```",
                   "summary with sample completions")
        r.link("checkpoint", str(png.parent), "checkpoint folder")
        r.markdown("lineage", lineage_markdown(f"{name}-0123456789ab", {"world": "world-0123456789ab"}),
                   "versions consumed and produced")
        if name == "rejection-sft":
            r.table("funnel", [{"filter": "generated", "kept": 64}, {"filter": "format", "kept": 51},
                               {"filter": "correct", "kept": 30}, {"filter": "dedup", "kept": 27}],
                    "rejection funnel")
        if name == "reasoning-rl":
            r.table("monitor", [{"step": 8, "completion": "<think>2+2 is 4</think><answer>4</answer>",
                                 "note": "a < b and c > d"}], "monitor samples")
            r.image("curves", png, "reward and loss curves")
            r.warning("reward-hacking", "format reward rising while accuracy falls")
        return {"stage": name, "version": f"{name}-0123456789ab", "cached": cached,
                "seconds": time.monotonic() - start, "metrics": {"pass@1": 0.25},
                "flow_run_id": str(flow_run.id)}

    @flow(name="pipeline")
    def pipeline() -> list[dict]:
        results = [stage(name) for name in STAGES]
        r = PrefectReporter(PIPELINE, "pipeline")
        r.table("summary", summary_table([{k: v for k, v in res.items() if k != "flow_run_id"}
                                          for res in results]), "one row per stage")
        r.markdown("runs", "\n".join(f"- {reporting.flow_run_link(res['flow_run_id'], res['stage'])}"
                                     for res in results), "stage runs")
        return results

    with temporary_settings({PREFECT_API_URL: ui.api_url(port)}):
        state = pipeline(return_state=True)
        results = state.result()
        drain_prefect()  # send run logs and events now, before the server goes away
    assert [res["stage"] for res in results] == STAGES
    return str(state.state_details.flow_run_id)


def stage_runs_of(port: int, pipeline_run_id: str) -> dict[str, str]:
    """The nested stage flow runs of a pipeline flow run, by run name (the stage), via the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: ui.api_url(port)}):
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline_run_id])))
    return {run.name: str(run.id) for run in children}


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    """Run the stand-in pipeline twice (second run: all cached) so keys have a history."""
    png = plot_curves([{"step": s, "reward": s / 20, "loss": 1 / s} for s in range(1, 21)],
                      ["reward", "loss"], tmp_path_factory.mktemp("plots") / "curves.png")
    run_stand_in_pipeline(server, png)
    pipeline_run = run_stand_in_pipeline(server, png, cached=True)
    return pipeline_run, stage_runs_of(server, pipeline_run), png.parent


def read_artifacts(port: int, **filters):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: ui.api_url(port)}):
        with get_client(sync_client=True) as client:
            return client.read_artifacts(artifact_filter=ArtifactFilter(**filters))


def test_artifacts_reach_the_server(server, runs):
    from prefect.client.schemas.filters import ArtifactFilterFlowRunId, ArtifactFilterKey

    pipeline_run, stage_runs, png_dir = runs
    assert sorted(stage_runs) == sorted(STAGES)
    by_key = {a.key: a for a in read_artifacts(
        server, flow_run_id=ArtifactFilterFlowRunId(any_=[stage_runs["rejection-sft"]]))}
    assert set(by_key) == {f"tiny-rejection-sft-{k}" for k in
                           ("progress", "metrics", "summary", "funnel", "checkpoint", "lineage")}
    assert by_key["tiny-rejection-sft-checkpoint"].data == (
        f"[{png_dir}]({link_to_folder(png_dir)})")
    assert by_key["tiny-rejection-sft-progress"].data == 100.0  # the throttled updates end at 100
    assert json.loads(by_key["tiny-rejection-sft-funnel"].data)[3] == {"filter": "dedup", "kept": 27}
    summary = read_artifacts(server, flow_run_id=ArtifactFilterFlowRunId(any_=[pipeline_run]),
                             key=ArtifactFilterKey(any_=["tiny-pipeline-summary"]))
    rows = json.loads(summary[0].data)  # table artifacts are stored as JSON text
    assert [row["stage"] for row in rows] == STAGES
    assert all(row["cached"] is True for row in rows)
    # Stable keys: both runs wrote the same key, so it has a history of two.
    history = read_artifacts(server, key=ArtifactFilterKey(any_=["tiny-pipeline-summary"]))
    assert len(history) == 2
    warning = read_artifacts(server, key=ArtifactFilterKey(any_=["tiny-reasoning-rl-reward-hacking"]))
    assert len(warning) == 2 and warning[0].data.startswith("**Warning**")
    curves = read_artifacts(server, key=ArtifactFilterKey(any_=["tiny-reasoning-rl-curves"]))[0]
    assert "data:image/png;base64," in curves.data


def test_stage_module_logs_reach_the_prefect_run_log(server, tmp_path):
    """What `stages.*` modules log inside a run (training progress, filter counts, guard results) shows in the
    run's log in the UI, as the flows' own `r1flow` logger does: `r1flow` sets Prefect's extra loggers."""
    script = tmp_path / "logs.py"
    script.write_text(
        "import logging, sys\n"
        "from pipeline import cli\n"
        "cli.route_logs_to_prefect()\n"
        "from prefect import flow, task\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import drain_prefect\n"
        "@task\n"
        "def stage():\n"
        "    logging.getLogger('stages.rejection_sft').info('kept 27 of 64 samples')\n"
        "    logging.getLogger('pipeline.store').info('registered rejection-sft-0123')\n"
        "@flow\n"
        "def run():\n"
        "    stage()\n"
        "state = run(return_state=True)\n"
        "drain_prefect()\n"
        "with get_client(sync_client=True) as client:\n"
        "    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(\n"
        "        any_=[state.state_details.flow_run_id])))\n"
        "print('\\n'.join(f'{l.name}: {l.message}' for l in logs))\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_EXTRA_LOGGERS"}
    env.update(PREFECT_API_URL=ui.api_url(server), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stages.rejection_sft: kept 27 of 64 samples" in done.stdout, done.stdout
    assert "pipeline.store: registered rejection-sft-0123" in done.stdout, done.stdout


def test_progress_is_throttled(server):
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @flow(name="progress-check")
    def check() -> list:
        r = PrefectReporter(PIPELINE, "throttle")
        seen = []
        for f in (0.1, 0.105, 0.5, 1.0, 1.0):
            r.progress(f)
            seen.append(r._progress_last[1])
        return seen

    with temporary_settings({PREFECT_API_URL: ui.api_url(server)}):
        seen = check()
    # 0.105: too soon and too small a step; 0.5: too soon (min_interval 2 s); 1.0 always published.
    assert seen == [0.1, 0.1, 0.1, 1.0, 1.0]


# ---------------------------------------------------------------- the browser

@contextlib.contextmanager
def chromium_page(profile: Path):
    """A Playwright page in headless Debian Chromium with a fresh user-data-dir at `profile`."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            context.close()


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    with chromium_page(tmp_path_factory.mktemp("chromium-profile")) as page:
        yield page


def find_artifacts_in_ui(port: int, flow_run_id: str, page=None, screenshot: Path | None = None) -> str:
    """Open a flow run's page in the UI, switch to its Artifacts tab and return the tab's text
    (artifact types, keys and descriptions as a person sees them). Without `page` it starts its
    own browser."""
    if page is None:
        with tempfile.TemporaryDirectory() as profile, chromium_page(Path(profile)) as own:
            return find_artifacts_in_ui(port, flow_run_id, own, screenshot)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(f"{ui.ui_url(port)}/runs/flow-run/{flow_run_id}")
    page.locator("li.p-tab#artifacts").click()
    panel = page.locator("#artifacts-content")
    try:
        panel.locator(".artifact-card").first.wait_for(timeout=20_000)
    except PlaywrightTimeout:
        pass  # no artifacts: return what the tab says
    # The cards sit in a virtual scroller: scroll to the end so every card is rendered.
    for _ in range(10):
        before = panel.locator(".artifact-card").count()
        page.mouse.wheel(0, 5000)
        page.wait_for_timeout(300)
        if panel.locator(".artifact-card").count() == before:
            break
    if screenshot:
        page.screenshot(path=str(screenshot), full_page=True)
    return panel.inner_text()


def open_artifact(page, key: str, screenshot: Path | None = None) -> str:
    """On a flow run's Artifacts tab, click the artifact card titled `key` and return the text of
    the artifact's page (a table's cells, a Markdown document)."""
    page.locator(".artifact-card__title").get_by_text(key, exact=True).click()
    page.wait_for_url("**/artifacts/artifact/**")
    page.get_by_text("Show raw data").wait_for()
    page.wait_for_load_state("networkidle")
    if screenshot:
        page.screenshot(path=str(screenshot), full_page=True)
    return page.locator("body").inner_text()


def test_browser_shows_pipeline_summary_and_funnel(server, runs, browser_page, tmp_path):
    pipeline_run, stage_runs, _ = runs
    page = browser_page

    text = find_artifacts_in_ui(server, pipeline_run, page, tmp_path / "pipeline-artifacts.png")
    assert "tiny-pipeline-summary" in text and "one row per stage" in text
    assert "tiny-pipeline-runs" in text
    table = open_artifact(page, "tiny-pipeline-summary", tmp_path / "pipeline-summary.png")
    for column in ("stage", "version", "cached", "seconds", "pass@1"):
        assert column in table
    for name in STAGES:
        assert f"{name}-0123456789ab" in table

    text = find_artifacts_in_ui(server, stage_runs["rejection-sft"], page,
                                tmp_path / "rejection-sft-artifacts.png")
    for key in ("funnel", "metrics", "summary", "progress"):
        assert f"tiny-rejection-sft-{key}" in text
    assert "rejection funnel" in text
    funnel = open_artifact(page, "tiny-rejection-sft-funnel", tmp_path / "funnel.png")
    for cell in ("generated", "format", "correct", "dedup", "64", "27"):
        assert cell in funnel
    assert (tmp_path / "funnel.png").stat().st_size > 10_000


def test_browser_renders_embedded_curve_picture(server, runs, browser_page, tmp_path):
    _, stage_runs, _ = runs
    page = browser_page
    find_artifacts_in_ui(server, stage_runs["reasoning-rl"], page)
    open_artifact(page, "tiny-reasoning-rl-curves", tmp_path / "curves.png")
    img = page.locator("img[src^='data:image/png;base64,']").first
    img.wait_for()
    width = page.evaluate("(img) => img.naturalWidth", img.element_handle())
    assert width > 100  # decoded and laid out, not a broken-image icon


def test_browser_table_cells_keep_think_and_answer_tags(server, runs, browser_page, tmp_path):
    """Completions in table artifacts are text: the UI must show `<think>`/`<answer>`, not swallow them
    as HTML tags."""
    _, stage_runs, _ = runs
    page = browser_page
    find_artifacts_in_ui(server, stage_runs["reasoning-rl"], page)
    table = open_artifact(page, "tiny-reasoning-rl-monitor", tmp_path / "monitor.png")
    assert "<think>2+2 is 4</think><answer>4</answer>" in table, table
    assert "a < b and c > d" in table and "&lt;" not in table


def test_browser_summary_links_to_stage_runs(server, runs, browser_page):
    pipeline_run, stage_runs, _ = runs
    page = browser_page
    find_artifacts_in_ui(server, pipeline_run, page)
    open_artifact(page, "tiny-pipeline-runs")
    link = page.get_by_role("link", name="rejection-sft", exact=True)
    assert link.get_attribute("href").endswith(f"/runs/flow-run/{stage_runs['rejection-sft']}")


def test_browser_artifacts_page_shows_key_history(server, runs, browser_page, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilterKey

    history = read_artifacts(server, key=ArtifactFilterKey(any_=["tiny-pipeline-summary"]))
    page = browser_page
    page.goto(f"{ui.ui_url(server)}/artifacts/key/tiny-pipeline-summary")
    page.get_by_text(str(history[0].id)[:8]).wait_for()
    page.screenshot(path=str(tmp_path / "summary-history.png"), full_page=True)
    text = page.locator("body").inner_text()
    assert len(history) == 2
    for artifact in history:  # one entry per pipeline run, each naming its flow run
        assert str(artifact.id)[:8] in text
