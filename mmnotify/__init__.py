"""mmnotify: a distributed model of Linux MMU notifiers and XPMEM remote mappings.

The installed packages are ``protocol`` (the wire contract), ``transport``,
``broker`` (the host), ``node`` (the secondary MMUs) and ``mmn`` (the CLI).
This package holds what a user's own tests drive: :mod:`mmnotify.local`, the
whole system in one process around the host's real core.
"""
