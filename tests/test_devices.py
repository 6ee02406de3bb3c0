"""Reading --device and --dtype."""

from types import SimpleNamespace

import pytest
import torch

import havir.devices
from havir.devices import describe, matmul_rate, resolve_device, resolve_dtype, timed


def test_auto_is_the_cpu_without_cuda_and_dtype_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


def test_bad_names_say_what_is_allowed():
    with pytest.raises(ValueError, match="--device must be"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="--dtype must be auto, fp32, bf16, fp16"):
        resolve_dtype("half", torch.device("cpu"))


def test_matmul_rate_is_a_plausible_cpu_rate():
    assert 1e8 < matmul_rate(torch.device("cpu")) < 1e14


def test_timed_warms_up_once_then_times_each_repeat():
    calls = []
    seconds = timed(lambda: calls.append(1), torch.device("cpu"), repeats=4)
    assert len(calls) == 5 and len(seconds) == 4 and all(s >= 0 for s in seconds)


def test_describe_records_the_device_and_the_versions_behind_the_figures():
    description = describe(torch.device("cpu"))
    assert description["device"].startswith("cpu: ")
    assert {"havir", "torch", "diffusers", "transformers", "accelerate", "python"} <= set(description["versions"])


def test_under_a_launch_each_process_takes_the_device_it_was_given(monkeypatch):
    launch = SimpleNamespace(num_processes=2, device=torch.device("cuda", 1))
    monkeypatch.setattr(havir.devices, "processes", lambda: launch)
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="runs on cuda:1, not cpu: pass --device auto"):
        resolve_device("cpu")
    launch.device = torch.device("cpu", 0)  # a CPU launch (gloo)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
