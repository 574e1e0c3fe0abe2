"""The README's CPU-profile command, read from README.md, in git clones of a project on a tiny archive: one clone
with a copy at ../shared beside it, as in this project's own checkout, and one without (a local HTTP server stands
in for the official URL), as on anyone else's machine. params.yaml is the shipped one but for data.sources, whose
urls stay (the second one aside) and whose md5s are the tiny archives'."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, make_project, md5_of, repickle, run
from http_server import serve

SHARED = "../shared/datasets/cifar-10-python.tar.gz"


def readme_cpu_command() -> str:
    section = (ROOT / "README.md").read_text().split("\n## CPU profile\n")[1].split("\n## ")[0]
    return re.search(r"```bash\n(dvc exp run [^\n]*)\n```", section).group(1)


def clone(origin: Path, folder: Path) -> Path:
    run(["git", "clone", "-q", str(origin), str(folder / "x")], folder.parent)
    for key, value in (("user.name", "Test"), ("user.email", "test@example.com")):  # dvc exp run commits
        run(["git", "config", key, value], folder / "x")
    return folder / "x"


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_archive):
    """The README's command run in a clone with ../shared, then in one without it that shares its DVC cache."""
    root = tmp_path_factory.mktemp("readme")
    official = repickle(tiny_archive, root / "official.tar.gz")  # the same images as the shared copy, other bytes
    command = readme_cpu_command()
    with serve({"cifar-10-python.tar.gz": official}) as server:
        url = f"{server.url}/cifar-10-python.tar.gz"
        assert shipped_sources()[0]["url"] == SHARED  # the shipped local path stays; only the URL stands in
        origin = make_project(root / "origin", tiny_archive, {"data.sources": [
            {"url": SHARED, "md5": md5_of(tiny_archive)}, {"url": url, "md5": md5_of(official)}]}, tiny=False)
        (root / "with" / "shared" / "datasets").mkdir(parents=True)
        shutil.copy(tiny_archive, root / "with" / SHARED.removeprefix("../"))
        with_shared = clone(origin, root / "with")
        first = run(["bash", "-c", command], with_shared)
        requests_with_shared = list(server.requests)
        without_shared = clone(origin, root / "without")
        # One full run is enough: this clone's stages after split come from the first one's run-cache, which
        # needs split's output to be byte-identical from the other archive.
        run(["dvc", "cache", "dir", "--local", str(with_shared / ".dvc" / "cache")], without_shared)
        second = run(["bash", "-c", command], without_shared)
    return {"with": (with_shared, first, requests_with_shared), "without": (without_shared, second, server.requests),
            "archives": (tiny_archive, official), "url": url}


def shipped_sources() -> list[dict]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["sources"]


def downloaded(project: Path) -> dict:
    return json.loads((project / "metrics/download.json").read_text())


def test_the_readme_command_is_the_cpu_profile():
    assert "$(cat profiles/cpu.args)" in readme_cpu_command()


def test_with_the_local_copy_nothing_is_fetched_and_every_stage_runs(layouts):
    project, result, requests = layouts["with"]
    tiny, _ = layouts["archives"]
    assert requests == []
    assert stages_run(result.stdout) == ["download", "split", "preprocess", "baseline", "pretrain", "finetune",
                                         "figures", "export"]
    assert downloaded(project) == {"source": 0, "url": SHARED, "md5": md5_of(tiny)}
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    assert finetune["epochs"] == 10 and finetune["strategy"] == 1  # the CPU profile's settings, not the tiny ones
    assert (project / "models/export/MODEL_CARD.md").is_file()


def test_without_the_local_copy_the_official_url_is_used(layouts):
    project, result, requests = layouts["without"]
    _, official = layouts["archives"]
    missing = project / SHARED
    assert f"download: skipping data.sources[0]: {missing} does not exist" in result.stdout
    assert [request["path"] for request in requests] == ["/cifar-10-python.tar.gz"]
    assert downloaded(project) == {"source": 1, "url": layouts["url"], "md5": md5_of(official)}
    assert md5_of(project / "data/cifar-10-python.tar.gz") == md5_of(official)
    assert stages_run(result.stdout) == ["download", "split"]  # the rest: the same split, from the run-cache
    with_shared, _, _ = layouts["with"]
    for path in ("metrics/finetune.json", "metrics/pretrain.json", "metrics/baseline.json"):
        assert (project / path).read_bytes() == (with_shared / path).read_bytes()
