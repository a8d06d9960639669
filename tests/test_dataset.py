"""Dataset items and collate: real synthetic IU-Xray images, mixed view counts, the IEC switch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ifnet.data.annotation import Study, load_annotation
from ifnet.data.dataset import ImageConfig, ImageTransform, ReportDataset, collate, views_to_tensor
from ifnet.data.images import ImageError, read_xray
from ifnet.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _tokenizer(reports) -> Tokenizer:
    return Tokenizer.build(reports, threshold=1)


def _save(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == np.uint16:
        import cv2

        assert cv2.imwrite(str(path), arr)
    else:
        Image.fromarray(arr).save(path)
    return path.name


# -- the real annotation with the synthetic test images ------------------------------------------

def test_real_synthetic_batch(iu_annotation_path, iu_synth_images):
    ann = load_annotation(iu_annotation_path, iu_synth_images, splits=("test",))
    studies = ann.split("test")[:3]
    tok = _tokenizer(s.report for s in studies)
    ds = ReportDataset.from_annotation(ann, "test", tok, max_tokens=60)
    assert len(ds) == 590
    item = ds[0]
    assert item["id"] == "CXR3030_IM-1405"
    assert item["images"].shape == (2, 3, 224, 224) and item["images"].dtype == torch.float32
    assert item["view_mask"].tolist() == [True, True]
    assert item["tokens"][0] == BOS_ID and item["tokens"][-1] == EOS_ID
    assert item["has_labels"].item() is False and item["labels"].tolist() == [0.0] * 14
    # the three channels are one gray image, normalised per channel
    gray = item["images"][0] * STD.view(3, 1, 1) + MEAN.view(3, 1, 1)
    torch.testing.assert_close(gray[0], gray[1])
    torch.testing.assert_close(gray[0], gray[2])
    assert 0.0 <= gray.min() and gray.max() <= 1.0 + 1e-6

    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 2, 3, 224, 224)
    assert batch["view_mask"].all()
    assert batch["ids"] == [s.id for s in studies]
    assert batch["reports"] == [s.report for s in studies]
    lengths = [len(tok.encode(s.report, 60)) for s in studies]
    assert batch["tokens"].shape == (3, max(lengths))
    assert batch["token_mask"].sum(dim=1).tolist() == lengths
    assert (batch["tokens"][~batch["token_mask"]] == PAD_ID).all()


def test_real_tokens_decode_to_cleaned_report(iu_annotation_path, iu_synth_images):
    ann = load_annotation(iu_annotation_path, iu_synth_images, splits=("test",), check_images=False)
    study = ann.split("test")[0]
    tok = _tokenizer([study.report])
    ds = ReportDataset([study], iu_synth_images, tok, max_tokens=60)
    # every word is in the vocabulary (built from this report), so decoding gives back the cleaned
    # text (R2Gen's cleaning ends with " .", a word like any other)
    assert tok.decode(ds[0]["tokens"].tolist()) == tok.clean(study.report)


# -- hand-computed transforms ---------------------------------------------------------------------

def test_eval_transform_values():
    cfg = ImageConfig(image_size=8)
    out = ImageTransform(cfg)(np.full((20, 30), 51, np.uint8))  # non-square input is squashed
    assert out.shape == (3, 8, 8)
    expected = (torch.full((3,), 51 / 255) - MEAN) / STD      # 0.2 -> (-1.2555, -1.1357, -0.9087)
    torch.testing.assert_close(out[:, 3, 5], expected)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 8, 8))
    # uint16 is divided by 65535, not squeezed through 8 bits
    out16 = ImageTransform(cfg)(np.full((8, 8), 13107, np.uint16))  # 13107 / 65535 = 0.2 exactly
    torch.testing.assert_close(out16, out)


def test_eval_transform_keeps_pixels_at_native_size():
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = ImageTransform(ImageConfig(image_size=8, mean=(0, 0, 0), std=(1, 1, 1)))(img)
    torch.testing.assert_close(out[2], torch.from_numpy(img.astype(np.float32) / 255))


def test_train_crop_is_a_window_and_reproducible():
    img = np.arange(144, dtype=np.uint8).reshape(12, 12)
    cfg = ImageConfig(image_size=8, resize_size=12, mean=(0, 0, 0), std=(1, 1, 1))
    tf = ImageTransform(cfg, train=True)
    windows = set()
    for seed in range(6):
        out = tf(img, torch.Generator().manual_seed(seed))[0] * 255
        top, left = divmod(int(round(out[0, 0].item())), 12)  # the corner value is top*12 + left
        np.testing.assert_allclose(out.numpy(), img[top:top + 8, left:left + 8], atol=1e-4)
        windows.add((top, left))
        again = tf(img, torch.Generator().manual_seed(seed))[0] * 255
        assert torch.equal(out, again)
    assert len(windows) > 1
    # without a generator the crop follows torch's seed, not numpy's
    torch.manual_seed(3)
    np.random.seed(0)
    a = tf(img)
    torch.manual_seed(3)
    np.random.seed(1)
    assert torch.equal(a, tf(img))
    # eval: no crop, and train_augment=False turns the crop off in training too
    no_aug = ImageTransform(ImageConfig(image_size=8, train_augment=False), train=True)
    assert not no_aug.random_crop
    assert ImageConfig(image_size=224).train_resize == 256


def test_image_config_validation_and_config_layering():
    with pytest.raises(ValueError, match="iec must be one of"):
        ImageConfig(iec="sharpen")
    with pytest.raises(ValueError, match="resize_size"):
        ImageConfig(image_size=224, resize_size=200)
    with pytest.raises(ValueError, match="3 values"):
        ImageConfig(mean=(0.5, 0.5))
    from ifnet.config import from_dict

    cfg = from_dict(ImageConfig, {"iec": "clahe", "image_size": 256, "mean": [0.5, 0.5, 0.5]})
    assert cfg.iec == "clahe" and cfg.mean == (0.5, 0.5, 0.5) and cfg.train_resize == 293


# -- mixed view counts -----------------------------------------------------------------------------

def test_mixed_one_and_two_view_batch(tmp_path):
    _save(tmp_path / "m1" / "0.png", np.full((10, 10), 200, np.uint8))
    _save(tmp_path / "iu" / "0.png", np.full((10, 10), 100, np.uint8))
    _save(tmp_path / "iu" / "1.png", np.full((12, 9), 50, np.uint8))
    _save(tmp_path / "m3" / "0.png", np.full((10, 10), 10, np.uint8))
    studies = [Study("m1", "Heart normal.", ["m1/0.png"], "train"),
               Study("iu", "Lungs clear. Heart normal.", ["iu/0.png", "iu/1.png"], "train"),
               Study("m3", "No effusion.", ["m3/0.png", "iu/0.png", "iu/1.png"], "train")]
    tok = _tokenizer(s.report for s in studies)
    labels = {"iu": np.array([0] * 13 + [1])}
    ds = ReportDataset(studies, tmp_path, tok, ImageConfig(image_size=8, max_views=2), labels=labels)
    assert ds[2]["images"].shape[0] == 2  # 3 views listed, max_views=2 keeps the first two

    batch = collate([ds[0], ds[1]])
    assert batch["images"].shape == (2, 2, 3, 8, 8)
    assert batch["view_mask"].tolist() == [[True, False], [True, True]]
    assert (batch["images"][0, 1] == 0).all()                 # the missing view is zeros
    torch.testing.assert_close(batch["images"][0, 0], ds[0]["images"][0])
    torch.testing.assert_close(batch["images"][1, 1, 0, 0, 0], (50 / 255 - MEAN[0]) / STD[0])
    # "heart normal ." = bos + 3 + eos; "lungs clear . heart normal ." = bos + 6 + eos
    assert batch["token_mask"].sum(1).tolist() == [5, 8]
    assert batch["tokens"][0, 5:].tolist() == [PAD_ID] * 3
    assert batch["has_labels"].tolist() == [False, True]
    assert batch["labels"].shape == (2, 14) and batch["labels"][1, 13] == 1.0 and batch["labels"].sum() == 1.0


def test_collate_rejects_mismatched_sizes_and_empty():
    a = {"id": "a", "report": "r", "images": torch.zeros(1, 3, 8, 8), "view_mask": torch.ones(1, dtype=torch.bool),
         "tokens": torch.tensor([1, 2]), "labels": torch.zeros(14), "has_labels": torch.tensor(False)}
    b = dict(a, images=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="same"):
        collate([a, b])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_dataloader_workers_are_reproducible(tmp_path):
    _save(tmp_path / "a" / "0.png", np.arange(256, dtype=np.uint8).reshape(16, 16))
    studies = [Study(f"s{i}", "Clear.", ["a/0.png"], "train") for i in range(4)]
    cfg = ImageConfig(image_size=8, resize_size=16)
    ds = ReportDataset(studies, tmp_path, _tokenizer(["Clear."]), cfg, train=True)

    def run(seed: int) -> torch.Tensor:
        loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate,
                            generator=torch.Generator().manual_seed(seed))
        return torch.cat([b["images"] for b in loader])

    first = run(0)
    assert torch.equal(first, run(0))
    # different workers / items do not all repeat the same crop
    assert len({tuple(first[i].flatten()[:4].tolist()) for i in range(4)}) > 1


# -- bad inputs inside the dataset -----------------------------------------------------------------

def test_unreadable_image_names_study(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "0.png").write_bytes(b"definitely not an image")
    ds = ReportDataset([Study("CXR9", "Clear.", ["x/0.png"], "test")], tmp_path, _tokenizer(["Clear."]))
    with pytest.raises(ImageError) as info:
        ds[0]
    assert info.value.record == "CXR9" and info.value.field == "image_path"
    assert str(tmp_path / "x" / "0.png") in str(info.value) and "study CXR9" in str(info.value)


def test_bad_label_shape():
    with pytest.raises(ValueError, match="shape"):
        ReportDataset([], ".", _tokenizer(["a"]), labels={"a": np.zeros(13)})


def test_views_to_tensor_limits_views():
    tf = ImageTransform(ImageConfig(image_size=8, max_views=1))
    images, mask = views_to_tensor([np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8)], tf)
    assert images.shape == (1, 3, 8, 8) and mask.tolist() == [True]
    with pytest.raises(ValueError):
        views_to_tensor([], tf)


# -- the IEC switch --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["clahe", "adaptive"])
def test_on_the_fly_iec_equals_enhance_cli(tmp_path, mode):
    from ifnet.iec.enhance import EnhanceSettings, enhance_tree

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    # Low-contrast films (lifted black level), so the adaptive criterion applies CLAHE too.
    _save(src / "a" / "0.png", (90 + rng.integers(0, 40, (64, 48))).astype(np.uint8))
    _save(src / "a" / "1.png", (20000 + rng.integers(0, 9000, (40, 64))).astype(np.uint16))
    dst = tmp_path / "dst"
    summary = enhance_tree(src, dst, EnhanceSettings(mode=mode), report=lambda m: None)
    assert summary.failed == 0 and summary.enhanced == 2
    if mode == "adaptive":
        assert summary.judged_low == 2  # both judged low quality, so the comparison is not trivial
    # the CLI's output is read back exactly as written (lossless, same dtype)
    assert read_xray(dst / "a" / "1.png").dtype == np.uint16

    study = [Study("a", "Clear.", ["a/0.png", "a/1.png"], "test")]
    tok = _tokenizer(["Clear."])
    on_the_fly = ReportDataset(study, src, tok, ImageConfig(iec=mode, image_size=32))[0]["images"]
    from_cli = ReportDataset(study, dst, tok, ImageConfig(iec="none", image_size=32))[0]["images"]
    assert torch.equal(on_the_fly, from_cli)
    plain = ReportDataset(study, src, tok, ImageConfig(iec="none", image_size=32))[0]["images"]
    assert not torch.equal(plain, on_the_fly)  # the switch really enhances


def test_iec_applied_before_resize(tmp_path):
    from ifnet.iec.clahe import CLAHE

    rng = np.random.default_rng(1)
    img = (100 + rng.integers(0, 30, (64, 64))).astype(np.uint8)
    tf = ImageTransform(ImageConfig(iec="clahe", image_size=16))
    expected = ImageTransform(ImageConfig(iec="none", image_size=16))(CLAHE(1.7, 8)(img))
    assert torch.equal(tf(img), expected)
