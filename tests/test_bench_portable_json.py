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
