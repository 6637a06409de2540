"""
The scheduler: dials out to the portal, receives instance commands, places
them on compute nodes and reports their state back.

``dit4c.scheduler.channel`` is its end of the scheduler channel (and the
channel's wire format, which the portal's end shares). Nothing is imported
here, so that the portal can use the wire format without the rest.
"""
