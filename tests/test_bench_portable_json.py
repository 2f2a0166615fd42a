"""Committed bench JSONs name the repository's files relatively and no other path of the machine changes."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_only_whole_paths_under_the_root_become_relative():
    sys.path.insert(0, str(BENCH))
    try:
        from portable_json import portable
    finally:
        sys.path.remove(str(BENCH))
    root = Path("/srv/repo")
    assert portable(f"{sys.executable} bench/x.py --out /srv/repo/runs/a --data /srv/repo", root) == \
        "python bench/x.py --out runs/a --data ."
    assert portable({"k": ["output_dir=/srv/repo/runs/x", '"/srv/repo"']}, root) == {"k": ["output_dir=runs/x", '"."']}
    for other in ("/mnt/srv/repo/y", "file:///srv/repo/x", "/srv/repository/x", "https://host/a /data/elpv"):
        assert portable(other, root) == other
    assert portable("/a/b c", Path("/")) == "/a/b c"  # a root of / rewrites nothing
    assert portable(3.5, root) == 3.5


def test_every_bench_result_starts_with_command_machine_and_versions(tmp_path, monkeypatch):
    """One builder for the header the README's numbers are traced by: the command as run (portable),
    the machine, and the versions down to dtl's commit."""
    import json
    import re

    sys.path.insert(0, str(BENCH))
    try:
        from result_header import result_header, write_result
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setattr(sys, "argv", [str(BENCH / "x.py"), "--out", str(BENCH.parent / "runs" / "a b")])
    write_result(tmp_path / "r.json", result_header(rows=[1, 2]))
    text = (tmp_path / "r.json").read_text()
    assert text.endswith("}\n")
    r = json.loads(text)
    assert list(r)[:4] == ["command", "date", "machine", "versions"] and r["rows"] == [1, 2]
    assert r["command"] == "python bench/x.py --out 'runs/a b'"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", r["date"])
    assert r["machine"]["cpus"] >= 1 and r["machine"]["torch_threads"] >= 1 and "gpu" in r["machine"]
    assert r["machine"]["processor"] and r["machine"]["cpu_capability"]
    assert {"python", "torch", "torchvision", "timm", "dtl"} <= set(r["versions"])
    assert re.fullmatch(r"([0-9a-f]{4,40}|unknown)(\+dirty)?", r["versions"]["dtl"])


def test_every_bench_that_writes_json_builds_its_header_with_the_one_builder():
    """A bench that writes a result by hand would drift from the others' header (it did: 13 copies)."""
    for path in sorted(BENCH.glob("*.py")):
        text = path.read_text()
        if path.name in ("result_header.py", "portable_json.py") or "--json" not in text:
            continue
        assert "result_header(" in text and "write_result(" in text, path.name
        assert '"versions":' not in text, path.name


def test_versions_without_git_say_unknown_instead_of_raising(monkeypatch):
    """`dtl compare` records versions() after its last run: a machine without git must not lose it."""
    from dtl.recipe_compare import versions

    monkeypatch.setenv("PATH", "/nonexistent")
    v = versions()
    assert v["dtl"] == "unknown" and v["torch"] and v["torchvision"] and v["timm"]
