"""Reading --device and --dtype."""

import pytest
import torch

from havir.devices import matmul_rate, resolve_device, resolve_dtype


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
