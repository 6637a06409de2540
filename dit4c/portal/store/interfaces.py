"""
``IStore``: everything the portal keeps, one interface per area (people,
failed logins, sessions, API tokens, OAuth codes, schedulers, their
commands, images, instances, reports), which ``IStore`` brings together. A
part of the portal that uses one area can ask for that interface alone.

Every method returns a ``Deferred``; the database work runs off the reactor
thread. Lookups fire with None when there is nothing to find; changes to a
record that does not exist fail with ``NotFound``, and changes that would
break a uniqueness rule (or a compare-and-set) fail with ``Conflict``.
Times come from the store's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface

from dit4c.common.limits import ToolLimits

from .model import (
    COMMAND_OPS,
    MAX_COMMAND_PARAMS,
    UNSET,
    ApiToken,
    Command,
    Grant,
    Identity,
    Image,
    Instance,
    LoginFailures,
    OAuthCode,
    PageView,
    Removed,
    Scheduler,
    Session,
    ShareLink,
    Unset,
    User,
)

# The commands' records and limits and ``OAuthCode`` are ``model``'s, and
# named here as well, beside the interfaces that use them.
__all__ = [
    "COMMAND_OPS",
    "MAX_COMMAND_PARAMS",
    "Command",
    "IApiTokens",
    "ICommands",
    "IImages",
    "IInstances",
    "ILoginFailures",
    "IOAuthCodes",
    "IPeople",
    "IPortals",
    "IReports",
    "ISchedulers",
    "ISessions",
    "IStore",
    "OAuthCode",
]


class IPeople(Interface):
    """People: the users, and the external logins (OIDC, GitHub) linked to them."""

    def createUser(
        name: str,
        *,
        email: str | None = None,
        password_hash: str | None = None,
        display_name: str | None = None,
        is_admin: bool = False,
        max_instances: int | None = None,
    ) -> Deferred[User]:
        """
        A new user. ``name`` is the login name, kept in lower case;
        ``display_name`` defaults to it. ``Conflict`` if the name is taken.
        """

    def userById(user_id: str) -> Deferred[User | None]:
        """The user with this id."""

    def userByName(name: str) -> Deferred[User | None]:
        """The user with this login name (in any case)."""

    def userByIdentity(provider: str, subject: str) -> Deferred[User | None]:
        """The user an external login is linked to."""

    def linkIdentity(user_id: str, provider: str, subject: str) -> Deferred[Identity]:
        """
        Link an external login to a user. ``Conflict`` if it is linked
        already (to anyone); ``NotFound`` if there is no such user.
        """

    def identitiesOf(user_id: str) -> Deferred[list[Identity]]:
        """The external logins linked to a user."""

    def listUsers(offset: int = 0, limit: int = 100) -> Deferred[list[User]]:
        """A page of users, by name."""

    def countUsers() -> Deferred[int]:
        """How many users there are."""

    def updateUser(
        user_id: str,
        *,
        name: str | Unset = UNSET,
        email: str | None | Unset = UNSET,
        password_hash: str | None | Unset = UNSET,
        display_name: str | Unset = UNSET,
        is_admin: bool | Unset = UNSET,
        max_instances: int | None | Unset = UNSET,
        disabled: bool | Unset = UNSET,
        password_reset: bool | Unset = UNSET,
    ) -> Deferred[User]:
        """Change the fields given; fires with the user as it now is."""

    def removeUser(user_id: str) -> Deferred[Removed]:
        """
        Remove a disabled person whose instances are all discarded, in one
        transaction: their instances' records, their saved images (no longer
        listed, shared or served), their sessions, tokens, identities and
        every share to or from them. ``Conflict`` if they are not disabled
        or an instance of theirs is not discarded; ``NotFound`` if there is
        no such person.
        """


class ILoginFailures(Interface):
    """Failed logins counted per key, for ``dit4c.portal.security.LoginThrottle``."""

    def claimLoginAttempt(
        delays: Mapping[str, Callable[[int], float]], now: float, forget: float
    ) -> Deferred[float]:
        """
        Let a login attempt through, or not, for every key of ``delays`` at
        once (an address, a name at that address). A key's failures are
        forgotten ``forget`` seconds after its latest attempt. If, for some
        key, ``delays[key](failures)`` seconds have not passed since its
        latest attempt, fires with the seconds still to wait and counts
        nothing. Otherwise counts the attempt as a failure of every key, its
        latest attempt now (``loginSucceeded`` takes that back), and fires
        with 0. One transaction with the keys' rows locked: attempts at the
        same time, in several portal processes too, are let through one by
        one, each seeing the failures before it.
        """

    def loginSucceeded(clear: Sequence[str], takeBack: Sequence[str]) -> Deferred[None]:
        """
        An attempt let through by ``claimLoginAttempt`` succeeded: the
        failures of ``clear`` are forgotten, and each key of ``takeBack``
        loses the failure the attempt was counted as.
        """

    def loginFailures(key: str) -> Deferred[LoginFailures | None]:
        """What is counted for ``key``, or None."""

    def forgetLoginFailures(before: float) -> Deferred[int]:
        """Forget every key whose latest attempt was before ``before``; how many."""


class ISessions(Interface):
    """Browser sessions: the store keeps only the hash of each session's secret."""

    def createSession(user_id: str, lifetime: float) -> Deferred[Session]:
        """
        A new session for a user, valid for ``lifetime`` seconds. Its ``id``
        is the secret for the cookie: the store keeps only its hash.
        """

    def sessionByToken(token: str) -> Deferred[Session | None]:
        """The live session whose id is ``token``: None if expired or its user is disabled."""

    def touchSession(token: str, expires: float | None = None) -> Deferred[None]:
        """Note that a session was seen now, and (if given) move its expiry."""

    def deleteSession(token: str) -> Deferred[None]:
        """Log a session out."""

    def sessionLive(token_hash: str) -> Deferred[bool]:
        """
        Whether the session whose secret hashes to ``token_hash`` (what
        ``Session.id``'s hash is) exists, is unexpired and its person enabled.
        """

    def deleteSessionsOfUser(user_id: str, keep: str | None = None) -> Deferred[int]:
        """
        Log a user out everywhere (but in the session whose secret is
        ``keep``, if given); fires with how many sessions ended.
        """

    def deleteExpiredSessions() -> Deferred[int]:
        """Forget sessions past their expiry; fires with how many."""


