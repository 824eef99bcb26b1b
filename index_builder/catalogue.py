"""Reading and validating a catalogue of sold items: CSV or JSON Lines, one row per photo."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Hashable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from index_builder.sources import REMOTE_SCHEMES, is_remote
from model_store.index_artifact import ISO_DATE, MAX_PRICE

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def lower_scheme(url: str) -> str:
    """HTTPS://cdn.example.com/a.jpg as https://cdn.example.com/a.jpg: a URL's scheme has no case, but fsspec
    and the checks here know only the lower-case one."""
    m = SCHEME.match(url)
    return m.group().lower() + url[m.end():] if m else url


COLUMNS = ("item_id", "image_path", "title", "category", "price", "currency", "sold_at")
OPTIONAL_COLUMNS = ("image_url",)
ITEM_FIELDS = ("item_id", "title", "category", "price", "currency", "sold_at")  # as CatalogueRow.item_fields


class CatalogueError(ValueError):
    """A catalogue that cannot be read at all (wrong format, missing columns)."""


class CatalogueRow(BaseModel):
    """One photo of one sold item, as written in the catalogue."""

    # JSON Lines exported from a database give numeric ids as numbers ({"item_id": 1017}): read as text
    model_config = ConfigDict(coerce_numbers_to_str=True)

    item_id: str = Field(min_length=1)
    image_path: str = Field(min_length=1)
    title: str = Field(min_length=1)
    category: str = Field(min_length=1)
    price: float = Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)
    currency: str = Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217 code, e.g. USD (usd is read as USD)")
    sold_at: dt.date
    image_url: str | None = Field(None, pattern=r"^https?://\S+$", max_length=2000,
                                  description="optional public URL of the photo (e.g. on a CDN), shown instead of "
                                              "a thumbnail")

    @field_validator("item_id", "image_path", "title", "category", "currency", mode="before")
    @classmethod
    def _strip(cls, v: object) -> object:
        return v.strip() if isinstance(v, str) else v

    @field_validator("image_path", mode="after")
    @classmethod
    def _no_control_characters(cls, v: str) -> str:
        """A NUL in a path stopped the whole build with a traceback (the OS takes no such path)."""
        if CONTROL.search(v):
            raise ValueError(f"holds a control character (a tab, a line break or NUL): {v[:60]!r}; write the "
                             "photo's path or URL alone")
        return lower_scheme(v)

    @field_validator("price", mode="before")
    @classmethod
    def _a_plain_number(cls, v: object) -> object:
        """Python's float() reads "1_000" as 1000, and a typo's "1_00" as 100: refused, as commas are. pydantic
        reads JSON's true as 1.0."""
        if isinstance(v, str) and "_" in v:
            raise ValueError("thousands separators")
        if isinstance(v, bool):
            raise ValueError("true or false")
        return v

    @field_validator("sold_at", mode="before")
    @classmethod
    def _iso_date(cls, v: object) -> object:
        """pydantic also reads a number as seconds since 1970 ("0" is 1970-01-01) and takes a midnight time."""
        if isinstance(v, dt.date):
            return v
        if isinstance(v, str) and ISO_DATE.fullmatch(v.strip()):
            return v.strip()
        raise ValueError("not YYYY-MM-DD")

    @field_validator("currency", mode="after")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @field_validator("image_url", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return (lower_scheme(v.strip()) or None) if isinstance(v, str) else v

    def item_fields(self) -> tuple:
        """What every photo of one item must agree on, named by ITEM_FIELDS."""
        return (self.item_id, self.title, self.category, self.price, self.currency, self.sold_at.isoformat())


@dataclass(frozen=True)
class Photo:
    line: int  # 1-based line in the file (CSV: the header is line 1)
    row: CatalogueRow
    path: str  # an absolute local path, or a URL (https://, s3://, gs://) read through fsspec


@dataclass(frozen=True)
class BadRow:
    line: int
    image_path: str
    reason: str


@dataclass
class Catalogue:
    path: Path
    sha256: str
    photos: list[Photo]
    bad: list[BadRow]
    respelled: dict[str, str] = field(default_factory=dict)  # a category as written -> as it is listed

    @property
    def n_rows(self) -> int:
        return len(self.photos) + len(self.bad)


def _raw_rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line, fields or None, error) for each data row of a .csv or .jsonl file."""
    try:
        yield from _decoded_rows(path)
    except UnicodeDecodeError as exc:  # e.g. Excel's plain "CSV" on Windows writes cp1252, not UTF-8
        raise CatalogueError(f"{path}: line {_first_line_not_utf8(path)} is not UTF-8 text (byte "
                             f"0x{exc.object[exc.start]:02x}): save the catalogue as UTF-8 (in Excel: "
                             "\"CSV UTF-8\")") from None


def _first_line_not_utf8(path: Path) -> int:
    """The line holding the first byte that is not UTF-8 (a decoding error's offset is within one read of the
    file, not the file)."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line
    return 1


