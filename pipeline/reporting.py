"""Stage reporting to the Prefect UI: `PrefectReporter` turns `stages.common.Reporter` calls into
Prefect artifacts (tables, Markdown, links, progress), plus helpers the flows use to build them
(curve plots, the pipeline summary table, lineage Markdown, folder links).

Artifact keys are `f"{pipeline}-{stage}-{key}"` sanitised to `^[a-z0-9-]*$`, so the same key is
reused run after run and the UI's Artifacts page shows each one's history.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.secrets import is_secret_key, redact
from stages.common import Reporter

log = logging.getLogger(__name__)

# Largest PNG embedded inline as a data: URI (bigger ones are linked instead).
MAX_INLINE_PNG_BYTES = 512 * 1024


def artifact_key(*parts: str) -> str:
    """Join parts with '-' and sanitise to Prefect's key alphabet `^[a-z0-9-]*$`:
    `artifact_key("Tiny", "reasoning_rl", "eval")` -> `"tiny-reasoning-rl-eval"`."""
    key = "-".join(str(p) for p in parts).lower()
    key = re.sub(r"[^a-z0-9-]+", "-", key)
    return re.sub(r"-{2,}", "-", key).strip("-")


def _cell(key: str, value: Any) -> Any:
    """A JSON-friendly table cell: numpy/torch scalars -> Python, floats rounded, paths -> str. Text is shown
    as text: the Prefect UI renders table cells as Markdown/HTML, where `<think>`/`<answer>` would vanish as
    tags (seen in headless Chromium), so `<` is written as the entity `&lt;` (the UI shows `<`)."""
    if is_secret_key(key) and value not in (None, ""):
        return "***"
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            value = str(value)
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if value is None or isinstance(value, (bool, int)):
        return value
    return redact(str(value)).replace("<", "&lt;")


def clean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the same columns in the same order (union, first-seen order; missing -> None)
    and JSON-friendly, secret-free cells."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return [{c: _cell(c, row.get(c)) for c in columns} for row in rows]


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext  # noqa: PLC0415

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class PrefectReporter(Reporter):
    """Publishes a stage's reports as Prefect artifacts keyed `{pipeline}-{stage}-{key}`.

    Call it from inside a flow or task run (the artifacts attach to that run). Outside a run it is
    a no-op that logs at debug level. A failure to publish (server down, ...) is logged as a
    warning and never fails the stage. `progress()` creates one progress artifact per reporter
    (per stage run) and updates it at most every `min_interval` seconds and only when it moved by
    at least `min_step`; reaching 1.0 is always published."""

    def __init__(self, pipeline: str, stage: str, min_interval: float = 2.0, min_step: float = 0.01):
        self.pipeline = pipeline
        self.stage = stage
        self.min_interval = min_interval
        self.min_step = min_step
        self._progress_id = None
        self._progress_last: tuple[float, float] | None = None  # (time, fraction) last published

    def key(self, key: str) -> str:
        """The stable artifact key for this pipeline and stage."""
        return artifact_key(self.pipeline, self.stage, key)

    def _publish(self, what: str, fn, /, **kwargs) -> Any:
        if not _in_prefect_run():
            log.debug("no Prefect run context; skipped %s artifact %s", what, kwargs.get("key"))
            return None
        try:
            return fn(**kwargs)
        except Exception as e:  # reporting must never break training
            log.warning("could not publish %s artifact %s: %s", what, kwargs.get("key"), e)
            return None

    def _description(self, description: str) -> str:
        return redact(description) or f"{self.pipeline} / {self.stage}"

    def progress(self, fraction: float, message: str = "") -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: PLC0415

        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        if self._progress_last is not None:
            last_time, last_fraction = self._progress_last
            final = fraction >= 1.0 and last_fraction < 1.0
            if not final and (now - last_time < self.min_interval
                              or abs(fraction - last_fraction) < self.min_step):
                return
        description = self._description(redact(message) or f"{self.stage} progress")
        if self._progress_id is None:
            self._progress_id = self._publish("progress", create_progress_artifact,
                                              progress=100 * fraction, key=self.key("progress"),
                                              description=description)
            if self._progress_id is None:
                return
        else:
            self._publish("progress", update_progress_artifact, artifact_id=self._progress_id,
                          progress=100 * fraction, description=description)
        self._progress_last = (now, fraction)

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        from prefect.artifacts import create_table_artifact  # noqa: PLC0415

        if not rows:
            self.markdown(key, "_(no rows)_", description)
            return
        self._publish("table", create_table_artifact, table=clean_rows(rows), key=self.key(key),
                      description=self._description(description))

    def markdown(self, key: str, text: str, description: str = "") -> None:
        from prefect.artifacts import create_markdown_artifact  # noqa: PLC0415

        self._publish("markdown", create_markdown_artifact, markdown=redact(text),
                      key=self.key(key), description=self._description(description))

    def link(self, key: str, target: str, description: str = "") -> None:
        """Link to `target`: a URL as is, a local path as a file:// URI. The link text is the plain
        path, since browsers do not follow file:// links from an http page (copy it instead)."""
        from prefect.artifacts import create_link_artifact  # noqa: PLC0415

        uri, text = _link_target(str(target))
        self._publish("link", create_link_artifact, link=redact(uri), link_text=redact(text),
                      key=self.key(key), description=self._description(description))

    def image(self, key: str, png_path: Path, description: str = "", caption: str | None = None) -> None:
        """A Markdown artifact showing the PNG (see `image_markdown`)."""
        self.markdown(key, image_markdown(png_path, caption), description)

    def warning(self, key: str, text: str) -> None:
        """A warning artifact, also written to the run's log (shown in the UI's Logs tab)."""
        self.markdown(key, f"**Warning**\n\n{text}", f"warning from {self.stage}")
        if _in_prefect_run():
            from prefect.logging import get_run_logger  # noqa: PLC0415

            get_run_logger().warning("%s/%s: %s", self.stage, key, redact(text))


