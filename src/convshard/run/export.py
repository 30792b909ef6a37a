"""A checkpoint's model for people who never install convshard: a program file and its spec beside it.

``export(checkpoint, out, fmt)`` rebuilds the plain model (``inference.load``:
eval mode, float32, CPU) and writes

* ``out``, the program. ``fmt`` ``"torch"``: a ``torch.export`` program
  (``torch.export.save``), which plain torch loads with
  ``torch.export.load(out).module()``. ``"onnx"``: an ONNX model (input
  ``images``, output ``logits``), written by ``torch.onnx.export`` when the
  ``onnx`` and ``onnxscript`` packages are installed (``pip install
  'convshard[onnx]'``). Either maps normalised images (N, C, H, W) float32,
  any N >= 1, to logits (N, classes): the same function as ``load_model``.
* ``spec_path(out)`` (``out`` with the suffix ``.json``), what the program
  needs around it, from the checkpoint's ``inference`` record::

      {"format": "torch" or "onnx", "model": ..., "dataset": ...,
       "input_shape": [C, H, W], "class_names": [one per logit, in order],
       "mean": [per channel], "std": [per channel],
       "input": how pixels become the program's input, "output": what it gives}

  A pixel p in [0, 1] enters as (p - mean) / std; mean and std are empty for
  a model trained on synthetic data, which has no pixels.

Both files are written atomically (``convshard.atomic``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from .. import atomic
from ..errors import ConfigError
from . import inference

FORMATS: tuple[str, ...] = ("torch", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export needs; the optional extra "onnx"


def spec_path(out: str | os.PathLike) -> Path:
    """Where the spec of the program at ``out`` goes: ``out`` with the suffix ``.json``."""
    return Path(out).with_suffix(".json")


def spec_record(info: inference.ModelSpec, fmt: str) -> dict:
    """The spec file's contents (the module docstring) for a program of ``info``'s model in ``fmt``."""
    c, h, w = info.input_shape
    pixels = (f"pixels p in [0, 1] (an image scaled so that its shorter side is {h} and centre-cropped), each "
              f"channel as (p - mean) / std" if info.mean else f"as the {info.dataset} data it was trained on, "
              f"which has no pixels")
    return {"format": fmt, "model": info.model, "dataset": info.dataset, "input_shape": [c, h, w],
            "class_names": list(info.class_names), "mean": list(info.mean), "std": list(info.std),
            "input": f"(N, {c}, {h}, {w}) float32: {pixels}",
            "output": f"(N, {len(info.class_names)}) logits: softmax over dim 1 gives the class probabilities, "
                      f"in the order of class_names"}


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "torch") -> tuple[Path, Path]:
    """Write the program of the checkpoint's model to ``out`` and its spec
    beside it (the module docstring); returns both paths."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None] if fmt == "onnx" else []
    if missing:
        raise ConfigError(f"--format onnx needs the {missing[0]} package: pip install 'convshard[onnx]'")
    if out.suffix == ".json":
        raise ConfigError(f"--out {out} ends in .json, the name of the spec written beside the program")
    model, info = inference.load(checkpoint)
    program = _trace(model, torch.zeros(2, *info.input_shape), fmt, info.model)  # example (N, C, H, W)
    try:
        with atomic.atomic_writer(out) as f:
            if fmt == "torch":
                torch.export.save(program, f)
            else:
                import onnx  # present: checked above

                onnx.save_model(program.model_proto, f)
        atomic.write_text(spec_path(out), json.dumps(spec_record(info, fmt), indent=2) + "\n")
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and Path(exc.filename) != out else ""
        raise ConfigError(f"cannot write --out {out}: {exc.strerror or exc}{where}") from None
    return out, spec_path(out)


def _trace(model: nn.Module, example: torch.Tensor, fmt: str, name: str):
    """``model`` traced on ``example`` with a free batch dimension N >= 1: a
    ``torch.export.ExportedProgram`` (fmt "torch") or a ``torch.onnx.ONNXProgram``."""
    batch = torch.export.Dim("batch", min=1)
    try:
        if fmt == "torch":
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        return torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                 input_names=["images"], output_names=["logits"])
    except Exception as exc:  # tracing fails in many ways on a user's model; say which in one line
        raise ConfigError(f"cannot export --model {name} as {fmt}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None
