"""fastff.save / fastff.load: round trips, refusal of pickles and corrupt files, atomic writes."""

import os
import pickle

import numpy as np
import pytest

import fastff


def _layers():
    yield fastff.UltraFFF(7, 5, 3, 2, "relu", dtype=np.float64, seed=1)
    yield fastff.UltraFFF(4, 3, 0, seed=2)
    yield fastff.FFF(9, 3, 4, 3, "gelu", dropout=0.1, train_hardened=True, seed=3)
    yield fastff.FFF(5, 2, 2, 0, dtype=np.float64, seed=4)
    from fastff import nn

    yield nn.Sequential(
        nn.Linear(6, 8, seed=5),
        nn.GELU(),
        fastff.UltraFFF(8, 8, 2, seed=6),
        nn.Dropout(0.1),
        fastff.FFF(8, 2, 3, 2, seed=7),
        nn.Linear(3, 2, seed=8),
    )


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip_bit_exact(tmp_path, suffix):
    for i, layer in enumerate(_layers()):
        path = str(tmp_path / f"m{i}{suffix}")
        fastff.save(layer, path)
        back = fastff.load(path)
        assert type(back) is type(layer) and back.get_config() == layer.get_config()
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(back.state_dict()[k], v)
            assert back.state_dict()[k].dtype == v.dtype


def test_safetensors_readable_by_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    layer = fastff.UltraFFF(6, 4, 2, seed=0)
    path = str(tmp_path / "m.safetensors")
    fastff.save(layer, path)
    loaded = st.load_file(path)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(loaded[k], v)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fastff_pwned",))


def test_pickle_is_refused_not_executed(tmp_path):
    marker = "/tmp/fastff_pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    path = str(tmp_path / "evil.npz")
    np.savez(path, **{"linear_in.weight": np.array([_Evil()], dtype=object)})
    with pytest.raises(fastff.WeightFileError, match="refused"):
        fastff.load(path)
    raw = str(tmp_path / "raw.npz")
    with open(raw, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(fastff.WeightFileError):
        fastff.load(raw)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_corrupt_and_foreign_files(tmp_path, suffix):
    layer = fastff.UltraFFF(6, 4, 2, seed=0)
    path = str(tmp_path / f"m{suffix}")
    fastff.save(layer, path)
    data = open(path, "rb").read()
    for cut in (0, 5, len(data) // 2, len(data) - 3):
        bad = str(tmp_path / f"cut{cut}{suffix}")
        open(bad, "wb").write(data[:cut])
        with pytest.raises(fastff.WeightFileError):
            fastff.load(bad)
    junk = str(tmp_path / f"junk{suffix}")
    open(junk, "wb").write(b"\x00garbage" * 50)
    with pytest.raises(fastff.WeightFileError):
        fastff.load(junk)
    with pytest.raises(FileNotFoundError):
        fastff.load(str(tmp_path / f"missing{suffix}"))


def test_mismatched_contents_are_refused(tmp_path):
    layer = fastff.UltraFFF(6, 4, 2, seed=0)
    state = layer.state_dict()
    meta = (
        '{"format": "fastff", "format_version": 1, "kind": "UltraFFF", "config": '
        '{"input_width": 6, "output_width": 4, "depth": 3}}'
    )
    path = str(tmp_path / "wrong.npz")
    np.savez(path, **state, __fastff_meta__=np.frombuffer(meta.encode(), np.uint8))
    with pytest.raises(fastff.WeightFileError, match="shape"):
        fastff.load(path)
    np.savez(path, **state)  # a bare state dict: no metadata
    with pytest.raises(fastff.WeightFileError, match="metadata"):
        fastff.load(path)
    meta64 = meta.replace('"depth": 3', '"depth": 2')
    np.savez(
        path,
        **{k: v.astype(np.float64) for k, v in state.items()},
        __fastff_meta__=np.frombuffer(meta64.encode(), np.uint8),
    )
    with pytest.raises(fastff.WeightFileError, match="float64"):
        fastff.load(path)


def test_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
    layer = fastff.UltraFFF(6, 4, 2, seed=0)
    path = str(tmp_path / "m.npz")
    fastff.save(layer, path)
    before = open(path, "rb").read()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        fastff.save(fastff.UltraFFF(6, 4, 2, seed=9), path)
    assert open(path, "rb").read() == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".fastff-")] == []
    with pytest.raises(TypeError):
        fastff.save({"not": "a module"}, path)


# ---- untrusted files: headers are checked, and compared with the module, before data is read ----


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    import json
    import struct

    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _meta(kind="Linear", config=None, **extra):
    import json

    meta = {
        "format": "fastff",
        "format_version": 1,
        "kind": kind,
        "config": {"input_width": 1, "output_width": 1, "bias": False}
        if config is None
        else config,
    }
    meta.update(extra)
    return {"__fastff_meta__": json.dumps(meta)}


