# The README's example test ("Python API"), as written there: tests/test_plugin.py checks they agree.
import pytest

import mmnotify


async def test_a_munmap_reaches_the_node_that_maps_the_page(mmn_cluster):
    c = mmn_cluster.client
    mm = await c.spawn()
    addr = await c.mmap(mm, pages=4, fill=0x5A)
    fault = await c.fault("kvm0", mm=mm, addr=addr, pages=4)
    assert [p.addr for p in fault.pages] == [addr + i * 4096 for i in range(4)]
    await c.munmap(mm, addr, 4 * 4096)
    assert (await c.status()).node("kvm0").translations.get(mm, {}) == {}
    with pytest.raises(mmnotify.KernelError) as err:
        await c.fault("kvm0", mm=mm, addr=addr)
    assert err.value.errno is mmnotify.Errno.EFAULT
