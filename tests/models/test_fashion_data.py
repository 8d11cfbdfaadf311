"""Fashion-MNIST loader, shipped reference subset, captions, tokenizer (all offline, fast)."""

import numpy as np
import pytest

from diffsqueeze.models.fashion import data as fd
from diffsqueeze.models.fashion.clip import clip_config
from diffsqueeze.models.fashion.tokenizer import MAX_LENGTH, WORDS, load_tokenizer


def test_reference_subset_is_balanced_uint8():
    images, labels = fd.load_reference_subset()
    assert images.shape == (2000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [200] * 10
    assert images.max() > 200 and images.min() == 0


def test_reference_subset_matches_test_set():
    try:
        test_x, test_y = fd.load_fashion_mnist("test")
    except fd.FashionMNISTMissingError:
        pytest.skip("dataset-fashion-mnist not installed")
    with np.load(fd.REFERENCE_SUBSET) as z:
        idx = z["indices"]
    images, labels = fd.load_reference_subset()
    assert np.array_equal(test_x[idx], images) and np.array_equal(test_y[idx], labels)


def test_missing_dataset_names_the_debian_package(tmp_path):
    with pytest.raises(fd.FashionMNISTMissingError, match="apt-get install dataset-fashion-mnist"):
        fd.load_fashion_mnist("train", root=tmp_path)


def test_pad_and_range():
    x = np.full((3, 28, 28), 255, np.uint8)
    p = fd.pad_to_32(x)
    assert p.shape == (3, 32, 32) and p[:, :2].max() == 0 and p[:, 2:30, 2:30].min() == 255
    r = fd.to_model_range(p)
    assert r.min() == -1.0 and r.max() == 1.0


def test_captions():
    assert fd.class_prompt(9) == "a photo of an ankle boot"
    assert fd.class_prompt(0) == "a photo of a t-shirt"
    assert {fd.caption(7, template=t) for t in range(len(fd.TEMPLATES))} >= {"a sneaker", "the sneaker"}


def test_tokenizer_offline_and_consistent_with_clip_config():
    from transformers import CLIPTokenizer

    tok = load_tokenizer()
    assert isinstance(tok, CLIPTokenizer)
    cfg = clip_config().text_config
    assert len(tok) == cfg.vocab_size
    assert tok.bos_token_id == cfg.bos_token_id and tok.eos_token_id == cfg.eos_token_id
    for w in WORDS:
        assert len(tok.tokenize(w)) == 1, w
    for c in range(10):
        for t in range(len(fd.TEMPLATES)):
            toks = tok.tokenize(fd.caption(c, template=t))
            assert all(len(s) > 1 or s in ("a</w>", "t</w>", "-</w>") for s in toks), toks
    ids = tok(["any unknown words tokenize: 123!"], padding="max_length", max_length=MAX_LENGTH,
              truncation=True).input_ids[0]
    assert len(ids) == MAX_LENGTH and ids[0] == cfg.bos_token_id
