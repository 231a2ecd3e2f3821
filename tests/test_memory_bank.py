import numpy as np
import pytest
import scipy.ndimage
import torch

from agent.features import get_extractor
from agent.memory_bank import MemoryBank, anomaly_maps, coverage_radius, greedy_coreset_indices, patch_rows


def _brute_force_distances(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    return np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None, :, :]) ** 2).sum(-1))


# -- coreset -----------------------------------------------------------------------------------------


def test_coreset_picks_the_farthest_points_on_a_toy_set():
    # Points on a line; anchor at 0. Greedy: farthest from {0} is 20; then the point whose distance to
    # the nearer of {0 (anchor), 20} is largest is 10 (10 from both); then 5 (5 from 0 and 10); then 15.
    x = np.array([0.0, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0], np.float32)[:, None]
    picks = greedy_coreset_indices(x, 4, anchor_indices=[0])
    assert x[picks, 0].tolist() == [20.0, 10.0, 5.0, 15.0]
    # The 2-D corners of a square around a central cluster come before any cluster point.
    square = np.array([[0, 0], [0.1, 0], [0, 0.1], [-3, -3], [3, -3], [-3, 3], [3, 3]], np.float32)
    picks = greedy_coreset_indices(square, 4, anchor_indices=[0])
    assert sorted(picks.tolist()) == [3, 4, 5, 6]


def test_coreset_selection_is_nested_and_coverage_radius_decreases_with_size():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    full = greedy_coreset_indices(x, 200, seed=3)
    assert len(set(full.tolist())) == 200
    np.testing.assert_array_equal(greedy_coreset_indices(x, 50, seed=3), full[:50])
    radii = [coverage_radius(x, x[full[:m]]) for m in (10, 50, 200)]
    assert radii[0] > radii[1] > radii[2]
    # Greedy k-center covers better than a random subset of the same size.
    random_subset = rng.choice(len(x), 200, replace=False)
    assert radii[2] < coverage_radius(x, x[random_subset])


def test_coreset_with_random_projection_and_full_selection():
    rng = np.random.default_rng(1)
    feats = torch.from_numpy(rng.normal(size=(2, 256, 5, 6)).astype(np.float32))  # D=256 > 128: projected
    picks = greedy_coreset_indices(feats, 40)
    assert picks.dtype == np.int64 and len(set(picks.tolist())) == 40
    np.testing.assert_array_equal(picks, greedy_coreset_indices(feats, 40))  # seeded: deterministic
    assert sorted(greedy_coreset_indices(feats, 60).tolist()) == list(range(60))  # all rows, each once
    with pytest.raises(ValueError, match="n_select"):
        greedy_coreset_indices(feats, 0)
    with pytest.raises(ValueError, match="anchor_indices"):
        greedy_coreset_indices(feats, 3, anchor_indices=[10_000])


# -- kNN scoring -----------------------------------------------------------------------------------


def test_patch_scores_equal_brute_force_nearest_distances():
    rng = np.random.default_rng(2)
    bank_rows = rng.normal(size=(300, 24)).astype(np.float32)
    query = rng.normal(size=(2, 24, 4, 5)).astype(np.float32)
    rows = query.transpose(0, 2, 3, 1).reshape(-1, 24)
    brute = _brute_force_distances(rows, bank_rows)
    bank = MemoryBank(bank_rows)
    scores = bank.score_patches(query)
    assert scores.shape == (2, 4, 5) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.reshape(-1), brute.min(axis=1), rtol=1e-4)
    _, idx = bank.nearest(rows, 1)
    np.testing.assert_array_equal(idx[:, 0], brute.argmin(axis=1))
    bank3 = MemoryBank(bank_rows, k=3)
    np.testing.assert_allclose(bank3.score_patches(torch.from_numpy(query)).reshape(-1),
                               np.sort(brute, axis=1)[:, :3].mean(axis=1), rtol=1e-4)
    with pytest.raises(ValueError, match="dimension 8"):
        bank.score_patches(query[:, :8])


def test_image_scores_and_patchcore_reweighting_by_hand():
    bank_rows = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]], np.float32)
    bank = MemoryBank(bank_rows)
    query = np.array([[0.0, 0.5], [4.0, 0.0]], np.float32).T.reshape(1, 2, 1, 2)  # two patches
    # patch scores: 0.5 and 3.0 (nearest is [1, 0]); the image score is the max.
    np.testing.assert_allclose(bank.image_scores(query), [3.0], rtol=1e-6)
    # reweighting with support = [1,0] and its 2 nearest bank neighbours: [0,0] (d=1) and [0,2] (d=sqrt 5)
    d = np.array([3.0, 4.0, np.sqrt(16 + 4)])
    expected = 3.0 * (1 - np.exp(d[0]) / np.exp(d).sum())
    np.testing.assert_allclose(bank.image_scores(query, reweight=True, n_support=3), [expected], rtol=1e-5)


