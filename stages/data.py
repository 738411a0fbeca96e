"""Dataset and model references: `world:NAME` inside the tiny world, local paths, or hub ids.

A dataset reference in flows.yaml is either a string (`world:cold_start`, a local .jsonl/.json/
.parquet file or folder, or a hub id) or a mapping with `path`, optional `name`, `split` and
`columns` (a rename map from the names r1flow expects to the dataset's own column names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from stages.common import UserError

WORLD_PREFIX = "world:"


class DatasetSpec(BaseModel):
    """Where a dataset comes from and how its columns map onto r1flow's names."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="`world:NAME`, a local file/folder, or a hub dataset id")
    name: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="split to load")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="r1flow column name -> dataset column name, e.g. {prompt: problem, answer: solution}",
    )
    limit: int | None = Field(None, gt=0, description="keep only the first N rows")


DatasetRef = Union[str, DatasetSpec]


def as_spec(ref: DatasetRef) -> DatasetSpec:
    return ref if isinstance(ref, DatasetSpec) else DatasetSpec(path=ref)


def resolve_model(ref: str, world_dir: Path | None) -> str:
    """Turn a model reference into something `from_pretrained` accepts, or raise UserError."""
    if ref.startswith(WORLD_PREFIX):
        if world_dir is None:
            raise UserError(f"model {ref!r}: refers to the tiny world, but this pipeline has no world stage")
        path = Path(world_dir) / ref[len(WORLD_PREFIX):]
        if not (path / "config.json").is_file():
            raise UserError(f"model {ref!r}: expected a model folder with config.json at {path}")
        return str(path)
    path = Path(ref).expanduser()
    if ref.startswith((".", "/", "~")) or path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model {ref!r}: no model folder (config.json) at {path.resolve()}")
        return str(path.resolve())
    return ref  # a hub id; loading errors are reported by the caller


def _to_chat(value: Any, role: str) -> Any:
    """Plain strings become one-message conversations, so text and chat datasets both work."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value


def load(ref: DatasetRef, world_dir: Path | None, required_columns: tuple[str, ...] = ()):
    """Load a dataset reference as a `datasets.Dataset`, renaming mapped columns and checking that
    `required_columns` exist. Problems raise UserError naming the dataset and the columns."""
    import datasets  # noqa: PLC0415

    spec = as_spec(ref)
    label = spec.path
    if spec.path.startswith(WORLD_PREFIX):
        if world_dir is None:
            raise UserError(f"dataset {label!r}: refers to the tiny world, but this pipeline has no world stage")
        file = Path(world_dir) / "data" / f"{spec.path[len(WORLD_PREFIX):]}.jsonl"
        if not file.is_file():
            raise UserError(f"dataset {label!r}: expected {file}")
        ds = datasets.load_dataset("json", data_files=str(file), split="train")
    else:
        local = Path(spec.path).expanduser()
        try:
            if local.is_file():
                kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
                if kind is None:
                    raise UserError(f"dataset {label!r}: unsupported file type {local.suffix!r} (expected .jsonl, .json, .parquet or .csv)")
                ds = datasets.load_dataset(kind, data_files=str(local), split="train")
            elif local.is_dir() and (local / "dataset_info.json").exists():
                ds = datasets.load_from_disk(str(local))
            else:
                ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
        except UserError:
            raise
        except Exception as exc:  # network, missing split, missing file...
            raise UserError(f"dataset {label!r}: could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if spec.columns:
        missing = [src for src in spec.columns.values() if src not in ds.column_names]
        if missing:
            raise UserError(*(f"dataset {label!r}: column {m!r} named in `columns` not found (has {ds.column_names})" for m in missing))
        ds = ds.rename_columns({src: dst for dst, src in spec.columns.items() if src != dst})
    missing = [c for c in required_columns if c not in ds.column_names]
    if missing:
        raise UserError(*(f"dataset {label!r}: missing required column {c!r} (has {ds.column_names}; map it with `columns`)" for c in missing))
    if spec.limit:
        ds = ds.select(range(min(spec.limit, len(ds))))
    for col, role in (("prompt", "user"), ("completion", "assistant"), ("chosen", "assistant"), ("rejected", "assistant")):
        feature = ds.features.get(col)
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            ds = ds.map(lambda row, c=col, r=role: {c: _to_chat(row[c], r)})
    return ds
