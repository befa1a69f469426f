"""Recovery removes the folders a streamed certification DataLoader was read into when the run that
made them has ended (killed before it could clean up), and keeps those of runs still going."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.paths import REPO


def test_recovery_removes_the_streamed_data_a_dead_run_left(tmp_path):
    from components.owner import owner_tag
    from flows.settings import Settings
    from flows.tasks import _clean_staging

    settings = Settings(home=tmp_path, tracking_uri="", registry_uri="", artifact_location="", model_name="m")
    ended = subprocess.run([sys.executable, "-c", "from components.owner import owner_tag; print(owner_tag())"],
                           capture_output=True, text=True, cwd=REPO, check=True).stdout
    for name, owner in (("lidgate-certification-ended", ended), ("lidgate-certification-running", owner_tag())):
        folder = settings.streams_dir / name
        folder.mkdir(parents=True)
        (folder / "owner.json").write_text(owner)
        (folder / "certification.safetensors").write_bytes(b"rows")
    done = _clean_staging(settings)
    assert [d["kind"] for d in done] == ["streams_cleaned"]
    assert done[0]["detail"] == "removed 1 streamed data folder(s) left by ended runs: lidgate-certification-ended"
    assert [p.name for p in settings.streams_dir.iterdir()] == ["lidgate-certification-running"]
