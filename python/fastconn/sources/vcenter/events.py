"""vSphere event objects → topics and JSON bodies (pure: no I/O, no vCenter calls).

Topics follow either the vcenter-connector (``dotted``: every ``Event`` removed from the class
name, camel case split into lower-case words joined by dots: ``VmPoweredOnEvent`` →
``vm.powered.on``, ``DVPortgroupCreatedEvent`` → ``dv.portgroup.created``) or the VMware Event
Broker (``class``: ``VmPoweredOnEvent``). ``EventEx`` and ``ExtendedEvent`` carry their identity
in ``eventTypeId`` (``com.vmware.vc.HA.ClusterFailoverActionCompletedEvent``): it is their topic
in both styles (the connector's rule would collapse them all into ``ex``/``extended``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["GENERIC_CLASSES", "class_name", "created_time", "dotted_topic", "event_json", "topic_of"]

GENERIC_CLASSES: Final = frozenset({"EventEx", "ExtendedEvent"})
"""Classes whose ``eventTypeId`` names the event."""

_LOWER_UPPER: Final = re.compile(r"([a-z0-9])([A-Z])")
_UPPER_RUN: Final = re.compile(r"([A-Z]+)([A-Z][a-z])")

# The base ``Event`` fields: written first, in this order; the entity arguments as objects.
_BASE_FIELDS: Final = ("key", "chainId", "createdTime", "userName", "fullFormattedMessage", "changeTag")
ENTITY_ARGUMENTS: Final = {
    "datacenter": "datacenter",
    "computeResource": "computeResource",
    "host": "host",
    "vm": "vm",
    "ds": "datastore",
    "net": "network",
    "dvs": "dvs",
}
"""Event field → the field of its ``…EventArgument`` that holds the managed object."""


def dotted_topic(name: str) -> str:
    """The vcenter-connector's topic for an event class name (see the module docstring)."""
    words = name.replace("Event", "")
    words = _UPPER_RUN.sub(r"\1.\2", _LOWER_UPPER.sub(r"\1.\2", words))
    return words.lower()


def class_name(event: Any) -> str:
    """``VmPoweredOnEvent``: the WSDL class name of a pyvmomi event."""
    return str(event._wsdlName)


def topic_of(event: Any, style: str) -> str:
    name = class_name(event)
    if name in GENERIC_CLASSES and getattr(event, "eventTypeId", None):
        return str(event.eventTypeId)
    return name if style == "class" else dotted_topic(name)


def created_time(event: Any) -> datetime:
    """The event's ``createdTime``, timezone-aware (UTC when vCenter sent none)."""
    when: datetime = event.createdTime
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _moref(obj: Any) -> dict[str, str]:
    return {"type": str(obj._wsdlName), "id": str(obj._moId)}


def _empty(value: Any) -> bool:
    # Not ``value == []``: managed objects compare by ``_moId`` and fail on a list.
    return value is None or (isinstance(value, list) and not value)


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON value for a pyvmomi property value: data objects as objects (with ``_type``),
    managed objects as ``{"type", "id"}`` references, times in ISO 8601 UTC."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return _iso(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "_moId"):
        return _moref(value)
    if depth > 8:  # vSphere data is a tree; a bound keeps a surprise from recursing away
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    properties = getattr(type(value), "_GetPropertyList", None)
    if properties is not None:
        out: dict[str, Any] = {"_type": str(value._wsdlName)}
        for prop in properties():
            item = getattr(value, prop.name, None)
            if not _empty(item):
                out[prop.name] = _plain(item, depth + 1)
        return out
    if isinstance(value, type):  # a type-valued property (rare in events)
        return getattr(value, "_wsdlName", value.__name__)
    return str(value)


def _argument(arg: Any, field: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": arg.name}
    obj = getattr(arg, ENTITY_ARGUMENTS[field], None)
    if obj is not None:
        out.update(_moref(obj))
    return out


def event_json(event: Any) -> dict[str, Any]:
    """The body sent to functions: the base fields, the entity arguments (``vm``, ``host``,
    ``datacenter``, ``computeResource``, ``ds``, ``net``, ``dvs`` as ``{name, type, id}``), then
    every field of the event's own class (``oldName``/``newName`` of a rename...)."""
    out: dict[str, Any] = {"class": class_name(event)}
    for name in _BASE_FIELDS:
        value = getattr(event, name, None)
        if value is not None:
            out[name] = _plain(value)
    for name in ENTITY_ARGUMENTS:
        arg = getattr(event, name, None)
        if arg is not None:
            out[name] = _argument(arg, name)
    for prop in type(event)._GetPropertyList():
        if prop.name in out or prop.name in ENTITY_ARGUMENTS:
            continue
        value = getattr(event, prop.name, None)
        if not _empty(value):
            out[prop.name] = _plain(value)
    return out
