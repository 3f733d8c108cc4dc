"""``mmn``: the command line of mmnotify (``mmn.cli.main``) and ``mmn up``."""
