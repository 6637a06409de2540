"""
The channel: how the portal, schedulers and compute nodes talk.

- :mod:`dit4c.channel.wire`: the messages, their checks, limits and close codes;
- :mod:`dit4c.channel.handshake`: the challenge, proof and welcome that open
  every link (portal-scheduler, scheduler-node), sans I/O;
- :mod:`dit4c.channel.interfaces`: a compute node as its scheduler drives it;
- :mod:`dit4c.channel.errors`: what closes a link, and a node that is full.

The ends themselves live with their components: the portal's
(:mod:`dit4c.portal.channel`), the scheduler's (:mod:`dit4c.scheduler.channel`)
and the node link's (:mod:`dit4c.node.link`).
"""
