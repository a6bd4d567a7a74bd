"""The shared plugin registry: registration, capabilities, lookup errors."""

from __future__ import annotations

import pytest

from pathopeft.errors import UserError
from pathopeft.registry import Registry, UnknownPluginError


def test_register_lookup_and_capabilities():
    reg: Registry[type] = Registry("widget", {"conv": False, "callback": None})

    @reg.register("Alpha", conv=True)
    class A:
        pass

    @reg.register()
    class beta:
        pass

    assert reg.get("alpha") is A
    assert list(reg) == ["alpha", "beta"]
    assert reg.entry("ALPHA").supports("conv")
    assert not reg.entry("beta").supports("conv")
    assert reg.names(conv=True) == ["alpha"]
    assert reg.entry("beta").caps == {"conv": False, "callback": None}
    assert "alpha" in reg
    assert len(reg) == 2


def test_unknown_names_and_bad_registrations():
    reg: Registry[object] = Registry("strategy", {"rehearsal": False})
    reg.add("finetune", object())
    with pytest.raises(
        UnknownPluginError, match=r"unknown strategy 'finetun'; did you mean 'finetune'\? \(known: finetune\)"
    ):
        reg.get("finetun")
    assert issubclass(UnknownPluginError, UserError)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("finetune", object())
    with pytest.raises(TypeError, match=r"unknown capabilities \['speed'\]"):
        reg.add("fast", object(), speed=3)
