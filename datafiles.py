"""Data files checked before they are used, and written so that a kill or a parallel writer
never leaves half a file: MNIST's four IDX files and the tensor caches built from the data.

MNIST, in torchvision's layout. `<root>/MNIST/raw/` holds, for each split (train, t10k), either
unpacked or as the official `.gz`:

    <split>-images-idx3-ubyte   header >IIII: magic 2051, n, 28, 28   then n·28·28 uint8 pixels
    <split>-labels-idx1-ubyte   header >II:   magic 2049, n           then n uint8 labels

Every file present is checked (header, size, gzip integrity, image and label counts agree) before
anything is written, and an archive is unpacked through a per-process temp name and os.replace, so a
bad file stops the run with one line naming it and leaves the folder as it was. `download` says when
torchvision's mirrors are used, and only ever for files that are absent:

    auto    only when none of the four is there (a fresh machine); a partial copy is left to the user
    true    whenever one is absent
    false   never

The files present are checked before any download, so a corrupt file stops the run before the
network is reached and is never replaced behind the user's back. A download arrives in a temp
folder and reaches raw/ only whole, so a failed one (no network) leaves raw/ as it was.

Caches (decoded images, latents) are rebuilt when they cannot be read, and written atomically.
"""
import gzip
import http.client
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import torch

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
IMAGES, LABELS, SIDE = 2051, 2049, 28        # IDX magics; MNIST digits are 28x28
DOWNLOAD = ("auto", "true", "false")         # the values of --download (see the module docstring)


# ------------------------------------------------------------------------------------------- MNIST
def load_mnist(raw: Path, train: bool, download: str):
    """-> images uint8 [N, 28, 28], labels int64 [N] of one split, after checking all four files."""
    prepare_mnist(raw, download)
    split = "train" if train else "t10k"
    images = (raw / f"{split}-images-idx3-ubyte").read_bytes()
    labels = (raw / f"{split}-labels-idx1-ubyte").read_bytes()
    n = len(labels) - 8
    images = torch.frombuffer(bytearray(images), dtype=torch.uint8, offset=16).view(n, SIDE, SIDE)
    return images, torch.frombuffer(bytearray(labels), dtype=torch.uint8, offset=8).long()


def prepare_mnist(raw: Path, download: str):
    """Make raw/ hold the four unpacked files, or raise one line that names the file at fault.
    download is one of DOWNLOAD; the files present are checked before any is fetched."""
    absent = [f for f in MNIST_FILES if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]
    packed, counts = {}, {}                                          # name -> unpacked bytes, item count
    for f in MNIST_FILES:
        if f not in absent:
            check_file(raw, f, packed, counts)
    if absent and (download == "false" or (download == "auto" and len(absent) < len(MNIST_FILES))):
        why = ("--download false uses no network" if download == "false" else
               "--download auto fetches only when none of the four is there")
        raise FileNotFoundError(
            f"MNIST {'not found' if len(absent) == len(MNIST_FILES) else 'incomplete'} ({why}): put "
            f"{', '.join(f + '.gz' for f in absent)} (or the files unpacked) into {raw.resolve()}/, "
            f"or pass --download true to fetch them (11.6 MB for all four), or point --data-root / "
            f"FAIRDIFF_DATA at a folder that has MNIST/raw/")
    if absent:
        fetch(raw, absent)
        for f in absent:
            check_file(raw, f, packed, counts)
    for images, labels in (MNIST_FILES[:2], MNIST_FILES[2:]):
        if counts[images] != counts[labels]:
            raise ValueError(f"MNIST in {raw}: {images} holds {counts[images]} images but {labels} "
                             f"{counts[labels]} labels, so they come from different copies; copy both again")
    for f, blob in packed.items():
        write_atomic(raw / f, lambda tmp: tmp.write_bytes(blob))


def check_file(raw: Path, f: str, packed: dict, counts: dict):
    """Check raw/f, or raw/f.gz when f is not unpacked (its bytes go to packed[f]); counts[f] = its items."""
    if (raw / f).exists():
        with open(raw / f, "rb") as fh:
            counts[f] = check_header(raw / f, fh.read(16), (raw / f).stat().st_size)
    else:
        packed[f] = unzip(raw / f"{f}.gz")
        counts[f] = check_header(raw / f"{f}.gz", packed[f][:16], len(packed[f]))