def _decoded_rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = spreadsheet_csv(f)
            if not reader.fieldnames:
                what = "the file is empty" if path.stat().st_size == 0 else "its first line is blank"
                raise CatalogueError(f"{path}: {what}: the first line must be the header {','.join(COLUMNS)}, "
                                     "and each line after it one photo")
            if twice := _named_twice(reader.fieldnames):  # csv would keep the last column of each name
                raise CatalogueError(f"{path}: the header names {twice} more than once (names are read without case "
                                     "or spaces): keep one column of each")
            missing = [c for c in COLUMNS if c not in reader.fieldnames]
            if missing:
                raise CatalogueError(f"{path}: missing column(s) {', '.join(missing)}; "
                                     f"the header must name {','.join(COLUMNS)}{_separator_hint(reader.fieldnames)}")
            for fields in reader:
                yield reader.line_num, *_fields_or_error(fields, reader.fieldnames)
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    pairs = json.loads(text, object_pairs_hook=_Pairs)
                except json.JSONDecodeError as exc:
                    yield line, None, f"not valid JSON ({exc.msg})"
                    continue
                if not isinstance(pairs, _Pairs):
                    yield line, None, "not a JSON object"
                    continue
                names = [column_name(str(key)) for key, _ in pairs]
                if twice := _named_twice(names):  # a dict would keep the last value of each name
                    yield line, None, (f"the keys name {twice} more than once (keys are read without case or "
                                       "spaces): keep one of each")
                    continue
                yield line, dict(zip(names, (_plain(value) for _, value in pairs))), ""
    else:
        raise CatalogueError(f"{path}: unknown catalogue format {suffix!r}: use .csv or .jsonl")


def _fields_or_error(fields: dict, header: list[str]) -> tuple[dict, str]:
    """A CSV row's fields, and why the row has more or fewer fields than its header, if it has (csv.DictReader
    keeps the extra ones under None, and gives the missing ones None)."""
    if None in fields:
        return fields, (f"the row has {len(header) + len(fields[None])} fields, the header {len(header)}: a comma "
                      'inside a field needs the field in double quotes ("Chair, oak")')
    if None in fields.values() and any(fields.get(c) is None for c in COLUMNS):
        given = next(i for i, name in enumerate(header) if fields[name] is None)
        return fields, (f"the row has {given} fields, the header {len(header)}: every column needs a value, even "
                      "an empty one between two commas")
    return fields, ""


class _Pairs(list):
    """A JSON object's (key, value) pairs, in order and with any key given twice."""


def _plain(value: object) -> object:
    """A JSON value as json.loads gives it: objects within as dicts (their errors show them as written)."""
    if isinstance(value, _Pairs):
        return {key: _plain(v) for key, v in value}
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _named_twice(names: list[str]) -> str:
    """The catalogue's columns that `names` (a header's, or a JSON object's keys) names more than once."""
    return ", ".join(sorted({c for c in (*COLUMNS, *OPTIONAL_COLUMNS) if names.count(c) > 1}))


def column_name(name: str) -> str:
    """A column as people type one in a spreadsheet's header or a JSON key: "Title", or " image_path" after a
    comma and a space, names the same column as "title" and "image_path"."""
    return name.strip().lower()


def spreadsheet_csv(f: IO[str]) -> csv.DictReader:
    """Rows of a CSV whose header names are read as column_name reads them."""
    reader = csv.DictReader(f)
    reader.fieldnames = [column_name(name) for name in reader.fieldnames or []]
    return reader


