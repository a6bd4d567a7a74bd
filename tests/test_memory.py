import math

import numpy as np

from pathopeft.memory import peak_mib, rss_kib, start_peak


def test_peak_sees_a_temporary_allocation():
    start = start_peak()
    if start < 0:
        assert math.isnan(peak_mib(start))
        return
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del block
    assert peak_mib(start) > 50
    assert rss_kib("VmHWM") >= rss_kib("VmRSS")


def test_peak_of_a_second_section_is_not_hidden_by_freed_heap():
    """Memory freed by an earlier section but kept by malloc must not make the next section read ~0."""
    pins = []

    def section() -> None:
        blocks = []
        for _ in range(1024):  # 64 MiB in 64 KiB heap blocks, each followed by a small live block that
            blocks.append(np.ones(64 * 1024 // 8))  # stops free() from giving the heap top back by itself
            pins.append(np.ones(16))
        del blocks

    section()
    start = start_peak()
    if start < 0:
        return
    section()
    assert peak_mib(start) > 50
