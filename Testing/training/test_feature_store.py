"""The on-disk feature store: records round-trip, a folder is ours only with our marker, interrupted runs are
continued, and reading does not grow the process's memory."""

import numpy as np
import pytest

from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.training.feature_store import MARKER, FeatureStore, RecordLayout, existing_layout, remove_store

LAYOUT = RecordLayout(features=(1, 8, 4, 4), taps=((1, 3, 2, 2),), target=(16, 16))


def record(k):
    rng = np.random.default_rng(k)
    return {
        "features": rng.normal(size=LAYOUT.features).astype(np.float16),
        "tap0": rng.normal(size=LAYOUT.taps[0]).astype(np.float16),
        "target": rng.random(LAYOUT.target) > 0.5,
        "box": np.array([1, 2, 3, 4], np.float32) * k,
        "sizes": np.array([16, 12, 64, 48], np.int32),
    }


def test_records_round_trip_and_a_part_can_be_read_alone(tmp_path):
    store = FeatureStore(tmp_path / "s", "key", 3, LAYOUT)
    for k in range(3):
        store.put(k, record(k))
    got = store.get(2, ["features", "tap0", "target", "box"])
    for name in got:
        np.testing.assert_array_equal(got[name], record(2)[name])
    assert set(store.get(1, ["tap0"])) == {"tap0"}
    assert store.sizes(1) == ((16, 12), (64, 48))
    with pytest.raises(ValueError, match="shape"):
        store.put(0, dict(record(0), features=np.zeros((2, 2), np.float16)))
    store.close()


def test_an_unwritten_record_is_never_read_as_zeros(tmp_path):
    store = FeatureStore(tmp_path / "s", "key", 2, LAYOUT)
    store.put(0, record(0))
    with pytest.raises(KeyError, match="never written"):
        store.get(1, ["features"])
    store.close()


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds other files"):
        FeatureStore(folder, "key", 2, LAYOUT)
    remove_store(folder)  # not a store: nothing is deleted
    assert (folder / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        FeatureStore(tmp_path / "file", "key", 2, LAYOUT)


def written_store(folder, count):
    """A store of ``count`` records of which the first two were written, saved and closed."""
    store = FeatureStore(folder, "key", count, LAYOUT)
    store.put(0, record(0))
    store.put(1, record(1))
    store.save_progress()
    store.close()


def test_an_interrupted_store_is_continued_and_another_key_starts_afresh(tmp_path):
    folder = tmp_path / "s"
    written_store(folder, 3)
    assert existing_layout(folder, "key", 3) == LAYOUT and existing_layout(folder, "other", 3) is None
    again = FeatureStore(folder, "key", 3, LAYOUT)
    assert again.done.tolist() == [True, True, False]
    np.testing.assert_array_equal(again.get(1, ["features"])["features"], record(1)["features"])
    again.close()
    other = FeatureStore(folder, "other", 3, LAYOUT)
    assert not other.done.any() and (folder / MARKER).is_file()
    other.close()


def test_a_truncated_part_file_means_nothing_is_reused(tmp_path):
    folder = tmp_path / "s"
    written_store(folder, 2)
    with open(folder / "features.bin", "r+b") as f:
        f.truncate(10)
    again = FeatureStore(folder, "key", 2, LAYOUT)
    assert not again.done.any()
    again.close()


def test_the_disk_space_is_checked_before_encoding(tmp_path, monkeypatch):
    from PromiseSegmentLib.training import feature_store

    store = FeatureStore(tmp_path / "s", "key", 1000, LAYOUT)
    monkeypatch.setattr(feature_store, "free_bytes", lambda folder: 1000)
    with pytest.raises(InputError, match="needs .* GB .* free"):
        store.check_space()
    store.close()
    remove_store(tmp_path / "s")
    assert not (tmp_path / "s").exists()
