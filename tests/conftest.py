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


@pytest.fixture(scope="session")
def huge_png() -> bytes:
    """A valid 1-bit grayscale PNG of 30000 x 30000 pixels (all black): ~0.1 MB on disk, 2.7 GB as
    RGB once decoded (a decompression bomb); compressed row block by row block."""
    import struct
    import zlib

    side = 30_000
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