def _link_target(target: str) -> tuple[str, str]:
    """(uri, text) for a link artifact: URLs stay as they are (file:// URIs show their path)."""
    if target.startswith("file://"):
        return target, unquote(urlparse(target).path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", target):
        return target, target
    return link_to_folder(target), str(Path(target).expanduser().resolve())


def image_markdown(png_path: Path | str, caption: str | None = None) -> str:
    """Markdown showing a PNG inline as a `data:image/png;base64,...` URI (the self-hosted Prefect
    UI renders it; checked with headless Chromium), with `caption` below (default: the file's path; pass a
    caption for a picture that is not kept, so the artifact never points at a deleted file). A missing file,
    or one over `MAX_INLINE_PNG_BYTES`, gets a link to the file instead."""
    png_path = Path(png_path).expanduser().resolve()
    path_line = caption if caption is not None else f"`{png_path}`"
    if not png_path.is_file() or png_path.stat().st_size > MAX_INLINE_PNG_BYTES:
        why = "missing" if not png_path.is_file() else "too large to embed"
        return f"Picture {why}: [{png_path.name}]({png_path.as_uri()})\n\n{path_line}"
    data = base64.b64encode(png_path.read_bytes()).decode("ascii")
    return f"![{png_path.stem}](data:image/png;base64,{data})\n\n{path_line}"


def plot_curves(history: list[dict[str, Any]], keys: list[str], path: Path | str,
                title: str = "") -> Path:
    """Plot metrics from a trainer log history (list of dicts, e.g. `trainer.state.log_history`)
    into a PNG at `path`: one subplot per key in `keys`, value vs `step` (row index when a row has
    no `step`). Keys with no values are left out; with none at all the picture says so."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    series = {}
    for key in keys:
        points = [(row.get("step", i), float(row[key])) for i, row in enumerate(history)
                  if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
        if points:
            series[key] = points
    n = max(len(series), 1)
    fig, axes = plt.subplots(n, 1, figsize=(6, 2.2 * n), squeeze=False)
    if not series:
        axes[0][0].text(0.5, 0.5, f"no values for {', '.join(keys) or 'any metric'}",
                        ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, (key, points) in zip(axes[:, 0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
    return path


def summary_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pipeline-level summary table: one row per stage with `stage`, `version`, `cached`,
    `seconds` first, then metrics. A nested `metrics` dict in a row is flattened into columns;
    seconds are rounded to 0.1 s."""
    flat = []
    for row in rows:
        out = {"stage": row.get("stage"), "version": row.get("version"),
               "cached": row.get("cached"), "seconds": row.get("seconds")}
        out.update({k: v for k, v in row.items() if k not in out and k != "metrics"})
        out.update(row.get("metrics") or {})
        if isinstance(out["seconds"], (int, float)):
            out["seconds"] = round(float(out["seconds"]), 1)
        flat.append(out)
    return clean_rows(flat)


def _ref(item: Any, stage: str = "") -> tuple[str, str]:
    """(stage, id) of a version given as an id string, a dict with "id", or an object with `.id`
    (e.g. `pipeline.store.Version`)."""
    if isinstance(item, dict):
        return str(item.get("stage", stage) or ""), str(item.get("id", ""))
    if hasattr(item, "id"):
        return str(getattr(item, "stage", stage) or ""), str(item.id)
    return stage, str(item)


def _refs(items: Any) -> list[tuple[str, str]]:
    if not items:
        return []
    if isinstance(items, dict):
        return [_ref(v, str(k)) for k, v in items.items()]
    return [_ref(v) for v in items]


def lineage_markdown(version: Any, parents: Any, children: Any = None) -> str:
    """Markdown naming a version, the versions it was built from (`parents`) and those built from
    it (`children`). Versions may be id strings, dicts with "id"/"stage", or objects with
    `.id`/`.stage` such as `pipeline.store.Version`; `parents`/`children` may also be a mapping
    stage -> version."""
    _, vid = _ref(version)
    lines = [f"**Version** `{vid}`", ""]
    for title, items in (("Built from", parents), ("Used by", children)):
        lines += [f"**{title}**", ""]
        entries = _refs(items)
        lines += [f"- {stage + ': ' if stage else ''}`{ref}`" for stage, ref in entries] or ["- none"]
        lines.append("")
    lines.append(f"Inspect with `r1flow show {vid}` and `r1flow lineage {vid}`.")
    return "\n".join(lines)


def flow_run_link(flow_run_id: str, text: str) -> str:
    """A Markdown link to a flow run's page in the Prefect UI, relative to the UI's own address
    (works whatever host/port the UI is served on), e.g. to link a stage's run from the summary."""
    return f"[{text}](/runs/flow-run/{flow_run_id})"


def link_to_folder(path: Path | str) -> str:
    """A file:// URI for a local file or folder (absolute, resolved)."""
    return Path(path).expanduser().resolve().as_uri()
