"""``mmn``: the command line of mmnotify, by role.

* :mod:`mmn.cli` -- the parser and dispatch (``main(argv=None) -> int``),
  :mod:`mmn.args` its argument types, :mod:`mmn.render` what it prints;
* :mod:`mmn.client` -- the client of a running host (endpoints, keys, admin
  calls, exit codes, the event stream), shared by all of the below and by
  scripts;
* :mod:`mmn.services` -- ``mmn host`` and ``mmn node``;
* :mod:`mmn.supervisor` -- child processes (``mmn up``, the soak, the bench);
* :mod:`mmn.up` (``mmn up``/``down``), :mod:`mmn.soak`, :mod:`mmn.swarm`,
  :mod:`mmn.health` (the containers' health check), :mod:`mmn.bench`.
"""
