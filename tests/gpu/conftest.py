"""Deterministic CUDA kernels for tests/gpu: the analyzer contract asks the same seed to give the same
value, which some CUDA kernels (atomic adds in backward passes) do not promise by default."""

import os

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: deterministic products


@pytest.fixture(autouse=True, scope="module")
def deterministic_kernels():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)
