"""A small, genuine COCO-format person-keypoints data set rendered from stick figures.

Each image is a textured, cluttered background with 1-4 articulated figures (thick limbs
with outlines, torso, head with hair) whose 17 COCO joints are known exactly, plus optional
crowd patches (annotated `iscrowd`) and occluding objects. Visibility follows COCO:
0 = not labelled (outside the image, or a face joint of a figure seen from behind),
1 = labelled but hidden (covered by a later figure/object, or an ear turned away),
2 = visible.

Left and right are told apart the way they are in real photographs, by geometry, not by
colour: a figure seen from the front shows a face (eyes, nose) and has its left limbs on
the image's right; a figure seen from behind shows hair and has its left limbs on the
image's left. Both sides are drawn in the same colours on purpose: a colour that marks
"left" would contradict the labels of every horizontally flipped training crop (the crop
is mirrored and the labels swapped, the colours are not), whereas the face/back cue
mirrors consistently.

Everything random comes from one `numpy.random.Generator` per image, seeded by
(seed, split, index), so a seed gives byte-identical images and JSON, and image i does not
depend on how many images were asked for.
"""

from __future__ import annotations

import colorsys
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from distilpose.data.coco import PERSON_CATEGORY_ID
from distilpose.keypoints import KEYPOINT_NAMES, NUM_JOINTS, SKELETON

SPLITS = {"train": 0, "val": 1}
IMAGE_ID_BASE = {"train": 0, "val": 10_000_000}  # disjoint ids across splits
ANNS_PER_IMAGE = 100  # annotation id = image_id * 100 + index within the image
JPEG_QUALITY = 90
MIN_HEIGHT, MAX_HEIGHT = 60, 200  # figure height in px (feet to head top, upright)
CROWD_PROB = 0.12
OCCLUDER_PROB = 0.35
TRUNCATE_PROB = 0.25
SKIN_TONES = ((255, 224, 189), (234, 192, 134), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 59, 38))

RGB = tuple[int, int, int]


# ----------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One rendered person: joints and the points/sizes needed to draw it, in image px."""

    joints: np.ndarray  # (17, 2) float64
    labelled: np.ndarray  # (17,) bool: False for face joints of a back view
    self_hidden: np.ndarray  # (17,) bool: labelled but hidden by the figure itself
    neck: np.ndarray
    head_center: np.ndarray
    head_up: np.ndarray  # unit vector from chin to crown
    head_radius: float
    hands: np.ndarray  # (2, 2) left, right
    feet: np.ndarray  # (2, 2) left, right
    widths: dict[str, float]
    front: bool


@dataclass(frozen=True)
class Palette:
    shirt: RGB
    upper_arm: RGB
    forearm: RGB
    pants: RGB
    shin: RGB
    skin: RGB
    hair: RGB
    shoes: RGB


