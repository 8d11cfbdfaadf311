"""Image conversions, the statistics cache and both FID/KID backends (the math: test_frechet.py).

The default tests use a tiny deterministic feature net (12 features) wrapped in the same
FeatureExtractor as the real Inception; the slow test runs the real weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from diffsqueeze.metrics import fid_stats
from diffsqueeze.metrics.fid import FIDAccumulator, compute_fid
from diffsqueeze.metrics.fid_stats import (
    ReferenceStats,
    default_cache_dir,
    reference_stats,
    stats_cache_key,
)
from diffsqueeze.metrics.images import (
    content_hash,
    iter_uint8_batches,
    resize_for_inception,
    to_pil_list,
    to_uint8_batch,
)
from diffsqueeze.metrics.inception import FeatureExtractor

# ---------------------------------------------------------------------------------------------
# helpers


def tiny_extractor(resize: str = "clean") -> FeatureExtractor:
    """12 features: mean of each channel over a 2x2 grid of the normalized 299x299 input."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return FeatureExtractor(net, num_features=12, weights_sha256="tiny-test-net", resize=resize)


def make_images(n: int, size: int = 64, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = PIL.Image.fromarray((rng.random((5, 5, 3)) * 255).astype(np.uint8))
        out.append(small.resize((size, size), PIL.Image.BICUBIC))
    return out


def save_images(images: list[PIL.Image.Image], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:03d}.png")
    return folder


# ---------------------------------------------------------------------------------------------
# image conversions and resize


def test_to_uint8_batch_accepts_pil_tensor_and_numpy() -> None:
    pil = make_images(2, 16)
    ref = to_uint8_batch(pil)
    assert ref.shape == (2, 3, 16, 16) and ref.dtype == torch.uint8
    as_float = ref.float() / 255  # diffusers output_type="pt"
    torch.testing.assert_close(to_uint8_batch(as_float), ref)
    as_np = as_float.permute(0, 2, 3, 1).numpy()  # diffusers output_type="np"
    torch.testing.assert_close(to_uint8_batch(as_np), ref)
    torch.testing.assert_close(to_uint8_batch(ref[0]), ref[:1])
    torch.testing.assert_close(to_uint8_batch(to_pil_list(ref)), ref)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_batch(as_float * 2 - 1)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_batch(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_iter_batches_splits_on_size_and_reads_folders(tmp_path: Path) -> None:
    mixed = make_images(3, 16) + make_images(2, 24)
    shapes = [tuple(b.shape) for b in iter_uint8_batches(mixed, batch_size=2)]
    assert shapes == [(2, 3, 16, 16), (1, 3, 16, 16), (2, 3, 24, 24)]
    folder = save_images(make_images(3, 16), tmp_path / "imgs")
    (folder / "notes.txt").write_text("not an image")
    batches = list(iter_uint8_batches(folder, batch_size=32))
    torch.testing.assert_close(torch.cat(batches), to_uint8_batch(make_images(3, 16)))


@pytest.mark.parametrize("mode", ["clean", "bilinear_aa", "bilinear", "tf_bilinear"])
def test_resize_modes(mode: str) -> None:
    x = to_uint8_batch(make_images(2, 64))
    y = resize_for_inception(x, mode)
    assert y.shape == (2, 3, 299, 299) and y.dtype == torch.float32
    assert 0 <= float(y.min()) and float(y.max()) <= 255
    x299 = to_uint8_batch(make_images(1, 299))
    torch.testing.assert_close(resize_for_inception(x299, mode), x299.float())  # never resized


def test_clean_resize_is_clean_fids() -> None:
    from cleanfid.resize import build_resizer

    x = to_uint8_batch(make_images(1, 100))
    theirs = build_resizer("clean")(x[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(resize_for_inception(x, "clean")[0].permute(1, 2, 0).numpy(), theirs)
    with pytest.raises(ValueError, match="unknown resize"):
        resize_for_inception(x, "lanczos")


# ---------------------------------------------------------------------------------------------
# cache keys and the statistics cache


def test_content_hash_tracks_pixels_not_order(tmp_path: Path) -> None:
    imgs = make_images(4, 16)
    h = content_hash(imgs)
    assert h.startswith("pixels:")
    assert content_hash(imgs[::-1]) == h
    changed = to_uint8_batch(imgs).clone()
    changed[2, 1, 5, 5] ^= 1
    assert content_hash(changed) != h
    assert content_hash(to_uint8_batch(imgs)) == h  # same pixels, other container
    folder = save_images(imgs, tmp_path / "a")
    fh = content_hash(folder)
    assert fh.startswith("files:")
    (folder / "000.png").rename(folder / "zzz.png")
    assert content_hash(folder) == fh  # names do not matter
    make_images(1, 16, seed=9)[0].save(folder / "001.png")
    assert content_hash(folder) != fh


def test_stats_cache_key_changes_with_each_input() -> None:
    base = dict(content="pixels:abc", num_images=10, resize="clean", weights_sha256="w1")
    key = stats_cache_key(**base)
    assert key == stats_cache_key(**base)
    for name, value in [("content", "pixels:abd"), ("num_images", 11), ("resize", "bilinear_aa"), ("weights_sha256", "w2")]:
        assert stats_cache_key(**{**base, name: value}) != key, name


def test_reference_stats_cache_hits_and_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = tiny_extractor()
    folder = save_images(make_images(6, 32), tmp_path / "ref")
    cache = tmp_path / "cache"
    first = reference_stats(folder, extractor=ex, cache_dir=cache)
    files = list(cache.glob("*.safetensors"))
    assert [p.stem for p in files] == [first.key]
    assert first.num_images == 6 and first.features.shape == (6, 12)

    calls = []
    real_extract = fid_stats.extract_features
    monkeypatch.setattr(fid_stats, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    hit = reference_stats(folder, extractor=ex, cache_dir=cache)
    assert calls == []  # served from the cache
    np.testing.assert_array_equal(hit.sigma, first.sigma)
    np.testing.assert_array_equal(hit.features, first.features)

    reference_stats(folder, extractor=tiny_extractor("bilinear_aa"), cache_dir=cache)  # other resize: miss
    make_images(1, 32, seed=7)[0].save(folder / "extra.png")  # other content and count: miss
    reference_stats(folder, extractor=ex, cache_dir=cache)
    assert len(calls) == 2
    assert len(list(cache.glob("*.safetensors"))) == 3
    reference_stats(folder, extractor=ex, cache_dir=cache, cache=False)
    assert len(calls) == 3


def test_reference_stats_roundtrip_and_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fid_stats.CACHE_ENV, str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    stats = reference_stats(make_images(4, 32), extractor=tiny_extractor())
    assert (tmp_path / "envcache" / f"{stats.key}.safetensors").is_file()
    path = stats.save(tmp_path / "ref.safetensors")
    loaded = ReferenceStats.load(path)
    for name in ("num_images", "resize", "weights_sha256", "key", "source"):
        assert getattr(loaded, name) == getattr(stats, name)
    assert loaded.mu.dtype == np.float64 and loaded.sigma.dtype == np.float64
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)


# ---------------------------------------------------------------------------------------------
# compute_fid / FIDAccumulator with the tiny net


@pytest.mark.parametrize("backend", ["torchmetrics", "clean-fid"])
def test_identical_sets_give_zero_fid(backend: str, tmp_path: Path) -> None:
    imgs = make_images(8, 48)
    folder = save_images(imgs, tmp_path / "ref")
    res = compute_fid(imgs, folder, backend=backend, extractor=tiny_extractor(), cache_dir=tmp_path / "c")
    assert abs(res.fid) < 1e-4
    assert res.num_generated == res.num_reference == 8
    assert res.kid_subset_size == 8  # clipped to N
    assert res.backend == backend and res.resize == "clean" and res.weights_sha256 == "tiny-test-net"


def test_backends_agree_with_tiny_net(tmp_path: Path) -> None:
    gen = save_images(make_images(10, 40, seed=1), tmp_path / "gen")
    ref = save_images(make_images(10, 56, seed=2), tmp_path / "ref")  # KID subsets = whole sets
    kw = dict(extractor=tiny_extractor(), cache=False)
    a = compute_fid(gen, ref, backend="torchmetrics", **kw)
    b = compute_fid(gen, ref, backend="clean-fid", **kw)
    assert a.fid > 0.01
    assert a.fid == pytest.approx(b.fid, rel=1e-4)
    assert a.kid_mean == pytest.approx(b.kid_mean, rel=1e-3, abs=1e-7)
    assert (a.num_generated, a.num_reference) == (b.num_generated, b.num_reference) == (10, 10)


def test_result_provenance_and_caller_fields(tmp_path: Path) -> None:
    res = compute_fid(make_images(4, 32), make_images(5, 32, seed=3), extractor=tiny_extractor(), cache_dir=tmp_path)
    assert "torchmetrics" in res.implementation
    assert res.reference.startswith("in-memory") and res.reference_key
    filled = dataclasses.replace(res, sampler="DDIM", steps=50, guidance=7.5, seeds=[0, 1, 2, 3], prompt_source="coco")
    d = json.loads(json.dumps(filled.to_dict()))
    assert d["steps"] == 50 and d["seeds"] == [0, 1, 2, 3] and d["resize"] == "clean"


def test_accumulator_streaming_equals_one_shot_and_reference_forms(tmp_path: Path) -> None:
    ex = tiny_extractor()
    gen, ref_imgs = make_images(9, 32, seed=4), make_images(7, 32, seed=5)
    stats = reference_stats(ref_imgs, extractor=ex, cache=False)

    one = FIDAccumulator(stats, extractor=ex, kid_subsets=5)
    one.update(gen)
    r1 = one.compute()
    many = FIDAccumulator(stats, extractor=ex, kid_subsets=5)
    for i in range(0, 9, 2):
        many.update(to_uint8_batch(gen[i : i + 2]))
    r2 = many.compute()
    assert r1.fid == pytest.approx(r2.fid, rel=1e-5)
    assert r1.kid_mean == pytest.approx(r2.kid_mean, rel=1e-5)  # same seed, same subsets

    streamed = FIDAccumulator(extractor=ex, kid=False)
    streamed.update(ref_imgs, real=True)
    streamed.update(gen)
    assert streamed.compute().fid == pytest.approx(r1.fid, rel=1e-5)

    mu_sigma_only = dataclasses.replace(stats, features=None)
    with pytest.raises(ValueError, match="KID needs"):
        FIDAccumulator(mu_sigma_only, extractor=ex)
    acc = FIDAccumulator(mu_sigma_only, extractor=ex, kid=False)
    acc.update(gen)
    r3 = acc.compute()
    assert r3.fid == pytest.approx(r1.fid, rel=1e-5) and r3.kid_mean is None and r3.num_reference == 7

    acc.reset()  # forget generated, keep the reference
    acc.update(ref_imgs)
    assert abs(acc.compute().fid) < 1e-4

    with pytest.raises(ValueError, match="do not match"):
        FIDAccumulator(stats, extractor=tiny_extractor("bilinear"))


def test_reference_as_stats_file_and_mismatches(tmp_path: Path) -> None:
    ex = tiny_extractor()
    gen = make_images(5, 32, seed=6)
    stats = reference_stats(make_images(6, 32, seed=8), extractor=ex, cache=False)
    path = stats.save(tmp_path / "ref.safetensors")
    a = compute_fid(gen, path, extractor=ex, backend="clean-fid")
    b = compute_fid(gen, stats, extractor=ex, backend="clean-fid")
    assert a.fid == b.fid and a.reference_key == stats.key
    with pytest.raises(ValueError, match="resize"):
        compute_fid(gen, stats, extractor=tiny_extractor("bilinear_aa"))
    with pytest.raises(ValueError, match="only does the 'clean' resize"):
        compute_fid(gen, stats, extractor=ex, backend="clean-fid", resize="bilinear")
    with pytest.raises(ValueError, match="backend"):
        compute_fid(gen, stats, extractor=ex, backend="tf")


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=world)
    try:
        ex = tiny_extractor()
        gen, ref = make_images(9, 32, seed=4), make_images(9, 32, seed=5)
        stats = reference_stats(ref, extractor=ex, cache=False, progress=False)
        out = {}
        for name, reference, kid in [("features", stats, True), ("mu_sigma", dataclasses.replace(stats, features=None), False)]:
            acc = FIDAccumulator(reference, extractor=ex, kid=kid, kid_subsets=5)
            acc.update(gen[rank::world])
            out[name] = acc.compute().to_dict()
        Path(folder, f"{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes re-import torch: ~15-60 s on 2 shared cores
def test_accumulator_syncs_across_processes(tmp_path: Path) -> None:
    """Two gloo processes, each with half the generated images, get the single-process result.

    9 + 9 images: the KID subsets are the whole sets, so the gathered order does not matter.
    """
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ex = tiny_extractor()
    gen, ref = make_images(9, 32, seed=4), make_images(9, 32, seed=5)
    stats = reference_stats(ref, extractor=ex, cache=False)
    single = FIDAccumulator(stats, extractor=ex, kid_subsets=5)
    single.update(gen)
    expected = single.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        for name in ("features", "mu_sigma"):
            r = got[name]
            assert (r["num_generated"], r["num_reference"]) == (9, 9), name
            assert r["fid"] == pytest.approx(expected.fid, rel=1e-5), name
        assert got["features"]["kid_subset_size"] == 9
        assert got["features"]["kid_mean"] == pytest.approx(expected.kid_mean, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# real weights


def _natural_like_images(n: int, size: int, seed: int) -> list[PIL.Image.Image]:
    """Images with structure at several scales: smooth colour fields plus rectangles and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = PIL.Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), PIL.Image.BICUBIC)
        arr = np.asarray(base).astype(np.float32)
        for _ in range(6):
            x0, y0 = rng.integers(0, size - 8, 2)
            w, h = rng.integers(8, size // 2, 2)
            arr[y0 : y0 + h, x0 : x0 + w] = rng.random(3) * 255
        arr += rng.normal(0, 8, arr.shape)
        out.append(PIL.Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


@pytest.mark.slow
def test_backends_agree_on_real_inception(tmp_path: Path) -> None:
    """torchmetrics vs clean-fid on 24 + 24 images (512px, so both resize) with the real weights."""
    from diffsqueeze.metrics.inception import load_inception

    gen = save_images(_natural_like_images(24, 512, seed=10), tmp_path / "gen")
    ref = save_images(_natural_like_images(24, 512, seed=11), tmp_path / "ref")
    ex = load_inception()
    a = compute_fid(gen, ref, backend="torchmetrics", extractor=ex, cache=False)
    b = compute_fid(gen, ref, backend="clean-fid", extractor=ex, cache=False)
    print(f"torchmetrics fid={a.fid:.4f} kid={a.kid_mean:.6f} | clean-fid fid={b.fid:.4f} kid={b.kid_mean:.6f}")
    assert a.weights_sha256 == b.weights_sha256
    assert a.fid > 1.0
    assert a.fid == pytest.approx(b.fid, rel=0.01)
    assert a.kid_mean == pytest.approx(b.kid_mean, rel=0.01)