def check_header(path: Path, head: bytes, size: int) -> int:
    """The item count of an IDX file, after checking its magic, its 28x28 shape and its size."""
    images = "images" in path.name
    magic, length, item = (IMAGES, 16, SIDE * SIDE) if images else (LABELS, 8, 1)
    again = " (the .gz next to it is unpacked again)" if path.with_name(path.name + ".gz").exists() else ""
    fix = f"delete it{again} and pass --download true, or copy it again"
    if size < length:
        raise ValueError(f"{path} is {size} bytes, shorter than an IDX header; {fix}")
    fields = struct.unpack(">IIII" if images else ">II", head[:length])
    if fields[0] != magic:
        raise ValueError(f"{path} starts with magic {fields[0]}, not {magic} (MNIST "
                         f"{'images' if images else 'labels'}); {fix}")
    if images and fields[2:] != (SIDE, SIDE):
        raise ValueError(f"{path} holds {fields[2]}x{fields[3]} images, not MNIST's 28x28; {fix}")
    n = fields[1]
    if size != length + n * item:
        raise ValueError(f"{path} has {size - length} bytes after its header, which promises {n} "
                         f"{'images of 28x28' if images else 'labels'} ({n * item} bytes), so it is "
                         f"{'truncated' if size < length + n * item else 'not an MNIST file'}; {fix}")
    return n


def unzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:        # truncated, not gzip, or a failed CRC
        raise ValueError(f"{path} is not a complete gzip archive ({' '.join(str(e).split())}); "
                         f"delete it and pass --download true, or copy it again") from None


def fetch(raw: Path, names):
    """Download the official archives of `names` with torchvision (its mirrors, checked against its
    MD5s) into raw/. They arrive in a temp folder first and reach raw/ only when all have arrived,
    so a failed download (no network, a cut connection, a wrong MD5) leaves raw/ as it was and
    raises one line naming the folder and the four files to put there by hand."""
    from torchvision.datasets import MNIST, utils
    print(f"MNIST: downloading {', '.join(n + '.gz' for n in names)} into {raw.resolve()}/")
    md5 = dict(MNIST.resources)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            errors = []
            for mirror in MNIST.mirrors:
                try:
                    utils.download_url(mirror + name + ".gz", tmp, md5=md5[name + ".gz"])
                    break
                # URLError (no network) is an OSError, a connection cut mid-file an HTTPException,
                # a wrong MD5 a RuntimeError
                except (OSError, http.client.HTTPException, RuntimeError) as e:
                    errors.append(f"{mirror}: {' '.join(str(e).split()) or type(e).__name__}")
            else:
                raise FileNotFoundError(
                    f"could not download MNIST {name}.gz ({'; '.join(errors)}); without a network put "
                    f"{', '.join(f + '.gz' for f in MNIST_FILES)} into {raw.resolve()}/ by hand")
        for name in names:
            blob = (Path(tmp) / f"{name}.gz").read_bytes()
            write_atomic(raw / f"{name}.gz", lambda out: out.write_bytes(blob))


# ------------------------------------------------------------------------------------------ caches
def load_cache(path: Path, valid, map_location="cpu"):
    """What save_cache wrote to path, or None when there is none to use: absent, or unreadable (cut
    off by a full disk or a kill) or not what valid(obj) expects, which is said in one line and
    left for the caller to rebuild."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
        problem = None if valid(obj) else "unexpected contents"
    except Exception as e:  # truncated, not a torch file, unpickling refused
        obj, problem = None, type(e).__name__
    if problem:
        print(f"cache {path} is unreadable ({problem}); rebuilding it", file=sys.stderr)
        return None
    return obj


def save_cache(obj, path: Path):
    """torch.save(obj) to path, atomically (see write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_atomic(path: Path, write):
    """write(tmp) to a per-process temp name next to path, then os.replace: processes writing the
    same file at once never share a half-written one, and a reader never sees half a file. Temp
    files of this path left behind by processes that no longer run (killed mid-write) are removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 1:-len(".tmp")]
        if pid.isdigit() and not _running(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)                 # signal 0: only asks whether the process exists (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:             # it exists, under another user
        pass
    return True
