import os
from pathlib import Path

# Triton reads this at import time: interpret kernels on the CPU unless a GPU run says otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar10_jpeg_tar() -> Path:
    """The shared CIFAR-10 JPEG archive (development data), or a clean skip when it is absent."""
    path = Path(os.environ.get("FASTEMP_CIFAR10_JPEG", SHARED_CIFAR10_JPEG))
    if not path.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {path} (set FASTEMP_CIFAR10_JPEG)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
