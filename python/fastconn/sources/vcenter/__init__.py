"""``type = "vcenter"``: vSphere events (VM powered on, created, renamed...) to the functions
subscribed to their topic, through pyvmomi and an event history collector.

* **Reading.** One session, one worker thread for every blocking pyvmomi call (never the event
  loop). Each ``poll_interval`` the tail collector's latest page is read; events above the
  cursor key are new. When a whole page is new (a burst, or fastconn was down), a catch-up
  collector filtered to the events created since the cursor's time is read to its end, so a
  burst bigger than a page is not skipped (see :mod:`.client`).
* **Topics**: ``dotted`` (``vm.powered.on``, the vcenter-connector) or ``class``
  (``VmPoweredOnEvent``, the VMware Event Broker); ``EventEx``/``ExtendedEvent`` use their
  ``eventTypeId``. Body: the event as JSON (:mod:`.events`); ``X-Message-Id`` =
  ``<vCenter instanceUuid>:<event key>``, the same on every redelivery.
* **At least once, across restarts.** The checkpoint is the event key below which every event
  read is settled (delivered, unrouted or dead-lettered): a gap-free watermark
  (:mod:`.progress`). A restart, kill -9 included, resumes after it and delivers again what had
  not settled. Retryable failures are sent again with doubling backoff while the checkpoint
  holds; final failures go to ``dead_letter`` with their context and then count as settled;
  without a dead-letter destination they are retried like retryable ones (the checkpoint holds
  until the function accepts them). With ``asynchronous_invocation`` an event settles only when
  its callbacks report the result.
* **Session loss** (vCenter restart, expired session, network): log in again with backoff and
  continue from the cursor; if the server's event keys started again (a restored vCenter, a
  simulator restart), the events created after the last one read are taken as new.
* **No ordering** between events: they are dispatched concurrently.

Modules: :mod:`.config`, :mod:`.events` (topics, JSON), :mod:`.messages` (event → message parts),
:mod:`.client` (blocking pyvmomi), :mod:`.progress` (watermark, checkpoint), :mod:`.source`.
"""

from __future__ import annotations

from fastconn.sources.vcenter.config import VcenterConfig
from fastconn.sources.vcenter.events import dotted_topic
from fastconn.sources.vcenter.source import VcenterSource, VcenterStats

__all__ = ["CONFIG_MODEL", "VcenterConfig", "VcenterSource", "VcenterStats", "create", "dotted_topic"]

CONFIG_MODEL = VcenterConfig


def create(config: VcenterConfig) -> VcenterSource:
    return VcenterSource(config)
