"""Where the workdir lives: a local directory, or a prefix on an object store (``s3://bucket/prefix``).

The stages read and write local files (Parquet writers, renames, directory walks), so on an object
store the data refresh computes in a local staging copy of the workdir (``staging_dir``) and the
store holds the committed state. ``Mirror.pull`` brings that state into staging before a run and
``Mirror.push`` publishes each stage's output after it, in an order that keeps every reader's view
whole, because an object store has no rename and the object written last is the commit:

- a dataset's files first, its ``manifest.json`` last (a dataset replaced in place has its old
  manifest deleted first, so readers never pair an old manifest with new shards); nested datasets
  (``rejects/``) before the dataset holding them;
- a persistent index's (dedup, boilerplate) new generation directories before its ``index.json``;
- a published root's ``versions/<v>/`` before its ``LATEST``; the ``.done`` records last.

Readers take only what a manifest, an ``index.json`` or a ``LATEST`` commits: whatever a killed
writer left on the store (shards without a manifest, a generation no ``index.json`` names) is never
pulled. Shards are checked against the manifest's sha256 as they are pulled.

The store is reached through fsspec/s3fs with the standard settings: ``AWS_ENDPOINT_URL`` (MinIO,
moto, any S3-compatible server), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, and fsspec's ``FSSPEC_S3_*`` variables for anything else (e.g.
``FSSPEC_S3_ANON=true``). Connect timeouts and retries are kept short so that an unreachable
endpoint or a missing bucket is one error line naming it within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import fsspec
from fsspec.core import url_to_fs

from tasks import dataset as ds
from tasks.atomic import atomic_path, atomic_write_bytes

# botocore's defaults wait 60 s per connect and retry 5 times; s3fs retries on top of that.
S3_CLIENT_CONFIG = {
    "connect_timeout": 3,
    "read_timeout": 60,
    "retries": {"max_attempts": 2, "mode": "standard"},
}
fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", S3_CLIENT_CONFIG)

DONE_DIR = ".done"  # the done records of tasks.prefect_tasks: pointers, pushed last
INDEX_FILE = "index.json"  # a persistent index's pointer to its generations (tasks.dedup, tasks.boilerplate)
GENERATION_DIRS = ("segments", "generations")  # where each index keeps the generations index.json names


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URL of a remote file system (``s3://...``); a local path or ``file://`` is not."""
    location = str(location)
    return "://" in location and not location.startswith("file://")


def staging_dir(url: str) -> Path:
    """The local directory where work on the remote workdir ``url`` is computed.

    ``$PRETRAIN_STAGING`` (default ``~/.cache/pretrain-factory/staging``), then the URL's protocol and
    path: the same URL always stages in the same place, so a re-run pulls only what changed.
    """
    root = Path(os.environ.get("PRETRAIN_STAGING") or Path.home() / ".cache" / "pretrain-factory" / "staging")
    protocol, _, path = url.partition("://")
    return root / protocol / path.strip("/")


def local_workdir(workdir: str) -> Path:
    """Where the stages read and write: ``workdir`` itself, or the staging copy of a remote one."""
    return staging_dir(workdir) if is_remote(workdir) else Path(workdir).resolve()


def endpoint_of(fs: fsspec.AbstractFileSystem) -> str:
    """The endpoint a file system talks to, for error messages."""
    configured = getattr(fs, "client_kwargs", {}).get("endpoint_url") or getattr(fs, "endpoint_url", None)
    return configured or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


@contextlib.contextmanager
def reaching(url: str, fs: fsspec.AbstractFileSystem) -> Iterator[None]:
    """Turn the store's connection failures into one line naming the endpoint (``ConnectionError``)."""
    from botocore.exceptions import BotoCoreError

    try:
        yield
    except (BotoCoreError, TimeoutError, ConnectionRefusedError) as e:
        raise ConnectionError(
            f"cannot reach the object store at {endpoint_of(fs)} for {url}: {type(e).__name__}: {e}"
        ) from e


def check_bucket(url: str) -> None:
    """Raise one line when the store of ``url`` cannot be reached (ConnectionError) or its bucket does
    not exist (FileNotFoundError)."""
    fs, path = url_to_fs(url)
    bucket = path.split("/", 1)[0]
    with reaching(url, fs):
        try:
            fs.ls(bucket, refresh=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"bucket {bucket!r} of {url} does not exist at {endpoint_of(fs)}") from e


# ---------------------------------------------------------------------------------------------
# What a workdir holds, by role: the same rules for the local staging copy and the store's listing


