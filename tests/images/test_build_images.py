"""
``scripts/build-images`` as a site uses it to add its own tool: a
``Containerfile`` FROM the Debian base, built with podman and no registry,
once; found again in seconds; built again when its recipe changes (the old
tag removed); a build that fails says why.

The images live in a directory of the test's own (``DIT4C_IMAGES``) beside
a copy of ``images/base``, whose recipe is then the same as the real one's:
the base ``scripts/test`` built is used, not made again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.podman import podmanEnv, podmanUnavailable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-images"


@pytest.fixture(scope="module")
def podman() -> None:
    why = podmanUnavailable() or (None if shutil.which("mmdebstrap") else "mmdebstrap not installed")
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def site(tmp_path: Path, podman: None) -> Iterator[tuple[Path, str]]:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copytree(ROOT / "images" / "base", images / "base")
    name = f"site-test{os.getpid()}"
    yield images, name
    listed = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", f"localhost/dit4c/{name}"],
        env=podmanEnv(), capture_output=True, timeout=60,
    )  # fmt: skip
    for ref in listed.stdout.decode().split():
        subprocess.run(["podman", "rmi", "--force", ref], env=podmanEnv(), capture_output=True, timeout=60)


def buildImages(images: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *arguments],
        env=dict(os.environ, DIT4C_IMAGES=str(images)),
        capture_output=True,
        text=True,
        timeout=1800,
    )


def inImage(ref: str, *command: str) -> str:
    result = subprocess.run(
        ["podman", "run", "--rm", "--pull=never", ref, *command],
        env=podmanEnv(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], env=podmanEnv(), timeout=60).returncode == 0


def test_a_sites_own_image_built_once_and_again_when_its_recipe_changes(site: tuple[Path, str]) -> None:
    images, name = site
    recipe = images / name / "Containerfile"
    recipe.parent.mkdir()
    recipe.write_text(
        "FROM localhost/dit4c/base:latest\n"
        "RUN echo \"a site's own tool\" > /etc/site-tool\n"
        "USER 1000:1000\n"
        "EXPOSE 8000\n"
    )
    first = buildImages(images, name)
    assert first.returncode == 0, first.stdout + first.stderr
    ref = buildImages(images, "--ref", name).stdout.strip()
    assert ref.startswith(f"localhost/dit4c/{name}:")
    assert f"{name}: built {ref} in " in first.stdout
    assert inImage(ref, "cat", "/etc/site-tool") == "a site's own tool\n"
    assert inImage(ref, "id", "-u") == "1000\n"  # the base's user, not root

    again = buildImages(images, name)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{name}: {ref} is up to date" in again.stdout
    assert "building" not in again.stdout

    recipe.write_text(recipe.read_text().replace("a site's own tool", "a site's own tool, changed"))
    changed = buildImages(images, name)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    newRef = buildImages(images, "--ref", name).stdout.strip()
    assert newRef != ref
    assert f"{name}: built {newRef} in " in changed.stdout
    assert not exists(ref)  # the older recipe's tag is gone
    assert inImage(f"localhost/dit4c/{name}:latest", "cat", "/etc/site-tool") == "a site's own tool, changed\n"


def test_a_failed_build_says_why(site: tuple[Path, str]) -> None:
    images, name = site
    (images / name).mkdir()
    (images / name / "Containerfile").write_text(
        "FROM localhost/dit4c/base:latest\nRUN echo 'the step that breaks' && exit 3\n"
    )
    result = buildImages(images, name)
    assert result.returncode == 1
    assert f"{name}: FAILED" in result.stdout
    assert "the step that breaks" in result.stdout  # the end of the build's output
    assert not exists(f"localhost/dit4c/{name}:latest")
