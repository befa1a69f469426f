"""`make demo` restarts from a clean registry without deleting anything else under the lidgate home."""

from flows.demo import demo_state, reset_demo_state
from flows.settings import Settings


def test_fresh_demo_removes_only_its_own_state(tmp_path):
    settings = Settings(home=tmp_path, tracking_uri="", registry_uri="", artifact_location="", model_name="m")
    for path in demo_state(settings):
        if path.suffix:  # mlflow.db, the summary
            path.write_text("demo")
        else:
            (path / "sub").mkdir(parents=True)
            (path / "sub" / "f").write_text("demo")
    bench = tmp_path / "bench-cl" / "runs"
    bench.mkdir(parents=True)
    (bench / "unit.json").write_text("{}")  # 25 minutes of `make bench-cl`
    (tmp_path / "notes.txt").write_text("mine")

    removed = reset_demo_state(settings)

    assert sorted(removed) == sorted(demo_state(settings))
    assert all(p.parent == tmp_path for p in removed), "nothing outside the lidgate home"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-cl", "notes.txt"]
    assert (bench / "unit.json").read_text() == "{}"
    assert reset_demo_state(settings) == [], "a second reset finds nothing of the demo's"
