"""Procedural two-view chest phantoms whose findings follow a label vector, with matching reports.

This is the toolkit's own embedded sample (no download, no CT): a stylised PA frontal and a lateral
radiograph drawn from ellipses, arcs and smooth noise, and a findings paragraph written from the same
labels in IU-Xray's phrasing. It exists so that a newcomer sees the whole pipeline (enhancement,
training, decoding, scoring) work in minutes on a CPU. It is not a model of real anatomy and numbers
on it say nothing about real X-rays.

Convention as in real radiographs: frontal PA with the patient's left on the image right (the heart
bulges to the image right); lateral with anterior on the image left. Bone and soft tissue are bright,
air dark.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ifnet.labels import NUM_OBSERVATIONS, OBSERVATIONS

# Findings the phantom can draw (index into OBSERVATIONS) and how often each is positive.
_PREVALENCE = {
    "Cardiomegaly": 0.22, "Pleural Effusion": 0.16, "Lung Opacity": 0.14, "Support Devices": 0.12,
    "Lung Lesion": 0.10, "Atelectasis": 0.12, "Edema": 0.08, "Pneumothorax": 0.06,
    "Enlarged Cardiomediastinum": 0.06, "Consolidation": 0.05, "Fracture": 0.05,
}

# Report sentences: positive wording, and the normal sentence that covers a negative finding.
_POSITIVE = {
    "Cardiomegaly": ["the heart is enlarged .", "there is cardiomegaly ."],
    "Enlarged Cardiomediastinum": ["the mediastinum is widened ."],
    "Pleural Effusion": ["there is a {side} pleural effusion .", "{side} pleural effusion is present ."],
    "Lung Opacity": ["there is an opacity in the {side} lower lobe ."],
    "Consolidation": ["there is focal consolidation in the {side} lower lobe ."],
    "Lung Lesion": ["there is a {side} upper lobe nodule ."],
    "Atelectasis": ["there is {side} basilar atelectasis ."],
    "Edema": ["there is pulmonary edema ."],
    "Pneumothorax": ["there is a {side} pneumothorax ."],
    "Fracture": ["there is a {side} rib fracture ."],
    "Support Devices": ["a {side} is present ."],
}
_NORMAL_HEART = "the heart size is normal ."
_NORMAL_MEDIASTINUM = "the mediastinum is normal ."
_NORMAL_LUNGS = "the lungs are clear ."
_NORMAL_PLEURA = "there is no pneumothorax or pleural effusion ."
_NORMAL_BONES = "no acute bony abnormality ."


@dataclass(frozen=True)
class PhantomStudy:
    """One generated study: two uint8 images [H, W], a report, and its 0/1 label vector [14]."""

    study_id: str
    frontal: np.ndarray
    lateral: np.ndarray
    report: str
    labels: np.ndarray
    low_quality: bool


def _rng(seed: int, study_id: str, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}|{study_id}|{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_labels(rng: np.random.Generator) -> np.ndarray:
    """A 0/1 vector [14]; No Finding is set exactly when no finding is."""
    labels = np.zeros(NUM_OBSERVATIONS, dtype=np.int64)
    for name, p in _PREVALENCE.items():
        labels[OBSERVATIONS.index(name)] = int(rng.random() < p)
    labels[OBSERVATIONS.index("No Finding")] = int(labels.sum() == 0)
    return labels


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _smooth_noise(rng, size, scale):
    """Low-frequency texture: bilinear upsampling of a coarse random grid."""
    coarse = rng.standard_normal((size // scale + 2, size // scale + 2))
    idx = np.arange(size) / scale
    i0 = idx.astype(int)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        img = (img + np.roll(img, 1, 0) + np.roll(img, -1, 0) + np.roll(img, 1, 1) + np.roll(img, -1, 1)) / 5
    return img


def _draw_frontal(labels, sides, rng, size):
    has = {n: bool(labels[OBSERVATIONS.index(n)]) for n in OBSERVATIONS}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.full((size, size), 0.15)
    body = _ellipse(yy, xx, 0.55, 0.5, 0.55, 0.45)
    img[body] = 0.55
    lung_r = _ellipse(yy, xx, 0.47, 0.31, 0.30, 0.15)  # patient's right lung, image left
    lung_l = _ellipse(yy, xx, 0.47, 0.69, 0.30, 0.15)
    lungs = lung_r | lung_l
    img[lungs] = 0.22 + 0.04 * _smooth_noise(rng, size, 16)[lungs]
    # ribs: bright arcs crossing the lungs
    for k in range(7):
        cy = 0.22 + 0.085 * k
        arc = np.abs(yy - cy - 0.06 * ((xx - 0.5) ** 2) * 8) < 0.008
        if has["Fracture"] and k == 3:
            gap_x = 0.24 if sides["Fracture"] == "right" else 0.76
            arc &= np.abs(xx - gap_x) > 0.02
        img[arc & body] += 0.12
    spine = np.abs(xx - 0.5) < 0.045
    img[spine & body] = 0.62
    normal_scale = 1.0 + 0.06 * rng.random()  # drawn always, so a finding never shifts later draws
    heart_scale = 1.35 if has["Cardiomegaly"] else normal_scale
    heart = _ellipse(yy, xx, 0.66, 0.54, 0.13, 0.12 * heart_scale)
    img[heart] = 0.6
    med_w = 0.085 if has["Enlarged Cardiomediastinum"] else 0.055
    img[(np.abs(xx - 0.5) < med_w) & (yy > 0.15) & (yy < 0.55)] = 0.6
    # diaphragm: below a dome per side everything is abdomen-bright
    for cx in (0.31, 0.69):
        dome = (yy > 0.74 - 0.2 * (1 - ((xx - cx) / 0.17) ** 2).clip(0) * 0.3) & (np.abs(xx - cx) < 0.2)
        img[dome & body] = 0.58
    side_x = {"right": 0.31, "left": 0.69}
    if has["Pleural Effusion"]:
        for side in (["right", "left"] if sides["Pleural Effusion"] == "bilateral" else [sides["Pleural Effusion"]]):
            cx = side_x[side]
            fluid = (yy > 0.63 - 0.08 * np.abs(xx - cx) / 0.15) & (np.abs(xx - cx) < 0.16) & body
            img[fluid] = np.maximum(img[fluid], 0.52)
    for name, (cy, r, density) in {"Lung Opacity": (0.6, 0.06, 0.16), "Consolidation": (0.62, 0.09, 0.28),
                                   "Lung Lesion": (0.33, 0.025, 0.3)}.items():
        if has[name]:
            cx = side_x[sides[name]] + rng.uniform(-0.04, 0.04)
            blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
            img += density * blob * lungs
    if has["Atelectasis"]:
        cx = side_x[sides["Atelectasis"]]
        plate = (np.abs(yy - 0.64) < 0.008) & (np.abs(xx - cx) < 0.08)
        img[plate] += 0.2
    if has["Edema"]:
        for cx in (0.4, 0.6):
            img += 0.15 * np.exp(-(((yy - 0.5) ** 2) / 0.01 + ((xx - cx) ** 2) / 0.006)) * lungs
    if has["Pneumothorax"]:
        cx = side_x[sides["Pneumothorax"]]
        ptx = _ellipse(yy, xx, 0.26, cx, 0.1, 0.14) & lungs
        img[ptx] = 0.08
        edge = ptx ^ _blur(ptx.astype(float), 1).astype(bool)
        img[edge] = 0.35
    if has["Support Devices"]:
        pacemaker = sides["Support Devices"] == "pacemaker"
        if pacemaker:  # generator box in the left chest wall, lead to the heart
            box = (np.abs(yy - 0.2) < 0.03) & (np.abs(xx - 0.78) < 0.05)
            img[box] = 0.98
        t = np.linspace(0, 1, 200)
        # pacemaker lead from the box; central line from the right neck down the SVC
        path = zip(0.2 + 0.45 * t, 0.78 - 0.26 * t) if pacemaker else zip(0.05 + 0.45 * t, 0.40 + 0.06 * t)
        for py, px in path:
            iy, ix = int(py * size), int(px * size)
            img[max(iy - 1, 0):iy + 1, max(ix - 1, 0):ix + 1] = 0.95
    return img


def _draw_lateral(labels, sides, rng, size):
    has = {n: bool(labels[OBSERVATIONS.index(n)]) for n in OBSERVATIONS}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.full((size, size), 0.15)
    body = _ellipse(yy, xx, 0.55, 0.5, 0.55, 0.36)
    img[body] = 0.5
    lung = _ellipse(yy, xx, 0.47, 0.5, 0.3, 0.26)
    img[lung] = 0.24 + 0.04 * _smooth_noise(rng, size, 16)[lung]
    img[(xx > 0.7) & (xx < 0.78) & body] = 0.64  # spine, posterior (image right)
    heart = _ellipse(yy, xx, 0.62, 0.38, 0.14, 0.12 * (1.3 if has["Cardiomegaly"] else 1.0))
    img[heart] = 0.58
    img[(yy > 0.76) & body] = 0.56
    if has["Pleural Effusion"]:
        img[(yy > 0.68) & (xx > 0.6) & lung] = 0.5  # posterior costophrenic angle fills first
    if has["Consolidation"] or has["Lung Opacity"]:
        img += 0.18 * np.exp(-(((yy - 0.6) ** 2 + (xx - 0.55) ** 2) / 0.006)) * lung
    if has["Edema"]:
        img += 0.12 * np.exp(-(((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.02)) * lung
    if has["Support Devices"] and sides["Support Devices"] == "pacemaker":
        img[(np.abs(yy - 0.2) < 0.03) & (np.abs(xx - 0.3) < 0.04)] = 0.98
    return img


def _finish(img, rng, size, low_quality):
    img = _blur(img, 1) + rng.normal(0, 0.015, img.shape)
    if low_quality:  # washed-out, low-contrast exposure: what IEC (CLAHE) is for
        img = 0.45 + 0.35 * (img - 0.45)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def write_report(labels: np.ndarray, sides: dict, rng: np.random.Generator) -> str:
    """IU-style findings paragraph from the labels: positives named, negatives as normal sentences."""
    has = {n: bool(labels[OBSERVATIONS.index(n)]) for n in OBSERVATIONS}
    parts: list[str] = []

    def pos(name: str) -> str:
        choices = _POSITIVE[name]
        return choices[int(rng.integers(len(choices)))].format(side=sides.get(name, "right"))

    parts.append(pos("Cardiomegaly") if has["Cardiomegaly"] else _NORMAL_HEART)
    parts.append(pos("Enlarged Cardiomediastinum") if has["Enlarged Cardiomediastinum"] else _NORMAL_MEDIASTINUM)
    lung_findings = [n for n in ("Lung Opacity", "Consolidation", "Lung Lesion", "Atelectasis", "Edema") if has[n]]
    parts.extend(pos(n) for n in lung_findings)
    if not lung_findings:
        parts.append(_NORMAL_LUNGS)
    pleural = [n for n in ("Pleural Effusion", "Pneumothorax") if has[n]]
    parts.extend(pos(n) for n in pleural)
    if not pleural:
        parts.append(_NORMAL_PLEURA)
    if has["Support Devices"]:
        parts.append(pos("Support Devices"))
    parts.append(pos("Fracture") if has["Fracture"] else _NORMAL_BONES)
    text = " ".join(parts)
    # Capitalised sentences, as in raw reports; cleaning lower-cases them again.
    return " ".join(s.strip().capitalize() + "." for s in text.split(" .") if s.strip())


def make_study(study_id: str, *, seed: int = 0, size: int = 256,
               labels: Sequence[int] | None = None) -> PhantomStudy:
    """Deterministic in (seed, study_id): the same call gives the same pixels and report."""
    rng_labels = _rng(seed, study_id, "labels")
    lab = np.asarray(labels, dtype=np.int64) if labels is not None else sample_labels(rng_labels)
    rng_side = _rng(seed, study_id, "sides")
    sides = {n: ("right" if rng_side.random() < 0.5 else "left") for n in _POSITIVE}
    # for devices the "side" is the device type, drawn and reported consistently
    sides["Support Devices"] = "pacemaker" if sides["Support Devices"] == "right" else "central venous catheter"
    if rng_side.random() < 0.3:
        sides["Pleural Effusion"] = "bilateral"
    # Separate streams for anatomy, findings' placement and noise: changing a label changes only
    # the finding, never the nuisance, so the difference between two renders shows what a label adds.
    low_quality = bool(_rng(seed, study_id, "quality").random() < 0.3)
    frontal = _finish(_draw_frontal(lab, sides, _rng(seed, study_id, "frontal"), size),
                      _rng(seed, study_id, "noise-frontal"), size, low_quality)
    lateral = _finish(_draw_lateral(lab, sides, _rng(seed, study_id, "lateral"), size),
                      _rng(seed, study_id, "noise-lateral"), size, low_quality)
    report = write_report(lab, sides, _rng(seed, study_id, "report"))
    return PhantomStudy(study_id, frontal, lateral, report, lab, low_quality)
