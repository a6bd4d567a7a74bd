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
