"""Router fine-tuning data: one query per line, labelled with the expert it should go to.

JSONL: `{"text": "...", "images": ["img/a.png"], "label": "think"}` (images optional).
CSV: columns `text,images,label`, several images separated by `;`.

Everything is checked before any training starts, and every bad line is reported at once (a
person fixing a file wants the whole list, not one error per attempt). Image paths are relative
to the dataset's folder and may not leave it: an uploaded dataset must not read server files.
Evaluation datasets (`metis/evaluation/dataset.py`) share the file checks (`read_rows`), the
image checks (`check_images`, `within_budget`) and the upload handling (`unpack_upload`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..images import Header, ImageError, check_budget, load_images, read_header
from ..prompting import Message, PromptConfig

LABELS = ("think", "direct")
MAX_BYTES = 20 * 1024 * 1024
MAX_LINES = 20_000
PROMPT = PromptConfig()  # a row is one user message: the chat's own limits on text and images
MAX_UNPACKED_BYTES = 200 * 1024 * 1024
MAX_ZIP_MEMBERS = 20_000


@dataclass(frozen=True)
class DataFiles:
    """Which dataset files an upload may hold: fine-tuning takes JSONL or CSV, evaluation JSONL."""

    suffixes: tuple[str, ...]
    described: str  # for messages: "expected a .jsonl or .csv file"


ROUTER_DATA = DataFiles((".jsonl", ".json", ".csv"), ".jsonl or .csv")


class DatasetError(ValueError):
    """The dataset cannot be used; `problems` lists every bad line ("line N: reason")."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n" + "\n".join(problems))


@dataclass(frozen=True)
class Example:
    text: str
    images: tuple[Path, ...]
    label: str  # "think" or "direct"
    line: int

    def messages(self) -> list[Message]:
        """The single user turn the router sees for this query; its images are loaded like a chat
        request's (same checks, same pixel budget, one at a time)."""
        return [Message("user", self.text, load_images(self.images))]


