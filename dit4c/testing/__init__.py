"""
Test doubles for people who build on DIT4C: stand-ins for DIT4C's peers
that speak the real wire, so a test of your own scheduler, node, tool or
portal client runs against real sockets and the real protocol without the
rest of a deployment (as ``treq.testing`` ships ``StubTreq``).

:mod:`dit4c.testing.scheduler`
    A stand-in scheduler on the real scheduler channel
    (``docs/protocols.md``, section 7):

    - :class:`~dit4c.testing.scheduler.TestingScheduler` runs nothing: its
      instances live in its memory and move through the instance life as a
      node's would (starting, running with a URL and a fresh instance key,
      stopping, saving...), with delays and failures a test sets. A portal
      with one connected behaves as with a real cluster behind it: a test
      of a portal client (a page, a tool that calls the REST API) sees its
      instances start and stop. It is also a complete
      :class:`~dit4c.scheduler.channel.ISchedulerHandler` to read before
      writing your own.
    - :class:`~dit4c.testing.scheduler.RawChannel` is a bare channel client
      that sends what it is told and records what comes back, for tests of
      a portal's end of the channel (bad proofs, bad messages).
    - :func:`~dit4c.testing.scheduler.registerScheduler` registers a
      scheduler and its public key in a portal store.

A stand-in scheduler on a portal in the test's own process::

    from twisted.internet import reactor
    from dit4c.common.life import State
    from dit4c.testing.scheduler import TestingScheduler, registerScheduler

    scheduler, key = await registerScheduler(store, "cluster")
    sim = TestingScheduler(reactor, delays={"start": 0.2})
    await sim.connect("ws://127.0.0.1:8000", scheduler.id, key).whenConnected()
    ...                 # start an instance through the portal
    await sim.whenState(instanceId, State.RUNNING)
    await sim.stop()

Against a portal running on its own (``twistd -n dit4c-portal``), register
the key's public JWK (:func:`dit4c.common.keys.publicJWK`) at ``/admin/``
or with ``POST /api/v1/admin/schedulers`` and connect with the id the
portal gave. Your own scheduler is tested the same way: its
:class:`~dit4c.scheduler.channel.ChannelClient` (with your handler) in
place of the stand-in.

Nothing in DIT4C imports this package; DIT4C's own test harnesses
(Chromium, podman images, processes) are in its ``tests/support``.
"""
