"""Benchmark: gzip inflaters on a betas-like stream, against the standard library's.

Writes one gzip file of int16 betas-like data (about 300 MB uncompressed: N(0, 1.5) percent signal
change x 300 in half of the values, zeros in the rest, as an NSD session's brain and background;
stdlib gzip at ``--level``, 6 by default) and decompresses it whole with each inflater installed,
the file objects read in blocks of 65 MB (as :func:`havir.nsd.betas.read_masked_betas` did before
it streamed one ``decompressobj`` pass itself, which the ``decompressobj`` rows time). Every inflater's output
must hash to the same SHA-256 as the standard library's, else the benchmark fails.

    python bench/bench_inflate.py [--megabytes 300] [--level 6] [--repeats 3] [--out FILE.json]
    python bench/bench_inflate.py --file bench/work/.../betas_session01.nii.gz   # a given file

Inflaters: ``gzip`` (the standard library, zlib), ``isal.igzip`` (python-isal, Intel ISA-L),
``zlib_ng.gzip_ng`` (zlib-ng), ``indexed_gzip`` (zlib with a seek index: what nibabel's own
opener returns when it is installed), and as the floor of each library a bare
``decompressobj`` pass over the file (no file object, no buffering). Warm page cache, one thread.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import importlib
import socket
import sys
import time
import zlib
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from _results import write_result  # noqa: E402

from havir.io import package_versions  # noqa: E402

MIB = 1024**2
#: Bytes read per call of a file object: 50 trial volumes of a (81, 104, 83) int16 grid.
READ_BYTES = 50 * 81 * 104 * 83 * 2
SEED = 0


def betas_like(n_bytes: int) -> np.ndarray:
    """int16 values compressing like an NSD session: half zeros, half N(0, 1.5) x 300, in runs
    of one 81-voxel row, as a brain's voxels alternate with background along X."""
    rng = np.random.default_rng(SEED)
    values = np.clip(np.rint(rng.normal(0.0, 1.5 * 300, size=n_bytes // 2)), -32768, 32767).astype(np.int16)
    rows = values.reshape(-1, 81) if values.size % 81 == 0 else values[: values.size // 81 * 81].reshape(-1, 81)
    rows[rng.random(len(rows)) < 0.5] = 0
    return rows.ravel()


def ensure_file(path: Path, megabytes: int, level: int) -> None:
    if path.exists():
        return
    print(f"writing {path} ({megabytes} MB, gzip level {level}) ...", flush=True)
    temporary = path.with_suffix(".tmp")
    with gzip.open(temporary, "wb", compresslevel=level) as stream:
        stream.write(betas_like(megabytes * 10**6).tobytes())
    temporary.rename(path)


def _read_all(opener, path: Path, digest) -> int:
    n_out = 0
    with opener(path) as stream:
        while block := stream.read(READ_BYTES):
            digest.update(block)
            n_out += len(block)
    return n_out


def _decompressobj_pass(module, path: Path, digest) -> int:
    n_out = 0
    decompressor = module.decompressobj(wbits=16 + 15)
    with open(path, "rb", buffering=0) as stream:
        while piece := stream.read(MIB):
            out = decompressor.decompress(piece)
            digest.update(out)
            n_out += len(out)
    out = decompressor.flush()
    digest.update(out)
    return n_out + len(out)


class _Discard:
    """A digest that digests nothing: the timed passes measure inflating, not hashing."""

    def update(self, _data: bytes) -> None:
        pass


def installed_distributions(*names: str) -> list[str]:
    """Those of ``names`` installed here (the optional inflaters)."""
    from importlib import metadata

    installed = []
    for name in names:
        try:
            metadata.version(name)
            installed.append(name)
        except metadata.PackageNotFoundError:
            pass
    return installed


def inflaters() -> dict[str, object]:
    """name -> function(path, digest) -> bytes out (fed to ``digest``), for every inflater
    importable here."""
    found = {
        "gzip (stdlib zlib)": lambda path, digest: _read_all(lambda p: gzip.open(p, "rb"), path, digest),
        "zlib decompressobj": lambda path, digest: _decompressobj_pass(zlib, path, digest),
    }
    optional = {
        "isal.igzip": ("isal.igzip", lambda m: lambda path, digest: _read_all(lambda p: m.open(p, "rb"), path, digest)),
        "isal_zlib decompressobj": ("isal.isal_zlib", lambda m: lambda path, digest: _decompressobj_pass(m, path, digest)),
        "zlib_ng.gzip_ng": ("zlib_ng.gzip_ng", lambda m: lambda path, digest: _read_all(lambda p: m.open(p, "rb"), path, digest)),
        "zlib_ng decompressobj": ("zlib_ng.zlib_ng", lambda m: lambda path, digest: _decompressobj_pass(m, path, digest)),
        "indexed_gzip": (
            "indexed_gzip",
            lambda m: lambda path, digest: _read_all(lambda p: m.IndexedGzipFile(str(p)), path, digest),
        ),
    }
    for name, (module_name, make) in optional.items():
        try:
            found[name] = make(importlib.import_module(module_name))
        except ImportError:
            print(f"{name}: not installed, skipped")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=300, help="uncompressed size in MB (default 300)")
    parser.add_argument("--level", type=int, default=6, help="gzip level the file is written at (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per inflater (default 3)")
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="where the gzip file is cached")
    parser.add_argument("--file", type=Path, default=None, help="time this gzip file instead (e.g. a session's .nii.gz)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/inflate-<host>-<date>.json)")
    args = parser.parse_args(argv)
    if args.file is None:
        args.work.mkdir(parents=True, exist_ok=True)
        path = args.work / f"betas-like-{args.megabytes}MB-level{args.level}-seed{SEED}.gz"
        ensure_file(path, args.megabytes, args.level)
    else:
        path = args.file
    path.read_bytes()  # warm the page cache

    figures, reference = {}, None
    for name, inflate in inflaters().items():
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            n_out = inflate(path, _Discard())
            seconds.append(time.perf_counter() - start)
        sha256 = hashlib.sha256()
        inflate(path, sha256)  # untimed: the bytes out, checked
        digest = sha256.hexdigest()
        reference = reference or digest  # the standard library's, which runs first
        if digest != reference:
            raise AssertionError(f"{name} decompressed to other bytes than the standard library (sha256 {digest} != {reference})")
        best = min(seconds)
        figures[name] = {"seconds": seconds, "seconds_best": best, "uncompressed_mib_per_s": n_out / MIB / best}
        print(f"{name:26s} {best:6.3f} s  {n_out / MIB / best:7.1f} MiB/s out", flush=True)
    baseline = figures["gzip (stdlib zlib)"]["seconds_best"]
    for entry in figures.values():
        entry["speedup_over_stdlib"] = baseline / entry["seconds_best"]

    result = {
        "benchmark": "inflate: gzip decompression of a betas-like int16 stream",
        "versions": package_versions("numpy", "nibabel", *installed_distributions("isal", "zlib-ng", "indexed_gzip"))
        | {"zlib": zlib.ZLIB_RUNTIME_VERSION},
        "settings": {
            "uncompressed_bytes": n_out,
            "compressed_bytes": path.stat().st_size,
            "file": str(path) if args.file else "betas-like (generated)",
            "gzip_level": args.level if args.file is None else "as written",
            "read_bytes_per_call": READ_BYTES,
            "repeats": args.repeats,
            "page_cache": "warm",
            "identical_output": "every inflater's sha256 equals the standard library's (checked)",
            "sha256": reference,
        },
        "inflaters": figures,
    }
    out = args.out or BENCH_DIR / "results" / f"inflate-{socket.gethostname()}-{datetime.date.today().isoformat()}.json"
    write_result(out, result)


if __name__ == "__main__":
    main()