class IApiTokens(Interface):
    """Personal API tokens: the store keeps only the hash of each token."""

    def createApiToken(user_id: str, name: str) -> Deferred[tuple[ApiToken, str]]:
        """A new API token: the record, and the token itself (shown once, never stored)."""

    def userByApiToken(token: str) -> Deferred[User | None]:
        """
        The (enabled) user an unrevoked API token belongs to; notes the
        token's use.
        """

    def revokeApiToken(token_id: str, user_id: str | None = None) -> Deferred[None]:
        """
        Revoke a token by its id (of ``user_id``'s tokens, if given).
        ``NotFound`` if there is no such token.
        """

    def listApiTokens(user_id: str) -> Deferred[list[ApiToken]]:
        """A user's tokens, revoked ones too, oldest first."""


class IOAuthCodes(Interface):
    """OAuth 2 authorization codes, for ``dit4c.portal.oauth``."""

    def createOAuthCode(
        client_id: str,
        redirect_uri: str,
        user_id: str,
        code_challenge: str,
        lifetime: float,
        session: str | None = None,
    ) -> Deferred[tuple[OAuthCode, str]]:
        """
        A new one-time authorization code for ``user_id`` at the client
        (instance) ``client_id``, valid for ``lifetime`` seconds: the record,
        and the code itself (handed out once, never stored: the store keeps
        only its hash). ``session``: the browser session (its secret) the
        code was asked for in; the record keeps only its hash. Codes expired
        already are forgotten on the way. ``NotFound`` if there is no such
        instance or user.
        """

    def redeemOAuthCode(code: str) -> Deferred[OAuthCode | None]:
        """
        Use a code: a compare-and-set that marks it used, so that of any
        number of concurrent attempts exactly one wins. Fires with the code's
        record (now marked used) for that one, and with None for a code that
        is unknown, expired or used already. Nothing else changes.
        """


