"""`r1flow show-config PIPELINE [STAGE]`: a pipeline's fully resolved settings and where each value comes from.

Every stage setting is listed with its source: `flows.yaml` (the user wrote it), `r1flow default` (the stage's
`Config` default, e.g. the tiny-world SFT schedule under `trainer:`), `r1flow run default` (merged under the
`trainer:` block when the stage builds its TRL config, e.g. preference-rl's GRPO_DEFAULTS) or `set by r1flow`
(seed, use_cpu, report_to). For TRL arguments, every one that differs from TRL's own default is listed (and
any the user wrote), next to TRL's default, so a recipe that silently inherits a tiny-world setting shows it.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from pipeline.plan import TRAINERS, _effective_args, _trl_defaults

FLOWS, STAGE_DEFAULT, RUN_DEFAULT, RUNTIME = "flows.yaml", "r1flow default", "r1flow run default", "set by r1flow"
_MISSING = object()


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _row(stage: str, setting: str, value: Any, source: str, trl_default: Any = _MISSING) -> dict[str, str]:
    return {"stage": stage, "setting": setting, "value": _value(value), "from": source,
            "TRL default": "" if trl_default is _MISSING else _value(trl_default)}


def _plain_rows(stage: str, dumped: dict[str, Any], raw: dict[str, Any], skip: tuple[str, ...] = ()) -> list[dict]:
    """Non-trainer settings; a block (a mapping) is shown key by key."""
    rows = []
    for key, value in dumped.items():
        if key in skip:
            continue
        mine = raw.get(key, _MISSING) if isinstance(raw, dict) else _MISSING
        if isinstance(value, dict) and value:  # a block (rewards, guard, generation): key by key
            written = mine if isinstance(mine, dict) else {}
            rows += [_row(stage, f"{key}.{k}", v, FLOWS if k in written else STAGE_DEFAULT) for k, v in value.items()]
        else:
            rows.append(_row(stage, key, value, STAGE_DEFAULT if mine is _MISSING else FLOWS))
    return rows


def trainer_rows(pipe, stage: str, cfg, raw: dict[str, Any]) -> list[dict]:
    """The TRL arguments a stage trains with: set in flows.yaml, or different from TRL's default."""
    trl_class, run_defaults, block = _effective_args(stage, cfg)
    field = "dpo_trainer" if trl_class == "DPOConfig" else "trainer"
    factory = type(cfg).model_fields[field].default_factory
    stage_defaults = factory() if factory else {}
    mine = raw.get(field) or {}
    runtime = {"seed": pipe.seed, "use_cpu": pipe.device == "cpu", "report_to": "none"}
    effective = {**runtime, **run_defaults, **block}
    trl_defaults = _trl_defaults(trl_class)
    rows = []
    for key in sorted(effective):
        default = trl_defaults.get(key, _MISSING)
        if key not in mine and default is not _MISSING and effective[key] == default:
            continue
        source = (FLOWS if key in mine else STAGE_DEFAULT if key in stage_defaults
                  else RUN_DEFAULT if key in run_defaults else RUNTIME)
        rows.append(_row(stage, f"{field}.{key} (trl.{trl_class})", effective[key], source, default))
    return rows


def resolved_rows(loaded, name: str, stage: str | None = None) -> list[dict[str, str]]:
    """Rows (stage, setting, value, from, TRL default) of pipeline `name` in a validated flows file, for one
    stage or all (pipeline-level settings first)."""
    from pipeline.config import STAGES  # noqa: PLC0415
    from stages.common import UserError  # noqa: PLC0415

    name, pipe = loaded.get(name)
    raw_pipe = (yaml.safe_load(loaded.path.read_text()).get("pipelines") or {}).get(name) or {}
    if stage is not None and stage not in STAGES:
        raise UserError(f"STAGE {stage!r}: not a stage (expected one of {', '.join(STAGES)})")
    if stage is not None and pipe.stage_config(stage) is None:
        raise UserError(f"STAGE {stage!r}: pipeline {name!r} has no `{stage}` block")
    rows = []
    if stage is None:
        rows += _plain_rows("pipeline", pipe.model_dump(mode="json"), raw_pipe, skip=("stages", "world"))
    for s in [stage] if stage else pipe.enabled_stages():
        cfg = pipe.stage_config(s)
        raw = (raw_pipe.get("world") if s == "world" else (raw_pipe.get("stages") or {}).get(s)) or {}
        if s in TRAINERS:
            rows += _plain_rows(s, cfg.model_dump(mode="json"), raw, skip=("trainer", "dpo_trainer"))
            rows += trainer_rows(pipe, s, cfg, raw)
        else:
            rows += _plain_rows(s, cfg.model_dump(mode="json"), raw)
    return rows
