"""mmnotify's benchmarks.

:mod:`benchmarks.suite` is the suite behind ``mmn bench`` (installed with the
package, so the command works from any install).  The other modules are
scripts run from a checkout: ``codec.py`` (the codec's fast path),
``mm_scale.py`` (page-table scale), ``transport_rtt.py`` (the socket
adapter's round trip), ``bench.py`` (``mmn bench`` without installing).
"""
