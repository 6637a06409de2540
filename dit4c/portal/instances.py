"""
What a person can do with instances, in one place for the pages and the
REST API: start (quota and placement), stop, save, discard, share.

Each action checks who may do it, changes the instance's state with a
compare-and-set (two clicks cannot both win), and hands a command to the
scheduler through an :class:`ICommandSink` (the scheduler channel). Every
refusal is an :class:`InstanceError` whose message a person can act on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import Interface, implementer

from dit4c.channel.questions import Unanswered
from dit4c.channel.wire import LogChunk
from dit4c.common.completes import completes
from dit4c.common.errors import IllegalMove
from dit4c.common.life import ACTIONS, ACTIVE, Life, State
from dit4c.portal.errors import (
    Forbidden,
    InstanceError,
    NoScheduler,
    NotFound,
    QuotaExceeded,
    WrongState,
)
from dit4c.portal.events import AccessChange, EventBus, InstanceEvents
from dit4c.portal.reportrules import MAX_NAME
from dit4c.portal.store.errors import Conflict, QuotaReached
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Grant, Image, Instance, ShareLink, User


def imageJSON(image: Image, viewer: str) -> dict[str, Any]:
    """An image as the API shows it to the person ``viewer`` (``GET /api/v1/images``)."""
    return {
        "id": image.id, "name": image.name, "ref": image.ref, "port": image.port, "digest": image.digest,
        "mine": image.owner_id == viewer, "limits": image.limits.toJSON(),
    }  # fmt: skip


class ICommandSink(Interface):
    """Where instance commands go: the scheduler channel."""

    def send(scheduler_id: str, op: str, instance_id: str, params: dict[str, Any]) -> Deferred[str]:
        """Persist a command for a scheduler and deliver it (now, or when it connects)."""

    def connected(scheduler_id: str) -> bool:
        """Whether that scheduler has a live channel to this portal process now."""

    def reachable(scheduler_id: str) -> Deferred[bool]:
        """Whether that scheduler has a live channel to this portal process or another running one."""

    def logs(scheduler_id: str, instance_id: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """Ask that scheduler for a piece of an instance's tool's output (docs/protocols.md 7.6)."""


@implementer(ICommandSink)
class NoChannel:
    """The commands of a portal without schedulers: refused; nothing is connected."""

    def send(self, scheduler_id: str, op: str, instance_id: str, params: dict[str, Any]) -> Deferred[str]:
        raise NoScheduler("This portal has no scheduler channel.")

    def connected(self, scheduler_id: str) -> bool:
        return False

    def reachable(self, scheduler_id: str) -> Deferred[bool]:
        return succeed(False)

    def logs(self, scheduler_id: str, instance_id: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        raise NoScheduler("This portal has no scheduler channel.")


def _atImageServer(image: Image) -> bool:
    """A saved image, kept at the image server (reading it takes a read token)."""
    return image.owner_id is not None and image.ref.startswith(("http://", "https://"))


def _overQuota(e: QuotaReached) -> QuotaExceeded:
    return QuotaExceeded(
        f"You may run {e.quota} instance{'s' if e.quota != 1 else ''} at once and have {e.active}; stop one first."
    )


class Instances:
    """
    What people do with instances, for the pages and the REST API alike.
    Each action that changes several things in turn (claim, store the
    command, tell the scheduler; share or unshare, tell every watcher) runs
    to its end once begun (:func:`~dit4c.common.completes.completes`), even
    if the browser that asked goes away meanwhile.
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        commands: ICommandSink,
        *,
        defaultQuota: int = 4,
        events: EventBus | None = None,
        readToken: Callable[[Image], str] | None = None,
    ) -> None:
        """
        :param readToken: makes the token a node fetches a saved image with
            from the image server (docs/protocols.md 8.5); it goes in the
            ``start`` command of an instance started from a saved image,
            as the command is sent (:meth:`paramsToSend`).
        """
        self.readToken = readToken
        self.store = store
        self.commands = commands
        self.defaultQuota = defaultQuota
        #: Where every change made here is published (the pages watch it).
        self.events: EventBus = events if events is not None else InstanceEvents()

    def quotaOf(self, user: User) -> int:
        return user.max_instances if user.max_instances is not None else self.defaultQuota

    async def images(self, user: User) -> list[Image]:
        """What ``user`` may start: the catalogue, their saved images, and images shared with them."""
        return (
            list(await self.store.listCatalogue())
            + list(await self.store.listImagesOf(user.id))
            + list(await self.store.listImagesSharedWith(user.id))
        )

    @completes
    async def start(self, user: User, image_id: str, scheduler_id: str | None = None) -> Instance:
        image = await self.store.imageById(image_id)
        if image is None or image.deleted:
            raise NotFound("There is no such image.")
        if image.owner_id is not None and not await self.store.mayUseImage(user.id, image.id):
            raise Forbidden("That image is not yours and was not shared with you.")
        scheduler = await self._placement(user, scheduler_id)
        try:
            # The quota is checked and the instance claimed in one store
            # transaction: requests racing (in this process or another)
            # cannot together pass it.
            instance = await self.store.createInstance(
                user.id, image.id, scheduler_id=scheduler, quota=self.quotaOf(user)
            )
        except QuotaReached as e:
            raise _overQuota(e) from None
        self.events.publish(instance)
        # A saved image's read token is not stored with the command: it is
        # made as the command is sent (paramsToSend).
        params: dict[str, Any] = {"image": image.ref, "port": image.port, "digest": image.digest}
        if image.limits.cpus is not None or image.limits.memory is not None:
            # What the node enforces; the idle limit is the portal's own (culling).
            params["limits"] = {"cpus": image.limits.cpus, "memory": image.limits.memory}
        await self.commands.send(scheduler, "start", instance.id, params)
        self.log.info("{user} started {instance} from {image}", user=user.name, instance=instance.id, image=image.name)
        return instance

    async def paramsToSend(self, op: str, instance_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """
        A stored command's params as they go to the scheduler: a ``start``
        from a saved image at the image server gets a read token made now
        (docs/protocols.md 7.3, 8.5), so that no usable token is kept in the
        store and a command that waited for its scheduler carries a fresh
        one. None if the image was deleted meanwhile (the node's fetch is
        then refused, and the instance errs).
        """
        sent = dict(params)
        sent.pop("token", None)
        if op != "start" or self.readToken is None:
            return sent
        instance = await self.store.instanceById(instance_id)
        image = await self.store.imageById(instance.image_id) if instance is not None else None
        if image is not None and not image.deleted and _atImageServer(image):
            # The node needs leave to read it.
            sent["token"] = self.readToken(image)
        return sent

    async def _placement(self, user: User, wanted: str | None) -> str:
        """
        The person's choice if they may run there; else the first cluster open
        to them with a live channel; else the first open to them (its
        commands wait until it connects).
        """
        schedulers = await self.store.schedulersFor(user.id)
        if wanted is not None:
            if wanted not in {s.id for s in schedulers}:
                raise NoScheduler("That cluster does not exist, is not taking instances, or is not open to you.")
            return wanted
        connected = [s.id for s in schedulers if await self.commands.reachable(s.id)]
        if connected:
            return connected[0]
        if schedulers:
            # Commands wait for a scheduler that is away; the person sees
            # the instance requested until it comes back.
            return schedulers[0].id
        raise NoScheduler("No cluster is available to you to run instances now.")

    async def owned(self, user: User, instance_id: str) -> Instance:
        instance = await self.store.instanceById(instance_id)
        if instance is None or (instance.owner_id != user.id and not user.is_admin):
            raise NotFound("There is no such instance of yours.")
        return instance

    @completes
    async def act(self, user: User, instance_id: str, action: str, reason: str | None = None) -> Instance:
        """
        A person's action on an instance, if its life allows it in the
        state it is in: the instance moves on at once (compare-and-set on
        that state, so two clicks cannot both win) and its scheduler is
        told. An instance no scheduler holds has nothing to stop or
        remove anywhere: it goes straight to where that would end.
        ``reason``: why, when the person did not ask for it themselves
        (the portal culls an unused instance); it stays with the state the
        action ends in.
        """
        if action not in ACTIONS:
            raise InstanceError(f"Unknown action {action!r}.")
        instance = await self.owned(user, instance_id)
        if instance.scheduler_id is None and action in ("save", "resume"):
            raise WrongState(f"Cannot {action} an instance that never ran on a compute node.")
        life = Life(instance.state)
        try:
            life.act(action)
            if instance.scheduler_id is None and life.state in (State.STOPPING, State.DISCARDING):
                life.move(State.STOPPED if life.state is State.STOPPING else State.DISCARDED)
        except IllegalMove:
            raise WrongState(f"Cannot {action} an instance that is {instance.state}.") from None
        # Back to life (a resume) counts against the quota, as a start does.
        quota = self.quotaOf(user) if life.state in ACTIVE and instance.state not in ACTIVE else None
        try:
            updated = await self.store.updateInstance(
                instance.id, state=life.state, reason=reason, expected_state=instance.state, quota=quota
            )
        except Conflict:
            raise WrongState("The instance changed meanwhile; reload and try again.") from None
        except QuotaReached as e:
            raise _overQuota(e) from None
        self.events.publish(updated)
        if instance.scheduler_id is not None:
            await self.commands.send(instance.scheduler_id, ACTIONS[action].op, instance.id, {})
        self.log.info("{user}: {action} {instance}", user=user.name, action=action, instance=instance.id)
        return updated

    @completes
    async def share(self, user: User, instance_id: str, name: str) -> None:
        instance = await self.owned(user, instance_id)
        other = await self.store.userByName(name.strip().lower())
        if other is None or other.disabled:
            raise NotFound(f"There is nobody called {name!r}.")
        await self.store.shareInstance(instance.id, other.id)
        self.events.accessChanged(AccessChange(user=other.id, instance=instance.id))

    async def logs(self, user: User, instance_id: str, offset: int | None, limit: int) -> LogChunk:
        """
        A piece of the tool's output of the person's instance (theirs: it may
        show secrets a shared person must not see), from its cluster; a
        chunk with ``error`` says why there is none.
        """
        instance = await self.owned(user, instance_id)
        if instance.scheduler_id is None or instance.state in (State.REQUESTED, State.DISCARDED):
            return LogChunk(offset or 0, offset or 0, "", "The instance has no output: it has not started, or is discarded.")
        try:
            return await self.commands.logs(instance.scheduler_id, instance.id, offset, limit)
        except Unanswered as e:
            return LogChunk(offset or 0, offset or 0, "", str(e))

    async def access(self, user: User, instance_id: str) -> list[Grant]:
        """Who besides ``user`` may use their instance, and how (``NotFound`` if it is not theirs)."""
        instance = await self.owned(user, instance_id)
        return await self.store.listInstanceAccess(instance.id)

    @completes
    async def unshare(self, user: User, instance_id: str, name: str) -> None:
        """
        Take the instance back from ``name``, however they came to use it
        (named, or through its share links): published, so that their open
        connections through its auth helper close and their pages stop
        hearing of it within seconds (docs/protocols.md 6.6).
        """
        instance = await self.owned(user, instance_id)
        other = await self.store.userByName(name.strip().lower())
        if other is not None:
            await self.store.unshareInstance(instance.id, other.id)
            self.events.accessChanged(AccessChange(user=other.id, instance=instance.id))


class Sharing:
    """Share links to instances, and saved images shared with people."""

    log = Logger()

    def __init__(
        self,
        instances: Instances,
        publicURL: str,
        *,
        removeBytes: Callable[[Image], Deferred[None]] | None = None,
    ) -> None:
        """
        :param removeBytes: asks the image server to remove a deleted saved
            image's bytes (when no other saved image has the same digest).
        """
        self.instances = instances
        self.store = instances.store
        self.publicURL = publicURL
        self.removeBytes = removeBytes

    async def createLink(self, user: User, instance_id: str) -> tuple[ShareLink, str]:
        """A new link (shown once) that lets whoever follows it, logged in, use the instance."""
        instance = await self.instances.owned(user, instance_id)
        link, token = await self.store.createShareLink(instance.id)
        return link, f"{self.publicURL}/share/{token}"

    async def links(self, user: User, instance_id: str) -> list[ShareLink]:
        instance = await self.instances.owned(user, instance_id)
        return list(await self.store.listShareLinks(instance.id))

    @completes
    async def revokeLink(self, user: User, instance_id: str, link_id: str) -> None:
        instance = await self.instances.owned(user, instance_id)
        if link_id not in {link.id for link in await self.store.listShareLinks(instance.id)}:
            raise NotFound("There is no such link to this instance.")
        await self.store.revokeShareLink(link_id)
        # Whoever came in through the link may have lost the instance.
        self.instances.events.accessChanged(AccessChange(instance=instance.id))

    async def ownedImage(self, user: User, image_id: str) -> Image:
        image = await self.store.imageById(image_id)
        if image is None or image.deleted or (image.owner_id != user.id and not user.is_admin):
            raise NotFound("There is no such saved image of yours.")
        return image

    async def renameImage(self, user: User, image_id: str, name: str) -> Image:
        """A saved image of the person's, under a name they choose (1 to ``MAX_NAME`` printable characters)."""
        image = await self.ownedImage(user, image_id)
        name = name.strip()
        if not 0 < len(name) <= MAX_NAME or not name.isprintable():
            raise InstanceError(f"A name is 1 to {MAX_NAME} printable characters.")
        return await self.store.renameImage(image.id, name)

    async def shareImage(self, user: User, image_id: str, name: str) -> None:
        image = await self.ownedImage(user, image_id)
        other = await self.store.userByName(name.strip().lower())
        if other is None or other.disabled:
            raise NotFound(f"There is nobody called {name!r}.")
        await self.store.shareImage(image.id, other.id)

    async def unshareImage(self, user: User, image_id: str, name: str) -> None:
        image = await self.ownedImage(user, image_id)
        other = await self.store.userByName(name.strip().lower())
        if other is not None:
            await self.store.unshareImage(image.id, other.id)

    @completes
    async def deleteImage(self, user: User, image_id: str) -> None:
        image = await self.ownedImage(user, image_id)
        await self.store.deleteImage(image.id)
        await self.removeBytesOf(image)

    async def removeBytesOf(self, image: Image) -> None:
        """A deleted saved image's bytes, removed from the image server unless another saved image has them."""
        if self.removeBytes is None or not image.digest or not image.ref.startswith(("http://", "https://")):
            return
        if await self.store.findImages(image.digest):
            return  # someone else saved the same bytes: they stay
        try:
            await self.removeBytes(image)
        except Exception as e:
            # The record is gone either way; the bytes wait for an administrator.
            self.log.warn(
                "the image server kept the bytes of deleted image {image} ({digest}): {error}",
                image=image.id, digest=image.digest, error=str(e),
            )  # fmt: skip


def isActive(instance: Instance) -> bool:
    return instance.state in ACTIVE