class ISchedulers(Interface):
    """Schedulers (clusters) with their keys, and who may run instances on each."""

    def createScheduler(name: str, public_jwk: str, *, id: str | None = None) -> Deferred[Scheduler]:
        """Register a scheduler and its public key. ``Conflict`` if the name or id is taken."""

    def listSchedulers() -> Deferred[list[Scheduler]]:
        """Every scheduler, disabled ones too, by name."""

    def schedulerById(scheduler_id: str) -> Deferred[Scheduler | None]:
        """The scheduler with this id."""

    def updateScheduler(
        scheduler_id: str,
        *,
        name: str | Unset = UNSET,
        public_jwk: str | Unset = UNSET,
        disabled: bool | Unset = UNSET,
    ) -> Deferred[Scheduler]:
        """Change the fields given; fires with the scheduler as it now is."""

    # -- who may run where ------------------------------------------------------------------------

    def setSchedulerUsers(scheduler_id: str, user_ids: Collection[str]) -> Deferred[None]:
        """
        Restrict a scheduler (a cluster) to these people; an empty collection
        opens it to everyone again. ``NotFound`` if there is no such scheduler.
        """

    def schedulerUsers(scheduler_id: str) -> Deferred[list[str]]:
        """The ids of the people a scheduler is restricted to; empty when it is open to all."""

    def schedulersFor(user_id: str) -> Deferred[list[Scheduler]]:
        """The enabled schedulers this person may run instances on, by name."""


class ICommands(Interface):
    """
    The commands kept for a scheduler until it acknowledges them, for
    ``dit4c.portal.channel``.
    """

    def createCommand(
        scheduler_id: str, instance_id: str, op: str, params: Mapping[str, Any] | None = None
    ) -> Deferred[Command]:
        """
        A new pending command for a scheduler about one of its instances,
        after every earlier command of that scheduler (``seq``). ``op`` is one
        of ``COMMAND_OPS``; ``params`` a JSON object (at most
        ``MAX_COMMAND_PARAMS`` bytes as JSON). ``NotFound`` if there is no
        such scheduler or instance; ``Conflict`` if the instance is not
        placed on that scheduler; ``ValueError`` for a bad op or params.
        """

    def pendingCommands(scheduler_id: str, limit: int = 1000) -> Deferred[list[Command]]:
        """A scheduler's commands not yet acknowledged, in the order they were made."""

    def ackCommand(scheduler_id: str, command_id: str) -> Deferred[bool]:
        """
        The scheduler acknowledged a command: fires with True if that
        changed it from pending, False if it was acknowledged already, is
        another scheduler's, or does not exist.
        """

    def commandById(command_id: str) -> Deferred[Command | None]:
        """The command with this id."""

    def latestCommandOp(instance_id: str) -> Deferred[str | None]:
        """The op of the latest command made about an instance (acknowledged or not); None if none is kept."""

    def commandedInstances(scheduler_id: str) -> Deferred[dict[str, bool]]:
        """
        Every instance the scheduler has (or had) commands about, by id:
        True if one of them is not yet acknowledged, False if all are.
        """

    def deleteAckedCommands(before: float) -> Deferred[int]:
        """Forget commands acknowledged before ``before``; fires with how many."""


class IImages(Interface):
    """Images: the catalogue, people's own, and those shared with them."""

    def createImage(
        name: str,
        ref: str,
        *,
        owner_id: str | None = None,
        digest: str | None = None,
        port: int | None = None,
        limits: ToolLimits | None = None,
    ) -> Deferred[Image]:
        """A new image: a catalogue entry when ``owner_id`` is None, else a user's own."""

    def listCatalogue() -> Deferred[list[Image]]:
        """The catalogue (images nobody owns), not deleted, by name."""

    def listImagesOf(user_id: str) -> Deferred[list[Image]]:
        """A user's own images, not deleted, oldest first."""

    def listImagesSharedWith(user_id: str) -> Deferred[list[Image]]:
        """Other users' images shared with this one, not deleted, oldest first."""

    def imageById(image_id: str) -> Deferred[Image | None]:
        """The image with this id, deleted or not."""

    def deleteImage(image_id: str) -> Deferred[None]:
        """
        Mark an image deleted (instances made from it keep their record).
        ``NotFound`` if there is no such image.
        """

    def renameImage(image_id: str, name: str) -> Deferred[Image]:
        """Give an image another name; fires with it as it now is. ``NotFound`` if there is none."""

    def setImageLimits(image_id: str, limits: ToolLimits) -> Deferred[Image]:
        """Set what each new instance of an image may use; fires with it as it now is. ``NotFound`` if there is none."""

    def shareImage(image_id: str, user_id: str) -> Deferred[None]:
        """Let another user use an image (again is harmless)."""

    def unshareImage(image_id: str, user_id: str) -> Deferred[None]:
        """Stop sharing an image with a user."""

    def mayUseImage(user_id: str, image_id: str) -> Deferred[bool]:
        """Whether a user may start an image: a catalogue entry, their own, or shared with them."""


