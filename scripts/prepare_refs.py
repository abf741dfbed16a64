"""Build the FID reference folder: the COCO-30k images, centre-cropped to a square and resized (SPEC §5).

    python scripts/prepare_refs.py                       # defaults under $SKRR_DATA (or ./data)
    python scripts/prepare_refs.py --captions .../captions_val2014.json --images .../val2014 \
        --out .../val2014_coco30k_512 --n 30000 --seed 0 --size 512

The images are exactly those whose captions eval.prompts draws for COCO-30k (same n and seed), so the
references and the prompts match one-to-one. Choice (the paper says only "resized to 512"): centre crop to a
square, then PIL bicubic resize, saved as PNG ``<image_id:012d>.png``; ``--crop none`` squashes instead.
Existing files are kept, so an interrupted run resumes. FID then uses ``eval.fid.ref_dir=<out>``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from eval import MissingAssetError  # noqa: E402
from eval.prompts import load_coco_captions  # noqa: E402

log = logging.getLogger("prepare_refs")


def square_resize(image: Image.Image, size: int, crop: str = "center") -> Image.Image:
    """Centre-crop to a square (``crop="center"``) or not (``"none"``), then bicubic-resize to ``size`` x ``size``."""
    image = image.convert("RGB")
    if crop == "center":
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    return image.resize((size, size), Image.BICUBIC)


def _one(job: tuple[str, str, int, str]) -> None:
    src, dst, size, crop = job
    tmp = f"{dst}.{os.getpid()}.tmp"
    with Image.open(src) as im:
        square_resize(im, size, crop).save(tmp, format="PNG")
    os.replace(tmp, dst)  # a present file is always whole


def prepare_refs(captions: Path, images: Path, out: Path, n: int = 30_000, seed: int = 0, size: int = 512,
                 crop: str = "center", workers: int = 4) -> int:
    """Write the missing reference images; returns how many were written."""
    if not images.is_dir():
        raise MissingAssetError(f"COCO val2014 image folder {images} not found; download val2014.zip from "
                                f"https://cocodataset.org/#download and pass --images")
    ps = load_coco_captions(captions, n=n, seed=seed, key="--captions")
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for meta in ps.metadata:
        src = images / meta["file_name"]
        if not src.is_file():
            raise MissingAssetError(f"COCO image {src} not found; "
                                    f"pass the folder that holds val2014's jpgs as --images")
        dst = out / f"{meta['image_id']:012d}.png"
        if not dst.is_file():
            jobs.append((str(src), str(dst), size, crop))
    log.info("%d of %d reference images to write into %s", len(jobs), len(ps), out)
    if workers <= 1:
        for job in tqdm(jobs, unit="img"):
            _one(job)
    else:  # decoding 30k JPEGs is CPU-bound: spread it over processes
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in tqdm(pool.map(_one, jobs, chunksize=32), total=len(jobs), unit="img"):
                pass
    return len(jobs)


def main(argv: list[str] | None = None) -> None:
    data = Path(os.environ.get("SKRR_DATA", Path(__file__).resolve().parents[1] / "data"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=Path, default=data / "coco/annotations/captions_val2014.json")
    p.add_argument("--images", type=Path, default=data / "coco/val2014")
    p.add_argument("--out", type=Path, default=data / "coco/val2014_coco30k_512")
    p.add_argument("--n", type=int, default=30_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--crop", choices=["center", "none"], default="center")
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prepare_refs(args.captions, args.images, args.out, args.n, args.seed, args.size, args.crop, args.workers)
    except MissingAssetError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
