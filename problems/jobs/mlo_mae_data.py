"""The MLO-MAE main job's data: which preset runs, and its train/test tensors.

CIFAR-10 is read from ``--data-dir`` (else the first of :data:`DEFAULT_DATA_DIRS` holding
it) and downloaded when absent and the machine is online (or with ``--download``);
without it, and with neither ``--data-dir`` nor ``--data cifar10`` given, the job falls
back to the ``cpu`` preset (scikit-learn digits) with one line saying so.
Fashion-MNIST and MNIST are IDX files (:func:`problems.datasets.load_mnist_like`).
"""
from __future__ import annotations

import argparse
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from problems.datasets import (CIFAR_RESOURCES, IDX_RESOURCES, IDXFormatError, find_mnist_like, load_cifar,
                               load_digits, load_mnist_like, search_places)
from problems.jobs.common import UsageError, one_line
from problems.mlo_mae import MLOMAESettings
from problems.jobs.mlo_mae_options import DEFAULT_DATA_DIRS, IDX_DATA, IDX_PRESET, PRESETS, read_preset

__all__ = ["Data", "cifar_root", "has_cifar", "online", "choose_preset", "load_idx", "load_data", "check_data"]

Data = Tuple[Tensor, Tensor]


def cifar_root(args: argparse.Namespace) -> Path:
    """``--data-dir``, else the first default directory holding CIFAR-10 (else ``~/data``)."""
    if args.data_dir is not None:
        return Path(args.data_dir).expanduser()
    roots = [Path(d).expanduser() for d in DEFAULT_DATA_DIRS]
    return next((r for r in roots if has_cifar(r)), roots[0])


def has_cifar(root: Path) -> bool:
    """Whether ``root`` holds every file of CIFAR-10 (python version)."""
    res = CIFAR_RESOURCES["cifar10"]
    return all((root / res["dir"] / f).is_file() for f in res["train"] + res["test"] + [res["meta"]])


def online(host: str = "www.cs.toronto.edu", timeout: float = 3.0, port: int = 443) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def choose_preset(args: argparse.Namespace) -> Dict[str, Any]:
    """``--preset-file``, ``--preset``, or the default: ``fmnist`` for ``--data
    fashion-mnist/mnist``, ``cpu`` for other non-CIFAR data, else ``paper`` when CUDA is
    available and CIFAR-10 is on disk, else ``cpu`` (printing why)."""
    if args.preset_file is not None:
        return read_preset(args.preset_file)
    name = args.preset
    if name is None and args.data in IDX_DATA and IDX_PRESET.is_file():
        return read_preset(IDX_PRESET)
    if name is None and args.data not in (None, "cifar10"):
        name = "cpu"
    if name is None:
        gpu, cifar = torch.cuda.is_available(), has_cifar(cifar_root(args))
        name = "paper" if gpu and cifar else "cpu"
        if name == "cpu":
            why = ", ".join(w for w, missing in (("no GPU", not gpu),
                                                 (f"no CIFAR-10 in {cifar_root(args)}", not cifar)) if missing)
            print(f"[mlo_mae] {why}: running the cpu preset (scikit-learn digits, small ViT); "
                  f"--preset paper runs the paper's ViT-B/2 on CIFAR-10", flush=True)
    return read_preset(PRESETS[name])


