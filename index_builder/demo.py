"""A synthetic demo catalogue (drawn objects with titles and prices), so the quick start needs no data."""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from index_builder.catalogue import COLUMNS

# Each family: a look (shape, palette) and a price level; items of a family look alike and sell alike.
FAMILIES = [
    ("Ceramics", "vase", "circle", (200, 60, 40), 120.0),
    ("Glassware", "decanter", "triangle", (40, 140, 200), 65.0),
    ("Furniture", "side table", "square", (120, 80, 30), 340.0),
    ("Jewelry", "brooch", "star", (220, 190, 40), 210.0),
    ("Lighting", "lamp", "ring", (60, 160, 80), 90.0),
    ("Art", "framed print", "stripes", (110, 50, 150), 480.0),
    ("Silver", "tray", "hexagon", (150, 150, 160), 150.0),
    ("Textiles", "quilt", "checker", (30, 60, 140), 75.0),
]
QUERY_ANGLE = 60  # the extra view of each item, kept out of the catalogue, for --eval


def _polygon(cx: float, cy: float, r: float, sides: int, rot: float, star: bool = False) -> list[tuple]:
    pts = []
    for i in range(sides * (2 if star else 1)):
        rr = r * (0.45 if star and i % 2 else 1.0)
        a = rot + 2 * math.pi * i / (sides * (2 if star else 1))
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_object(family: int, variant: int, angle: float, size: int = 160, seed: int = 0) -> Image.Image:
    """One photo of item (family, variant) seen at `angle` degrees, on a light textured backdrop."""
    rnd = random.Random(seed)
    _, _, shape, colour, _ = FAMILIES[family]
    bg = tuple(min(255, 225 + rnd.randint(0, 25)) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    accent = tuple((c + 70 * (variant + 1)) % 256 for c in reversed(colour))
    cx, cy = size / 2 + rnd.uniform(-8, 8), size / 2 + rnd.uniform(-8, 8)
    r = size * rnd.uniform(0.30, 0.36)
    rot = math.radians(angle)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        d.ellipse([cx - r / 2 + r / 3 * math.cos(rot), cy - r / 2, cx + r / 2 + r / 3 * math.cos(rot), cy + r / 2],
                  fill=accent)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=int(r / 3))
        d.ellipse([cx - r / 4, cy - r / 4, cx + r / 4, cy + r / 4], fill=accent)
    elif shape in ("triangle", "square", "hexagon", "star"):
        sides = {"triangle": 3, "square": 4, "hexagon": 6, "star": 5}[shape]
        d.polygon(_polygon(cx, cy, r, sides, rot, star=shape == "star"), fill=colour)
        d.polygon(_polygon(cx, cy, r * 0.4, sides, -rot), fill=accent)
    elif shape == "stripes":
        for i in range(6):
            x0 = cx - r + i * r / 3
            d.rectangle([x0, cy - r, x0 + r / 6, cy + r], fill=colour if i % 2 else accent)
    else:  # checker
        step = r / 2
        for i in range(4):
            for j in range(4):
                fill = colour if (i + j) % 2 else accent
                d.rectangle([cx - r + i * step, cy - r + j * step, cx - r + (i + 1) * step, cy - r + (j + 1) * step],
                            fill=fill)
    img = img.rotate(angle * 0.25, resample=Image.Resampling.BILINEAR, fillcolor=bg)
    return img.filter(ImageFilter.GaussianBlur(0.6))


def make_demo_catalogue(folder: Path, items_per_family: int = 6, views: tuple[int, ...] = (0, 120, 240),
                        seed: int = 0) -> Path:
    """Write photos, catalogue.csv and queries.csv (one unseen view per item) into `folder`."""
    folder = Path(folder)
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    rows, queries = [], []
    for family, (category, noun, _, _, base_price) in enumerate(FAMILIES):
        for variant in range(items_per_family):
            item_id = f"item-{family:02d}{variant:02d}"
            price = round(base_price * rnd.uniform(0.85, 1.15), 2)
            sold_at = dt.date(2024, 1, 1) + dt.timedelta(days=rnd.randint(0, 900))
            title = f"{noun.title()} no. {variant + 1} ({category.lower()})"
            for angle in (*views, QUERY_ANGLE):
                name = f"photos/{item_id}-{angle:03d}.png"
                draw_object(family, variant, angle, seed=hash((seed, family, variant, angle)) & 0xFFFF).save(folder / name)
                if angle == QUERY_ANGLE:
                    queries.append({"image_path": name, "item_id": item_id})
                else:
                    rows.append(dict(zip(COLUMNS, (item_id, name, title, category, price, "USD", sold_at))))
    with open(folder / "catalogue.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(folder / "queries.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_path", "item_id"])
        writer.writeheader()
        writer.writerows(queries)
    return folder / "catalogue.csv"