def _layout(files: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Relative file paths -> (datasets: dir -> its own files, manifest excluded; indexes: dir -> the
    files under its generation dirs; pointers: LATEST files and done records).

    Anything else (temporary names, scratch dirs, files outside any dataset) is not part of the
    committed state and is ignored.
    """
    # a killed writer's temporary files and dirs, scratch (.dedup-work), the lock: all hidden names
    files = {f for f in files if not any(p.startswith(".") and p != DONE_DIR for p in PurePosixPath(f).parts)}
    datasets = {str(PurePosixPath(f).parent): [] for f in files if PurePosixPath(f).name == ds.MANIFEST}
    datasets = {("" if d == "." else d): v for d, v in datasets.items()}
    indexes = {
        str(PurePosixPath(f).parent): []
        for f in files
        if PurePosixPath(f).name == INDEX_FILE and str(PurePosixPath(f).parent) not in datasets
    }
    pointers = []
    for f in sorted(files):
        parts = PurePosixPath(f).parts
        if parts[-2:-1] == (DONE_DIR,) or parts[-1] == ds.LATEST:
            pointers.append(f)
            continue
        owner = _nearest(parts[:-1], datasets)
        if owner is not None and parts[-1] != ds.MANIFEST:
            datasets[owner].append(f)
            continue
        index = _nearest(parts[:-1], indexes)
        if index is not None and parts[len(PurePosixPath(index).parts)] in GENERATION_DIRS:
            indexes[index].append(f)
    # LATEST before the done records
    pointers.sort(key=lambda f: (PurePosixPath(f).name != ds.LATEST, f))
    return datasets, indexes, pointers


def _nearest(dir_parts: tuple[str, ...], dirs: dict[str, list[str]]) -> str | None:
    for end in range(len(dir_parts), -1, -1):
        candidate = "/".join(dir_parts[:end])
        if candidate in dirs:
            return candidate
    return None


def _outermost(dirs: dict[str, list[str]]) -> list[str]:
    """The dirs not inside another one (datasets holding nested ones such as rejects/)."""
    return [d for d in dirs if d == "" or _nearest(PurePosixPath(d).parts[:-1], dirs) is None]


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _deepest_first(dirs: list[str]) -> list[str]:
    return sorted(dirs, key=lambda d: (-len(PurePosixPath(d).parts) if d else 0, d))


def _generation_of(index_dir: str, rel: str) -> str:
    """``segments/<name>`` of a file under an index dir's generation dirs."""
    return "/".join(PurePosixPath(rel).parts[len(PurePosixPath(index_dir).parts) :][:2])


def _generations(index_json: bytes) -> set[str]:
    """The generation dirs an index.json commits, as paths relative to the index dir."""
    index = json.loads(index_json)
    return {f"{kind}/{g['name']}" for kind in GENERATION_DIRS for g in index.get(kind, [])}


# ---------------------------------------------------------------------------------------------
# The mirror


class Mirror:
    """A remote workdir (``url``) and its local staging copy (``local``)."""

    def __init__(self, url: str, local: Path | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local = local or staging_dir(self.url)
        # rel -> (the local file's (size, mtime_ns), the object's ETag) when both held the same bytes
        self._synced: dict[str, tuple[tuple[int, int], str]] = {}
        self._remote: dict[str, str] = {}  # rel -> ETag: what the store holds, as this mirror last saw

    # -- the two sides

    def _list(self) -> dict[str, str]:
        self.fs.invalidate_cache()
        prefix = self.root + "/"
        found = self.fs.find(self.root, withdirs=False, detail=True)
        self._remote = {p[len(prefix) :]: i.get("ETag", "") for p, i in found.items() if p.startswith(prefix)}
        return self._remote

    def _stat(self, rel: str) -> tuple[int, int] | None:
        path = self.local / rel
        if not path.is_file():
            return None
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def _local_unchanged(self, rel: str) -> bool:
        """The local file is still the one last pulled or pushed."""
        synced = self._synced.get(rel)
        return synced is not None and synced[0] == self._stat(rel)

    def _store_unchanged(self, rel: str) -> bool:
        """The store's object is still the one last pulled or pushed."""
        synced = self._synced.get(rel)
        return synced is not None and synced[1] == self._remote.get(rel) and self._local_unchanged(rel)

    def _mark(self, rel: str) -> None:
        self._synced[rel] = (self._stat(rel), self._remote[rel])  # type: ignore[assignment]

    def _download(self, rel: str, sha256: str | None = None) -> None:
        with atomic_path(self.local / rel) as tmp:
            self.fs.get_file(_join(self.root, rel), str(tmp))
            if sha256 is not None and (actual := ds.sha256_file(tmp)) != sha256:
                raise ValueError(
                    f"{self.url}/{rel}: sha256 {actual} is not the manifest's {sha256} "
                    "(the dataset is being replaced on the store; run again)"
                )
        self._mark(rel)

    def _upload(self, rel: str) -> None:
        remote = _join(self.root, rel)
        self.fs.put_file(str(self.local / rel), remote)  # one PUT: the object is whole or absent
        self._remote[rel] = self.fs.info(remote, refresh=True).get("ETag", "")
        self._mark(rel)

    def _remove(self, rels: list[str]) -> None:
        if rels:
            self.fs.rm([_join(self.root, r) for r in rels])
            for r in rels:
                self._remote.pop(r, None)
                self._synced.pop(r, None)

    # -- pull

    def pull(self, under: str = "") -> None:
        """Bring the store's committed state (under ``under``, relative to the workdir) into staging."""
        check_bucket(self.url)
        with reaching(self.url, self.fs):
            listing = {f for f in self._list() if not under or f.startswith(under + "/")}
            datasets, indexes, pointers = _layout(listing)
            for directory in _deepest_first(list(datasets)):
                self._pull_dataset(directory, datasets[directory])
            for directory, files in indexes.items():
                self._pull_index(directory, files)
            for rel in pointers:
                self._pull_small(rel)

    def _pull_small(self, rel: str) -> bytes:
        """A manifest, index.json or pointer: read whole, written locally only when it differs."""
        body = self.fs.cat_file(_join(self.root, rel))
        path = self.local / rel
        if not path.is_file() or path.read_bytes() != body:
            atomic_write_bytes(path, body)
        self._mark(rel)
        return body

    def _pull_dataset(self, directory: str, files: list[str]) -> None:
        manifest_rel = _join(directory, ds.MANIFEST)
        manifest = ds.Manifest.model_validate_json(self.fs.cat_file(_join(self.root, manifest_rel)))
        hashes = {_join(directory, s.path): s.sha256 for s in manifest.shards}
        missing = sorted(set(hashes) - set(files))
        if missing:
            raise FileNotFoundError(f"{self.url}/{manifest_rel} lists {missing[0]}, which the store lacks")
        for rel in files:
            if self._store_unchanged(rel):
                continue
            local = self.local / rel
            if rel in hashes and local.is_file() and ds.sha256_file(local) == hashes[rel]:
                self._mark(rel)
            else:
                self._download(rel, hashes.get(rel))
        self._pull_small(manifest_rel)  # last: locally too, the dataset exists once whole

    def _pull_index(self, directory: str, files: list[str]) -> None:
        committed = _generations(self.fs.cat_file(_join(self.root, directory, INDEX_FILE)))
        for rel in files:
            if _generation_of(directory, rel) not in committed or self._store_unchanged(rel):
                continue
            local = self.local / rel
            # a generation is written once, under a name of its own: same name and size, same file
            if local.is_file() and local.stat().st_size == self.fs.size(_join(self.root, rel)):
                self._mark(rel)
            else:
                self._download(rel)
        self._pull_small(_join(directory, INDEX_FILE))

    # -- push

    def push(self) -> None:
        """Publish what changed in staging since the last pull or push (commit objects last)."""
        with reaching(self.url, self.fs):
            files = {p.relative_to(self.local).as_posix() for p in self.local.rglob("*") if p.is_file()}
            datasets, indexes, pointers = _layout(files)
            for top in sorted(_outermost(datasets)):
                group = [d for d in datasets if top in ("", d) or d.startswith(top + "/")]
                self._push_datasets(_deepest_first(group), datasets)
            for directory, generation_files in indexes.items():
                self._push_index(directory, generation_files)
            for rel in pointers:
                if not self._store_unchanged(rel):
                    self._upload(rel)

    def _push_datasets(self, group: list[str], datasets: dict[str, list[str]]) -> None:
        """One dataset and the datasets nested in it, hidden from readers while they are replaced."""
        manifests = [_join(d, ds.MANIFEST) for d in group]
        files = [f for d in group for f in datasets[d]]
        if all(self._store_unchanged(f) for f in [*manifests, *files]):
            return
        self._remove([m for m in reversed(manifests) if m in self._remote])  # the top one first
        local = set(files)
        stale = [
            r
            for r in self._remote
            if any(d == "" or r.startswith(d + "/") for d in group)
            and r not in local
            and DONE_DIR not in PurePosixPath(r).parts
            and PurePosixPath(r).name != ds.MANIFEST
        ]
        self._remove(stale)
        for rel in files:
            if not self._store_unchanged(rel):
                self._upload(rel)
        for manifest in manifests:  # deepest first: the top manifest commits the whole
            self._upload(manifest)

    def _push_index(self, directory: str, files: list[str]) -> None:
        pointer = _join(directory, INDEX_FILE)
        if self._store_unchanged(pointer):
            return
        committed = _generations((self.local / pointer).read_bytes())
        for rel in files:
            if _generation_of(directory, rel) in committed and not self._store_unchanged(rel):
                self._upload(rel)
        self._upload(pointer)


def pulled_mirror(workdir: str) -> Mirror | None:
    """For a workdir on object storage, its mirror with the committed state pulled into staging;
    None for a local workdir."""
    if not is_remote(workdir):
        return None
    mirror = Mirror(workdir)
    mirror.pull()
    return mirror


def fetch(url: str) -> Path:
    """A local copy of the dataset at ``url`` (a published root: its LATEST version), for readers of
    files such as the trainer. Returns the local dataset dir (in ``staging_dir(url)``)."""
    mirror = Mirror(url)
    check_bucket(url)
    with reaching(url, mirror.fs):
        rel = ""
        if mirror.fs.exists(_join(mirror.root, ds.LATEST)):
            version = mirror.fs.cat_file(_join(mirror.root, ds.LATEST)).decode().strip()
            rel = f"{ds.VERSIONS}/{version}"
        if not mirror.fs.exists(_join(mirror.root, rel, ds.MANIFEST)):
            raise FileNotFoundError(
                f"{url} is neither a published dataset (no {ds.LATEST}) nor a dataset (no {ds.MANIFEST})"
            )
    mirror.pull(under=rel)
    return mirror.local / rel
