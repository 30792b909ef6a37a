"""Tests for the ``--devices`` grammar and for claiming devices in workers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from convshard.devices import (
    MAX_CORE,
    MAX_CUDA_INDEX,
    Device,
    backend_for,
    check_available,
    default_threads,
    format_devices,
    parse_devices,
    pin,
    sharing,
    usable_cores,
)
from convshard.errors import ConfigError

CPU = Device("cpu")


def cpu(*cores: int) -> Device:
    return Device("cpu", cores)


def cuda(index: int | None = None) -> Device:
    return Device("cuda", index=index)


VALID = [
    ("cpu", (CPU,), "cpu"),
    ("cpu@3", (cpu(3),), "cpu@3"),
    ("cpu@0-3", (cpu(0, 1, 2, 3),), "cpu@0-3"),
    ("cpu@2-2", (cpu(2),), "cpu@2"),
    ("cpu@0+2", (cpu(0, 2),), "cpu@0+2"),
    ("cpu@0+2,cpu@1", (cpu(0, 2), cpu(1)), "cpu@0+2,cpu@1"),
    ("cpu@0-1+4", (cpu(0, 1, 4),), "cpu@0-1+4"),
    ("cpu@4+0+1", (cpu(0, 1, 4),), "cpu@0-1+4"),
    ("cpu@0+1+1+0-1", (cpu(0, 1),), "cpu@0-1"),
    ("cpu@0,cpu@1,cpu@1", (cpu(0), cpu(1), cpu(1)), "cpu@0,cpu@1,cpu@1"),
    ("cpu@0,cpu,cpu", (cpu(0), CPU, CPU), "cpu@0,cpu,cpu"),
    ("cuda", (cuda(),), "cuda"),
    ("cuda:1", (cuda(1),), "cuda:1"),
    ("cuda:01", (cuda(1),), "cuda:1"),
    ("cpu@0-1,cuda:0,cuda:1", (cpu(0, 1), cuda(0), cuda(1)), "cpu@0-1,cuda:0,cuda:1"),
    (f"cpu@{MAX_CORE},cuda:{MAX_CUDA_INDEX}", (cpu(MAX_CORE), cuda(MAX_CUDA_INDEX)), None),
    ("  cpu@0+2 , \tcuda:1\n", (cpu(0, 2), cuda(1)), "cpu@0+2,cuda:1"),
]


@pytest.mark.parametrize(("text", "expected", "canonical"), VALID)
def test_parse_valid(text: str, expected: tuple[Device, ...], canonical: str | None) -> None:
    devices = parse_devices(text)
    assert devices == expected
    if canonical is not None:
        assert format_devices(devices) == canonical
    assert parse_devices(format_devices(devices)) == devices
    for device in devices:
        assert parse_devices(str(device)) == (device,)


INVALID = [
    ("", ""),
    ("   ", ""),
    ("cpu,,cuda", ""),
    ("cpu,", ""),
    ("cpu@", "cpu@"),
    ("cpu@-1", "cpu@-1"),
    ("cpu@3-1", "cpu@3-1"),
    ("cpu@0,cpu@x", "cpu@x"),
    ("cpu@0,3-1", "3-1"),
    ("cpu@0+", "cpu@0+"),
    ("cpu@+1", "cpu@+1"),
    ("cpu@0+x", "cpu@0+x"),
    ("cpu@0,-1", "-1"),
    ("cpu@ 1", "cpu@ 1"),
    ("cpu@1-", "cpu@1-"),
    (f"cpu@{MAX_CORE + 1}", f"cpu@{MAX_CORE + 1}"),
    ("cpu@" + "9" * 5000, "cpu@" + "9" * 5000),
    ("cpu@\u0661", "cpu@\u0661"),  # an Arabic-Indic digit is not a core number
    ("2", "2"),
    ("cpu,2", "2"),
    ("cuda:0,2", "2"),
    ("gpu", "gpu"),
    ("CPU", "CPU"),
    ("cuda:", "cuda:"),
    ("cuda:x", "cuda:x"),
    ("cuda:-1", "cuda:-1"),
    (f"cuda:{MAX_CUDA_INDEX + 1}", f"cuda:{MAX_CUDA_INDEX + 1}"),
    ("cuda@0", "cuda@0"),
    ("cpu:0", "cpu:0"),
]


@pytest.mark.parametrize(("text", "element"), INVALID)
def test_parse_invalid(text: str, element: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_devices(text)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text) in message
    if element:
        assert repr(element) in message


@pytest.mark.parametrize(("text", "one_worker"), [
    ("cpu@0,1", "cpu@0-1 or cpu@0+1"),
    ("cpu@0-1,4", "cpu@0-1+4"),
    ("cpu@3,cpu@0,2", "cpu@0+2"),
])
def test_comma_inside_a_device_is_refused_with_both_readings(text: str, one_worker: str) -> None:
    """``cpu@0,1`` could be two workers or one on two cores: it is refused,
    and the hint spells both readings in the unambiguous grammar."""
    with pytest.raises(ConfigError) as info:
        parse_devices(text)
    message = str(info.value)
    assert "\n" not in message and message.startswith("ambiguous device spec")
    first, core = text.split(",")[-2:]
    assert f"{first},cpu@{core} for two workers" in message
    assert f"{one_worker} for one worker" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("cpu@0,2", (cpu(0, 2),)),
    ("cpu@0-1,4,cpu@3", (cpu(0, 1, 4), cpu(3))),
    ("cpu@0+2,cuda:1", (cpu(0, 2), cuda(1))),
])
def test_legacy_comma_core_sets_read_for_saved_plans(text: str, expected: tuple[Device, ...]) -> None:
    """Plan files saved before ``+`` wrote core sets with commas; legacy mode
    reads them, and writes them back in the new spelling."""
    devices = parse_devices(text, legacy=True)
    assert devices == expected
    assert parse_devices(format_devices(devices)) == expected
    assert "," not in str(devices[0])


def test_error_message_format() -> None:
    with pytest.raises(ConfigError, match=r"^bad device spec 'cpu@x' in --devices 'cpu@0,cpu@x': "):
        parse_devices("cpu@0,cpu@x")


@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    _parse_or_config_error(text)


@given(st.text(alphabet="cpu@da:0123456789-+, \t", max_size=40))
def test_fuzz_grammar_like_text(text: str) -> None:
    _parse_or_config_error(text)


def _parse_or_config_error(text: str) -> None:
    try:
        devices = parse_devices(text)
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    assert devices and all(isinstance(d, Device) for d in devices)
    assert parse_devices(format_devices(devices)) == devices


devices_strategy = st.lists(
    st.one_of(
        st.just(CPU),
        st.builds(lambda cores: Device("cpu", tuple(cores)), st.sets(st.integers(0, 40), min_size=1)),
        st.just(cuda()),
        st.builds(cuda, st.integers(0, MAX_CUDA_INDEX)),
    ),
    min_size=1,
    max_size=8,
)


@given(devices_strategy)
def test_round_trip(devices: list[Device]) -> None:
    assert parse_devices(format_devices(devices)) == tuple(devices)


def test_device_normalises_cores() -> None:
    assert Device("cpu", (4, 0, 1, 0)).cpus == (0, 1, 4)
    assert str(Device("cpu", (4, 0, 1))) == "cpu@0-1+4"
    with pytest.raises(ConfigError):
        Device("gpu")
    with pytest.raises(ConfigError):
        Device("cuda", (0,))
    with pytest.raises(ConfigError):
        Device("cpu", index=0)


def test_torch_device() -> None:
    assert cpu(0, 1).torch_device == torch.device("cpu")
    assert CPU.torch_device == torch.device("cpu")
    assert cuda().torch_device == torch.device("cuda")
    assert cuda(1).torch_device == torch.device("cuda", 1)


# -- check_available ---------------------------------------------------------


def test_check_available_core_outside_mask() -> None:
    bad = max(usable_cores()) + 1
    with pytest.raises(ConfigError, match=rf"core {bad} is not usable") as info:
        check_available([cpu(min(usable_cores())), cpu(bad)])
    assert "usable cores:" in str(info.value)


def test_check_available_duplicate_cpu_cores_allowed() -> None:
    core = min(usable_cores())
    check_available([cpu(core), cpu(core), cpu(core), CPU, CPU])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_check_available_no_cuda() -> None:
    with pytest.raises(ConfigError, match="cuda:1 requested but CUDA is not available"):
        check_available([CPU, cuda(1)])


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.usefixtures("two_gpus")
def test_check_available_cuda_ok() -> None:
    check_available([cuda(0), cuda(1), CPU])
    check_available([cuda(), cuda(1)])


@pytest.mark.usefixtures("two_gpus")
@pytest.mark.parametrize("devices", [[cuda(1), cuda(1)], [cuda(), cuda(0)], [cuda(), cuda()]])
def test_check_available_duplicate_cuda(devices: list[Device]) -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        check_available(devices)


@pytest.mark.usefixtures("two_gpus")
def test_check_available_cuda_index_too_high() -> None:
    with pytest.raises(ConfigError, match="cuda:2 requested but only 2"):
        check_available([cuda(2)])


# -- default_threads, backend_for ----------------------------------------------


def test_default_threads() -> None:
    # the cores this process may use, read from the OS rather than from usable_cores (which default_threads calls)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_threads(cpu(0, 1, 4), [cpu(0, 1, 4)]) == 3
    assert default_threads(cpu(1), [cpu(1), cpu(1)]) == 1
    assert default_threads(CPU, [CPU]) == n
    assert default_threads(CPU, [CPU, CPU, cpu(0), cuda()]) == max(1, n // 2)
    assert default_threads(CPU, [CPU] * (n + 3)) == 1
    assert default_threads(cuda(1), [cuda(1), CPU]) == 1


def test_default_threads_splits_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert default_threads(CPU, [CPU, CPU, CPU]) == 2
    assert default_threads(CPU, [CPU, cpu(0)]) == 8


@pytest.mark.parametrize(
    ("devices", "backend"),
    [
        ([cuda(0), cuda(1)], "nccl"),
        ([cuda()], "nccl"),
        ([cuda(0), CPU], "gloo"),
        ([cpu(0), cpu(1)], "gloo"),
        ([], "gloo"),
    ],
)
def test_backend_for(devices: list[Device], backend: str) -> None:
    assert backend_for(devices) == backend


# -- pin ---------------------------------------------------------------------

_PIN_CHILD = """
import os, torch
from convshard.devices import Device, pin
pin(Device("cpu", (0,)), 1)
assert os.sched_getaffinity(0) == {0}, os.sched_getaffinity(0)
assert torch.get_num_threads() == 1, torch.get_num_threads()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
@pytest.mark.skipif(0 not in usable_cores(), reason="core 0 is not usable here")
def test_pin_in_child_process() -> None:
    before = os.sched_getaffinity(0)
    result = subprocess.run(
        [sys.executable, "-c", _PIN_CHILD], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert os.sched_getaffinity(0) == before


def test_pin_rejects_zero_threads() -> None:
    with pytest.raises(ConfigError, match="thread"):
        pin(CPU, 0)


@pytest.mark.parametrize("listed, hosts, expected", [
    ("cpu@0,cpu@1,cpu@1", "aaa", [[1, 2]]),
    ("cpu@0-1,cpu@1,cpu@2", "aaa", [[0, 1]]),
    ("cpu@0,cpu,cpu@3", "aaa", [[0, 1, 2]]),  # an unpinned worker may run on any core
    ("cpu@0,cpu@0", "ab", []),  # core 0 of two hosts
    ("cuda:0,cuda:1,cuda:0,cpu@0", "aaaa", [[0, 2]]),
    ("cuda,cuda:0", "aa", [[0, 1]]),  # cuda is the current device, 0 unless pinned
])
def test_devices_that_share_hardware(listed, hosts, expected):
    assert sharing(listed.split(","), list(hosts)) == expected