def _rows(path: Path) -> list[tuple[int, dict | str]]:
    """(line number, record) per non-blank line; a record is a dict or a parse-error message."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
                return [(1, "CSV header must name the columns text, label (and optionally images), "
                            f"got {reader.fieldnames}")]
            rows = []
            for record in reader:
                images = (record.get("images") or "").strip()
                record["images"] = [p.strip() for p in images.split(";") if p.strip()]
                rows.append((reader.line_num, record))
            return rows
    rows = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            rows.append((number, f"bad JSON ({exc.msg} at column {exc.colno})"))
            continue
        rows.append((number, record if isinstance(record, dict) else "a line must be a JSON object"))
    return rows


def _check_image(root: Path, name, seen: dict[Path, Header | str]) -> Header | str:
    """The image's header (the chat's limits; nothing decoded), or what is wrong with it."""
    if not isinstance(name, str) or not name:
        return f"image entries must be non-empty path strings, got {name!r}"
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        return f"image path {name!r} is outside the dataset's folder"
    if path not in seen:
        try:
            seen[path] = read_header(path)
        except ImageError as exc:
            seen[path] = f"unreadable image {name!r} ({exc})"
    return seen[path]


def check_images(root: Path, names, seen: dict) -> tuple[list[Header], list[str]]:
    """A row's `images` field against the chat's limits: (headers, problems); nothing decoded."""
    if not isinstance(names, list):
        return [], ["field 'images' must be a list of paths"]
    if len(names) > PROMPT.max_images:
        return [], [f"too many images ({len(names)}, at most {PROMPT.max_images})"]
    headers = [_check_image(root, name, seen) for name in names]
    return [h for h in headers if not isinstance(h, str)], [h for h in headers if isinstance(h, str)]


def within_budget(headers: list[Header]) -> list[str]:
    """A row's images together against a request's pixel budget (checked once each one is fine)."""
    try:
        check_budget(headers)
    except ImageError as exc:
        return [str(exc)]
    return []


def _check_record(record: dict, number: int, root: Path, seen: dict) -> tuple[Example | None, list[str]]:
    problems = []
    text, label, names = record.get("text"), record.get("label"), record.get("images", [])
    if not isinstance(text, str) or not text.strip():
        problems.append("missing field 'text'" if text is None else "field 'text' must be a non-empty string")
    elif len(text) > PROMPT.max_text_chars:
        problems.append(f"text too long ({len(text)} characters, at most {PROMPT.max_text_chars})")
    if label is None:
        problems.append("missing field 'label'")
    elif label not in LABELS:
        problems.append(f"unknown label {label!r} (expected one of {', '.join(LABELS)})")
    headers, found = check_images(root, names, seen)
    problems += found
    if not problems:
        problems += within_budget(headers)
    if problems:
        return None, problems
    return Example(text, tuple(h.path for h in headers), label, number), []


def read_rows(path: str | Path, files: DataFiles = ROUTER_DATA) -> tuple[Path, list[tuple[int, dict | str]]]:
    """The checks every dataset file gets before its rows are looked at (exists, kind, size,
    UTF-8, line count): (its resolved path, (line number, record or parse error) per line)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise DatasetError([f"{path.name}: no such file"])
    if path.suffix.lower() not in files.suffixes:
        raise DatasetError([f"{path.name}: expected a {files.described} file"])
    if (size := path.stat().st_size) > MAX_BYTES:
        raise DatasetError([f"{path.name}: file too large ({size / 2**20:.1f} MiB, at most {MAX_BYTES // 2**20} MiB)"])
    try:
        rows = _rows(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError([f"{path.name}: cannot be read as UTF-8 text ({exc})"]) from exc
    if len(rows) > MAX_LINES:
        raise DatasetError([f"{path.name}: too many lines ({len(rows)}, at most {MAX_LINES})"])
    if not rows:
        raise DatasetError([f"{path.name}: the dataset is empty"])
    return path, rows


def checked_rows(rows, check) -> list:
    """What `check(record, line number, seen)` makes of each parsed row, `(item, problems)`; raises
    one DatasetError listing every problem of every line (`seen` spans the file, for duplicates)."""
    items, problems, seen = [], [], {}
    for number, record in rows:
        if isinstance(record, str):  # the row did not parse: read_rows says why
            problems.append(f"line {number}: {record}")
            continue
        item, found = check(record, number, seen)
        problems += [f"line {number}: {p}" for p in found]
        if item:
            items.append(item)
    if problems:
        raise DatasetError(problems)
    return items


def load_dataset(path: str | Path) -> list[Example]:
    """Parse and validate a .jsonl or .csv dataset; raises one DatasetError listing every problem."""
    path, rows = read_rows(path)
    return checked_rows(rows, lambda record, number, seen: _check_record(record, number, path.parent, seen))


def dataset_hash(examples: list[Example]) -> str:
    """Content hash (texts, labels, image bytes): the feature cache key's data half."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.text, ex.label]).encode())
        for path in ex.images:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass
class UploadBudget:
    """What all uploads of one fine-tuning run may put on disk together: bytes and files, counted
    across zips and loose files, checked before anything of an upload is written."""

    max_bytes: int = MAX_UNPACKED_BYTES
    max_files: int = MAX_ZIP_MEMBERS
    used_bytes: int = 0
    used_files: int = 0

    def take(self, name: str, size: int, files: int) -> None:
        if self.used_files + files > self.max_files:
            raise DatasetError([f"{name}: the uploads of this run would hold {self.used_files + files:,} files, "
                                f"at most {self.max_files:,}"])
        if self.used_bytes + size > self.max_bytes:
            raise DatasetError([f"{name}: the uploads of this run would unpack to "
                                f"{(self.used_bytes + size) / 2**20:.0f} MiB, at most {self.max_bytes // 2**20} MiB"])
        self.used_bytes += size
        self.used_files += files


def _unzip(archive: Path, dest: Path, budget: UploadBudget) -> None:
    """Extract with the limits an upload needs: no path leaving `dest`, size and count within the
    run's budget (the sizes a zip declares bound what it extracts: zipfile stops at them)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            budget.take(archive.name, sum(m.file_size for m in members), len(members))
            bad = [m.filename for m in members if not (dest / m.filename).resolve().is_relative_to(dest)]
            if bad:
                raise DatasetError([f"{archive.name}: entry {name!r} would land outside the dataset folder"
                                    for name in bad])
            zf.extractall(dest, members)
    except zipfile.BadZipFile as exc:
        raise DatasetError([f"{archive.name}: not a valid zip file ({exc})"]) from exc


def unpack_upload(files: list[str | Path], dest: str | Path, budget: UploadBudget | None = None,
                  kind: DataFiles = ROUTER_DATA) -> Path:
    """Gather uploaded files into `dest` and return the one dataset file among them.

    A zip keeps its folders; loose files are copied side by side, so their image paths must be
    plain file names. All of them together stay within `budget` (one per run); the one dataset
    file's row limit (MAX_LINES) is then the run's.
    """
    budget = budget or UploadBudget()
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for file in map(Path, files):
        if file.suffix.lower() == ".zip":
            _unzip(file, dest, budget)
        else:
            budget.take(file.name, file.stat().st_size, 1)
            shutil.copy(file, dest / file.name)
    found = sorted(p for p in dest.rglob("*") if p.suffix.lower() in kind.suffixes and "__MACOSX" not in p.parts)
    if len(found) != 1:
        names = ", ".join(str(p.relative_to(dest)) for p in found) or "none"
        raise DatasetError([f"expected exactly one {kind.described} dataset file among the uploads, found {names}"])
    return found[0]