def _separator_hint(header: list[str] | None) -> str:
    """Why a header lacks the columns, when it is only written with another separator (Excel in many European
    locales writes ';')."""
    text = ",".join(header or [])
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        if all(c in text.split(sep) for c in ("item_id", "image_path")):
            return f" separated by commas: this header is separated by {name} (in Excel: save as \"CSV UTF-8 (Comma delimited)\")"
    return ""


# What a field must hold, in the words a person writing a spreadsheet needs (pydantic's say "unable to parse
# string as a number" or "invalid character in year").
WANTED = {"price": "a number of 0 or more, such as 340.00, without a currency sign or thousands separators and "
                   "with a point, not a comma, before the cents",
          "currency": "a three-letter ISO 4217 code, such as USD",
          "sold_at": "a date as YYYY-MM-DD",
          "image_url": "an http:// or https:// URL without spaces, or empty"}


def _validation_reason(exc: ValidationError) -> str:
    reasons = []
    for e in exc.errors():
        field = ".".join(map(str, e["loc"])) or "row"
        if field == "price" and e["type"] == "less_than_equal":
            reasons.append(f"price must be at most {MAX_PRICE:,.0f} (the most a search filters on), in any "
                           f"currency; got {_as_written(e['input'])}")
        elif e["type"] in ("missing", "string_too_short"):  # too short: empty, or spaces only
            reasons.append(f"{field} is {'missing' if e['type'] == 'missing' else 'empty'}: every row needs one")
        elif field in WANTED:
            reasons.append(f"{field} must be {WANTED[field]}; got {_as_written(e['input'])}")
        elif e["type"] == "string_type":  # JSON Lines: null, true, a list...
            reasons.append(f"{field} must be text; got {_as_written(e['input'])}")
        else:
            reasons.append(f"{field}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(reasons)


def _as_written(value: object) -> str:
    """A field's value as the catalogue wrote it: CSV text quoted, a JSON Lines value as JSON (null, true)."""
    return repr(value[:60]) if isinstance(value, str) else json.dumps(value, default=str)[:60]


def read_catalogue(path: Path) -> Catalogue:
    """Parse and validate every row; bad rows are kept with the reason, never silently dropped."""
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"{path}: no such catalogue file")
    photos, bad = [], []
    # A sale dated after the build (a typo in the year: 2062 for 2026) would pass every `sold_after` filter,
    # and show buyers a date no sale had. A day's grace: somewhere on Earth it is already tomorrow.
    latest_sale = dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)
    for line, fields, error in _raw_rows(path):
        image_path = str((fields or {}).get("image_path") or "")
        if error:
            bad.append(BadRow(line, image_path, error))
            continue
        try:
            row = CatalogueRow.model_validate(fields)
        except ValidationError as exc:
            bad.append(BadRow(line, image_path, _validation_reason(exc)))
            continue
        reason = ""
        remote = is_remote(row.image_path)
        full = row.image_path if remote else str((path.parent / row.image_path).resolve())
        if row.sold_at > latest_sale:
            reason = f"sold_at is in the future: write the day the item sold; got '{row.sold_at}'"
        elif not remote and not Path(full).is_file():  # remote photos are checked when they are fetched
            reason = (f"image_path is a folder, not a photo: {full}" if Path(full).is_dir()
                      else f"image file not found: {full}{_not_found_hint(row.image_path)}")
        if reason:
            bad.append(BadRow(line, row.image_path, reason))
            continue
        photos.append(Photo(line, row, full))
    photos, respelled = _one_spelling_per_category(photos)
    photos, disagreeing = _rows_that_agree(photos)
    photos, repeated = _first_listing_of_each_photo(photos)
    return Catalogue(path.resolve(), file_sha256(path), photos, bad + disagreeing + repeated, respelled)


def repeats(keys: Iterable[Hashable | None]) -> dict[int, int]:
    """{position: position of the first key equal to it} for each key seen before it; None repeats nothing.
    The catalogue's repeated paths and the builder's repeated photo bytes are both found this way."""
    first: dict[Hashable, int] = {}
    again = {}
    for i, key in enumerate(keys):
        if key is not None and (j := first.setdefault(key, i)) != i:
            again[i] = j
    return again


