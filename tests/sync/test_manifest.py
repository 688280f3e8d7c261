"""Tests for daemon.sync.manifest and daemon.atomicfile, on real files in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.atomicfile import write_atomic
from daemon.sync.manifest import (
    DriftEntry,
    Manifest,
    ManifestError,
    ModelEntry,
    NodeEntry,
    compute_drift,
    merge_previous,
    normalise_digest,
    read_manifest,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 3, 9, 19, 0, tzinfo=UTC)
HEX_A = "a" * 64
HEX_B = "b" * 64
DIGEST_A = f"sha256:{HEX_A}"
DIGEST_B = f"sha256:{HEX_B}"


def model(name: str, digest: str | None = DIGEST_A, status: str = "present") -> ModelEntry:
    return ModelEntry.model_validate({"name": name, "digest": digest, "status": status})


def node(name: str, *models: ModelEntry, reachable: bool = True) -> NodeEntry:
    return NodeEntry(
        name=name, address=f"http://{name}:11434", reachable=reachable, models=list(models)
    )


def manifest(*nodes: NodeEntry, at: datetime = T0, run: str = "") -> Manifest:
    return Manifest(
        generated_at=at,
        window="02:00-06:00 UTC+8",
        options={"skip_existing": True, "models": None, "run": run},
        nodes=list(nodes),
    )


def sample() -> Manifest:
    full = ModelEntry(
        name="llama3.1:8b",
        digest=DIGEST_A,
        size=4_920_753_328,
        modified_at=datetime(2024, 3, 1, 12, tzinfo=UTC),
        status="pulled",
        attempts=3,
        seconds=412.5,
        last_error="connection reset",
    )
    gpu1 = node("gpu1", full, model("qwen2.5:7b", DIGEST_B, "skipped"))
    gpu1.ollama_version = "0.5.7"
    gpu2 = node("gpu2", model("llama3.1:8b", None, "deferred"))
    built = manifest(gpu1, gpu2)
    built.drift = compute_drift(built.nodes)
    return built


# -- model and validation ------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    original = sample()
    write_manifest(path, original)
    assert read_manifest(path) == original
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1
    assert raw["generated_at"] == "2024-03-09T19:00:00Z"
    assert raw["nodes"][0]["models"][0]["digest"] == DIGEST_A
    assert raw["options"] == {"skip_existing": True, "models": None, "run": ""}


@pytest.mark.parametrize(
    "bad",
    [
        HEX_A,  # bare form: only normalise_digest() accepts it
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,
        "sha512:" + HEX_A,
        "SHA256:" + HEX_A,
        " sha256:" + HEX_A,
        "sha256:" + "g" * 64,
        "a80c4f17acd5",  # the short id `ollama list` prints
        "",
    ],
)
def test_bad_digests_are_refused_naming_model_and_value(bad: str) -> None:
    with pytest.raises(ValueError, match="digest") as caught:
        ModelEntry(name="llama3.1:8b", digest=bad, status="present")
    assert "model 'llama3.1:8b'" in str(caught.value)
    assert repr(bad) in str(caught.value)


def test_drift_entry_digests_are_validated() -> None:
    with pytest.raises(ValueError, match="model 'm'"):
        DriftEntry(model="m", digests={"gpu1": DIGEST_A, "gpu2": "sha256:abc"})


def test_normalise_digest() -> None:
    assert normalise_digest(HEX_A) == DIGEST_A
    assert normalise_digest(DIGEST_A) == DIGEST_A
    with pytest.raises(ValueError, match=r"model 'm': digest 'a80c4f17acd5' is not 'sha256:'"):
        normalise_digest("a80c4f17acd5", model="m")
    with pytest.raises(ValueError, match="digest 'ABC'"):
        normalise_digest("ABC")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schema_version", 2),
        ("generated_at", "2024-03-09T19:00:00"),  # naive
        ("surprise", True),
    ],
)
def test_manifest_refuses_bad_top_level(field: str, value: object) -> None:
    data = sample().model_dump(mode="json")
    data[field] = value
    with pytest.raises(ValidationError, match=field):
        Manifest.model_validate(data)


def test_bad_status_and_duplicates_are_refused() -> None:
    with pytest.raises(ValidationError, match="status"):
        model("m", status="downloaded")
    with pytest.raises(ValidationError, match="model on node 'gpu1' 'm' appears twice"):
        node("gpu1", model("m"), model("m"))
    with pytest.raises(ValidationError, match="node 'gpu1' appears twice"):
        manifest(node("gpu1"), node("gpu1"))


# -- drift ---------------------------------------------------------------------------------


def test_compute_drift() -> None:
    nodes = [
        node("gpu1", model("same"), model("differs", DIGEST_A), model("partial", DIGEST_A)),
        node("gpu2", model("same"), model("differs", DIGEST_B), model("partial", None)),
        node("gpu3", model("same"), model("only-here", DIGEST_B), model("late", DIGEST_B)),
        node("gpu4", model("late", DIGEST_A)),
    ]
    drift = compute_drift(nodes)
    assert drift == [
        DriftEntry(model="differs", digests={"gpu1": DIGEST_A, "gpu2": DIGEST_B}),
        DriftEntry(model="late", digests={"gpu3": DIGEST_B, "gpu4": DIGEST_A}),
    ]


def test_no_drift_without_nodes_or_differences() -> None:
    assert compute_drift([]) == []
    assert compute_drift([node("a", model("m")), node("b", model("m", None, "missing"))]) == []


# -- merging with the previous manifest ------------------------------------------------------


def test_unreachable_node_keeps_last_known_entries_as_stale() -> None:
    first = merge_previous(
        manifest(node("gpu1", model("m")), node("gpu2", model("m", DIGEST_B)), at=T0), None
    )
    confirmed = first.node("gpu2")
    assert confirmed is not None
    assert confirmed.last_confirmed == T0

    t1 = T0 + timedelta(days=1)
    down = node("gpu2", model("new-model", None, "failed"), reachable=False)
    second = merge_previous(manifest(node("gpu1", model("m")), down, at=t1), first)
    gpu2 = second.node("gpu2")
    assert gpu2 is not None
    assert gpu2.stale
    assert not gpu2.reachable
    assert gpu2.last_confirmed == T0
    assert [(m.name, m.digest, m.status) for m in gpu2.models] == [
        ("m", DIGEST_B, "present"),
        ("new-model", None, "failed"),
    ]
    assert second.drift == [DriftEntry(model="m", digests={"gpu1": DIGEST_A, "gpu2": DIGEST_B})]
    gpu1 = second.node("gpu1")
    assert gpu1 is not None
    assert not gpu1.stale
    assert gpu1.last_confirmed == t1

    # Still down a day later: the confirmation time does not move.
    t2 = t1 + timedelta(days=1)
    third = merge_previous(manifest(node("gpu2", reachable=False), at=t2), second)
    gpu2 = third.node("gpu2")
    assert gpu2 is not None
    assert gpu2.stale
    assert gpu2.last_confirmed == T0
    assert [m.name for m in gpu2.models] == ["m", "new-model"]

    # Back up: fresh entries, no longer stale.
    t3 = t2 + timedelta(days=1)
    fourth = merge_previous(manifest(node("gpu2", model("m")), at=t3), third)
    gpu2 = fourth.node("gpu2")
    assert gpu2 is not None
    assert not gpu2.stale
    assert gpu2.last_confirmed == t3
    assert [m.name for m in gpu2.models] == ["m"]


def test_merge_survives_the_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_manifest(path, merge_previous(manifest(node("gpu1", model("m"))), None))
    down = manifest(node("gpu1", reachable=False), at=T0 + timedelta(hours=24))
    write_manifest(path, merge_previous(down, read_manifest(path)))
    again = read_manifest(path)
    assert again is not None
    gpu1 = again.node("gpu1")
    assert gpu1 is not None
    assert (gpu1.stale, gpu1.last_confirmed, gpu1.models[0].name) == (True, T0, "m")


def test_never_reachable_node_is_not_marked_stale() -> None:
    previous = manifest(node("gpu9", reachable=False))
    merged = merge_previous(manifest(node("gpu9", reachable=False)), previous)
    gpu9 = merged.node("gpu9")
    assert gpu9 is not None
    assert (gpu9.stale, gpu9.last_confirmed, gpu9.models) == (False, None, [])


def test_nodes_missing_from_the_new_run_are_dropped_unless_kept() -> None:
    previous = manifest(node("gpu1", model("m")), node("gpu2", model("m")), node("gone"))
    new = manifest(node("gpu1", model("m")), at=T0 + timedelta(days=1))
    assert [n.name for n in merge_previous(new, previous).nodes] == ["gpu1"]
    kept = merge_previous(new, previous, keep=["gpu2", "unknown"])
    assert [n.name for n in kept.nodes] == ["gpu1", "gpu2"]
    assert kept.node("gpu2") == previous.node("gpu2")


def test_a_narrowed_run_keeps_the_records_of_models_it_did_not_handle() -> None:
    failed = ModelEntry(
        name="b", status="failed", attempts=3, seconds=1.5, last_error="no such model"
    )
    deferred = ModelEntry(
        name="c", digest=DIGEST_A, size=10, status="deferred", attempts=1, last_error="window"
    )
    changed = ModelEntry(name="d", digest=DIGEST_A, status="failed", last_error="old")
    previous = manifest(
        node("gpu1", model("a", None, "failed"), failed, deferred, changed, model("gone")),
        node("gpu2", model("a")),
    )
    # gpu1 answered: "a" handled (pulled); it still lists c (same digest), d changed.
    live_c = ModelEntry(name="c", digest=DIGEST_A, size=11, status="present")
    new = manifest(
        node("gpu1", model("a", DIGEST_B, "pulled"), live_c, model("d", DIGEST_B)),
        node("gpu2", model("a", DIGEST_B, "pulled")),
        at=T0 + timedelta(days=1),
    )
    merged = merge_previous(new, previous, handled=["a"])
    gpu1 = merged.node("gpu1")
    assert gpu1 is not None
    assert [(m.name, m.status) for m in gpu1.models] == [
        ("a", "pulled"),  # handled: this run's word
        ("c", "deferred"),  # still what the deferral left: the record stands, live size
        ("d", "present"),  # the node holds another digest now: live inventory
        ("b", "failed"),  # not held, not handled: carried over unchanged
    ]  # "gone" claimed the node held it; the node no longer lists it
    assert gpu1.model("b") == failed
    assert gpu1.model("c") == deferred.model_copy(update={"size": 11})
    assert not gpu1.stale
    # A whole run speaks for every model: nothing is carried.
    full = merge_previous(new, previous)
    assert [m.name for m in full.nodes[0].models] == ["a", "c", "d"]
    assert full.nodes[0].model("c") == live_c


def test_a_node_the_new_run_marks_stale_is_taken_as_is() -> None:
    previous = manifest(node("gpu1", model("m", None, "missing")))
    at = T0 + timedelta(days=1)
    lost = node("gpu1", model("m", None, "pulled"), reachable=False).model_copy(
        update={"stale": True, "last_confirmed": at - timedelta(minutes=5)}
    )
    merged = merge_previous(manifest(lost, at=at), previous)
    assert merged.node("gpu1") == lost


# -- files ---------------------------------------------------------------------------------


def test_read_absent_is_none(tmp_path: Path) -> None:
    assert read_manifest(tmp_path / "nothing.json") is None


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"schema_version": 1}', b"[]", b"\xff\xfe", b""]
)
def test_read_corrupt_names_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=f"manifest {path} is corrupt"):
        read_manifest(path)


def test_write_creates_parents_and_keeps_prev(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "deployment" / "ollama-models-manifest.json"
    prev = path.with_name(path.name + ".prev")
    one, two, three = (manifest(at=T0 + timedelta(days=d), run=str(d)) for d in range(3))
    write_manifest(path, one)
    assert read_manifest(path) == one
    assert not prev.exists()
    write_manifest(path, two)
    assert read_manifest(path) == two
    assert read_manifest(prev) == one
    write_manifest(path, three)
    assert read_manifest(path) == three
    assert read_manifest(prev) == two
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, prev.name]


def test_write_keeps_the_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_manifest(path, manifest())
    path.chmod(0o640)
    write_manifest(path, manifest(run="again"))
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failure_before_rename_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "m.json"
    old = manifest(run="old")
    write_manifest(path, old)
    write_manifest(path, old)  # so a .prev exists too

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError, match="No space left"):
        write_manifest(path, manifest(run="new"))
    monkeypatch.undo()
    assert read_manifest(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.json.prev"]


def test_write_atomic_plain(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from daemon.sync.manifest import Manifest, write_manifest

    target = Path(sys.argv[1])
    new = Manifest.model_validate_json(sys.argv[2])
    at_any_rename = sys.argv[3] == "any"
    real_replace = os.replace

    def killed(src, dst, *args, **kwargs):
        # Dies like a SIGKILL would: no cleanup, no finally blocks, no atexit.
        if at_any_rename or Path(dst) == target:
            os._exit(9)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = killed
    write_manifest(target, new)
    """
)


@pytest.mark.parametrize("when", ["final", "any"])
def test_write_killed_before_rename_leaves_old_manifest(tmp_path: Path, when: str) -> None:
    path = tmp_path / "docs" / "ollama-models-manifest.json"
    old = manifest(node("gpu1", model("m")), run="old")
    new = manifest(node("gpu1", model("m", DIGEST_B)), at=T0 + timedelta(days=1), run="new")
    write_manifest(path, old)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(path), new.model_dump_json(), when],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 9, done.stderr

    assert read_manifest(path) == old
    # The killed writer left its fully written temp file behind, under a name nobody
    # takes for the manifest: hidden, '.tmp', never the manifest's or '.prev' name.
    leftovers = [p for p in path.parent.iterdir() if p.name not in (path.name, path.name + ".prev")]
    assert leftovers
    for leftover in leftovers:
        assert leftover.name.startswith(f".{path.name}.")
        assert leftover.name.endswith(".tmp")
    assert new in [Manifest.model_validate_json(p.read_bytes()) for p in leftovers]

    # The next run writes normally despite the debris.
    write_manifest(path, new)
    assert read_manifest(path) == new
    assert read_manifest(path.with_name(path.name + ".prev")) == old
