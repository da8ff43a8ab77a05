"""encode_png: the PNG writer of predict's maps, masks and PNG overlays."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.png import encode_png


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk, each chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, at = [], 8
    while at < len(data):
        (n,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + n]
        (crc,) = struct.unpack(">I", data[at + 8 + n:at + 12 + n])
        assert crc == zlib.crc32(kind + body)
        out.append((kind, body))
        at += 12 + n
    return out


def test_a_two_by_two_image_by_hand():
    data = encode_png(np.array([[1, 2], [3, 250]], np.uint8))
    (k1, ihdr), (k2, idat), (k3, end) = chunks(data)
    assert (k1, k2, k3, end) == (b"IHDR", b"IDAT", b"IEND", b"")
    assert struct.unpack(">IIBBBBB", ihdr) == (2, 2, 8, 0, 0, 0, 0)  # width, height, 8-bit greyscale
    # each row: filter type 2 (Up), then the row minus the row above, modulo 256 (the first row over zeros)
    assert zlib.decompress(idat) == bytes([2, 1, 2, 2, 2, 248])


def test_sixteen_bit_samples_are_big_endian():
    (_, ihdr), (_, idat), _ = chunks(encode_png(np.array([[0x0102, 0xFFFF]], np.uint16)))
    assert struct.unpack(">IIBBBBB", ihdr) == (2, 1, 16, 0, 0, 0, 0)
    assert zlib.decompress(idat) == bytes([2, 0x01, 0x02, 0xFF, 0xFF])


@pytest.mark.parametrize("shape,dtype,mode", [((37, 53), np.uint16, "I;16"), ((40, 31), np.uint8, "L"),
                                              ((29, 41, 3), np.uint8, "RGB"), ((1, 1), np.uint16, "I;16")])
def test_pil_reads_back_the_exact_pixels(shape, dtype, mode):
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    with Image.open(io.BytesIO(encode_png(pixels))) as im:
        assert im.mode == mode
        assert np.array_equal(np.asarray(im), pixels)


def test_a_smooth_map_compresses():
    ramp = np.add.outer(np.arange(480), np.arange(640)).astype(np.uint16) * 50
    assert len(encode_png(ramp)) < ramp.nbytes / 3  # Up turns a smooth map's rows into near-constant bytes


@pytest.mark.parametrize("pixels", [np.zeros((3, 3), np.float32), np.zeros((3, 3, 4), np.uint8),
                                    np.zeros((0, 3), np.uint8), np.zeros(5, np.uint8), np.zeros((2, 2), np.int16)])
def test_refuses_what_it_does_not_write(pixels):
    with pytest.raises(ValueError, match="encode_png"):
        encode_png(pixels)
