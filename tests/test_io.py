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