def _first_listing_of_each_photo(photos: list[Photo]) -> tuple[list[Photo], list[BadRow]]:
    """A photo listed again (the same image_path, once resolved) is skipped, naming the line that lists it. Only
    rows that agree with their item count as listings: a row skipped for disagreeing lists nothing."""
    again = repeats(p.path for p in photos)
    return ([p for i, p in enumerate(photos) if i not in again],
            [BadRow(photos[i].line, photos[i].row.image_path, f"duplicate photo: same image_path as line "
                                                               f"{photos[j].line}") for i, j in again.items()])


def _one_spelling_per_category(photos: list[Photo]) -> tuple[list[Photo], dict[str, str]]:
    """A catalogue typed by several people over years spells one category several ways ("Furniture",
    "furniture", "FURNITURE", "Dining  tables"). Each is read as the spelling most of its items use (on a tie,
    the first seen), so that the page lists the category once and /assist's vote is not split between its
    spellings. Returns the photos and {spelling as written: spelling listed} for those that changed."""
    items_of: dict[str, Counter] = {}
    for _item_id, category in dict.fromkeys((p.row.item_id, p.row.category) for p in photos):
        items_of.setdefault(" ".join(category.split()).casefold(), Counter())[category] += 1
    listed = {key: spellings.most_common(1)[0][0] for key, spellings in items_of.items()}
    respelled = {spelling: listed[key] for key, spellings in items_of.items() for spelling in spellings
                 if spelling != listed[key]}
    return [replace(p, row=p.row.model_copy(update={"category": respelled[p.row.category]}))
            if p.row.category in respelled else p for p in photos], respelled


def _rows_that_agree(photos: list[Photo]) -> tuple[list[Photo], list[BadRow]]:
    """An item is listed with what most of its rows say (on a tie, its first row); a row that says otherwise is
    skipped, and its reason names the fields at fault and the lines that agree. A typo in an item's first row no
    longer costs its correct rows, nor has the report send the cataloguer to "fix" them."""
    fields = [p.row.item_fields() for p in photos]
    rows_of: dict[str, list[int]] = {}
    for i, photo in enumerate(photos):
        rows_of.setdefault(photo.row.item_id, []).append(i)
    listed = {item: Counter(fields[i] for i in rows).most_common(1)[0][0]  # ties: the first seen
              for item, rows in rows_of.items()}
    kept, bad = [], []
    for i, photo in enumerate(photos):
        item = photo.row.item_id
        if fields[i] == listed[item]:
            kept.append(photo)
            continue
        agree = [photos[j].line for j in rows_of[item] if fields[j] == listed[item]]
        bad.append(BadRow(photo.line, photo.row.image_path, _disagreement(photo.row, listed[item], agree)))
    return kept, bad


def _disagreement(row: CatalogueRow, listed: tuple, agree: list[int]) -> str:
    """Why `row` is skipped: its fields that differ from `listed`, the item's fields on lines `agree`."""
    lines = ", ".join(map(str, agree[:3])) + (f" and {len(agree) - 3} more" if len(agree) > 3 else "")
    differs = "; ".join(f"{name} {_shown(ours)} here, {_shown(theirs)} on line{'s' * (len(agree) > 1)} {lines}"
                        for name, ours, theirs in zip(ITEM_FIELDS, row.item_fields(), listed) if ours != theirs)
    return (f"item {row.item_id}: {differs}; all photos of one item must agree (an item is listed as most of its "
            "rows say, as its first row on a tie)")


def _shown(value: str | float) -> str:
    """A field's value in a reason: text quoted, a price as written plainly (1000000, not 1e+06)."""
    return _as_written(value) if isinstance(value, str) else f"{value:.2f}".rstrip("0").rstrip(".")


def _not_found_hint(image_path: str) -> str:
    """Why a path that names no file may have been written for another machine or another reader."""
    if scheme := SCHEME.match(image_path):
        return f" ({scheme.group()} is not read: write a path, or a URL starting {', '.join(REMOTE_SCHEMES)})"
    if "\\" in image_path:
        return " (a Windows path: write its folders with /, as photos/lot-1017-a.jpg)"
    if re.match(r"[A-Za-z]:/", image_path):
        return " (a Windows drive: write the path on the machine that builds, or relative to the catalogue)"
    return ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_report(path: Path, bad: list[BadRow]) -> None:
    """CSV of the rows and photos that were skipped: line, image_path, reason."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["line", "image_path", "reason"])
        writer.writerows((b.line, b.image_path, b.reason) for b in sorted(bad, key=lambda b: b.line))
