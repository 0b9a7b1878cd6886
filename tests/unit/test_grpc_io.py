"""`--grpc-io` as the ``GRPC_EXPERIMENTS`` gRPC loads with: ``poller`` switches the EventEngine
listener off, ``event-engine`` leaves gRPC's default; an operator's other experiments are kept, a
conflicting listener entry is replaced, an unknown choice is refused by name, and a process that
has loaded gRPC already is left as it is. (That a served process's threads then do what the flag
says: tests/integration/test_grpc_io.py.)"""

from __future__ import annotations

import logging
import os

import pytest

from server import grpc_io
from server.errors import InvalidArgument
from server.grpc_io import CLIENT, ENV, LISTENER, configure, experiments


def test_poller_switches_the_event_engine_listener_off() -> None:
    assert experiments("poller", None) == "-event_engine_listener"
    assert experiments("event-engine", None) == ""


def test_an_operators_other_experiments_are_kept_and_a_conflicting_entry_replaced() -> None:
    assert experiments("poller", "tcp_rcv_lowat") == "tcp_rcv_lowat,-event_engine_listener"
    assert experiments("poller", " event_engine_listener , tcp_rcv_lowat,") == \
        "tcp_rcv_lowat,-event_engine_listener"
    assert experiments("event-engine", "-event_engine_listener,tcp_rcv_lowat") == "tcp_rcv_lowat"


def test_a_client_process_switches_its_channels_over_and_keeps_the_listener_entry() -> None:
    assert experiments("poller", None, CLIENT) == "-event_engine_client"
    assert experiments("event-engine", "-event_engine_client", CLIENT) == ""
    # `serve`'s entry for the listener and the load generator's for its channels coexist
    assert experiments("poller", experiments("poller", None, LISTENER), CLIENT) == \
        "-event_engine_listener,-event_engine_client"


def test_an_unknown_choice_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match=r"--grpc-io 'iouring': one of poller, event-engine"):
        experiments("iouring", None)


def test_a_process_with_grpc_loaded_keeps_its_setting_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import grpc  # noqa: F401  (loaded, as in any test process)

    monkeypatch.setenv(ENV, "-event_engine_listener")
    with caplog.at_level(logging.WARNING, logger=grpc_io.__name__):
        configure("event-engine")
    assert "gRPC is already loaded" in caplog.text
    assert os.environ[ENV] == "-event_engine_listener"  # unchanged: it could not take effect
    caplog.clear()
    configure("poller")  # what the process has already: nothing to say
    assert caplog.text == ""
