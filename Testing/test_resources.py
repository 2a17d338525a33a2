"""Which device and precision a run gets (resources.py), tested without a GPU: what
torch reports is faked, so the choices are checked on any machine."""

from __future__ import annotations

import pytest
import torch

from LiverTumorSegLib import resources
from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.resources import resolve_device, resolve_precision


def _pretend(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def test_auto_takes_cuda_then_mps_then_the_cpu(monkeypatch):
    """A machine with an NVIDIA GPU and MPS (none today, but the order is the contract)
    runs on CUDA; a Mac on MPS; anything else on the CPU."""
    for cuda, mps, expected in ((True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                (False, False, "cpu")):
        _pretend(monkeypatch, cuda, mps)
        assert resolve_device("auto") == expected, (cuda, mps)


def test_a_device_that_is_absent_or_unknown_is_refused(monkeypatch):
    """--device cuda on a machine without CUDA must say so, not fail later inside torch
    (or, worse, be taken as given); so must an unknown name."""
    _pretend(monkeypatch, cuda=False, mps=False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="'mps' was requested but it is not available"):
        resolve_device("mps")
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("cpu") == "cpu"
    _pretend(monkeypatch, cuda=True, mps=True)
    assert resolve_device("cuda") == "cuda" and resolve_device("mps") == "mps" and resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_auto_precision_is_fp16_on_cuda_bf16_only_on_a_capable_cpu(monkeypatch, cpu_bf16):
    """``auto``: fp16 on CUDA (its tensor cores; bf16 is not on every CUDA GPU), bf16 on a
    CPU with native bf16, fp32 elsewhere: MPS must not get bf16 because the CPU has it."""
    monkeypatch.setattr(resources, "cpu_supports_bf16", lambda: cpu_bf16)
    assert resolve_precision("auto", "cuda") is torch.float16
    assert resolve_precision("auto", "mps") is None
    assert resolve_precision("auto", "cpu") is (torch.bfloat16 if cpu_bf16 else None)
    for device in ("cpu", "cuda"):  # an explicit choice is taken as given
        assert resolve_precision("fp32", device) is None
        assert resolve_precision("bf16", device) is torch.bfloat16
        assert resolve_precision("fp16", device) is torch.float16
    with pytest.raises(InputError, match="unknown precision 'half'"):
        resolve_precision("half", "cpu")
