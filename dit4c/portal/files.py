"""
A person's storage in reach from the portal: the Files page (``/files``)
and ``/api/v1/files`` (list, download, upload, new folder, delete), both
going to the file server through :mod:`dit4c.portal.fileclient` as that
person, so that the file server's own resolver and limits decide what is
reached (docs/protocols.md 13.6).

Paths are relative to the person's storage (``sub/dir/file``); one that is
absolute, climbs (``..``), or holds a NUL or a control character is
refused here, before it reaches the file server (which refuses it too).

An upload is at most :data:`FILE_LIMIT` bytes: the portal's HTTP front
takes a request's body whole before the route runs, so the body is held in
memory (a bigger file is copied into an instance's ``/mnt`` instead). A
download is passed on as the file server gives it, a chunk at a time,
the next chunk asked for only while the person's connection takes more.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Awaitable, Callable
from email import policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import quote, urlencode

from klein import Klein
from twisted.conch.ssh.filetransfer import (
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_PERMISSION_DENIED,
    SFTPError,
)
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

from dit4c.common.httpsite import BodyLimit
from dit4c.portal import security
from dit4c.portal.errors import APIError, InstanceError
from dit4c.portal.fileclient import FileClient, FileSession
from dit4c.portal.interfaces import PageRenderer, SessionLookup
from dit4c.portal.sessions import LoggedIn
from dit4c.portal.store.model import User
from dit4c.portal.web import arg, finishStream, redirect, served

__all__ = ["FILE_LIMIT", "Files", "cleanPath", "filesBodyLimit"]

#: The largest file uploaded through the portal (the page's form or ``PUT /api/v1/files/content``).
FILE_LIMIT = 32 * 1024 * 1024
#: What a multipart form adds around the file, at most.
FORM_OVERHEAD = 64 * 1024
#: Bytes asked of the file server at a time while downloading (it answers at most 256 KiB).
CHUNK = 64 * 1024
#: The longest path taken.
MAX_PATH = 4096
#: The routes whose body is a file.
UPLOADS = ((b"POST", b"/files/upload"), (b"PUT", b"/api/v1/files/content"))

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadPath(InstanceError):
    status = 400
    code = "bad_path"


class NoStorage(InstanceError):
    status = 404
    code = "no_storage"


def filesBodyLimit(limit: BodyLimit) -> BodyLimit:
    """``limit``, except for uploads of files, which may be up to :data:`FILE_LIMIT`."""

    def bodyLimit(method: bytes, target: bytes) -> int | None:
        path = re.sub(rb"/+", b"/", target.partition(b"?")[0]).rstrip(b"/")
        return FILE_LIMIT + FORM_OVERHEAD if (method, path) in UPLOADS else limit(method, target)

    return bodyLimit


def cleanPath(text: str | None) -> str:
    """
    ``text`` as a path in the person's storage (``""``: its top), or
    :class:`BadPath`: absolute, climbing, or with control characters.
    """
    text = text or ""
    if text.startswith("/") or _CONTROL.search(text) or len(text.encode()) > MAX_PATH:
        raise BadPath("Give a path inside your storage, such as folder/file.txt.")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadPath("A path may not climb out with '..'.")
    if any(len(p.encode()) > 255 for p in parts):
        raise BadPath("A name is at most 255 bytes.")
    return "/".join(parts)


def cleanName(text: str | None) -> str:
    """One name (a file's or a folder's), no path; browsers may send ``C:\\fakepath\\name``."""
    name = (text or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or name in (".", "..") or _CONTROL.search(name) or len(name.encode()) > 255:
        raise BadPath("Give a name of 1 to 255 bytes, without / or control characters.")
    return name


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _sftpPath(path: str) -> str:
    return path or "."


def _refusal(e: SFTPError, path: str) -> InstanceError:
    """The file server's refusal, as the person is told it."""
    shown = path or "your storage"
    if e.code == FX_NO_SUCH_FILE:
        error = InstanceError(f"There is no {shown}.")
        error.status, error.code = 404, "not_found"
    elif e.code == FX_PERMISSION_DENIED:
        error = InstanceError(f"The file server refused access to {shown}.")
        error.status, error.code = 403, "forbidden"
    elif e.code == FX_FAILURE:
        error = InstanceError(f"That could not be done to {shown} (a folder must be empty to be deleted).")
        error.status, error.code = 409, "refused"
    else:
        error = InstanceError(f"The file server refused: {e.message}")
    return error


