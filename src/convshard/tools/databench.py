"""``convshard bench --sweeps data``: does the data keep up, and does memory stay flat?

Generates JPEG image folders (10 classes; nothing is downloaded) of N and
4N training images (``paper``: 5,000 and 20,000 of 256x256), and trains on
each, ``--model`` under ``--strategy auto`` on two single-core workers with
``--augment resized-crop,flip`` at ``--image-size`` 64 (the built-in
ResNets are CIFAR-form, without the stem's downsampling: at 224 a step
of ResNet-18 takes tens of seconds on two cores), then the same job on the N images decoded
beforehand and held in memory as uint8 tensors (``preloaded``, a
``--dataset package.module:function``; its loader reads by indexing).
Each job reports:

- ``peak_rss_mib``: the largest worker's peak resident memory: the N and
  4N jobs should differ by under 10% (nothing grows with the dataset);
- ``wait_share``: rank 0's wait for its batch over its step time;
- ``images_per_second`` and its ratio to the preloaded job;
- ``decoded_per_image``: training images decoded on the host per training
  image (1.0: once per host).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

log = logging.getLogger(__name__)

SIZES = {  # images of the N folder, their side on disk, the side trained at, batch, steps
    "paper": {"images": 5000, "side": 256, "image_size": 64, "batch": 32, "steps": 200},
    "smoke": {"images": 100, "side": 48, "image_size": 32, "batch": 8, "steps": 6},
}
CLASSES = 10
FOLDER_ENV = "CONVSHARD_PRELOADED_FOLDER"  # the folder ``preloaded`` reads
PRELOADED_SIZE_ENV = "CONVSHARD_PRELOADED_SIZE"


def make_folder(root: Path, images: int, side: int, *, seed: int = 0) -> Path:
    """``root/train/<class>/<i>.jpg`` (``images`` of them, ``side`` pixels square, 10
    classes told apart by their mean colour) and a tenth as many in ``root/val``;
    kept when already complete."""
    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", max(CLASSES, images // 10))):
        for i in range(n):
            label = i % CLASSES
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([25 * label, 255 - 25 * label, 120])
            noise = rng.integers(-60, 61, (side // 8, side // 8, 3))
            pixels = np.clip(colour + np.kron(noise, np.ones((8, 8, 1))), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    done.touch()
    return root


class Preloaded(torch.utils.data.Dataset):
    """A folder's images decoded once, centre-cropped to ``size``, held as (N, 3, size, size) uint8."""

    def __init__(self, root: Path, split: str, size: int) -> None:
        from .. import folder

        listed = folder.load(root, size, 0.2, normalisation=((0.5,) * 3, (0.25,) * 3))
        images = listed.train if split == "train" else listed.test
        self.classes = listed.class_names
        self.images = torch.stack([images.read(i) for i in range(len(images))])
        self.targets = images.labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.targets[i]


def preloaded(split: str) -> Preloaded:
    """``--dataset convshard.tools.databench:preloaded``: the folder named by $CONVSHARD_PRELOADED_FOLDER."""
    return Preloaded(Path(os.environ[FOLDER_ENV]), split, int(os.environ[PRELOADED_SIZE_ENV]))


def _train(args: list[str], out: Path, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "convshard", "train", *args, "--metrics-out", str(out)]
    proc = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"data bench job failed: {proc.stderr.strip().splitlines()[-1:]}")
    metrics = json.loads(out.read_text())
    return {"command": "convshard train " + " ".join(args), "ms": 1000 * metrics["mean_step_seconds"],
            "images_per_second": metrics["images_per_second"],
            "peak_rss_mib": max(metrics["timeline"]["peak_rss_mib"]), "wait_share": metrics["data"]["wait_share"],
            "decoded_per_image": metrics["data"]["decoded_per_image"], "strategy": metrics["strategy"]}


def data_sweep(out_dir: Path, size: str, model: list[str], cores: list[int], precisions: tuple[str, ...],
               steps: int | None) -> list[dict]:
    """The data sweep's jobs (module docstring); one point per job."""
    chosen = SIZES[size]
    steps = steps or chosen["steps"]
    spec = ",".join(f"cpu@{c}" for c in cores[:2])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*model, "--strategy", "auto", "--devices", spec, "--threads", "1", "--batch-size",
              str(chosen["batch"]), "--max-steps", str(steps), "--epochs", "1000", "--quiet",
              "--image-size", str(chosen["image_size"]), "--augment", "resized-crop,flip",
              "--precision", precisions[-1]]
    points = []
    for scale in (1, 4):
        n = chosen["images"] * scale
        root = make_folder(out_dir / f"images-{n}", n, chosen["side"])
        log.info("data sweep: %d JPEGs in %s", n, root)
        job = _train(["--dataset", "folder", "--data-dir", str(root), *common], out_dir / f"data-{n}.json", env)
        points.append({"x": f"folder of {n}", "job": job})
        log.info("%8.1f ms/step  %s", job["ms"], job["command"])
    root = out_dir / f"images-{chosen['images']}"
    job = _train(["--dataset", f"{__name__}:preloaded", "--workers", "0", *common], out_dir / "data-preloaded.json",
                 {**env, FOLDER_ENV: str(root), PRELOADED_SIZE_ENV: str(chosen["image_size"])})
    log.info("%8.1f ms/step  %s (preloaded)", job["ms"], job["command"])
    points.append({"x": f"preloaded {chosen['images']}", "job": job})
    small, large, held = (p["job"] for p in points)
    points.append({"x": "summary", "rss_4n_over_n": large["peak_rss_mib"] / small["peak_rss_mib"],
                   "streamed_over_preloaded": small["images_per_second"] / held["images_per_second"]})
    return points


def markdown(points: list[dict]) -> list[str]:
    """The data sweep as a table, with its commands."""
    lines = ["| data | ms/step | images/s | data wait, share of step | peak MiB per worker | decoded per image |",
             "| --- | --- | --- | --- | --- | --- |"]
    jobs = [p for p in points if "job" in p]
    for p in jobs:
        j = p["job"]
        wait = f"{100 * j['wait_share']:.1f}%" if j["wait_share"] is not None else "-"
        decoded = ", ".join(f"{v:.2f}" for v in j["decoded_per_image"].values())
        lines.append(f"| {p['x']} | {j['ms']:.0f} | {j['images_per_second']:.1f} | {wait} | "
                     f"{j['peak_rss_mib']:.0f} | {decoded} |")
    summary = next(p for p in points if p["x"] == "summary")
    lines += ["", f"Peak memory 4N / N: {summary['rss_4n_over_n']:.3f}; images/s streamed / preloaded: "
              f"{summary['streamed_over_preloaded']:.3f}.", "", "Commands:", "", "```sh",
              *(p["job"]["command"] for p in jobs), "```", ""]
    return lines