def test_build_keeps_the_requested_size_and_validates():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(3, 8, 6, 6)).astype(np.float32)
    assert len(MemoryBank.build(feats, fraction=0.1)) == 11  # ceil(0.1 * 108)
    assert len(MemoryBank.build(feats, size=20)) == 20
    everything = MemoryBank.build(feats, fraction=1.0)
    np.testing.assert_array_equal(everything.features, patch_rows(feats))
    with pytest.raises(ValueError, match="fraction"):
        MemoryBank.build(feats, fraction=0.0)
    with pytest.raises(ValueError, match="float32"):
        MemoryBank(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        MemoryBank(np.full((3, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="k must be"):
        MemoryBank(np.zeros((3, 2), np.float32), k=4)


# -- storage ---------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    bank = MemoryBank(rng.normal(size=(50, 16)).astype(np.float32), k=2,
                      metadata={"extractor": "efficientnet-lite0", "stride": "8"})
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = MemoryBank.load(path)
    np.testing.assert_array_equal(loaded.features, bank.features)
    assert loaded.k == 2 and loaded.metadata == {"extractor": "efficientnet-lite0", "stride": "8"}
    query = rng.normal(size=(1, 16, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.score_patches(query), bank.score_patches(query))
    assert b"pickle" not in path.read_bytes() and path.read_bytes()[8:9] == b"{"  # safetensors JSON header
    with pytest.raises(ValueError, match="reserved"):
        MemoryBank(bank.features, metadata={"sha256": "x"}).save(tmp_path / "other.safetensors")


def test_tampered_or_foreign_files_are_rejected(tmp_path):
    from safetensors.numpy import save_file

    bank = MemoryBank(np.random.default_rng(5).normal(size=(20, 4)).astype(np.float32))
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    data = bytearray(path.read_bytes())

    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data[:-3]) + bytes([data[-3] ^ 0x01]) + bytes(data[-2:]))
    with pytest.raises(ValueError, match="flipped.safetensors.*checksum"):
        MemoryBank.load(flipped)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[:-40]))
    with pytest.raises(ValueError, match="truncated.safetensors.*not a readable"):
        MemoryBank.load(truncated)

    nan_bank = tmp_path / "nan.safetensors"
    feats = bank.features.copy()
    feats[3, 1] = np.nan
    save_file({"features": feats}, str(nan_bank), metadata={"format": "edge-inspection-agent/memory-bank",
                                                             "version": "1", "k": "1", "sha256": "0"})
    with pytest.raises(ValueError, match="NaN"):
        MemoryBank.load(nan_bank)

    wrong_dtype = tmp_path / "f64.safetensors"
    save_file({"features": bank.features.astype(np.float64)}, str(wrong_dtype),
              metadata={"format": "edge-inspection-agent/memory-bank", "version": "1", "k": "1", "sha256": "0"})
    with pytest.raises(ValueError, match="float32"):
        MemoryBank.load(wrong_dtype)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"features": bank.features}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors.*'format'"):
        MemoryBank.load(foreign)

    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        MemoryBank.load(tmp_path / "absent.safetensors")


# -- image-size anomaly maps -------------------------------------------------------------------------


def test_anomaly_maps_upsample_then_blur_like_patchcore():
    rng = np.random.default_rng(6)
    scores = rng.random((2, 4, 4)).astype(np.float32)
    maps = anomaly_maps(scores, (32, 32), stride=8, sigma=4.0)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    unblurred = anomaly_maps(scores, (32, 32), stride=8, sigma=0.0)
    np.testing.assert_allclose(maps[1], scipy.ndimage.gaussian_filter(unblurred[1], 4.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(anomaly_maps(np.full((3, 3), 2.5), (20, 24), stride=8), 2.5, rtol=1e-6)
    assert anomaly_maps(scores[0], (30, 31), stride=8).shape == (30, 31)


# -- end to end --------------------------------------------------------------------------------------


def test_pasted_blob_scores_highest_at_the_blob():
    extractor = get_extractor("efficientnet-lite0", device="cpu")
    y, x = np.mgrid[0:96, 0:96]
    clean = np.stack([128 + 60 * np.sin(x / 5.0), 128 + 60 * np.cos(y / 7.0), 128 + 40 * np.sin((x + y) / 9.0)], -1)
    clean = clean.astype(np.uint8)
    defective = clean.copy()
    blob = (x - 30) ** 2 + (y - 62) ** 2 <= 8**2
    defective[blob] = (30, 30, 30)

    bank = MemoryBank.build(extractor(clean).features, fraction=0.5)
    clean_scores = bank.score_patches(extractor(clean).features)
    defect_features = extractor(defective)
    scores = bank.score_patches(defect_features.features)
    amap = anomaly_maps(scores, (96, 96), defect_features.stride)[0]

    row, col = np.unravel_index(np.argmax(amap), amap.shape)
    assert np.hypot(row - 62, col - 30) <= 12
    far = ((x - 30) ** 2 + (y - 62) ** 2) > 32**2
    assert amap[blob].mean() > 3 * amap[far].mean()
    assert bank.image_scores(defect_features.features)[0] > 2 * clean_scores.max()
