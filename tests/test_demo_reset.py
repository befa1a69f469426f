"""`make demo` restarts from a clean registry without deleting anything else under the lidgate home."""

from flows.demo import DEMO_STATE, reset_demo_state


def test_fresh_demo_removes_only_its_own_state(tmp_path):
    for name in DEMO_STATE:
        if "." in name:
            (tmp_path / name).write_text("demo")
        else:
            (tmp_path / name / "sub").mkdir(parents=True)
            (tmp_path / name / "sub" / "f").write_text("demo")
    bench = tmp_path / "bench-cl" / "runs"
    bench.mkdir(parents=True)
    (bench / "unit.json").write_text("{}")  # 25 minutes of `make bench-cl`
    (tmp_path / "notes.txt").write_text("mine")

    removed = reset_demo_state(tmp_path)

    assert sorted(removed) == sorted(DEMO_STATE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-cl", "notes.txt"]
    assert (bench / "unit.json").read_text() == "{}"
    assert reset_demo_state(tmp_path) == [], "a second reset finds nothing of the demo's"
