"""Launching a stage's training as a child process group (`launcher: {kind: accelerate, ...}` in a stage's block).

The Prefect task (`pipeline.flows.execute_stage`) stays the one place that creates and registers the version: it
writes a hand-off file (the flows file, pipeline, stage and the StageContext's plain fields), then runs

    accelerate launch --num_processes N --num_machines M [--config_file F | --multi_gpu] -m pipeline.launch HANDOFF

Every rank rebuilds the config and the context from the hand-off and calls the stage's `run(cfg, ctx)`; TRL's
trainers shard the data and all-reduce the gradients (DDP; DeepSpeed ZeRO or FSDP through the accelerate config).
Only the main process writes the version folder: the other ranks get a scratch `out_dir` under the work folder
(collective saves still see every rank), report nothing, and the main process writes the stage's metrics, with
the world size, for the parent to read. Evaluation runs afterwards in the parent, once. The parent streams the
group's output into its log (the Prefect run log), ends the whole group when it is cancelled, interrupted or
dies (`PR_SET_PDEATHSIG` on Linux), and registers the version only when the launch exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from stages.common import StageContext, UserError

log = logging.getLogger("r1flow")
HANDOFF, METRICS = "launch.json", "launch-metrics.json"
USER_ERROR = re.compile(r"(?:^|\]:\s*)error: (.+)$")  # a rank's UserError line, as `main` prints it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher, handoff: Path, config_dir: Path, device: str) -> list[str]:
    """The `accelerate launch` command line for `launcher` (a pipeline.config.LauncherConfig)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launcher.num_processes),
           "--num_machines", str(launcher.num_machines), "--machine_rank", str(launcher.machine_rank),
           "--main_process_port", str(launcher.main_process_port or free_port())]
    if launcher.main_process_ip:
        cmd += ["--main_process_ip", launcher.main_process_ip]
    if launcher.config_file:
        path = Path(os.path.expanduser(launcher.config_file))
        cmd += ["--config_file", str(path if path.is_absolute() else config_dir / path)]
    elif launcher.num_processes > 1 or launcher.num_machines > 1:
        # plain DDP: torch.distributed's launcher starts one process per rank; on CPU the ranks talk over gloo
        # (the stage's TRL config sets use_cpu when device is cpu)
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if device == "cpu":
        cmd += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // launcher.num_processes))]
    return [*cmd, "-m", "pipeline.launch", str(handoff)]


def _die_with_parent() -> None:  # runs in the child before exec: end it when the parent process dies
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: a cancelled or interrupted parent still ends the group (below)
        pass


def run_launched(config_file: Path, pipeline: str, stage: str, ctx: StageContext, launcher, rehearse: bool) -> dict:
    """Run `stage` under `launcher` as a child process group; returns the metrics its main process wrote."""
    work = Path(ctx.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    handoff, metrics_file = work / HANDOFF, work / METRICS
    metrics_file.unlink(missing_ok=True)
    handoff.write_text(json.dumps({
        "config_file": str(config_file), "pipeline": pipeline, "stage": stage, "rehearse": rehearse,
        "metrics_file": str(metrics_file),
        "ctx": {"out_dir": str(ctx.out_dir), "work_dir": str(ctx.work_dir),
                "inputs": {k: str(v) for k, v in ctx.inputs.items()}, "seed": ctx.seed, "device": ctx.device,
                "version_id": ctx.version_id, "parents": ctx.parents, "system_prompt": ctx.system_prompt,
                "rehearsal": ctx.rehearsal, "data_mirror": str(ctx.data_mirror) if ctx.data_mirror else None},
    }))
    cmd = command(launcher, handoff, Path(config_file).parent, ctx.device)
    log.info("%s: launching %d process(es) on %d machine(s): %s", stage, launcher.num_processes,
             launcher.num_machines, " ".join(cmd))
    ctx.reporter.progress(0.0, f"{stage}: launched {launcher.num_processes} process(es) with accelerate")
    # progress bars would flood the run log line by line; the trainers' logged metrics still stream
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent, cwd=os.getcwd())
    tail: deque[str] = deque(maxlen=20)
    user_errors: dict[str, None] = {}  # the ranks' one-line user errors (`error: ...`, see main), once each
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log.info("%s | %s", stage, line)
                match = USER_ERROR.search(line)
                if match:
                    user_errors[match.group(1)] = None
        code = proc.wait()
    except BaseException:  # cancelled, interrupted, failed: the whole group goes, never a stray rank
        stop_group(proc)
        raise
    if code != 0 and user_errors:  # bad input, found by the ranks: the one-line errors, no retry
        raise UserError(*user_errors)
    if code != 0:
        raise RuntimeError(f"{stage}: the launched training exited with status {code}; last output:\n" + "\n".join(tail))
    if not metrics_file.is_file():
        raise RuntimeError(f"{stage}: the launched training exited 0 but its main process wrote no metrics ({metrics_file})")
    return json.loads(metrics_file.read_text())


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group of `proc`, then SIGKILL what is left after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def main(handoff_path: str) -> int:
    """One rank of a launched stage (see the module docstring)."""
    from accelerate import PartialState  # noqa: PLC0415

    from pipeline.config import load_config, stage_module  # noqa: PLC0415

    handoff = json.loads(Path(handoff_path).read_text())
    c = handoff["ctx"]
    state = PartialState(cpu=c["device"] == "cpu")
    _, pipe = load_config(handoff["config_file"], rehearse=handoff["rehearse"],
                          data_mirror=c["data_mirror"]).get(handoff["pipeline"])
    stage = handoff["stage"]
    cfg = pipe.stage_config(stage)
    out_dir = Path(c["out_dir"]) if state.is_main_process else Path(c["work_dir"]) / f"rank-{state.process_index}"
    ctx = StageContext(out_dir=out_dir, work_dir=Path(c["work_dir"]), inputs={k: Path(v) for k, v in c["inputs"].items()},
                       pipeline=pipe, seed=c["seed"], device=c["device"], version_id=c["version_id"],
                       parents=c["parents"], system_prompt=c["system_prompt"], rehearsal=c["rehearsal"],
                       data_mirror=Path(c["data_mirror"]) if c["data_mirror"] else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = stage_module(stage, cfg).run(cfg, ctx)
    state.wait_for_everyone()
    if state.is_main_process:
        metrics = {**(metrics or {}), "launcher": {"kind": "accelerate", "world_size": state.num_processes,
                                                   "backend": str(state.backend),
                                                   "distributed_type": str(state.distributed_type)}}
        tmp = Path(handoff["metrics_file"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics))
        os.replace(tmp, handoff["metrics_file"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except UserError as exc:
        print("\n".join(f"error: {p}" for p in exc.problems), file=sys.stderr)
        sys.exit(2)
