"""The pytest plugin (mmnotify/pytest_plugin.py), run as a user runs it:
inner test files under ``pytester``, each in a pytest of its own."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from mmnotify.pytest_plugin import start_cluster

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def _gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_the_readme_example_is_the_test_the_suite_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    example = (ROOT / "tests" / "test_example.py").read_text().split("\n", 1)[1]  # less the comment line
    assert block.strip() == example.strip()
    assert len(block.strip().splitlines()) <= 16


def test_a_failing_test_still_tears_its_cluster_down(pytester: pytest.Pytester, tmp_path: Path) -> None:
    record = tmp_path / "pid"
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(f"""
        import pathlib

        import pytest

        @pytest.mark.mmn_cluster(kvm=2, gru=0, xpmem=0)
        async def test_fails(mmn_cluster):
            pathlib.Path({str(record)!r}).write_text(str(mmn_cluster.process.pid))
            status = await mmn_cluster.client.status()
            assert sorted(n.name for n in status.nodes) == ["kvm0", "kvm1"]
            assert mmn_cluster.keys  # CURVE by default
            assert False, "a failing user test"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*a failing user test*"])
    assert _gone(int(record.read_text()))


def test_a_killed_test_process_takes_its_cluster_with_it(pytester: pytest.Pytester, tmp_path: Path) -> None:
    record = tmp_path / "pid"
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(f"""
        import os, pathlib, signal

        def test_dies(mmn_cluster):
            pathlib.Path({str(record)!r}).write_text(str(mmn_cluster.process.pid))
            os.kill(os.getpid(), signal.SIGKILL)  # no teardown runs
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert _gone(int(record.read_text()))


def test_mmn_host_attaches_to_a_running_cluster_and_leaves_it_running(pytester: pytest.Pytester,
                                                                      tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "running", kvm=1, gru=0, xpmem=1)
    try:
        pytester.makeini("[pytest]\ntrio_mode = true\n")
        pytester.makepyfile("""
            import mmnotify
            import pytest

            async def test_attached(mmn_cluster):
                assert mmn_cluster.process is None
                assert sorted(mmn_cluster.nodes) == ["kvm0", "xpmem0"]
                mm = await mmn_cluster.client.spawn()
                with pytest.raises(mmnotify.KernelError) as err:
                    await mmn_cluster.client.fault("kvm0", mm=mm, addr=0x10000000)
                assert err.value.errno is mmnotify.Errno.EFAULT  # nothing mapped there
        """)
        # --opt=PATH: a bare path argument would move pytest's rootdir away from the test's ini
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--mmn-host={cluster.admin}",
                                               f"--mmn-keys={cluster.keys}")
        result.assert_outcomes(passed=1)
        assert cluster.process is not None and cluster.process.poll() is None
    finally:
        cluster.stop()
        assert cluster.process is not None and _gone(cluster.process.pid)


def test_failures_injected_before_the_test_gets_its_cluster(mmn_cluster_factory) -> None:  # type: ignore[no-untyped-def]
    import trio

    cluster = mmn_cluster_factory(kvm=1, gru=0, xpmem=0, inject=[("kvm0", "delay-acks", {"delay_ms": 50})])
    status = trio.run(cluster.client.status)
    assert status.node("kvm0").injected.get("delay-acks")



async def test_the_in_process_cluster_answers_the_same_client_calls(mmn_local) -> None:  # type: ignore[no-untyped-def]
    """The README's example, against ``mmn_local.client()``: the relayed
    commands run on the in-process nodes as ``mmn node`` runs them."""
    import mmnotify

    c = mmn_local.client()
    mm = await c.spawn()
    addr = await c.mmap(mm, pages=4, fill=0x5A)
    fault = await c.fault("kvm0", mm=mm, addr=addr, pages=4)
    assert [p.addr for p in fault.pages] == [addr + i * 4096 for i in range(4)]
    assert (await c.access("gru0", mm=mm, addr=addr, length=3)).data == b"ZZZ"
    segid = await c.xpmem_make("xpmem0", mm=mm, addr=addr, length=2 * 4096, mode=0o666)
    apid = await c.xpmem_get("xpmem0", segid=segid, write=True)
    assert await c.xpmem_attach("xpmem0", apid=apid, length=2 * 4096)
    await c.munmap(mm, addr, 4 * 4096)
    status = await c.status()
    assert status.node("kvm0").translations.get(mm, {}) == {} and status.stale_accesses == 0
    with pytest.raises(mmnotify.KernelError) as err:
        await c.fault("kvm0", mm=mm, addr=addr)
    assert err.value.errno is mmnotify.Errno.EFAULT
    mmn_local.check()
