"""The example configuration in etc/ is what the servers read."""

from __future__ import annotations

from pathlib import Path

from dit4c.node.process import toolsFromFile
from dit4c.portal.upstream import providersFromFile

ETC = Path(__file__).resolve().parent.parent / "etc"


def test_login_providers_example_reads(tmp_path: Path) -> None:
    # The secrets live in files beside it (never in the file itself).
    (tmp_path / "providers.json").write_text((ETC / "examples" / "login-providers.json").read_text())
    for name in ("github", "uni"):
        (tmp_path / f"{name}.secret").write_text(f"{name}-client-secret\n")
    providers = providersFromFile(tmp_path / "providers.json")
    assert [p.name for p in providers] == ["github", "uni"]


def test_node_tools_example_reads() -> None:
    tools = toolsFromFile(ETC / "examples" / "node-tools.json")
    assert set(tools) == {"dit4c/notes", "rstudio/server", "jupyter/lab"}
    assert "{port}" in " ".join(tools["rstudio/server"].command)


def test_containers_conf_sets_what_podman_needs_here() -> None:
    text = (ETC / "podman" / "containers.conf").read_text()
    for setting in ("default_ulimits", "cgroupfs", "runc"):
        assert setting in text
