"""
``twistd -n dit4c-helper-upload`` as the node runs it, against an image
server and a portal on loopback that record what they are sent: the image
stored with an upload token signed by the instance's key, the portal told
after, and the process ending with the verdict and exit status the node
judges it by (docs/protocols.md 9.2).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from support.processes import TWISTD
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dit4c.common.helperenv import HelperEnvironment, inherited, toEnvironment
from dit4c.common.keys import generatePrivateKey, savePrivateKey
from dit4c.listener.report import REPORT_AUDIENCE
from dit4c.upload.helper import UPLOAD_AUDIENCE, failureFile, progressFile, resultFile
from dit4c.upload.tap import Options

ROOT = Path(__file__).resolve().parents[2]
IMAGE = b"a saved instance " * 50_000
DIGEST = "sha256:" + hashlib.sha256(IMAGE).hexdigest()


@dataclass
class Recorded:
    """What the stand-in image server and portal were sent, and how they answer."""

    #: Status codes the image server answers with, in turn (201 once they run out).
    imageAnswers: list[int] = field(default_factory=list)
    puts: list[tuple[str, str, bytes]] = field(default_factory=list)
    reports: list[bytes] = field(default_factory=list)


class _Images(Resource):
    isLeaf = True

    def __init__(self, recorded: Recorded) -> None:
        super().__init__()
        self.recorded = recorded

    def render_PUT(self, request: Request) -> bytes:
        assert request.content is not None
        self.recorded.puts.append(
            (request.path.decode(), (request.getHeader("authorization") or ""), request.content.read())
        )
        code = self.recorded.imageAnswers.pop(0) if self.recorded.imageAnswers else 201
        request.setResponseCode(code)
        if code != 201:
            return b'{"error": "no"}'
        return json.dumps({"url": f"https://images.example/images/{DIGEST}"}).encode()


class _Reports(Resource):
    isLeaf = True

    def __init__(self, recorded: Recorded) -> None:
        super().__init__()
        self.recorded = recorded

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.recorded.reports.append(request.content.read())
        return b'{"ok": true}'


@pytest_twisted.async_yield_fixture
async def servers() -> Any:
    """The image server and the portal (one site, port 0): their base URL and the record."""
    recorded = Recorded()
    root = Resource()
    root.putChild(b"images", _Images(recorded))
    reports = Resource()
    reports.putChild(b"image", _Reports(recorded))
    root.putChild(b"reports", reports)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    yield f"http://127.0.0.1:{port.getHost().port}", recorded
    await maybeDeferred(port.stopListening)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """An instance's directory with its key and a captured image."""
    key = generatePrivateKey()
    savePrivateKey(key, tmp_path / "instance.key")
    (tmp_path / "saved-image.tar").write_bytes(IMAGE)
    yield tmp_path, key


def helperEnv(directory: Path, base: str) -> HelperEnvironment:
    return HelperEnvironment(
        instance="saveme",
        keyFile=str(directory / "instance.key"),
        portal="https://portal.example",
        portalInternal=base,
        imageServer=base,
        imageFile=str(directory / "saved-image.tar"),
        imageDigest=DIGEST,
    )


async def runHelper(environment: dict[str, str], *args: str) -> tuple[str, int]:
    """``twistd -n dit4c-helper-upload`` run to its end: its output and exit status."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [*TWISTD[1:], "-n", "--pidfile=", "dit4c-helper-upload", *args],
        env={**inherited(), **environment},
        path=str(ROOT),
        reactor=reactor,
    )
    return (out + err).decode(errors="replace"), code


@pytest_twisted.ensureDeferred
async def test_stores_the_image_then_tells_the_portal_and_exits_0(servers: Any, pod: Any) -> None:
    base, recorded = servers
    directory, key = pod
    log, code = await runHelper(toEnvironment(helperEnv(directory, base)))
    assert code == 0, log
    image = str(directory / "saved-image.tar")
    assert json.loads(resultFile(image).read_text()) == {"url": f"https://images.example/images/{DIGEST}"}
    assert not failureFile(image).exists()
    assert json.loads(progressFile(image).read_text()) == {"sent": len(IMAGE), "total": len(IMAGE)}

    [(path, authorization, body)] = recorded.puts
    assert (path, body) == (f"/images/{DIGEST}", IMAGE)
    scheme, _, token = authorization.partition(" ")
    assert scheme == "Bearer"
    claims = jwt.decode(token, key.public_key(), algorithms=["ES256"], audience=UPLOAD_AUDIENCE)
    assert (claims["sub"], claims["digest"]) == ("saveme", DIGEST)
    assert claims["exp"] - claims["iat"] <= 300

    [report] = recorded.reports
    claims = jwt.decode(report, key.public_key(), algorithms=["ES256"], audience=REPORT_AUDIENCE)
    assert (claims["sub"], claims["digest"]) == ("saveme", DIGEST)
    assert claims["image_url"] == f"https://images.example/images/{DIGEST}"


@pytest_twisted.ensureDeferred
async def test_a_refused_image_is_a_failed_verdict_and_status_1(servers: Any, pod: Any) -> None:
    base, recorded = servers
    directory, _ = pod
    recorded.imageAnswers = [403]
    log, code = await runHelper(toEnvironment(helperEnv(directory, base)))
    assert code == 1, log
    image = str(directory / "saved-image.tar")
    assert failureFile(image).read_text().startswith("the image server refused the image: 403")
    assert not resultFile(image).exists()
    assert len(recorded.puts) == 1
    assert recorded.reports == []  # the portal hears of no image that is not stored


@pytest_twisted.ensureDeferred
async def test_a_server_error_is_tried_again(servers: Any, pod: Any) -> None:
    base, recorded = servers
    directory, _ = pod
    recorded.imageAnswers = [503]
    log, code = await runHelper(toEnvironment(helperEnv(directory, base)))
    assert code == 0, log
    assert "the image server answered 503; trying again" in log
    assert [body for _, _, body in recorded.puts] == [IMAGE, IMAGE]
    assert len(recorded.reports) == 1


@pytest_twisted.ensureDeferred
async def test_a_missing_image_is_said_in_the_verdict(servers: Any, pod: Any) -> None:
    base, recorded = servers
    directory, _ = pod
    (directory / "saved-image.tar").unlink()
    log, code = await runHelper(toEnvironment(helperEnv(directory, base)))
    assert code == 1, log
    assert failureFile(str(directory / "saved-image.tar")).read_text() == f"no image at {directory / 'saved-image.tar'}"
    assert recorded.puts == []


@pytest_twisted.ensureDeferred
async def test_without_the_helper_environment_it_says_what_is_missing(tmp_path: Path) -> None:
    log, code = await runHelper({"DIT4C_IMAGE_FILE": str(tmp_path / "saved-image.tar")})
    assert code != 0
    assert "DIT4C_INSTANCE is not set" in log
    assert list(tmp_path.iterdir()) == []


def test_options_override_the_environment(pod: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, _ = pod
    for name, value in toEnvironment(helperEnv(directory, "http://127.0.0.1:1")).items():
        monkeypatch.setenv(name, value)
    config = Options()
    config.parseOptions(["--image-server", "http://images.test/", "--image", "/elsewhere.tar", "--digest", "sha256:00"])
    helper = config["helper"]
    assert (helper.imageServer, helper.imageFile, helper.imageDigest) == ("http://images.test/", "/elsewhere.tar", "sha256:00")
    assert helper.instance == "saveme"