class IInstances(Interface):
    """Instances, their life, and whom they are shared with (directly or by links)."""

    def createInstance(
        owner_id: str,
        image_id: str,
        *,
        scheduler_id: str | None = None,
        public_jwk: str | None = None,
        quota: int | None = None,
    ) -> Deferred[Instance]:
        """
        A new instance, ``requested``, with a fresh time-sortable id.
        ``NotFound`` if the owner, image or scheduler does not exist.

        With a ``quota`` this is a claim: the instance is made only if the
        owner has fewer active instances (``dit4c.common.life.ACTIVE``)
        than that, else ``QuotaReached`` says how many they have. The count
        and the insert are one transaction, and concurrent claims for one
        person are serialised (from any number of portal processes), so a
        quota holds however many requests race; claims for different
        people do not wait for each other beyond what the database needs.
        """

    def instanceById(instance_id: str) -> Deferred[Instance | None]:
        """The instance with this id."""

    def listInstancesOf(user_id: str, includeDiscarded: bool = False) -> Deferred[list[Instance]]:
        """A user's own instances, oldest first."""

    def listInstancesSharedWith(user_id: str) -> Deferred[list[Instance]]:
        """Instances others shared with this user (directly or by a link), not discarded."""

    def listInstancesIn(states: Iterable[str], updatedBefore: float) -> Deferred[list[Instance]]:
        """
        The instances in any of ``states`` whose last change (``updated``)
        was before ``updatedBefore``, longest unchanged first.
        """

    def countInstancesByState() -> Deferred[dict[str, int]]:
        """How many instances are in each state now (states with none left out)."""

    def markActive(instance_id: str, when: float) -> Deferred[bool]:
        """Traffic reached the instance at ``when`` (kept if later than what is kept); whether it was."""

    def listRunningWithIdleLimits() -> Deferred[list[tuple[Instance, ToolLimits]]]:
        """Running instances whose image has an idle limit, with its limits."""

    def listInstancesOfScheduler(
        scheduler_id: str, includeDiscarded: bool = False
    ) -> Deferred[list[Instance]]:
        """The instances placed on a scheduler, oldest first."""

    def updateInstance(
        instance_id: str,
        *,
        state: str | Unset = UNSET,
        reason: str | None | Unset = UNSET,
        url: str | None | Unset = UNSET,
        public_jwk: str | None | Unset = UNSET,
        scheduler_id: str | None | Unset = UNSET,
        expected_state: str | Collection[str] | None = None,
        quota: int | None = None,
    ) -> Deferred[Instance]:
        """
        Change the fields given; fires with the instance as it now is.

        With ``expected_state`` (one state or several) this is a
        compare-and-set: it fails with ``Conflict`` unless the instance is
        in that state at the moment of the change. With ``quota``, the
        owner's other active instances are counted in the same transaction
        (``QuotaReached`` if they are that many already), as a start claims.
        ``NotFound`` if there is no such instance; ``ValueError`` for a
        state that is not one.
        """

    # -- sharing instances ------------------------------------------------------------------------

    def shareInstance(instance_id: str, user_id: str) -> Deferred[None]:
        """Let another user use an instance (again is harmless)."""

    def unshareInstance(instance_id: str, user_id: str) -> Deferred[None]:
        """
        Take an instance back from a user: its share with them, and their
        uses of its share links (the links stay, for whoever else has them).
        """

    def listInstanceAccess(instance_id: str) -> Deferred[list[Grant]]:
        """
        Who may use an instance besides its owner, oldest first: each person
        it is shared with, and each who followed one of its live share
        links (a person may be there once for each way).
        """

    def createShareLink(instance_id: str) -> Deferred[tuple[ShareLink, str]]:
        """A new share link: the record, and its token (shown once, never stored)."""

    def redeemShareLink(token: str, user_id: str) -> Deferred[str | None]:
        """
        A user follows a share link: while the link is not revoked, they may
        use its instance. Fires with the instance's id, or None for an
        unknown or revoked link.
        """

    def revokeShareLink(link_id: str) -> Deferred[None]:
        """Revoke a share link, and every use it granted. ``NotFound`` if there is none."""

    def listShareLinks(instance_id: str) -> Deferred[list[ShareLink]]:
        """An instance's share links, revoked ones too, oldest first."""

    def mayUseInstance(user_id: str, instance_id: str) -> Deferred[bool]:
        """
        Whether a user may use an instance: they own it, it is shared with
        them, or they redeemed a share link to it that is not revoked.
        """


