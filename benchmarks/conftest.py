"""pytest-benchmark suites. On a GPU: full sizes. Without one (or with --quick): tiny
sizes and few rounds, so CI runs them once and they cannot rot."""
import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("resnet_fused")
    group.addoption("--quick", action="store_true", help="tiny sizes, few rounds (default without a GPU)")
    group.addoption("--batch-sizes", default=None, help="comma-separated batch sizes (default 1,32,256 on GPU)")


def quick(config) -> bool:
    return config.getoption("--quick") or not torch.cuda.is_available()


def batch_sizes(config) -> list[int]:
    text = config.getoption("--batch-sizes")
    if text:
        return [int(b) for b in text.split(",")]
    return [2] if quick(config) else [1, 32, 256]


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def dtype(device):
    return torch.float16 if device.type == "cuda" else torch.float32
