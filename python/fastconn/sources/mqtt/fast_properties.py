"""paho's MQTT 5 ``Properties``, built cheaply for every incoming PUBLISH.

paho builds three lookup tables (type names, property names, property ids) in every
``Properties.__init__`` and scans them in ``clear()``: profiled, that was most of the source's
per-message cost at MQTT 5 (tens of microseconds per message, more than the rest of intake).
:class:`SharedTableProperties` is paho's class with the tables built once and shared (paho
only reads them after construction); parsing, validation and attribute access are paho's own.
:func:`install` makes paho's PUBLISH decoder use it; :mod:`tests.test_mqtt_units` checks that it
decodes exactly as paho does.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

from paho.mqtt import properties as paho_properties
from paho.mqtt.packettypes import PacketTypes

__all__ = ["SharedTableProperties", "install"]

_Original = paho_properties.Properties
_TEMPLATE: Final = _Original(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_TABLES: Final = {name: getattr(_TEMPLATE, name) for name in ("types", "names", "properties")}
_PRIVATE: Final = frozenset({"packetType", *_TABLES})
_DECODERS: Final = ("paho.mqtt._packet", "paho.mqtt.client")
"""The modules whose ``Properties`` name paho's PUBLISH decoding looks up (2.2, 2.1)."""


class SharedTableProperties(paho_properties.Properties):
    """paho's ``Properties`` with its lookup tables shared instead of rebuilt per instance."""

    def __init__(self, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)
        for name, table in _TABLES.items():
            object.__setattr__(self, name, table)

    def clear(self) -> None:
        """Removes every property (paho's scans all 27 names; only set ones are attributes)."""
        for name in [n for n in self.__dict__ if n not in _PRIVATE]:
            object.__delattr__(self, name)


def install() -> None:
    """Makes paho's decoders build :class:`SharedTableProperties` (idempotent)."""
    for module_name in _DECODERS:
        try:
            module: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        if getattr(module, "Properties", None) is _Original:
            module.Properties = SharedTableProperties
