"""The `r1flow` command. User errors print one line per problem and exit 2; never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.config import STAGES, load_config
from stages.common import UserError

EXIT_USER_ERROR = 2


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _load(args):
    mirror = getattr(args, "data_mirror", None)
    if mirror:  # the flows re-read the config (and may run elsewhere): the environment carries the mirror to them
        os.environ["R1FLOW_DATA_MIRROR"] = str(Path(mirror).expanduser().resolve())
    return load_config(args.config, rehearse=getattr(args, "rehearse", False))


def _store(args):
    from pipeline.store import Store  # noqa: PLC0415

    loaded = _load(args)
    name, _ = loaded.get(args.pipeline)
    return Store(loaded.storage_root(name))


def _version_row(v) -> dict[str, Any]:
    ev = v.metrics.get("eval", {})
    return {"version": v.id, "stage": v.stage, "created": v.created[:19], "parents": ",".join(v.parents.values()),
            "pass@1": ev.get("pass@1", "")}


def cmd_validate(args) -> int:
    loaded = load_config(args.file or args.config)
    for name, pipe in loaded.pipelines.items():
        mark = "*" if name == loaded.default else " "
        print(f"{mark} {name}: {', '.join(pipe.enabled_stages())}  — {pipe.description}")
    print(f"{loaded.path}: OK ({len(loaded.pipelines)} pipelines, default {loaded.default})")
    return 0


def _write_summary(path: str | None, rows: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=2))


def cmd_stage(args) -> int:
    from pipeline import flows  # noqa: PLC0415

    loaded = _load(args)
    name, pipe = loaded.get(args.pipeline)
    _prefect_api_ready()
    if args.downstream:
        rows = flows.pipeline_flow(config_file=str(loaded.path), pipeline=name, start_at=args.name,
                                   rehearse=loaded.rehearse)
    else:
        rows = [flows.run_stage_flow(loaded, name, args.name, from_version=args.from_version, force=args.force)]
    print(_table(rows))
    _write_summary(args.summary_json, rows)
    return 0


def cmd_world(args) -> int:
    args.name, args.downstream, args.from_version = "world", False, None
    return cmd_stage(args)


def cmd_run(args) -> int:
    from pipeline import flows  # noqa: PLC0415

    loaded = _load(args)
    name, _ = loaded.get(args.pipeline_name or args.pipeline)
    preflight = _plan(args, loaded, name)  # lengths, TRL configs and memory before any stage starts
    if preflight.problems:
        raise UserError(*preflight.problems, f"r1flow plan {name} shows the plan; nothing was run")
    _prefect_api_ready()
    start = time.monotonic()
    if loaded.rehearse:
        print(f"rehearsal of {name}: a few steps and rows per stage, versions under {loaded.storage_root(name)}",
              file=sys.stderr)
    try:
        rows = flows.pipeline_flow(config_file=str(loaded.path), pipeline=name, force=args.force or [],
                                   rehearse=loaded.rehearse)
    except flows.StageFailed as exc:
        print(_table(exc.rows) if exc.rows else "(no stage finished)")
        _write_summary(args.summary_json, exc.rows)
        print(f"error: {exc}", file=sys.stderr)
        print("completed stages stay registered; run `r1flow run` again to resume at the failed stage", file=sys.stderr)
        return 1
    print(_table(rows))
    print(f"pipeline {name}: {len(rows)} stages in {time.monotonic() - start:.0f} s")
    _write_summary(args.summary_json, rows)
    return 0


def _plan(args, loaded, name: str):
    from pipeline.plan import plan  # noqa: PLC0415

    _, pipe = loaded.get(name)
    return plan(name, pipe, getattr(args, "device_memory_gib", None), getattr(args, "data_mirror", None),
                check_memory=not loaded.rehearse, config_dir=loaded.path.parent)


def _plan_line(problem: str) -> str:
    """`flows.yaml: pipelines.P.stages.S.FIELD: msg` -> `P/S: FIELD: msg` (`P/eval`, `P/world` alike)."""
    import re  # noqa: PLC0415

    sections = "|".join(re.escape(s) for s in ["eval", "world", *STAGES])
    m = re.match(rf"^.*?: pipelines\.(.+?)\.(?:stages\.)?({sections})\.(\S+): (.*)$", problem)
    return f"{m[1]}/{m[2]}: {m[3]}: {m[4]}" if m else problem


def cmd_show_config(args) -> int:
    """Resolved settings with their sources (pipeline/show_config.py)."""
    from pipeline.show_config import resolved_rows  # noqa: PLC0415

    loaded = load_config(args.config)
    name = args.pipeline_name or args.pipeline or loaded.default
    rows = resolved_rows(loaded, name, args.stage)
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


def cmd_plan(args) -> int:
    """Preflight: TRL configs built for real, GRPO batches, lengths against each model's context window, chat
    template and stop tokens, peak memory per stage against the device (pipeline/plan.py, docs/PLAN.md)."""
    try:
        loaded = load_config(args.flows or args.config)
    except UserError as exc:  # validation problems, in the plan's `pipeline/stage: field: problem` form
        raise UserError(*(_plan_line(p) for p in exc.problems)) from None
    name = args.pipeline_name or args.pipeline or loaded.default
    result = _plan(args, loaded, name)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        budget = "no budget check on cpu" if result.budget is None else f"{result.budget / 2**30:.0f} GiB per device"
        print(f"plan of {name} ({result.device}, {budget}; GiB)")
        print(_table(result.table()))
        for m in result.models():
            if m["chat_template"] is not None or m["context"]:
                template = {True: "yes", False: "NO", None: "?"}[m["chat_template"]]
                print(f"model {m['model']}: context {m['context'] or '?'} tokens, chat template {template}, "
                      f"end of turn {m['end_of_turn'] or '-'}, eos {m['eos'] or '-'}")
        for note in dict.fromkeys(result.notes):
            print(f"note: {note}")
    if result.problems:
        raise UserError(*result.problems)
    if not args.json:
        print(f"plan of {name}: OK")
    return 0


def cmd_eval(args) -> int:
    from stages.evaluate import evaluate  # noqa: PLC0415

    from stages.common import resolve_system_prompt  # noqa: PLC0415

    loaded = _load(args)
    name, pipe = loaded.get(args.pipeline)
    store = _store(args)
    v = store.require(args.version)
    model = v.path / ("base_model" if v.stage == "world" else "model")
    if not (model / "config.json").is_file():
        raise UserError(f"version {v.id}: has no model to evaluate ({model})")
    world = v.path if v.stage == "world" else (store.get(v.parents["world"]).path if "world" in v.parents else None)
    result = evaluate(str(model), pipe.eval, world, system_prompt=resolve_system_prompt(pipe.system_prompt),
                      mirror=pipe.data_mirror)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table([{k: val for k, val in result.items() if not isinstance(val, (list, dict))}]))
    return 0


def cmd_ls(args) -> int:
    if args.stage and args.stage not in STAGES:
        raise UserError(f"--stage {args.stage!r}: expected one of {', '.join(STAGES)}")
    versions = _store(args).list(args.stage)
    if args.json:
        print(json.dumps([{"id": v.id, "stage": v.stage, "path": str(v.path), "created": v.created,
                           "parents": v.parents, "metrics": v.metrics} for v in versions], indent=2))
    else:
        print(_table([_version_row(v) for v in versions]))
    return 0


def _get(store, vid):
    return store.require(vid)


def cmd_show(args) -> int:
    v = _get(_store(args), args.version)
    if args.json:
        print(json.dumps({**v.manifest, "path": str(v.path)}, indent=2))
        return 0
    m = v.manifest
    print(f"{v.id}  ({v.stage})\npath:    {v.path}\ncreated: {v.created}\nparents: {v.parents or '-'}")
    print(f"code:    {m.get('code_version')}  r1flow {m.get('r1flow_version')}")
    ev = v.metrics.get("eval")
    if ev:
        print("eval:    " + ", ".join(f"{k}={_fmt(val)}" for k, val in ev.items() if not isinstance(val, (list, dict))))
    print(f"files:   {len(m.get('files', {}))} ({sum(f['size'] for f in m.get('files', {}).values()) / 1e6:.1f} MB)")
    return 0


def cmd_lineage(args) -> int:
    store = _store(args)
    v = _get(store, args.version)
    lin = store.lineage(v.id)
    for label, items in (("ancestors", lin["ancestors"]), ("descendants", lin["descendants"])):
        print(f"{label}:")
        for a in items:
            print(f"  {a.id}  ({a.stage})")
        if not items:
            print("  (none)")
    return 0


def cmd_verify(args) -> int:
    store = _store(args)
    if args.version:
        _get(store, args.version)
    problems = store.verify(args.version)
    for p in problems:
        print(p)
    what = args.version or f"all versions in {store.root}"
    print(f"verified {what}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


def cmd_gc(args) -> int:
    """List (and with --yes remove) the versions and work folders nothing refers to (Store.garbage)."""
    from pipeline.flows import resolve_upstream  # noqa: PLC0415
    from pipeline.store import Store  # noqa: PLC0415

    loaded = _load(args)
    name, pipe = loaded.get(args.pipeline)
    store = Store(loaded.storage_root(name))
    keep: set[str] = set()
    for stage in pipe.enabled_stages():  # what `r1flow stage S` would start from today stays
        try:
            keep |= set(resolve_upstream(store, pipe, stage, None, None).values())
        except UserError:
            pass
    items = store.garbage(keep)
    if not items:
        print(f"nothing to remove in {store.root}")
        return 0
    width = max(len(i.name) for i in items) + 5
    for i in items:
        where = f"work/{i.name}" if i.kind == "work" else i.name
        print(f"{i.kind:<7}  {where:<{width}}  {_size(i.size):>9}  {i.reason}")
    total = _size(sum(i.size for i in items))
    if not args.yes:
        print(f"{len(items)} item(s), {total}: dry run, nothing removed; `r1flow gc --yes` removes them")
        return 0
    skipped = store.remove_garbage(items)
    for line in skipped:
        print(line)
    print(f"removed {len(items) - len(skipped)} of {len(items)} item(s) ({total} listed)")
    return 0


def cmd_deploy(args) -> int:
    from pipeline.deploy import deploy  # noqa: PLC0415

    loaded = _load(args)
    name, _ = loaded.get(args.pipeline_name or args.pipeline)
    rows = deploy(loaded, name, args.pool)
    print(_table(rows))
    print(f"run the pipeline: prefect deployment run 'r1flow-pipeline/{name}' (a worker must serve each pool: "
          f"prefect worker start --pool POOL)")
    return 0


def cmd_ui(args) -> int:
    from pipeline import ui  # noqa: PLC0415

    return ui.main(port=args.port) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1flow", description="Run the DeepSeek-R1 post-training recipe as Prefect flows.")
    p.add_argument("--config", "-c", default=None, help="flows file (default: $R1FLOW_CONFIG or ./flows.yaml)")
    p.add_argument("--pipeline", "-p", default=None, help="pipeline name (default: the file's `default`)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rehearse_help = ("rehearsal: a few steps and rows per stage, versions under <storage_root>-rehearse "
                     "(checks the mechanics on CPU in minutes)")
    mirror_help = ("folder laid out by hub id that replaces the hub: models at DIR/<org>/<name>/, datasets at "
                   "DIR/<org>/<name>/<config or default>/<split>.jsonl (overrides flows.yaml's data_mirror)")

    s = sub.add_parser("validate", help="check a flows file; one line per problem, exit 2 if any")
    s.add_argument("file", nargs="?", default=None)
    s.set_defaults(func=cmd_validate)

    def stage_opts(s):
        s.add_argument("--force", action="store_true", help="re-run even if a cached version exists")
        s.add_argument("--summary-json", default=None, metavar="PATH", help="write per-stage results as JSON")
        s.add_argument("--rehearse", action="store_true", help=rehearse_help)
        s.add_argument("--data-mirror", default=None, metavar="DIR", help=mirror_help)

    s = sub.add_parser("world", help="build (or reuse) the tiny synthetic world")
    stage_opts(s)
    s.set_defaults(func=cmd_world)

    s = sub.add_parser("stage", help="run one stage (reusing upstream versions)")
    s.add_argument("name", choices=STAGES)
    s.add_argument("--from", dest="from_version", default=None, metavar="VERSION", help="upstream version (default: latest)")
    s.add_argument("--downstream", action="store_true", help="re-run this stage and every stage after it")
    stage_opts(s)
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("run", help="run the whole pipeline, reusing cached stages")
    s.add_argument("pipeline_name", nargs="?", default=None, metavar="PIPELINE")
    s.add_argument("--force", nargs="*", choices=STAGES, help="stages to re-run even if cached")
    s.add_argument("--summary-json", default=None, metavar="PATH")
    s.add_argument("--rehearse", action="store_true", help=rehearse_help)
    s.add_argument("--data-mirror", default=None, metavar="DIR", help=mirror_help)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("deploy", help="Prefect deployments for a pipeline and each stage, on work pools "
                                      "(orchestration.work_pools)")
    s.add_argument("pipeline_name", nargs="?", default=None, metavar="PIPELINE")
    s.add_argument("--pool", default=None, help="work pool of the pipeline flow (and of stages without their own)")
    s.add_argument("--data-mirror", default=None, metavar="DIR", help=mirror_help)
    s.set_defaults(func=cmd_deploy)

    s = sub.add_parser("plan", help="preflight in seconds: TRL configs, lengths, chat template, peak memory per stage",
                       description="Build every stage's TRL config, check GRPO batches and every length against the "
                                   "model's context window, report the chat template and stop tokens, and estimate "
                                   "each stage's peak accelerator memory (docs/PLAN.md). One line per problem, exit 2.")
    s.add_argument("pipeline_name", nargs="?", default=None, metavar="PIPELINE")
    s.add_argument("--flows", default=None, metavar="FILE", help="flows file (as the global --config)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.add_argument("--data-mirror", default=None, metavar="DIR", help=mirror_help)
    s.add_argument("--device-memory-gib", type=float, default=None, metavar="N",
                   help="accelerator memory per device (default 80 for device: cuda; no budget check on cpu)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("show-config", help="a pipeline's resolved settings and where each value comes from",
                       description="Every setting of a pipeline (or one STAGE) as the run resolves it, with its source: "
                                   "flows.yaml, r1flow default, r1flow run default or set by r1flow; TRL arguments "
                                   "are listed when set in flows.yaml or different from TRL's own default.")
    s.add_argument("pipeline_name", nargs="?", default=None, metavar="PIPELINE")
    s.add_argument("stage", nargs="?", default=None, metavar="STAGE")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.set_defaults(func=cmd_show_config)

    s = sub.add_parser("eval", help="evaluate a version's model on the held-out prompts")
    s.add_argument("version")
    s.add_argument("--json", action="store_true")
    s.add_argument("--rehearse", action="store_true", help="look in the rehearsal store")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("ls", help="list versions")
    s.add_argument("--stage", default=None)
    s.add_argument("--json", action="store_true")
    s.add_argument("--rehearse", action="store_true", help="look in the rehearsal store")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("show", help="show one version's manifest")
    s.add_argument("version")
    s.add_argument("--json", action="store_true")
    s.add_argument("--rehearse", action="store_true", help="look in the rehearsal store")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("lineage", help="ancestors and descendants of a version")
    s.add_argument("version")
    s.add_argument("--rehearse", action="store_true", help="look in the rehearsal store")
    s.set_defaults(func=cmd_lineage)

    s = sub.add_parser("verify", help="re-hash versions' files; report corrupted or missing ones")
    s.add_argument("version", nargs="?", default=None)
    s.add_argument("--rehearse", action="store_true", help="look in the rehearsal store")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("gc", help="list versions and work folders nothing refers to; --yes removes them",
                       description="Unreferenced: a version that is not the latest of its stage, not an upstream "
                                   "`r1flow stage` would take today, and that no kept version was built from; a work "
                                   "folder whose version is registered, or whose unfinished run was superseded by a "
                                   "later version of its stage. Dry run unless --yes.")
    s.add_argument("--yes", action="store_true", help="remove them (default: only list them)")
    s.add_argument("--rehearse", action="store_true", help="look in the rehearsal store")
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("ui", help="start a local Prefect server with the UI (127.0.0.1)")
    s.add_argument("--port", type=int, default=4200)
    s.set_defaults(func=cmd_ui)
    return p


_TEMP_SERVER: dict = {}


def _start_prefect_api() -> None:
    """Before a flow command loads its config, pick the Prefect API: the configured one
    (`PREFECT_API_URL`, from the environment or the Prefect profile), else a running `r1flow ui`, else
    Prefect's temporary server (~5 s), started in a thread so that it comes up while the config and the
    training stack load (~3 s); `_prefect_api_ready()` waits for it before the first flow."""
    from prefect.context import refresh_global_settings_context  # noqa: PLC0415
    from prefect.settings import get_current_settings  # noqa: PLC0415

    from pipeline.ui import use_running_server  # noqa: PLC0415

    if get_current_settings().api.url:
        return
    url = use_running_server()
    if url:
        refresh_global_settings_context()  # Prefect read its settings at import: make it see the new URL
        print(f"reporting to the Prefect UI at {url} (started by `r1flow ui`)", file=sys.stderr)
        return
    from prefect.server.api.server import SubprocessASGIServer  # noqa: PLC0415

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from it
    # Prefect waits 20 s for it; on a loaded 2-core machine its start (imports, database) can take longer
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    refresh_global_settings_context()
    server = SubprocessASGIServer()  # the object Prefect's client uses: started here, reused there
    _one_start_at_a_time(server)

    def start() -> None:
        try:
            server.start()
        except Exception:  # noqa: BLE001  (the flow's own start() raises it again, with Prefect's message)
            pass

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    _TEMP_SERVER.update(server=server, thread=thread)


def _one_start_at_a_time(server) -> None:
    """Make `server.start` (the temporary server's; Prefect's client calls it too) safe to race and leak-free.

    Prefect's `SubprocessASGIServer.start` checks `running` and only then spawns uvicorn, with no lock: a client
    asking for the API while this module's thread is still starting the server spawned a second server (on the same
    port when the first had not bound it yet: `[Errno 98] address already in use`), and only the last one was
    stopped at exit. A start that times out (a loaded machine) left its process running while the next call
    spawned another. So: one start at a time, and a failed start stops the process it spawned."""
    lock = threading.Lock()
    start = server.start

    def locked_start(*args, **kwargs):
        with lock:
            try:
                start(*args, **kwargs)
            except BaseException:
                proc = server.server_process
                if proc is not None and proc.poll() is None:  # never leave a half-started server behind
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                raise

    server.start = locked_start


def _prefect_api_ready() -> None:
    """Wait until the temporary server started by `_start_prefect_api` answers (no-op without one)."""
    if _TEMP_SERVER:
        _TEMP_SERVER["thread"].join()


def _release_prefect_api() -> None:
    """On the way out: a server still starting has, once its process exists, registered its shutdown
    at exit (Prefect does so right after spawning it), so wait only for that, never for it to be up."""
    if not _TEMP_SERVER:
        return
    server, thread = _TEMP_SERVER["server"], _TEMP_SERVER["thread"]
    deadline = time.monotonic() + 5
    while thread.is_alive() and server.server_process is None and time.monotonic() < deadline:
        time.sleep(0.01)


FLOW_COMMANDS = {"world", "stage", "run"}


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


# Loggers whose records reach the Prefect run log (besides Prefect's own): the flows' `r1flow` logger and every
# module of the stages (`stages.*`: training progress, filters, guards) and of the orchestration (`pipeline.*`).
RUN_LOG_LOGGERS = "r1flow,stages,pipeline"


def route_logs_to_prefect() -> None:
    """Ask Prefect (before it configures logging) to forward r1flow's loggers to the run log; a user's own
    PREFECT_LOGGING_EXTRA_LOGGERS wins."""
    import logging  # noqa: PLC0415

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", RUN_LOG_LOGGERS)
    for name in RUN_LOG_LOGGERS.split(","):  # Prefect copies handlers, not levels: INFO would stop at the root's WARNING
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    route_logs_to_prefect()
    args = build_parser().parse_args(argv)
    previous = None
    if args.command in FLOW_COMMANDS:
        # `kill` (SIGTERM) unwinds like Ctrl-C: the running stage is not registered, and Prefect's exit
        # handlers stop the temporary server (with Python's default handler it was left running).
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminated)
        _start_prefect_api()
    try:
        return args.func(args)
    except UserError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _release_prefect_api()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