def _rot(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _foreshorten(rng: np.random.Generator) -> float:
    """Out-of-plane limbs look shorter; a 2-D figure imitates that by shrinking some."""
    return float(rng.uniform(0.55, 1.0)) if rng.random() < 0.3 else 1.0


def _limb_chain(
    rng: np.random.Generator,
    root: np.ndarray,
    down: np.ndarray,
    outward: np.ndarray,
    lengths: tuple[float, float],
    abduction: float,
    max_bend: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-segment limb: abduction 0 hangs along `down`, pi/2 points `outward`."""
    d1 = math.cos(abduction) * down + math.sin(abduction) * outward
    mid = root + lengths[0] * _foreshorten(rng) * d1
    d2 = _rot(d1, float(rng.uniform(0.0, max_bend)) * (1.0 if rng.random() < 0.5 else -1.0))
    end = mid + lengths[1] * _foreshorten(rng) * d2
    return mid, end, d2


def make_figure(rng: np.random.Generator, height: float, angle: float, origin: np.ndarray) -> Figure:
    """A random pose, `height` px tall, rotated by `angle` rad about the pelvis at `origin`.

    Built in body units (height 1, pelvis at 0, y down) and then placed in the image.
    """
    front = rng.random() < 0.7
    left = 1.0 if front else -1.0  # image-x sign of the person's left side
    width_factor = float(rng.uniform(0.8, 1.3))

    def jit() -> float:  # body proportions vary by +-10 % per person
        return float(rng.uniform(0.9, 1.1))

    lean = float(np.clip(rng.normal(0.0, 0.12), -0.4, 0.4))
    up = np.array([math.sin(lean), -math.cos(lean)])
    right = np.array([math.cos(lean), math.sin(lean)])

    j = np.zeros((NUM_JOINTS, 2))
    neck = 0.30 * jit() * up
    hip_half, shoulder_half = 0.08 * width_factor * jit(), 0.115 * width_factor * jit()
    j[11], j[12] = left * hip_half * right, -left * hip_half * right
    j[5], j[6] = neck + left * shoulder_half * right, neck - left * shoulder_half * right

    hands, feet = np.zeros((2, 2)), np.zeros((2, 2))
    arm = (0.165 * jit(), 0.15 * jit())
    leg = (0.235 * jit(), 0.235 * jit())
    for i, (sho, elb, wri, side) in enumerate(((5, 7, 9, left), (6, 8, 10, -left))):
        j[elb], j[wri], d = _limb_chain(rng, j[sho], -up, side * right, arm, rng.uniform(-0.35, 2.9), 2.5)
        hands[i] = j[wri] + 0.03 * d
    for i, (hip, knee, ank, side) in enumerate(((11, 13, 15, left), (12, 14, 16, -left))):
        abduction = rng.uniform(0.8, 1.7) if rng.random() < 0.1 else rng.uniform(-0.25, 0.8)
        j[knee], j[ank], d = _limb_chain(rng, j[hip], -up, side * right, leg, abduction, 1.9)
        feet[i] = j[ank] + 0.055 * (0.3 * d + side * right)

    head_up = _rot(up, float(np.clip(rng.normal(0.0, 0.15), -0.5, 0.5)))
    head_right = np.array([-head_up[1], head_up[0]])
    r = 0.065 * jit()
    head = neck + 0.12 * jit() * head_up
    labelled = np.ones(NUM_JOINTS, dtype=bool)
    self_hidden = np.zeros(NUM_JOINTS, dtype=bool)
    j[3], j[4] = head + left * 0.95 * r * head_right, head - left * 0.95 * r * head_right
    if front:
        yaw = float(rng.uniform(-0.45, 0.45))
        face = head + yaw * r * head_right
        j[0] = face - 0.22 * r * head_up
        eyes = face + 0.08 * r * head_up
        j[1], j[2] = eyes + left * 0.36 * r * head_right, eyes - left * 0.36 * r * head_right
        if abs(yaw) > 0.25:  # the face turned towards one ear: that ear is behind the head
            self_hidden[3 if yaw * left > 0 else 4] = True
    else:
        labelled[:3] = False

    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def place(p: np.ndarray) -> np.ndarray:
        return p @ rotation.T * height + origin

    unit_widths = {"upper_arm": 0.052, "forearm": 0.044, "thigh": 0.072, "shin": 0.058, "neck": 0.05}
    return Figure(
        joints=place(j),
        labelled=labelled,
        self_hidden=self_hidden,
        neck=place(neck),
        head_center=place(head),
        head_up=head_up @ rotation.T,
        head_radius=r * height,
        hands=place(hands),
        feet=place(feet),
        widths={k: max(1.5, v * width_factor * height) for k, v in unit_widths.items()},
        front=front,
    )


def figure_extent(fig: Figure) -> np.ndarray:
    """Approximate (x1, y1, x2, y2) of the drawn figure, for placement before drawing."""
    pts = np.vstack([fig.joints, fig.hands, fig.feet, fig.head_center[None]])
    pad = max(fig.head_radius, fig.widths["thigh"])
    return np.array([*(pts.min(axis=0) - pad), *(pts.max(axis=0) + pad)])


def _random_color(rng: np.random.Generator, sat: tuple[float, float] = (0.3, 1.0)) -> RGB:
    h, s, v = rng.random(), rng.uniform(*sat), rng.uniform(0.25, 1.0)
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _jitter(rng: np.random.Generator, color: RGB, amount: int = 18) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)  # type: ignore[return-value]


def make_palette(rng: np.random.Generator) -> Palette:
    skin = _jitter(rng, SKIN_TONES[int(rng.integers(len(SKIN_TONES)))])
    shirt, pants = _random_color(rng), _random_color(rng)
    sleeves = rng.random()  # long, short or no sleeves
    return Palette(
        shirt=shirt,
        upper_arm=shirt if sleeves < 0.8 else skin,
        forearm=shirt if sleeves < 0.4 else skin,
        pants=pants,
        shin=pants if rng.random() < 0.75 else skin,
        skin=skin,
        hair=_jitter(rng, ((40, 30, 20), (90, 60, 30), (20, 20, 20), (170, 140, 80))[int(rng.integers(4))]),
        shoes=_random_color(rng, sat=(0.0, 0.5)),
    )


def _dark(color: RGB) -> RGB:
    return tuple(int(c * 0.45) for c in color)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- drawing


class Canvas:
    """Draws shapes into the RGB image and, when given, into one figure's 0/255 mask."""

    def __init__(self, image: Image.Image, mask: Image.Image | None = None, outline: float = 1.0):
        self.draw = ImageDraw.Draw(image)
        self.mask = ImageDraw.Draw(mask) if mask is not None else None
        self.outline = outline

    def _targets(self, color: RGB) -> list[tuple[ImageDraw.ImageDraw, Any]]:
        targets: list[tuple[ImageDraw.ImageDraw, Any]] = [(self.draw, color)]
        if self.mask is not None:
            targets.append((self.mask, 255))
        return targets

    def limb(self, a: np.ndarray, b: np.ndarray, width: float, color: RGB) -> None:
        """Thick segment with round ends: a dark outline (which is also the mask), then the fill."""
        for draw, value in self._targets(_dark(color)):
            _capsule(draw, a, b, width / 2 + self.outline, value)
        _capsule(self.draw, a, b, width / 2, color)

    def disc(self, c: np.ndarray, rx: float, ry: float, color: RGB, in_mask: bool = True) -> None:
        box = [c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry]
        targets = self._targets(color) if in_mask else [(self.draw, color)]
        for draw, value in targets:
            outline = _dark(color) if draw is self.draw else value
            draw.ellipse(box, fill=value, outline=outline, width=max(1, round(self.outline)))

    def polygon(self, points: list[np.ndarray], color: RGB) -> None:
        xy = [tuple(p) for p in points]
        for draw, value in self._targets(color):
            outline = _dark(color) if draw is self.draw else value
            draw.polygon(xy, fill=value, outline=outline, width=max(1, round(self.outline)))


def _capsule(draw: ImageDraw.ImageDraw, a: np.ndarray, b: np.ndarray, half: float, value: Any) -> None:
    draw.line([tuple(a), tuple(b)], fill=value, width=max(1, round(2 * half)))
    for p in (a, b):
        draw.ellipse([p[0] - half, p[1] - half, p[0] + half, p[1] + half], fill=value)


def draw_figure(canvas: Canvas, fig: Figure, pal: Palette) -> None:
    j, w = fig.joints, fig.widths
    for hip, knee, ank, foot in ((11, 13, 15, 0), (12, 14, 16, 1)):
        canvas.limb(j[hip], j[knee], w["thigh"], pal.pants)
        canvas.limb(j[knee], j[ank], w["shin"], pal.shin)
        canvas.limb(j[ank], fig.feet[foot], w["shin"] * 0.8, pal.shoes)
    # Torso corners sit a little outside the shoulder/hip joints so the joints lie inside it.
    out_l, out_r = j[5] - j[6], j[6] - j[5]
    norm = max(float(np.hypot(*out_l)), 1e-6)
    out_l, out_r = out_l / norm, out_r / norm
    up = fig.head_up
    sh, th = 0.4 * w["upper_arm"], 0.35 * w["thigh"]
    torso = [j[5] + sh * (out_l + up), j[6] + sh * (out_r + up), j[12] + th * out_r, j[11] + th * out_l]
    canvas.polygon(torso, pal.shirt)
    canvas.limb(fig.neck, fig.head_center, w["neck"], pal.skin)
    for sho, elb, wri, hand in ((5, 7, 9, 0), (6, 8, 10, 1)):
        canvas.limb(j[sho], j[elb], w["upper_arm"], pal.upper_arm)
        canvas.limb(j[elb], j[wri], w["forearm"], pal.forearm)
        canvas.disc(fig.hands[hand], w["forearm"] * 0.7, w["forearm"] * 0.7, pal.skin)
    draw_head(canvas, fig, pal)


def draw_head(canvas: Canvas, fig: Figure, pal: Palette) -> None:
    c, r, j = fig.head_center, fig.head_radius, fig.joints
    ear = max(1.0, 0.28 * r)
    canvas.disc(c, r, r, pal.skin if fig.front else pal.hair)
    if fig.front:
        # Hair cap on the crown side: shows which way is up on a rotated head.
        up_deg = math.degrees(math.atan2(fig.head_up[1], fig.head_up[0]))
        canvas.draw.chord([c[0] - r, c[1] - r, c[0] + r, c[1] + r], up_deg - 70, up_deg + 70, fill=pal.hair)
        eye = max(0.8, 0.13 * r)
        for k in (1, 2):
            canvas.disc(j[k], eye, eye, (20, 20, 20), in_mask=False)
        canvas.disc(j[0], max(0.8, 0.14 * r), max(0.8, 0.14 * r), (200, 60, 60), in_mask=False)
    for k in (3, 4):
        if not fig.self_hidden[k]:
            canvas.disc(j[k], ear * 0.8, ear, _shade(pal.skin))


def _shade(color: RGB) -> RGB:
    """Slightly darker tone (ears against the head)."""
    return tuple(int(c * 0.85) for c in color)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- backgrounds


def make_background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth colour field + finer texture + clutter (incl. limb-like bars)."""
    h, w = size
    coarse = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    fine_n = int(rng.integers(12, 40))
    fine = rng.integers(0, 256, (fine_n, fine_n, 3), dtype=np.uint8)
    base = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    texture = Image.fromarray(fine).resize((w, h), Image.Resampling.BILINEAR)
    image = Image.blend(base, texture, float(rng.uniform(0.1, 0.45)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        color = _random_color(rng, sat=(0.0, 0.9))
        x, y = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
        rx, ry = rng.uniform(4, 0.25 * w), rng.uniform(4, 0.25 * h)
        kind = int(rng.integers(4))
        if kind == 0:
            draw.rectangle([x - rx, y - ry, x + rx, y + ry], fill=color)
        elif kind == 1:
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=color)
        elif kind == 2:
            pts = [(x + rx * math.cos(a), y + ry * math.sin(a)) for a in np.sort(rng.uniform(0, 2 * np.pi, 5))]
            draw.polygon(pts, fill=color)
        else:  # bars as thick as limbs, so "thick segment" alone does not mean "person"
            a = rng.uniform(0, np.pi)
            dx, dy = rx * math.cos(a), rx * math.sin(a)
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=color, width=int(rng.integers(3, 14)))
    return image


def add_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    amp = int(rng.integers(3, 12))
    noise = rng.integers(-amp, amp + 1, image.shape, dtype=np.int16)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- one image


@dataclass
class RenderedImage:
    pixels: np.ndarray  # (H, W, 3) uint8
    persons: list[dict[str, Any]]  # per person: keypoints (51 ints), bbox, area, num_keypoints
    crowds: list[dict[str, Any]]  # per crowd region: bbox, area, segmentation (RLE)


def _place_figures(rng: np.random.Generator, size: tuple[int, int]) -> list[Figure]:
    """1-4 figures, mostly inside the image, some truncated, none mostly hidden behind another
    (a candidate whose box overlaps an earlier one by IoU > 0.45 is redrawn, up to 8 times)."""
    h, w = size
    count = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    scale = min(h, w) / 256.0  # sizes are specified for 256 px images
    max_height = (MAX_HEIGHT - 25 * (count - 1)) * scale
    figures: list[Figure] = []
    boxes: list[np.ndarray] = []
    for _ in range(count):
        for _attempt in range(8):
            height = float(rng.uniform(MIN_HEIGHT * scale, max_height))
            angle = float(rng.normal(0, 0.15)) if rng.random() < 0.85 else float(rng.uniform(-1.75, 1.75))
            fig = make_figure(rng, height, angle, np.zeros(2))
            ext = figure_extent(fig)
            ew, eh = ext[2] - ext[0], ext[3] - ext[1]
            if rng.random() < TRUNCATE_PROB:
                cx, cy = rng.uniform(-0.05, 1.05) * w, rng.uniform(-0.05, 1.05) * h
            else:
                cx = rng.uniform(min(ew / 2, w / 2), max(w - ew / 2, w / 2))
                cy = rng.uniform(min(eh / 2, h / 2), max(h - eh / 2, h / 2))
            shift = np.array([cx - (ext[0] + ext[2]) / 2, cy - (ext[1] + ext[3]) / 2])
            box = ext + np.tile(shift, 2)
            if _inside_fraction(box, w, h) < 0.4 or any(_iou(box, b) > 0.45 for b in boxes):
                continue
            figures.append(shifted(fig, shift))
            boxes.append(box)
            break
    return figures


def shifted(fig: Figure, shift: np.ndarray) -> Figure:
    """The same figure moved by `shift` px."""
    return replace(
        fig,
        joints=fig.joints + shift,
        neck=fig.neck + shift,
        head_center=fig.head_center + shift,
        hands=fig.hands + shift,
        feet=fig.feet + shift,
    )


def _inside_fraction(box: np.ndarray, w: int, h: int) -> float:
    iw = max(0.0, min(box[2], w) - max(box[0], 0.0))
    ih = max(0.0, min(box[3], h) - max(box[1], 0.0))
    return iw * ih / max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-6)


def _draw_crowd(rng: np.random.Generator, image: Image.Image, size: tuple[int, int]) -> dict[str, Any]:
    """A patch of many small unannotated figures, annotated as one iscrowd region."""
    h, w = size
    rw, rh = int(rng.uniform(0.25, 0.45) * w), int(rng.uniform(0.15, 0.3) * h)
    x0, y0 = int(rng.integers(0, w - rw)), int(rng.integers(0, h - rh))
    canvas = Canvas(image, outline=0.6)
    small = min(h, w) / 256.0
    for _ in range(int(rng.integers(5, 11))):
        height = float(rng.uniform(22, 40)) * small
        fig = make_figure(rng, height, float(rng.normal(0, 0.1)), np.zeros(2))
        ext = figure_extent(fig)
        cx, cy = rng.uniform(x0, x0 + rw), rng.uniform(y0, y0 + rh)
        shift = np.array([cx - (ext[0] + ext[2]) / 2, cy - (ext[1] + ext[3]) / 2])
        draw_figure(canvas, shifted(fig, shift), make_palette(rng))
    mask = np.zeros((h, w), dtype=bool)
    mask[y0 : y0 + rh, x0 : x0 + rw] = True
    return {"bbox": [x0, y0, rw, rh], "area": float(rw * rh), "segmentation": rle_encode(mask)}


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE (column-major run lengths, starting with a run of zeros)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _draw_occluders(rng: np.random.Generator, image: Image.Image, figures: list[Figure]) -> np.ndarray:
    """Objects in front of a random figure; returns their mask."""
    mask = Image.new("L", image.size, 0)
    if not figures or rng.random() >= OCCLUDER_PROB:
        return np.zeros((image.size[1], image.size[0]), dtype=bool)
    canvas = Canvas(image, mask)
    px = min(image.size) / 256.0  # sizes are specified for 256 px images
    for _ in range(int(rng.integers(1, 3))):
        fig = figures[int(rng.integers(len(figures)))]
        c = fig.joints[int(rng.integers(5, NUM_JOINTS))] + rng.normal(0, 8 * px, 2)
        rx, ry = rng.uniform(6, 30) * px, rng.uniform(6, 30) * px
        color = _random_color(rng, sat=(0.0, 0.8))
        if rng.random() < 0.5:
            pts = [c + np.array(d) for d in ((-rx, -ry), (rx, -ry), (rx, ry), (-rx, ry))]
            canvas.polygon(pts, color)
        else:
            canvas.disc(c, rx, ry, color)
    return np.asarray(mask) > 0


def _annotate(fig: Figure, mask: np.ndarray, covered_later: np.ndarray) -> dict[str, Any] | None:
    """COCO fields of one figure; None if nothing of it ended up inside the image."""
    h, w = mask.shape
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y1, y2 = np.flatnonzero(rows)[[0, -1]]
    x1, x2 = np.flatnonzero(cols)[[0, -1]]
    keypoints: list[int] = []
    for k in range(NUM_JOINTS):
        x, y = (int(round(float(v))) for v in fig.joints[k])
        if not fig.labelled[k] or not (0 <= x < w and 0 <= y < h):
            keypoints += [0, 0, 0]
            continue
        hidden = fig.self_hidden[k] or covered_later[y, x]
        keypoints += [x, y, 1 if hidden else 2]
    return {
        "keypoints": keypoints,
        "num_keypoints": sum(1 for v in keypoints[2::3] if v > 0),
        # Box of the whole figure within the image (including parts hidden by others).
        "bbox": [int(x1), int(y1), int(x2 - x1 + 1), int(y2 - y1 + 1)],
        "area": float(mask.sum()),
    }


def render_image(rng: np.random.Generator, size: tuple[int, int] = (256, 256)) -> RenderedImage:
    h, w = size
    image = make_background(rng, size)
    crowds = [_draw_crowd(rng, image, size)] if rng.random() < CROWD_PROB else []
    figures = _place_figures(rng, size)
    masks = []
    outline = max(1.0, min(h, w) / 256.0)
    for fig in figures:
        mask = Image.new("L", (w, h), 0)
        draw_figure(Canvas(image, mask, outline), fig, make_palette(rng))
        masks.append(np.asarray(mask) > 0)
    occluded = _draw_occluders(rng, image, figures)
    persons = []
    covered = occluded.copy()
    for fig, mask in reversed(list(zip(figures, masks))):
        ann = _annotate(fig, mask, covered)
        covered |= mask
        if ann is not None:
            persons.append(ann)
    persons.reverse()
    return RenderedImage(add_noise(rng, np.asarray(image)), persons, crowds)


def fake_detections(
    rng: np.random.Generator, image_id: int, rendered: RenderedImage, size: tuple[int, int]
) -> list[dict[str, Any]]:
    """Detector-style person boxes: jittered GT boxes (a few missed) and false positives."""
    h, w = size
    dets = []
    for person in rendered.persons:
        if rng.random() < 0.05:
            continue  # missed by the detector
        x, y, bw, bh = person["bbox"]
        cx = x + bw / 2 + rng.normal(0, 0.06 * bw)
        cy = y + bh / 2 + rng.normal(0, 0.06 * bh)
        bw, bh = bw * math.exp(rng.normal(0, 0.08)), bh * math.exp(rng.normal(0, 0.08))
        visible = person["num_keypoints"] / NUM_JOINTS
        score = float(np.clip(0.55 + 0.4 * visible + rng.normal(0, 0.05), 0.3, 0.999))
        dets.append(_detection(image_id, [cx - bw / 2, cy - bh / 2, bw, bh], score))
    for _ in range(int(rng.poisson(0.5))):
        bw, bh = rng.uniform(15, 0.4 * w), rng.uniform(30, 0.7 * h)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        dets.append(_detection(image_id, [x, y, bw, bh], float(rng.uniform(0.02, 0.45))))
    return dets


def _detection(image_id: int, box: list[float], score: float) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "category_id": PERSON_CATEGORY_ID,
        "bbox": [round(float(v), 2) for v in box],
        "score": round(score, 4),
    }


# ----------------------------------------------------------------------------- data set


@dataclass
class SyntheticSummary:
    out_dir: str
    seed: int
    image_size: tuple[int, int]
    images: dict[str, int] = field(default_factory=dict)
    persons: dict[str, int] = field(default_factory=dict)
    crowds: dict[str, int] = field(default_factory=dict)
    detections: int = 0
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process

    @property
    def images_per_s(self) -> float:
        return sum(self.images.values()) / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}

    def table(self) -> str:
        h, w = self.image_size
        lines = [f"synthetic COCO data set -> {self.out_dir} (seed {self.seed}, {h}x{w})"]
        for split in self.images:
            lines.append(
                f"  {split:5s}: {self.images[split]} images, {self.persons[split]} persons, "
                f"{self.crowds[split]} crowd regions"
            )
        lines.append(f"  val detections: {self.detections}")
        lines.append(f"  {self.seconds:.1f} s ({self.images_per_s:.0f} images/s, {self.cpu_seconds:.1f} CPU s)")
        return "\n".join(lines)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def _categories() -> list[dict[str, Any]]:
    return [
        {
            "supercategory": "person",
            "id": PERSON_CATEGORY_ID,
            "name": "person",
            "keypoints": list(KEYPOINT_NAMES),
            "skeleton": [list(pair) for pair in SKELETON],
        }
    ]


def _write_json(path: Path, obj: Any) -> None:
    path.write_bytes(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


Progress = Callable[[str, int, int], None]  # (split, images done, images in split)


def _write_split(
    out: Path,
    split: str,
    count: int,
    seed: int,
    size: tuple[int, int],
    summary: SyntheticSummary,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    """Render one split; returns its detections (val only uses them)."""
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, detections = [], [], []
    persons = crowds = 0
    for index in range(count):
        rng = image_rng(seed, split, index)
        rendered = render_image(rng, size)
        image_id = IMAGE_ID_BASE[split] + index + 1
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(rendered.pixels).save(image_dir / file_name, quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": size[1], "height": size[0]})
        records = [{**p, "iscrowd": 0} for p in rendered.persons]
        records += [{**c, "iscrowd": 1, "keypoints": [0] * 3 * NUM_JOINTS, "num_keypoints": 0} for c in rendered.crowds]
        for n, rec in enumerate(records):
            x, y, bw, bh = rec["bbox"]
            segmentation = rec.get("segmentation", [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]])
            annotations.append(
                {
                    "id": image_id * ANNS_PER_IMAGE + n,
                    "image_id": image_id,
                    "category_id": PERSON_CATEGORY_ID,
                    "iscrowd": rec["iscrowd"],
                    "bbox": rec["bbox"],
                    "area": rec["area"],
                    "segmentation": segmentation,
                    "keypoints": rec["keypoints"],
                    "num_keypoints": rec["num_keypoints"],
                }
            )
        persons += len(rendered.persons)
        crowds += len(rendered.crowds)
        detections += fake_detections(rng, image_id, rendered, size)
        if progress is not None:
            progress(split, index + 1, count)
    dataset = {
        "info": {
            "description": "distilpose synthetic person keypoints (rendered stick figures)",
            "version": "1.0",
            "seed": seed,
            "split": split,
            "image_size": list(size),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(),
    }
    _write_json(out / "annotations" / f"person_keypoints_{split}.json", dataset)
    summary.images[split] = count
    summary.persons[split] = persons
    summary.crowds[split] = crowds
    return detections


def make_synthetic_coco(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    seed: int,
    image_size: tuple[int, int] = (256, 256),
    progress: Progress | None = None,
) -> SyntheticSummary:
    """Write images/{train,val}/*.jpg, annotations/person_keypoints_{train,val}.json and
    annotations/val_detections.json under a local folder. `image_size` is (H, W);
    `progress(split, done, total)` is called after every image."""
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    size = (int(image_size[0]), int(image_size[1]))
    if min(size) < 64:
        raise ValueError(f"image_size must be at least 64 px per side, got {size}")
    summary = SyntheticSummary(out_dir=str(out), seed=seed, image_size=size)
    start, cpu_start = time.perf_counter(), time.process_time()
    _write_split(out, "train", num_train, seed, size, summary, progress)
    detections = _write_split(out, "val", num_val, seed, size, summary, progress)
    _write_json(out / "annotations" / "val_detections.json", detections)
    summary.detections = len(detections)
    summary.seconds = time.perf_counter() - start
    summary.cpu_seconds = time.process_time() - cpu_start
    return summary
