"""``twistd dit4c-helper-upload``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from dit4c.common.errors import HelperEnvironmentError
from dit4c.common.helperenv import fromEnvironment
from dit4c.upload.helper import UploadService


class Options(usage.Options):
    synopsis = "[--image-server URL] [--image FILE] [--digest sha256:HEX]"
    longdesc = (
        "Store a saved instance's image at the image server and report it to "
        "the portal, then exit: status 0 once the portal has the image, 1 "
        "otherwise, with the verdict left beside the image (FILE.done, or "
        "FILE.failed with the reason). Reads the helper environment "
        "(DIT4C_INSTANCE, DIT4C_INSTANCE_KEY, DIT4C_PORTAL, "
        "DIT4C_PORTAL_INTERNAL, DIT4C_IMAGE_SERVER, DIT4C_IMAGE_FILE, "
        "DIT4C_IMAGE_DIGEST; docs/protocols.md section 9); the options "
        "override it."
    )
    optParameters = [
        ["image-server", None, None, "The image server's base URL (or unix:/path). Default: $DIT4C_IMAGE_SERVER."],
        ["image", None, None, "The saved image (an archive). Default: $DIT4C_IMAGE_FILE."],
        ["digest", None, None, "The image's digest, sha256:<hex>. Default: $DIT4C_IMAGE_DIGEST."],
    ]

    def postOptions(self) -> None:
        try:
            self["helper"] = fromEnvironment(
                imageServer=self["image-server"], imageFile=self["image"], imageDigest=self["digest"]
            )
        except HelperEnvironmentError as e:
            raise usage.UsageError(str(e)) from None


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return UploadService(reactor, config["helper"])
