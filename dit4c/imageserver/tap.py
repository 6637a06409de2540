"""``twistd dit4c-imageserver``: options and service construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dit4c.common.options import endpointList, positiveFloat, positiveInt, secretFromFile
from dit4c.common.portalhttp import isPortalAddress
from dit4c.imageserver.service import ImageServerService
from dit4c.imageserver.storage import IImageStorage
from dit4c.imageserver.web import DEFAULT_MAX_SIZE

#: The shortest secret accepted (the portal's rule, docs/protocols.md 8.4).
DEFAULT_LISTEN = "tcp:8600:interface=127.0.0.1"


class Options(usage.Options):
    synopsis = "--portal URL --secret-file PATH [--storage s3 --s3-bucket B --s3-access-key-file F --s3-secret-key-file F] [options]"
    longdesc = (
        "Run a DIT4C image server: it stores saved instance images by their "
        "SHA-256 (PUT/GET/HEAD/DELETE /images/sha256:<hex>) and asks the portal "
        "(POST <portal>/reports/image-access, proving itself with the secret "
        "shared with the portal's --image-server-secret-file) whether each "
        "request may go ahead. It keeps no user list. Every address is a "
        "Twisted endpoint string."
    )
    optParameters = [
        ["data-dir", None, "data/images", "Directory for the images (sha256/<hex>) and unfinished uploads (tmp/); with --storage s3, only the uploads being received."],
        ["storage", None, "directory", "Where images are kept: directory (--data-dir) or s3 (an S3-compatible object store, the --s3-* options)."],
        ["s3-endpoint", None, None, "With --storage s3: the store's URL, e.g. http://127.0.0.1:9000 (default: AWS S3 of --s3-region)."],
        ["s3-bucket", None, None, "With --storage s3: the bucket (it must exist). Required."],
        ["s3-access-key-file", None, None, "With --storage s3: file holding the access key ID. Required."],
        ["s3-secret-key-file", None, None, "With --storage s3: file holding the secret access key. Required."],
        ["s3-region", None, "us-east-1", "With --storage s3: the region."],
        ["s3-prefix", None, "", "With --storage s3: prefix of every key (images are <prefix>sha256/<hex>), e.g. images/."],
        ["portal", None, None, "The portal's URL as this server reaches it: http(s)://... (or unix:/path). Required."],
        ["secret-file", None, None, "File holding the secret shared with the portal (at least 16 characters). Required."],
        ["public-url", None, None, "Base URL clients use (the url of an upload's answer). Default: http://HOST:PORT of the first --listen."],
        ["max-size", None, DEFAULT_MAX_SIZE, "Largest image accepted, in bytes.", positiveInt],
        ["portal-timeout", None, 10.0, "Seconds to wait for the portal's answer.", positiveFloat],
        ["idle-timeout", None, 60.0, "Seconds a connection may send nothing (a request head included) before it is closed.", positiveFloat],
        ["metrics", None, None, "Endpoint to serve Prometheus /metrics and /health on, e.g. tcp:9103:interface=127.0.0.1 (keep it off the public network)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, value: str) -> None:
        """Endpoint to serve on, e.g. tcp:8600:interface=127.0.0.1 (the default). Repeatable."""
        self["listen"].append(value)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        endpointList(self["listen"], server=True, option="listen")
        if self["metrics"]:
            endpointList([self["metrics"]], server=True, option="metrics")
        if not self["portal"]:
            raise usage.UsageError("--portal is required")
        if not isPortalAddress(self["portal"]):
            raise usage.UsageError("--portal must be an http:// or https:// URL (or unix:/path)")
        if not self["secret-file"]:
            raise usage.UsageError("--secret-file is required")
        self["secret"] = secretFromFile(self["secret-file"], "secret-file")
        self._storageOptions()
        if self["public-url"]:
            self["public-url"] = self["public-url"].rstrip("/")
            if not self["public-url"].startswith(("http://", "https://")):
                raise usage.UsageError("--public-url must start with http:// or https://")
        else:
            self["public-url"] = _defaultPublicURL(self["listen"][0])


    def _storageOptions(self) -> None:
        s3 = ["s3-endpoint", "s3-bucket", "s3-access-key-file", "s3-secret-key-file"]
        if self["storage"] == "directory":
            given = [name for name in s3 if self[name]]
            if given or self["s3-prefix"] or self["s3-region"] != "us-east-1":
                raise usage.UsageError("the --s3-* options need --storage s3")
            return
        if self["storage"] != "s3":
            raise usage.UsageError("--storage must be directory or s3")
        endpoint = self["s3-endpoint"]
        if endpoint is not None:
            endpoint = self["s3-endpoint"] = endpoint.rstrip("/")
            if not endpoint.startswith(("http://", "https://")):
                raise usage.UsageError("--s3-endpoint must start with http:// or https://")
        if not self["s3-bucket"]:
            raise usage.UsageError("--s3-bucket is required with --storage s3")
        for option, key in (("s3-access-key-file", "s3-access-key"), ("s3-secret-key-file", "s3-secret-key")):
            if not self[option]:
                raise usage.UsageError(f"--{option} is required with --storage s3")
            try:
                self[key] = Path(self[option]).read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError(f"--{option}: {getattr(e, 'strerror', None) or e}") from None
            if not self[key]:
                raise usage.UsageError(f"--{option}: the file is empty")
        prefix = self["s3-prefix"].lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self["s3-prefix"] = prefix


def _defaultPublicURL(description: str) -> str | None:
    """``http://HOST:PORT`` of a ``tcp:PORT[:interface=HOST]`` endpoint; None for port 0 or other kinds (decided once bound)."""
    parts = description.split(":")
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2:
        return None
    port, host = None, "127.0.0.1"
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep and port is None:
            port = key
        elif key == "port":
            port = value
        elif key == "interface" and value not in ("", "0.0.0.0", "::"):
            host = value.replace("\\", "")
    if port is None or not port.isdigit() or int(port) == 0:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    storage: IImageStorage | None = None
    if config["storage"] == "s3":
        from dit4c.imageserver.s3 import S3Storage

        storage = S3Storage(
            reactor,
            bucket=config["s3-bucket"],
            spool=Path(config["data-dir"]) / "tmp",
            endpoint=config["s3-endpoint"],
            accessKey=config["s3-access-key"],
            secretKey=config["s3-secret-key"],
            region=config["s3-region"],
            prefix=config["s3-prefix"],
        )
    return ImageServerService(
        reactor,
        endpoints=[serverFromString(reactor, e) for e in config["listen"]],
        portal=config["portal"],
        secret=config["secret"],
        dataDir=config["data-dir"],
        storage=storage,
        publicURL=config["public-url"],
        maxSize=config["max-size"],
        portalTimeout=config["portal-timeout"],
        idleTimeout=config["idle-timeout"],
        metricsEndpoint=serverFromString(reactor, config["metrics"]) if config["metrics"] else None,
    )
