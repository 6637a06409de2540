"""
Questions for a scheduler whose channel another portal process holds
(docs/protocols.md 16): a tool's output (7.6), a scheduler's compute nodes
and a request about one (7.7) are asked down the scheduler's channel, which
only one process holds. Any other relays the question to it.

The store says which process took the channel last (``IPortals.holdChannel``)
and the peers whether it still runs (``IPeers.live``). The question goes
out as an ``ask`` message; the holder asks its scheduler, keeps the answer
in the store (``putAnswer``: an answer may be longer than a notification
may be) and tells ``answer``; the asker takes it (``takeAnswer``). No live
holder, or no answer within the question's time, is ``Unanswered``, as a
scheduler away is on the process that would hold it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.channel.questions import QUESTION_TIMEOUT, Unanswered
from dit4c.portal.peers import IPeers
from dit4c.portal.store.interfaces import IPortals

__all__ = ["AWAY", "ChannelRelay"]

#: What a question for a scheduler connected to no running portal process is told.
AWAY = "The instance's cluster is not connected now; try again in a moment."

#: Answers a holder gives: a question and its arguments → the answer as JSON (an ``Unanswered`` says why not).
Answerer = Callable[[str, str, Mapping[str, Any]], "Deferred[Any] | None"]


class ChannelRelay:
    """This process's side of relayed questions: asking the holder, and answering as one."""

    log = Logger()

    def __init__(
        self, clock: IReactorTime, store: IPortals, peers: IPeers, answer: Answerer, timeout: float = QUESTION_TIMEOUT
    ) -> None:
        """
        :param answer: ``answer(scheduler, question, args)`` asks a
            scheduler whose channel this process holds, or is None if it
            holds none for that scheduler.
        :param timeout: seconds an asker waits for the holder's answer.
        """
        self.clock = clock
        self.store = store
        self.peers = peers
        self.answer = answer
        self.timeout = timeout
        self._waiting: dict[str, Deferred[str]] = {}
        peers.hear("ask", self._asked)
        peers.hear("answer", self._answered)

    async def holder(self, schedulerId: str) -> str | None:
        """The running portal process (not this one) holding the scheduler's channel, if any."""
        if self.peers.alone:
            return None
        holder = await self.store.channelHolder(schedulerId)
        if holder is None or holder == self.peers.id or not await self.peers.live(holder):
            return None
        return holder

    async def ask(self, schedulerId: str, question: str, args: Mapping[str, Any]) -> Any:
        """The holder's answer to ``question`` (JSON), or ``Unanswered`` with the reason to show."""
        holder = await self.holder(schedulerId)
        if holder is None:
            raise Unanswered(AWAY)
        questionId = secrets.token_urlsafe(12)
        waiting: Deferred[str] = Deferred()
        self._waiting[questionId] = waiting
        waiting.addTimeout(self.timeout, self.clock)
        self.peers.tell("ask", {
            "id": questionId, "holder": holder, "scheduler": schedulerId,
            "question": json.dumps({"q": question, "args": args}),
        })  # fmt: skip
        try:
            text = await waiting
        except TimeoutError:
            raise Unanswered(f"The instance's cluster did not answer within {self.timeout:g} s; try again.") from None
        finally:
            self._waiting.pop(questionId, None)
        body = json.loads(text)
        if "error" in body:
            raise Unanswered(str(body["error"]))
        return body["answer"]

    # -- the holder's side --------------------------------------------------------------------

    def _asked(self, body: dict[str, Any]) -> None:
        questionId, schedulerId = body.get("id"), body.get("scheduler")
        try:
            asked = json.loads(str(body.get("question")))
            question, args = str(asked["q"]), dict(asked["args"])
        except (ValueError, KeyError, TypeError):
            self.log.warn("ignored a relayed question that is not one: {body!r}", body=body)
            return
        if not isinstance(questionId, str) or not isinstance(schedulerId, str) or body.get("holder") != self.peers.id:
            return  # another process's to answer
        answering = self.answer(schedulerId, question, args)
        if answering is None:
            # Named as the holder, but the channel closed meanwhile.
            answering = fail(Unanswered(AWAY))

        def answered(result: Any) -> dict[str, Any]:
            return {"answer": result}

        def refused(failure: Failure) -> dict[str, Any]:
            if failure.check(Unanswered):
                return {"error": str(failure.value)}
            self.log.failure("bug answering a relayed {question}", failure, question=question)
            return {"error": "The portal failed while asking the instance's cluster."}

        async def reply(outcome: dict[str, Any]) -> None:
            await self.store.putAnswer(questionId, json.dumps(outcome))
            self.peers.tell("answer", {"id": questionId})

        answering.addCallbacks(answered, refused).addCallback(lambda outcome: Deferred.fromCoroutine(reply(outcome)))
        answering.addErrback(lambda f: self.log.warn("could not answer a relayed question: {error}", error=f.getErrorMessage()))

    def _answered(self, body: dict[str, Any]) -> None:
        questionId = body.get("id")
        waiting = self._waiting.get(questionId) if isinstance(questionId, str) else None
        if waiting is None or questionId is None:
            return  # another process's question
        d = self.store.takeAnswer(questionId)

        def taken(text: str | None) -> None:
            if text is not None and not waiting.called:
                waiting.callback(text)

        def failed(failure: Failure) -> None:
            if not waiting.called:
                waiting.errback(failure)

        d.addCallback(taken).addErrback(failed)
