import math

import pytest

from pathopeft.wsi.resolution import choose_level, mag_to_mpp, mpp_to_mag, resolve_mpp, size_at_level


@pytest.mark.parametrize(("mag", "mpp"), [(40, 0.25), (20, 0.5), (10, 1.0), (5, 2.0), (0.625, 16.0)])
def test_mag_mpp_round_trip(mag, mpp):
    assert mag_to_mpp(mag) == pytest.approx(mpp)
    assert mpp_to_mag(mpp) == pytest.approx(mag)


@pytest.mark.parametrize("bad", [0, -1])
def test_mag_mpp_reject_non_positive(bad):
    with pytest.raises(ValueError, match="must be > 0"):
        mag_to_mpp(bad)
    with pytest.raises(ValueError, match="must be > 0"):
        mpp_to_mag(bad)


@pytest.mark.parametrize(
    ("props", "manifest", "expected", "source"),
    [
        ({"openslide.mpp-x": "0.2527", "openslide.objective-power": "20"}, None, 0.2527, "openslide.mpp-x"),
        ({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}, None, 0.5, "tiff.XResolution"),
        ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, None, 0.5, "tiff.XResolution"),
        (
            {"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch", "openslide.objective-power": "40"},
            None,
            0.25,
            "objective-power",
        ),
        ({"openslide.objective-power": "20"}, 0.3, 0.5, "objective-power"),  # metadata beats the manifest
        ({}, 0.3, 0.3, "manifest"),
        ({}, None, None, "none"),
        ({}, float("nan"), None, "none"),
        ({"openslide.mpp-x": "garbage"}, None, None, "none"),
    ],
)
def test_resolve_mpp_order(props, manifest, expected, source):
    info = resolve_mpp(props, manifest)
    assert info.source == source
    if expected is None:
        assert info.mpp is None
    else:
        assert info.mpp == pytest.approx(expected)


# (level downsamples, level-0 mpp, target mpp) -> (level, resize factor)
LEVEL_CASES = [
    ((1, 4, 16, 64), 0.25, 0.25, 0, 1.0),
    ((1, 4, 16, 64), 0.25, 0.5, 0, 2.0),
    ((1, 4, 16, 64), 0.25, 1.0, 1, 1.0),
    ((1, 4, 16, 64), 0.25, 2.0, 1, 2.0),
    ((1, 4, 16, 64), 0.25, 4.0, 2, 1.0),
    ((1, 2, 4, 8), 0.25, 0.6, 1, 1.2),  # no rounding into magnification buckets
    ((1.0, 4.000301, 16.0012), 0.25, 1.0, 1, 1.0),  # OpenSlide's near-integer downsamples
    ((1, 2), 0.5, 0.25, 0, 0.5),  # upsampling is explicit: factor < 1
    ((1, 4, 2), 0.5, 1.0, 2, 1.0),  # levels need not be sorted
]


@pytest.mark.parametrize(("downsamples", "mpp0", "target", "level", "factor"), LEVEL_CASES)
def test_choose_level(downsamples, mpp0, target, level, factor):
    choice = choose_level(downsamples, mpp0, target)
    assert choice.level == level
    assert choice.resize_factor == pytest.approx(factor, rel=1e-3)
    # never read a level coarser than the target (unless the target is finer than level 0)
    assert choice.level_downsample <= max(1.0, choice.target_downsample) * (1 + 1e-3)


def test_size_at_level():
    choice = choose_level((1, 2, 4, 8), 0.25, 0.6)
    assert size_at_level(224, choice) == round(224 * 1.2)
    assert math.isclose(choice.target_downsample, 2.4)


def test_implausible_metadata_is_refused_and_named():
    """The boxes fixture's openslide.mpp-x = 352.78 (a 72-dpi tag) is not a scan resolution."""
    from pathopeft.wsi.resolution import mpp_problem

    info = resolve_mpp({"openslide.mpp-x": "352.777"})
    assert info.mpp is None
    assert info.rejected == "352.8 µm/px from openslide.mpp-x"
    reason = mpp_problem(info, 0.5)
    assert reason.startswith("implausible resolution 352.8 µm/px from openslide.mpp-x")
    assert "manifest's mpp column" in reason
    # the manifest overrides an implausible value (but never a plausible one, see test_resolve_mpp_order)
    info = resolve_mpp({"openslide.mpp-x": "352.777"}, 0.5)
    assert (info.mpp, info.source) == (0.5, "manifest")
    assert mpp_problem(info, 0.5) is None
    # a plausible value further down the order of trust is used
    info = resolve_mpp({"openslide.mpp-x": "0.001", "openslide.objective-power": "20"})
    assert (info.mpp, info.source) == (0.5, "objective-power")
    assert info.rejected == "0.001 µm/px from openslide.mpp-x"


@pytest.mark.parametrize(("mpp0", "target", "ok"), [(0.5, 0.25, True), (0.5, 0.24, False), (0.25, 0.01, False)])
def test_targets_far_finer_than_level0_are_refused(mpp0, target, ok):
    from pathopeft.wsi.resolution import MppInfo, mpp_problem

    reason = mpp_problem(MppInfo(mpp0, "openslide.mpp-x"), target)
    assert (reason is None) == ok
    if not ok:
        assert "finer than the slide's level 0" in reason
        assert "at most 2× upsampling" in reason
