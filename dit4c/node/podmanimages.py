"""
The images the podman runtime runs: one pulled if podman has it not, the
port it exposes (the tool's, unless the start names one), a saved image
loaded from its archive, and a stopped tool's container saved as an OCI
archive (``podman commit``, ``podman save``) for the node to upload.
"""

from __future__ import annotations

from pathlib import Path

from dit4c.node.errors import PodmanError, RuntimeError_
from dit4c.node.podmancommand import SAVED_PREFIX, PodmanCommands, summarise

__all__ = ["PodmanImages"]


class PodmanImages(PodmanCommands):
    """Images (a part of :class:`dit4c.node.podman.PodmanRuntime`, which sets what is declared here)."""

    #: Seconds a pull, a load or a save may take.
    pullTimeout: float

    async def _ensureImage(self, image: str) -> None:
        if not image or image.startswith("-"):
            raise RuntimeError_(f"{image!r} is not an image reference")
        out, err, code, timedOut = await self._spawn([self.podman, "image", "exists", image])
        if code == 0 and not timedOut:
            return
        if code != 1 or timedOut:
            raise PodmanError(f"could not get the image {image!r}: {summarise(err)}")
        await self._run("pull", "--quiet", image, timeout=self.pullTimeout, what=f"could not get the image {image!r}")

    async def _exposedPort(self, image: str) -> int:
        info = await self._json("image", "inspect", "--format", "json", image, what=f"inspecting the image {image!r}")
        config = (info[0] if info else {}).get("Config") or {}
        ports = []
        for key in config.get("ExposedPorts") or {}:
            number, _, protocol = key.partition("/")
            if protocol in ("", "tcp") and number.isdigit():
                ports.append(int(number))
        if not ports:
            raise RuntimeError_("the image exposes no port")
        return min(ports)

    async def _capture(self, instance: str, archive: Path) -> str | None:
        tag = f"{SAVED_PREFIX}{instance}:latest"
        await self._run("commit", "--quiet", self.toolName(instance), tag, what="saving the tool's container")
        temporary = archive.with_suffix(".partial")
        try:
            await self._run(
                "save", "--quiet", "--format", "oci-archive", "--output", str(temporary), tag,
                timeout=self.pullTimeout, what="writing the saved image",
            )  # fmt: skip
            temporary.replace(archive)
        finally:
            temporary.unlink(missing_ok=True)
            await self._spawn([self.podman, "rmi", tag])
        return None  # podman wrote it: the node hashes it

    async def _load(self, archive: Path) -> str:
        """A saved archive into podman's images; its reference."""
        out = await self._run(
            "load", "--input", str(archive), timeout=self.pullTimeout, what="loading the saved image"
        )
        for line in out.decode("utf-8", "replace").splitlines():
            if line.startswith("Loaded image"):
                return line.split(":", 1)[1].strip().split(",")[0].strip()
        raise RuntimeError_("the saved image could not be loaded: podman named no image")