@pytest.mark.parametrize(
    "header, words",
    [
        (
            {
                "__metadata__": _meta(),
                "weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]},
            },
            "inconsistent",
        ),
        (
            {
                "__metadata__": _meta(),
                "weight": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]},
            },
            "bad header entry",
        ),
        (
            {
                "__metadata__": _meta(),
                "weight": {"dtype": "F32", "shape": [1.5, 1], "data_offsets": [0, 4]},
            },
            "bad header entry",
        ),
        (
            {
                "__metadata__": _meta(),
                "weight": {"dtype": "F32", "shape": [True, True], "data_offsets": [0, 4]},
            },
            "bad header entry",
        ),
        (
            {
                "__metadata__": _meta(),
                "weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 8]},
            },
            "inconsistent",
        ),
        (
            {
                "__metadata__": _meta(),
                "weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [16, 20]},
            },
            "inconsistent",
        ),
        ({"__metadata__": [1, 2]}, "__metadata__"),
        ({"__metadata__": {"__fastff_meta__": {"kind": "Linear"}}}, "__metadata__"),
        ({"__metadata__": _meta(format_version="9")}, "format_version"),
        (
            {"__metadata__": {"__fastff_meta__": "[" * 100000 + "]" * 100000}},
            "corrupt fastff metadata",
        ),
        ({"__metadata__": _meta(kind="_Elementwise", config={})}, "unknown module kind"),
        ({"__metadata__": _meta(kind=["Linear"])}, "corrupt fastff metadata"),
    ],
)
def test_hostile_safetensors_headers(tmp_path, header, words):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_safetensors(header, bytes(16)))
    with pytest.raises(fastff.WeightFileError, match=words):
        fastff.load(str(path))


def test_deeply_nested_config_is_refused(tmp_path):
    """Sequential inside Sequential 3000 deep: Python's JSON parser recurses, and so would
    rebuilding the modules; either way a WeightFileError, not a RecursionError."""
    depth = 3000
    config = (
        '{"modules": [{"kind": "Sequential", "config": ' * depth
        + '{"modules": [{"kind": "Identity", "config": {}}]}'
        + "}]}" * depth
    )
    text = '{"format": "fastff", "kind": "Sequential", "config": ' + config + "}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(_safetensors({"__metadata__": {"__fastff_meta__": text}}))
    with pytest.raises(fastff.WeightFileError, match="metadata|rebuild"):
        fastff.load(str(path))


def test_npz_arrays_are_checked_before_they_are_decompressed(tmp_path, monkeypatch):
    """A 40 MB array compressed to kilobytes, in a file whose metadata describes a one-weight
    Linear: refused from its header; only the metadata member is ever read."""
    from fastff import nn

    good = str(tmp_path / "good.npz")
    fastff.save(nn.Linear(1, 1, bias=False), good)
    with np.load(good) as z:
        meta = z["__fastff_meta__"]
    bomb = str(tmp_path / "bomb.npz")
    np.savez_compressed(bomb, weight=np.zeros((10**7, 1), np.float32), __fastff_meta__=meta)
    assert os.path.getsize(bomb) < 2**17
    reads = []
    real_read_array = np.lib.format.read_array
    monkeypatch.setattr(
        np.lib.format, "read_array", lambda f, **kw: reads.append(1) or real_read_array(f, **kw)
    )
    with pytest.raises(fastff.WeightFileError, match=r"'weight' has shape \(10000000, 1\)"):
        fastff.load(bomb)
    assert len(reads) == 1  # the metadata


def test_npz_with_foreign_members_or_compression(tmp_path):
    import zipfile

    layer = fastff.UltraFFF(3, 2, 1, seed=0)
    path = str(tmp_path / "m.npz")
    fastff.save(layer, path)
    extra = str(tmp_path / "extra.npz")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(extra, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("README.txt", b"hello")
    with pytest.raises(fastff.WeightFileError, match="unexpected member 'README.txt'"):
        fastff.load(extra)
    # A compression method Python cannot read (zipfile raises NotImplementedError): method 99
    # (AES) patched into the local and central headers of the first member.
    data = bytearray(open(path, "rb").read())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 8 : local + 10] = (99).to_bytes(2, "little")
    data[central + 10 : central + 12] = (99).to_bytes(2, "little")
    odd = str(tmp_path / "odd.npz")
    open(odd, "wb").write(bytes(data))
    with pytest.raises(fastff.WeightFileError):
        fastff.load(odd)


def test_paths_are_checked_and_named(tmp_path):
    layer = fastff.UltraFFF(3, 2, 1, seed=0)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        fastff.save(layer, str(tmp_path))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        fastff.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="directory .*nowhere does not exist"):
        fastff.save(layer, str(tmp_path / "nowhere" / "m.npz"))
    for bad in (None, 3, b"m.npz"):
        with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
            fastff.save(layer, bad)
        with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
            fastff.load(bad)
    with pytest.raises(ValueError, match="empty"):
        fastff.save(layer, "")
    fastff.save(layer, tmp_path / "m.safetensors")  # a pathlib.Path works
    back = fastff.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(
        back.state_dict()["linear_in.weight"], layer.state_dict()["linear_in.weight"]
    )
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_metadata_cannot_make_load_allocate_more_than_the_arrays(tmp_path, monkeypatch):
    """A few bytes of JSON describing a 2 GB UltraFFF, with no arrays: refused before any
    parameter is drawn. Modules whose arrays are all there still load (bias-free Linear too)."""
    from fastff import layers, nn

    path = tmp_path / "big.safetensors"
    path.write_bytes(
        _safetensors(
            {
                "__metadata__": _meta(
                    kind="UltraFFF", config={"input_width": 8192, "output_width": 8192, "depth": 14}
                )
            }
        )
    )

    def no_parameters(*args, **kwargs):
        raise AssertionError("load drew parameters for a module its file cannot fill")

    with monkeypatch.context() as patch:
        patch.setattr(layers, "_uniform", no_parameters)
        with pytest.raises(
            fastff.WeightFileError,
            match=r"needs [\d,]+ bytes, more than .* bytes "
            r"left of the 0 bytes of arrays",
        ):
            fastff.load(str(path))
    model = nn.Sequential(nn.Linear(300, 2000, bias=False, seed=0), fastff.UltraFFF(2000, 8, 3))
    fastff.save(model, str(tmp_path / "ok.npz"))
    back = fastff.load(str(tmp_path / "ok.npz"))
    np.testing.assert_array_equal(back.state_dict()["0.weight"], model.state_dict()["0.weight"])