class IReports(Interface):
    """What instances and the image server report, for ``dit4c.portal.reports``."""

    def spendTokenId(issuer: str, jti: str, expires: float) -> Deferred[bool]:
        """
        Remember that the token ``jti`` of ``issuer`` (an instance id) was
        used, until ``expires``: fires with True the first time, and with
        False while it is remembered (a replay). An insert that either wins
        or finds the row, so of concurrent uses exactly one gets True, in
        every portal process. Ids expired already are forgotten on the way.
        ``ValueError`` for an empty ``jti`` or one longer than 255 characters.
        """

    def findImages(reference: str) -> Deferred[list[Image]]:
        """
        The images, not deleted, whose id, ``ref`` or ``digest`` is
        ``reference`` exactly, oldest first.
        """

    def saveInstanceImage(
        instance_id: str,
        name: str,
        ref: str,
        digest: str,
        *,
        states: Collection[str],
    ) -> Deferred[tuple[Image, bool]]:
        """
        The image an instance saved: a new one owned by the instance's
        owner, with the port of the image the instance runs, and ``True``;
        or, if the owner already has an image (not deleted) with this
        ``digest``, that one and ``False``, so that a retried report makes
        no second image. Only while the instance is in one of ``states``,
        checked in the same transaction (which holds the instance's row, so
        concurrent reports for one instance are serialised): ``Conflict``
        otherwise, ``NotFound`` if there is no such instance.
        """


class IPageViews(Interface):
    """A person's page read at once: who they are and what the page lists, in one read transaction."""

    def pageView(
        *, sessionToken: str | None = None, apiToken: str | None = None, user_id: str | None = None, full: bool = True
    ) -> Deferred[PageView | None]:
        """
        What a person's page shows (``PageView``), every part read in one
        read-only transaction, so that a change committed meanwhile is seen
        whole or not at all (SQLite: one deferred transaction on WAL's
        snapshot; PostgreSQL: REPEATABLE READ, READ ONLY). The person is the
        one behind exactly one of a session token (live, not expired), an API
        token (not revoked) or a user id; None if there is none or they are
        disabled. ``full``: also what only the instances page needs (images,
        schedulers, share counts). An API token's ``last_used`` is written
        afterwards in its own transaction, at most once a minute.
        """


class IPortals(Interface):
    """
    What portal processes on one database keep for each other (dit4c.portal.peers): public
    signing keys (JWK JSON by kid), who holds each scheduler's channel, relayed answers.
    """

    def publishPortalKeys(keys: Mapping[str, str]) -> Deferred[None]:
        """Keep these public keys (kid → JWK), replacing any with the same kid."""

    def retirePortalKeys(kids: Collection[str]) -> Deferred[None]:
        """Forget these keys: what they signed no longer verifies anywhere."""

    def portalKeys() -> Deferred[dict[str, str]]:
        """Every portal process's published public key, kid → JWK (JSON text)."""

    def holdChannel(scheduler_id: str, holder: str) -> Deferred[None]:
        """``holder`` (a portal process) now holds the scheduler's channel."""

    def releaseChannel(scheduler_id: str, holder: str) -> Deferred[None]:
        """``holder`` no longer holds the scheduler's channel (nothing if another has it since)."""

    def channelHolder(scheduler_id: str) -> Deferred[str | None]:
        """The portal process that last took the scheduler's channel, if any (it may have died since)."""

    def putAnswer(id: str, body: str) -> Deferred[None]:
        """Keep a relayed question's answer for its asker (dropped after a minute)."""

    def takeAnswer(id: str) -> Deferred[str | None]:
        """A relayed question's answer, removed as it is read; None if there is none."""


class IStore(
    IPageViews, IPortals, IPeople, ILoginFailures, ISessions, IApiTokens, IOAuthCodes, ISchedulers, ICommands,
    IImages, IInstances, IReports,
):  # fmt: skip
    """Everything the portal keeps: every area's interface, and closing the store."""

    def close() -> Deferred[None]:
        """Close every database connection; the store is unusable afterwards."""
