"""fastconn: a high-throughput event connector for serverless functions.

Sources (brokers, webhooks, schedules) feed messages to a Rust core that routes them to
OpenFaaS functions and calls them over pooled HTTP with backpressure and retries.

Embedding::

    async with Dispatcher(DispatchOptions(max_inflight=256)) as dispatcher:
        dispatcher.set_functions([FunctionTarget("echo", ("orders.*",), "http://gw:8080/function/echo")])
        outcomes = await dispatcher.call([Message("orders.created", b"{}")])
"""

from fastconn._core import __version__
from fastconn.dispatcher import Dispatcher, DispatchOptions, OutcomeCallback
from fastconn.errors import (
    ConfigError,
    DispatcherClosed,
    DispatcherFull,
    FastconnError,
    ForkError,
    RegistryError,
    SourceError,
)
from fastconn.functions import FunctionTarget
from fastconn.message import ErrorKind, Message, Outcome, TargetResult, Verdict

__all__ = [
    "ConfigError",
    "DispatchOptions",
    "Dispatcher",
    "DispatcherClosed",
    "DispatcherFull",
    "ErrorKind",
    "FastconnError",
    "ForkError",
    "FunctionTarget",
    "Message",
    "Outcome",
    "OutcomeCallback",
    "RegistryError",
    "SourceError",
    "TargetResult",
    "Verdict",
    "__version__",
]
