"""A fit connects only to the Dask schedulers its own process allows (a Dask client speaks pickle)."""

import socket

import pytest

from simfluence_platform.errors import UserError
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.fit import DaskAddressError, allow_dask_address, dask_scheduler, plan_fit


@pytest.fixture(autouse=True)
def no_allowed_schedulers(monkeypatch):
    """Empty, and restored afterwards even when a test (or allow_dask_address) sets them."""
    monkeypatch.setenv("SIMFLUENCE_DASK_ADDRESS", "")
    monkeypatch.setenv("SIMFLUENCE_DASK_ALLOWED", "")


def test_a_parameter_not_allowed_is_refused_before_anything_connects(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(DaskAddressError, match="SIMFLUENCE_DASK_ALLOWED") as refused:
            plan_fit(Warehouse(tmp_path / "warehouse.duckdb"), "demo", dask_address=address)
        assert isinstance(refused.value, UserError) and address in str(refused.value)
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody knocked


def test_the_environment_names_the_schedulers(monkeypatch):
    assert dask_scheduler(None) is None  # a LocalCluster
    monkeypatch.setenv("SIMFLUENCE_DASK_ADDRESS", "tcp://dask-host:8786")
    assert dask_scheduler(None) == "tcp://dask-host:8786"
    assert dask_scheduler("tcp://dask-host:8786") == "tcp://dask-host:8786"
    with pytest.raises(DaskAddressError):
        dask_scheduler("tcp://elsewhere:8786")
    monkeypatch.setenv("SIMFLUENCE_DASK_ALLOWED", "tcp://a:8786, tcp://b:8786")
    assert dask_scheduler("tcp://b:8786") == "tcp://b:8786"
    with pytest.raises(DaskAddressError):
        dask_scheduler("tcp://b:8787")


def test_allowing_an_address_keeps_the_others():
    allow_dask_address("tcp://a:8786")
    allow_dask_address("tcp://b:8786")
    assert dask_scheduler("tcp://a:8786") == "tcp://a:8786" and dask_scheduler("tcp://b:8786") == "tcp://b:8786"