def load_idx(name: str, args: argparse.Namespace) -> Tuple[Data, Data]:
    """Fashion-MNIST or MNIST: the IDX files in ``--data-dir`` (else the first default
    directory holding them), then in /usr/share/datasets/<name>; else downloaded with
    ``--download``, or when online and no ``--data-dir`` was given."""
    dirs = [args.data_dir] if args.data_dir is not None else list(DEFAULT_DATA_DIRS)
    roots = [str(Path(d).expanduser()) for d in dirs]
    root = next((r for r in roots if find_mnist_like(name, r, system_dirs=())), roots[0])
    mirror = IDX_RESOURCES[name]["mirror"]
    url = urllib.parse.urlsplit(mirror)
    port = url.port or (443 if url.scheme == "https" else 80)
    download = find_mnist_like(name, root) is None and (
        args.download or (args.data_dir is None and online(url.hostname, port=port)))
    if download:
        print(f"[mlo_mae] downloading {name} from {mirror} into {search_places(name, root)[1]}", flush=True)
    try:
        d = load_mnist_like(name, root, download=download)
    except FileNotFoundError as e:
        places = search_places(name, root)
        failed = f"; the download from {mirror} failed ({one_line(e.__cause__ or e, 120)})" if download else ""
        hint = ["install it with `apt-get install dataset-fashion-mnist`"] if name == "fashion-mnist" else []
        if not download:
            hint.append(f"pass --download to fetch it from {mirror} into {places[1]}")
        raise UsageError(f"no {name} IDX files in {', '.join(places)}{failed}"
                         + (f"; {', or '.join(hint)}" if hint else "")) from None
    except (IDXFormatError, ValueError, OSError) as e:   # corrupt files, MD5 mismatch, unreadable
        raise UsageError(f"cannot read {name}: {one_line(e)}") from None
    print(f"[mlo_mae] {name} read from {d.root}", flush=True)
    return d.train, d.test


def load_data(preset: Dict[str, Any], args: argparse.Namespace) -> Tuple[Dict[str, Any], Data, Data]:
    """``(preset, train, test)``, ``--data`` replacing the preset's data; the preset becomes
    ``cpu`` when CIFAR-10 is unavailable and neither ``--data-dir`` nor ``--data cifar10`` was
    given (then it is an error, as missing Fashion-MNIST/MNIST always is)."""
    if args.data is not None and args.data != preset["data"]:
        preset = {**preset, "data": args.data}
    if preset["data"] == "digits":
        d = load_digits(seed=0, fractions=(0.8, 0.0, 0.2))
        return preset, d.train.tensors, d.test.tensors
    if preset["data"] in IDX_DATA:
        return (preset, *load_idx(preset["data"], args))
    root = cifar_root(args)
    download = not has_cifar(root) and (args.download or (args.data_dir is None and online()))
    try:
        cifar = load_cifar(str(root), "cifar10", download=download)
    except FileNotFoundError as e:
        if args.data_dir is not None or args.data is not None:
            raise UsageError(f"no CIFAR-10 in {'--data-dir ' if args.data_dir else ''}{root} ({one_line(e, 200)}); "
                             f"pass --download to fetch it, or use --preset cpu") from None
        why = "download failed" if download else "offline"
        print(f"[mlo_mae] CIFAR-10 not found in {root} ({why}): running the cpu preset on "
              f"scikit-learn digits instead", flush=True)
        return load_data(read_preset(PRESETS["cpu"]), args)
    except Exception as e:  # corrupt or foreign files, MD5 mismatch
        raise UsageError(f"cannot read CIFAR-10 in {root}: {one_line(e)}") from None
    return preset, cifar.tensors("train"), cifar.tensors("test")


def check_data(settings: MLOMAESettings, data: str, train: Data, test: Data) -> None:
    """Raises :class:`UsageError` before anything is built when the ``data`` set's tensors do
    not fit the settings: images not ``[N, in_chans, image_size, image_size]``, labels
    beyond ``num_classes`` (the head would index past its logits mid-training), or an
    empty split."""
    want = (settings.in_chans, settings.image_size, settings.image_size)
    for split, (x, _) in (("train", train), ("test", test)):
        if len(x) == 0:
            raise UsageError(f"the {data} {split} split has no images")
        if tuple(x.shape[1:]) != want:
            got, said = "x".join(map(str, x.shape[1:])), "x".join(map(str, want))
            raise UsageError(f"the {data} images are {got} but the settings say {said} (in_chans x image_size "
                             f"x image_size); set in_chans and image_size to match (e.g. --set "
                             f"in_chans={x.shape[1]} --set image_size={x.shape[-1]})")
    classes = int(max(int(train[1].max()), int(test[1].max()))) + 1
    if settings.num_classes < classes:
        raise UsageError(f"num_classes is {settings.num_classes} but the {data} labels run 0..{classes - 1} "
                         f"({classes} classes); set num_classes to at least {classes}")