def _entry(name: str, folder: str, attrs: dict[str, Any]) -> dict[str, Any]:
    mode = int(attrs.get("permissions", 0))
    kind = "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
    return {"name": name, "path": _join(folder, name), "type": kind, "size": attrs.get("size"), "modified": attrs.get("mtime")}


@implementer(IPushProducer)
class _Pace:
    """The person's connection's pace: a download asks for its next chunk only while it is not paused."""

    def __init__(self) -> None:
        self.paused: Deferred[None] | None = None
        self.stopped = False

    def pauseProducing(self) -> None:
        if self.paused is None:
            self.paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self.paused = self.paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()


class Files:
    """The Files page (:attr:`pages`, at ``/files``) and its API (:attr:`api`, at ``/api/v1/files``)."""

    pages = Klein()
    api = Klein()
    log = Logger()

    def __init__(self, *, sessions: SessionLookup, pages: PageRenderer, caller: Callable[[IRequest], Awaitable[User]]) -> None:
        """:param caller: the API's caller (a personal token, or a session with its CSRF header)."""
        self.sessions = sessions
        self.renderer = pages
        self.caller = caller
        #: The file server, once the portal is told of one (``PortalService``); None: no storage here.
        self.client: FileClient | None = None

    # -- what both do ------------------------------------------------------------------------

    def storage(self, user: User) -> Any:
        """An SFTP session in ``user``'s storage (never for a disabled person)."""
        if self.client is None:
            raise NoStorage("Storage is not available on this portal: it has no file server.")
        if user.disabled:
            raise InstanceError("Your account is disabled.")
        return self.client.session(user.id)

    async def listing(self, user: User, path: str) -> list[dict[str, Any]]:
        async with self.storage(user) as files:
            try:
                entries = await files.listdir(_sftpPath(path))
            except SFTPError as e:
                raise _refusal(e, path) from None
        listed = [_entry(name, path, attrs) for name, attrs in entries]
        return sorted(listed, key=lambda e: (e["type"] != "folder", e["name"].lower(), e["name"]))

    async def upload(self, user: User, path: str, data: bytes) -> None:
        if not path:
            raise BadPath("Name the file to write.")
        if len(data) > FILE_LIMIT:
            raise BadPath(f"A file uploaded here is at most {FILE_LIMIT // 2**20} MiB.")
        async with self.storage(user) as files:
            try:
                await files.write(path, data)
            except SFTPError as e:
                raise _refusal(e, path) from None
        self.log.info("{name} uploaded {size} bytes to their storage", name=user.name, size=len(data))

    async def mkdir(self, user: User, path: str) -> None:
        if not path:
            raise BadPath("Name the new folder.")
        async with self.storage(user) as files:
            try:
                await files.mkdir(path)
            except SFTPError as e:
                raise _refusal(e, path) from None

    async def delete(self, user: User, path: str) -> None:
        """A file, or an empty folder."""
        if not path:
            raise BadPath("Your storage itself cannot be deleted.")
        async with self.storage(user) as files:
            try:
                attrs = await files.stat(path)
                if stat.S_ISDIR(int(attrs.get("permissions", 0))):
                    await files.rmdir(path)
                else:
                    await files.remove(path)
            except SFTPError as e:
                raise _refusal(e, path) from None

    async def download(self, request: IRequest, user: User, path: str) -> None:
        """The file ``path`` as ``request``'s answer, read as fast as the person's connection takes it."""
        if not path:
            raise BadPath("Name the file to download.")
        async with self.storage(user) as files:
            try:
                attrs = await files.stat(path)
                if not stat.S_ISREG(int(attrs.get("permissions", 0))):
                    raise BadPath(f"{path} is not a file.")
                handle = await files.openRead(path)
            except SFTPError as e:
                raise _refusal(e, path) from None
            size = int(attrs.get("size", 0))
            name = path.rsplit("/", 1)[-1]
            ascii = re.sub(r'[^A-Za-z0-9._ -]+', "_", name) or "file"
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-disposition", f"attachment; filename=\"{ascii}\"; filename*=UTF-8''{quote(name)}".encode())
            request.setHeader(b"content-length", str(size).encode())
            request.setHeader(b"cache-control", b"no-store")
            try:
                sent = await self._send(request, files, handle, size)
            finally:
                try:
                    await files.within(handle.close())
                except Exception:
                    pass  # the connection closes anyway
        if served(request).finished or served(request)._disconnected:
            return
        if sent == size:
            finishStream(request)
        else:
            # Cut, not finished: a short file is never taken for a whole one.
            self.log.warn("a download of {name}'s ended early: {sent} of {size} bytes", name=user.name, sent=sent, size=size)
            served(request).transport.abortConnection()  # type: ignore[union-attr]

    async def _send(self, request: IRequest, files: FileSession, handle: Any, size: int) -> int:
        pace = _Pace()
        served(request).registerProducer(pace, True)
        served(request).notifyFinish().addBoth(lambda _: pace.stopProducing())
        sent = 0
        try:
            while sent < size and not pace.stopped:
                if pace.paused is not None:
                    await pace.paused
                    continue
                try:
                    data = await files.within(handle.readChunk(sent, min(CHUNK, size - sent)))
                except EOFError:
                    break
                if not data or pace.stopped:
                    break
                request.write(data)
                sent += len(data)
        finally:
            if served(request).channel is not None:
                served(request).unregisterProducer()
        return sent

    # -- the page --------------------------------------------------------------------------------

    def crumbs(self, path: str) -> list[tuple[str, str]]:
        parts = path.split("/") if path else []
        return [("/".join(parts[: n + 1]), part) for n, part in enumerate(parts)]

    async def page(self, request: IRequest, who: LoggedIn, path: str, status: int = 200, **extra: Any) -> bytes:
        entries: list[dict[str, Any]] = []
        unavailable = self.client is None
        if not unavailable and "error" not in extra:
            try:
                entries = await self.listing(who.user, path)
            except InstanceError as e:
                status, extra["error"] = e.status, str(e)
        return self.renderer.render(
            request, "files.html", status, user=who.user, csrf=who.session.csrf, path=path, crumbs=self.crumbs(path),
            entries=entries, unavailable=unavailable, limitMiB=FILE_LIMIT // 2**20, **extra,
        )  # fmt: skip

    def back(self, request: IRequest, folder: str, done: str) -> bytes:
        query = urlencode({"path": folder, "done": done} if folder else {"done": done})
        return redirect(request, f"/files?{query}")

    async def form(self, request: IRequest, csrf: str | None, act: Callable[[LoggedIn], Awaitable[bytes]]) -> bytes:
        """A form of the page: logged in, its CSRF token right, then ``act``; a refusal is shown on the page."""
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=/files")
        folder = ""
        try:
            folder = cleanPath(arg(request, "folder"))
            if not security.tokensEqual(csrf, who.session.csrf):
                return await self.page(request, who, folder, 400, error="The form expired; try again.")
            return await act(who)
        except InstanceError as e:
            return await self.page(request, who, folder, e.status, error=str(e))

    @pages.route("/", methods=["GET"], strict_slashes=False)
    async def index(self, request: IRequest) -> bytes:
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=/files")
        try:
            path = cleanPath(arg(request, "path"))
        except BadPath as e:
            return await self.page(request, who, "", 400, error=str(e))
        done = {"uploaded": "The file is uploaded.", "folder": "The folder is made.", "deleted": "Deleted."}
        return await self.page(request, who, path, message=done.get(arg(request, "done") or ""))

    @pages.route("/download", methods=["GET"])
    async def pageDownload(self, request: IRequest) -> bytes | None:
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=/files")
        try:
            await self.download(request, who.user, cleanPath(arg(request, "path")))
        except InstanceError as e:
            return self.renderer.render(request, "error.html", e.status, user=who.user, csrf=who.session.csrf, title="No download", message=str(e))
        return None

    @pages.route("/upload", methods=["POST"])
    async def pageUpload(self, request: IRequest) -> bytes:
        parts = formParts(request)
        folder = parts.get("folder", (None, b""))[1].decode("utf-8", "replace")
        request.args[b"folder"] = [folder.encode()]

        async def act(who: LoggedIn) -> bytes:
            filename, data = parts.get("file", (None, b""))
            if not filename:
                raise BadPath("Choose a file to upload.")
            path = cleanPath(folder)
            await self.upload(who.user, _join(path, cleanName(filename)), data)
            return self.back(request, path, "uploaded")

        return await self.form(request, parts.get("csrf", (None, b""))[1].decode("ascii", "replace"), act)

    @pages.route("/folder", methods=["POST"])
    async def pageFolder(self, request: IRequest) -> bytes:
        async def act(who: LoggedIn) -> bytes:
            folder = cleanPath(arg(request, "folder"))
            await self.mkdir(who.user, _join(folder, cleanName(arg(request, "name"))))
            return self.back(request, folder, "folder")

        return await self.form(request, arg(request, "csrf"), act)

    @pages.route("/delete", methods=["POST"])
    async def pageDelete(self, request: IRequest) -> bytes:
        async def act(who: LoggedIn) -> bytes:
            path = cleanPath(arg(request, "path"))
            folder = path.rpartition("/")[0]
            if arg(request, "confirm") != "yes":
                # Nothing is deleted without a second, deliberate press.
                return await self.page(request, who, folder, confirm=path)
            await self.delete(who.user, path)
            return self.back(request, folder, "deleted")

        return await self.form(request, arg(request, "csrf"), act)

    # -- the API -----------------------------------------------------------------------------------

    def reply(self, request: IRequest, body: object, status: int = 200) -> bytes:
        import json

        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    @api.handle_errors(Exception)
    def apiFailed(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        if isinstance(e, APIError):
            return self.reply(request, {"error": e.code, "reason": e.reason}, e.status)
        if isinstance(e, InstanceError):
            return self.reply(request, {"error": e.code, "reason": str(e)}, e.status)
        if isinstance(e, HTTPException):
            return self.reply(request, {"error": "http", "reason": e.description}, e.code or 500)
        self.log.failure("files API request failed", failure)
        return self.reply(request, {"error": "internal", "reason": "The portal failed."}, 500)

    @api.route("/", methods=["GET"], strict_slashes=False)
    async def apiList(self, request: IRequest) -> bytes:
        user = await self.caller(request)
        path = cleanPath(arg(request, "path"))
        return self.reply(request, {"path": path, "entries": await self.listing(user, path)})

    @api.route("/", methods=["DELETE"], strict_slashes=False)
    async def apiDelete(self, request: IRequest) -> bytes:
        user = await self.caller(request)
        path = cleanPath(arg(request, "path"))
        await self.delete(user, path)
        return self.reply(request, {"deleted": path})

    @api.route("/folders", methods=["POST"])
    async def apiFolder(self, request: IRequest) -> bytes:
        user = await self.caller(request)
        path = cleanPath(arg(request, "path"))
        await self.mkdir(user, path)
        return self.reply(request, {"path": path}, 201)

    @api.route("/content", methods=["GET"])
    async def apiDownload(self, request: IRequest) -> bytes | None:
        user = await self.caller(request)
        await self.download(request, user, cleanPath(arg(request, "path")))
        return None

    @api.route("/content", methods=["PUT"])
    async def apiUpload(self, request: IRequest) -> bytes:
        user = await self.caller(request)
        path = cleanPath(arg(request, "path"))
        data = request.content.read(FILE_LIMIT + 1)
        await self.upload(user, path, data)
        return self.reply(request, {"path": path, "size": len(data)}, 201)


def formParts(request: IRequest) -> dict[str, tuple[str | None, bytes]]:
    """A multipart form's fields: name to (file name or None, bytes); {} for any other body."""
    contentType = request.getHeader(b"content-type") or b""
    if not contentType.lower().startswith(b"multipart/form-data"):
        return {}
    request.content.seek(0)
    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + contentType + b"\r\n\r\n" + request.content.read())
    parts: dict[str, tuple[str | None, bytes]] = {}
    if not message.is_multipart():
        return parts
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in parts:
            payload = part.get_payload(decode=True)
            parts[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return parts
