"""Regenerate the bundled IDRiD sample (``training_backend/project/sample_data/``).

Takes 7 lesion images (the first, by id, that have all four lesion masks) and 3 lesion-free
``IDRiD_NAR_*`` images from the shared 1024 px IDRiD copy, downscales them to 256x256 (images:
Lanczos, JPEG quality 90; masks: nearest neighbour, 1-bit PNG) and writes ``labels.csv`` in the
same schema as the source (``image``, ``MA_mask``, ``HE_mask``, ``EX_mask``, ``SE_mask``) plus
an image-level column ``dr`` = ``lesion`` / ``no lesion``, and the ``NOTICE`` (CC BY 4.0
attribution and the changes made).

Usage (from the repository root):
    .venv/bin/python examples/make_sample_data.py [--src ../shared/data/idrid_1024]
        [--out training_backend/project/sample_data] [--size 256]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("MA", "HE", "EX", "SE")
N_LESION, N_FREE = 7, 3

NOTICE = """\
Bundled sample: 10 colour fundus photographs with lesion masks, derived from IDRiD.

Source: Indian Diabetic Retinopathy Image Dataset (IDRiD), segmentation part.
  Porwal P., Pachade S., Kamble R., Kokare M., Deshmukh G., Sahasrabuddhe V., Meriaudeau F.
  "Indian Diabetic Retinopathy Image Dataset (IDRiD): A Database for Diabetic Retinopathy
  Screening Research." Data 3(3):25 (2018). doi:10.3390/data3030025
  Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
  https://creativecommons.org/licenses/by/4.0/

Modifications (this bundle is a derived work; it is not the official release):
  - taken from a derived copy in which images were cropped, resized to 1024x1024 (aspect ratio
    not kept) and JPEG-compressed, and masks were re-derived as binary PNGs from lossy copies;
  - selected images: {lesion_ids} (lesion set, all four lesion masks);
    {free_ids} (no lesion masks in the source, treated as lesion-free);
  - downscaled to {size}x{size}: images with Lanczos filtering, saved as JPEG (quality 90);
    masks with nearest-neighbour sampling, saved as 1-bit PNG (microaneurysms, MA, survive only
    as isolated pixels; an empty cell in labels.csv means the lesion is absent);
  - the optic-disc masks were dropped; the column `dr` ("lesion" / "no lesion") was added from
    the presence of any lesion mask.

Regenerate with examples/make_sample_data.py.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/idrid_1024"))
    parser.add_argument("--out", type=Path, default=Path("training_backend/project/sample_data"))
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    with open(args.src / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["image_id"])
    lesion = [r for r in rows if r["source_split"] == "lesion_set"
              and all(r[f"{c}_mask"] for c in CLASSES)][:N_LESION]
    free = [r for r in rows if r["image_id"].startswith("IDRiD_NAR_")][:N_FREE]
    if len(lesion) < N_LESION or len(free) < N_FREE:
        raise SystemExit(f"{args.src}: not enough images to build the sample")
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(parents=True, exist_ok=True)
    size = (args.size, args.size)
    out_rows = []
    for r in lesion + free:
        iid = r["image_id"]
        image = Image.open(args.src / r["image"]).convert("RGB").resize(size, Image.LANCZOS)
        image.save(args.out / "images" / f"{iid}.jpg", quality=90, optimize=True)
        row = {"image_id": iid, "image": f"images/{iid}.jpg"}
        for c in CLASSES:
            row[f"{c}_mask"] = ""
            if r[f"{c}_mask"]:
                mask = np.asarray(Image.open(args.src / r[f"{c}_mask"])).astype(bool)
                small = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)).astype(bool)
                if small.any():
                    name = f"masks/{iid}_{c}.png"
                    Image.fromarray(small).save(args.out / name, optimize=True)
                    row[f"{c}_mask"] = name
        row["dr"] = "lesion" if any(row[f"{c}_mask"] for c in CLASSES) else "no lesion"
        out_rows.append(row)
    fields = ["image_id", "image"] + [f"{c}_mask" for c in CLASSES] + ["dr"]
    with open(args.out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
    (args.out / "NOTICE").write_text(NOTICE.format(
        lesion_ids=", ".join(r["image_id"] for r in lesion),
        free_ids=", ".join(r["image_id"] for r in free), size=args.size), encoding="utf-8")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(out_rows)} cases to {args.out} ({total / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
