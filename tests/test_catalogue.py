"""Catalogue reading: formats, validation, and a reason for every skipped row."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from index_builder.catalogue import CatalogueError, CatalogueRow, read_catalogue
from index_builder.demo import draw_object
from index_builder.sources import is_remote

HEADER = "item_id,image_path,title,category,price,currency,sold_at\n"


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        draw_object(0, 0, 0, size=32).save(tmp_path / name)
    return tmp_path


def write(folder, text, name="cat.csv"):
    (folder / name).write_text(text)
    return folder / name


def test_good_rows_and_several_photos_per_item(folder):
    cat = read_catalogue(write(folder, HEADER + "i1,a.png,Vase,Ceramics,12.5,USD,2024-05-01\n"
                                                 "i1,b.png,Vase,Ceramics,12.5,USD,2024-05-01\n"))
    assert [p.line for p in cat.photos] == [2, 3] and cat.bad == []
    assert cat.photos[0].path == str(folder / "a.png") and cat.photos[0].row.price == 12.5


@pytest.mark.parametrize("row, reason", [
    ("i1,a.png,Vase,Ceramics,abc,USD,2024-05-01", "price must be a number of 0 or more"),
    ("i1,a.png,Vase,Ceramics,-3,USD,2024-05-01", "price must be a number of 0 or more"),
    ("i1,a.png,Vase,Ceramics,$340,USD,2024-05-01", "without a currency sign or thousands separators"),
    ('i1,a.png,Vase,Ceramics,"1,200.50",USD,2024-05-01', "before the cents; got '1,200.50'"),
    ("i1,a.png,Vase,Ceramics,1_200,USD,2024-05-01", "thousands separators and with a point, not a comma, before "
                                                    "the cents; got '1_200'"),
    ('i1,a.png,Vase,Ceramics,"12,50",EUR,2024-05-01', "with a point, not a comma, before the cents; got '12,50'"),
    ("i1,a.png,Vase,Ceramics,3,US$,2024-05-01", "currency must be a three-letter ISO 4217 code, such as USD; got 'US$'"),
    ("i1,a.png,Vase,Ceramics,3,USD,yesterday", "sold_at must be a date as YYYY-MM-DD; got 'yesterday'"),
    ("i1,a.png,Vase,Ceramics,3,USD,14/03/2025", "sold_at must be a date as YYYY-MM-DD; got '14/03/2025'"),
    ("i1,a.png,Vase,Ceramics,3,USD,0", "sold_at must be a date as YYYY-MM-DD; got '0'"),
    ("i1,a.png,Vase,Ceramics,3,USD,2024-05-01T00:00", "sold_at must be a date as YYYY-MM-DD; got '2024-05-01T00:00'"),
    (",a.png,Vase,Ceramics,3,USD,2024-05-01", "item_id is empty: every row needs one"),
    ("i1,a.png,   ,Ceramics,3,USD,2024-05-01", "title is empty: every row needs one"),
    ("i1,a\x00.png,Vase,Ceramics,3,USD,2024-05-01", "image_path: holds a control character (a tab, a line break or "
                                                    "NUL): 'a\\x00.png'; write the photo's path or URL alone"),
    ("i1,missing.png,Vase,Ceramics,3,USD,2024-05-01", "image file not found"),
    ("i1,.,Vase,Ceramics,3,USD,2024-05-01", "image_path is a folder, not a photo"),
    ("i1,a.png,Vase,Ceramics,3,USD,2024-05-01,extra", "the row has 8 fields, the header 7: a comma inside a field "
                                                      'needs the field in double quotes ("Chair, oak")'),
    ("i1,a.png,Chair, oak,Furniture,3,USD,2024-05-01", "the row has 8 fields, the header 7"),
    ("i1,a.png,Vase,Ceramics", "the row has 4 fields, the header 7: every column needs a value, even an empty one "
                               "between two commas"),
    ("i1,a.png,Vase,Ceramics,3,USD,2099-05-01", "sold_at is in the future: write the day the item sold; got "
                                                "'2099-05-01'"),
    ("i1,a.png,Vase,Ceramics,1e13,USD,2024-05-01", "price must be at most 1,000,000,000,000 (the most a search "
                                                   "filters on), in any currency; got '1e13'"),
    ("i1,photos\\a.png,Vase,Ceramics,3,USD,2024-05-01", "(a Windows path: write its folders with /, as "
                                                        "photos/lot-1017-a.jpg)"),
    ("i1,C:/photos/a.png,Vase,Ceramics,3,USD,2024-05-01", "(a Windows drive: write the path on the machine that builds"),
    ("i1,file:///photos/a.png,Vase,Ceramics,3,USD,2024-05-01", "(file:// is not read: write a path, or a URL starting "
                                                               "http://, https://, s3://, gs://)"),
])
def test_each_bad_row_is_reported_with_line_and_reason(folder, row, reason):
    cat = read_catalogue(write(folder, HEADER + "i0,c.png,Cup,Ceramics,1,USD,2024-01-01\n" + row + "\n"))
    assert len(cat.photos) == 1
    assert len(cat.bad) == 1 and cat.bad[0].line == 3 and reason in cat.bad[0].reason


def test_a_row_with_a_field_too_many_or_too_few_names_its_photo(folder):
    cat = read_catalogue(write(folder, HEADER + "i1,a.png,Chair, oak,Furniture,3,USD,2024-05-01\n"
                                                 "i2,b.png,Vase\n"))
    assert [(b.line, b.image_path) for b in cat.bad] == [(2, "a.png"), (3, "b.png")]


def test_a_row_may_leave_out_an_optional_column_at_its_end(folder):
    cat = read_catalogue(write(folder, HEADER.strip() + ",image_url\ni1,a.png,Vase,Ceramics,3,USD,2024-05-01\n"))
    assert cat.bad == [] and cat.photos[0].row.image_url is None


def test_a_sale_dated_tomorrow_is_taken_and_one_after_is_not(folder):
    """Somewhere on Earth it is already tomorrow: a day's grace, no more."""
    today = dt.datetime.now(dt.timezone.utc).date()
    cat = read_catalogue(write(folder, HEADER + f"i1,a.png,Vase,Ceramics,3,USD,{today + dt.timedelta(days=1)}\n"
                                                f"i2,b.png,Jug,Ceramics,3,USD,{today + dt.timedelta(days=2)}\n"))
    assert [p.line for p in cat.photos] == [2]
    assert [(b.line, b.reason.split(";")[0]) for b in cat.bad] == [(3, "sold_at is in the future: write the day "
                                                                       "the item sold")]


def test_a_url_scheme_in_capitals_is_read_as_the_url():
    """Spreadsheets capitalise a cell's first letter: Https:// was a local file "not found", and an image_url
    in capitals a bad row."""
    row = CatalogueRow.model_validate(dict(item_id="i1", image_path="S3://Bucket/Lot 1.JPG", title="Vase",
                                           category="Ceramics", price="3", currency="USD", sold_at="2024-05-01",
                                           image_url="Https://CDN.example.com/Lot-1.jpg"))
    assert (row.image_path, row.image_url) == ("s3://Bucket/Lot 1.JPG", "https://CDN.example.com/Lot-1.jpg")
    assert is_remote(row.image_path)


def test_duplicate_photo_and_disagreeing_item_rows(folder):
    cat = read_catalogue(write(folder, HEADER + "i1,a.png,Vase,Ceramics,12,USD,2024-05-01\n"
                                                 "i2,a.png,Jug,Ceramics,5,USD,2024-05-01\n"
                                                 "i1,b.png,Vase,Ceramics,99,USD,2024-05-01\n"))
    reasons = {b.line: b.reason for b in cat.bad}
    assert "duplicate photo" in reasons[3] and "line 2" in reasons[3]
    assert reasons[4] == ("item i1: price 99 here, 12 on line 2; all photos of one item must agree (an item is "
                          "listed as most of its rows say, as its first row on a tie)")


def test_an_item_is_listed_as_most_of_its_rows_say(folder):
    """A typo in an item's first row used to list the item with it and skip every correct row, and the report
    told the cataloguer to change the correct rows."""
    for name in ("d.png", "e.png"):
        draw_object(0, 0, 0, size=32).save(folder / name)
    cat = read_catalogue(write(folder, HEADER + "i1,a.png,Vase,Ceramics,1200000,USD,2024-05-01\n"
                                                "i1,b.png,Vase,Ceramics,12,USD,2024-05-01\n"
                                                "i2,c.png,Jug,Ceramics,5,USD,2024-05-01\n"
                                                "i1,d.png,Vase,Ceramics,12,USD,2024-05-01\n"
                                                "i1,e.png,Vases,Glassware,12,USD,2024-05-02\n"))
    assert [p.line for p in cat.photos] == [3, 4, 5]
    assert {p.row.price for p in cat.photos if p.row.item_id == "i1"} == {12}
    reasons = {b.line: b.reason for b in cat.bad}
    assert reasons == {
        2: "item i1: price 1200000 here, 12 on lines 3, 5; all photos of one item must agree (an item is listed as "
           "most of its rows say, as its first row on a tie)",
        6: "item i1: title 'Vases' here, 'Vase' on lines 3, 5; category 'Glassware' here, 'Ceramics' on lines 3, 5; "
           "sold_at '2024-05-02' here, '2024-05-01' on lines 3, 5; all photos of one item must agree (an item is "
           "listed as most of its rows say, as its first row on a tie)"}


def test_missing_column_fails_the_whole_file(folder):
    with pytest.raises(CatalogueError, match="missing column.*price"):
        read_catalogue(write(folder, "item_id,image_path,title,category,currency,sold_at\n"))


def test_an_empty_file_or_a_blank_first_line_asks_for_the_header(folder):
    with pytest.raises(CatalogueError, match="the file is empty: the first line must be the header item_id,"):
        read_catalogue(write(folder, ""))
    with pytest.raises(CatalogueError, match="its first line is blank: the first line must be the header item_id,"):
        read_catalogue(write(folder, "\n" + HEADER))


@pytest.mark.parametrize("header", ["Item_ID,Image_Path,Title,Category,Price,Currency,Sold_At",
                                    "item_id, image_path, title, category, price, currency, sold_at"])
def test_a_spreadsheets_header_names_the_same_columns(folder, header):
    """Capitals, or a space after each comma, as people type headers in a spreadsheet."""
    cat = read_catalogue(write(folder, header + "\ni1,a.png,Vase,Ceramics,12.5,USD,2024-05-01\n"))
    assert cat.bad == [] and cat.photos[0].row.title == "Vase"


def test_a_header_naming_a_column_twice_is_refused(folder):
    with pytest.raises(CatalogueError, match=r"the header names price, title more than once \(names are read "
                                             r"without case or spaces\): keep one column of each"):
        read_catalogue(write(folder, HEADER.strip() + ",Title, PRICE\ni1,a.png,Vase,Ceramics,3,USD,2024-05-01,V,3\n"))
    # columns the catalogue does not read may repeat
    cat = read_catalogue(write(folder, HEADER.strip() + ",notes,notes\ni1,a.png,Vase,Ceramics,3,USD,2024-05-01,x,y\n"))
    assert len(cat.photos) == 1


def test_a_lowercase_currency_is_read_as_its_code(folder):
    cat = read_catalogue(write(folder, HEADER + "i1,a.png,Vase,Ceramics,3,usd,2024-05-01\n"))
    assert cat.bad == [] and cat.photos[0].row.currency == "USD"


@pytest.mark.parametrize("sep, name", [(";", "semicolons"), ("\t", "tabs")])
def test_a_header_with_another_separator_says_so(folder, sep, name):
    """Excel in many European locales saves "CSV" with semicolons: the error says that is what is wrong."""
    text = HEADER.replace(",", sep) + sep.join(["i1", "a.png", "Vase", "Ceramics", "3", "USD", "2024-05-01"]) + "\n"
    with pytest.raises(CatalogueError, match=f"separated by commas: this header is separated by {name}"):
        read_catalogue(write(folder, text))


def test_a_catalogue_not_in_utf8_names_the_line_and_the_fix(folder):
    """Excel's plain "CSV" on Windows writes cp1252: the error named neither the file nor the line."""
    path = folder / "cat.csv"
    path.write_bytes((HEADER + "i0,c.png,Cup,Ceramics,1,USD,2024-01-01\n" + "i1,a.png,Café table,Furniture,3,USD,"
                      "2024-05-01\n").encode("cp1252"))
    with pytest.raises(CatalogueError, match=r"cat.csv: line 3 is not UTF-8 text \(byte 0xe9\): save the catalogue "
                                             r"as UTF-8 \(in Excel: \"CSV UTF-8\"\)"):
        read_catalogue(path)


def test_json_lines(folder):
    good = {"item_id": "i1", "image_path": "a.png", "title": "Vase", "category": "Ceramics", "price": 3,
            "currency": "EUR", "sold_at": "2024-02-02"}
    text = json.dumps(good) + "\n{not json\n" + json.dumps([1, 2]) + "\n"
    cat = read_catalogue(write(folder, text, "cat.jsonl"))
    assert len(cat.photos) == 1 and cat.photos[0].row.currency == "EUR"
    assert {b.line: b.reason for b in cat.bad} == {2: "not valid JSON (Expecting property name enclosed in "
                                                       "double quotes)", 3: "not a JSON object"}


def test_json_lines_rows_name_what_is_missing_or_not_text(folder):
    """Exports from a database write numeric ids as numbers, leave keys out, write null and capitalise keys."""
    row = {"item_id": 1017, "image_path": "a.png", "title": "Vase", "category": "Ceramics", "price": 3,
           "currency": "EUR", "sold_at": "2024-02-02"}
    no_title = {k: v for k, v in row.items() if k != "title"} | {"image_path": "b.png"}
    capitals = {k.title(): v for k, v in row.items()} | {"Image_Path": "b.png"}  # keys read as CSV headers are
    rows = (row, no_title, row | {"image_path": "c.png", "category": None}, capitals)
    cat = read_catalogue(write(folder, "\n".join(json.dumps(r) for r in rows) + "\n", "cat.jsonl"))
    assert [p.row.item_id for p in cat.photos] == ["1017", "1017"]  # as the same id reads from a CSV
    assert {b.line: b.reason for b in cat.bad} == {2: "title is missing: every row needs one",
                                                   3: "category must be text; got null"}


def test_json_lines_values_are_shown_as_json_wrote_them(folder):
    """true was read as a price of 1.0, and null shown as Python's 'None'."""
    row = {"item_id": "i1", "image_path": "a.png", "title": "Vase", "category": "Ceramics", "price": 3,
           "currency": "EUR", "sold_at": "2024-02-02"}
    rows = (row | {"price": True}, row | {"currency": None}, row | {"price": 1e300}, row | {"sold_at": 20240202})
    cat = read_catalogue(write(folder, "\n".join(json.dumps(r) for r in rows) + "\n", "cat.jsonl"))
    assert cat.photos == []
    assert {b.line: b.reason.split("; got ")[-1] for b in cat.bad} == {1: "true", 2: "null", 3: "1e+300",
                                                                       4: "20240202"}
    assert cat.bad[0].reason.startswith("price must be a number of 0 or more")


def test_a_json_lines_row_naming_a_column_twice_is_refused(folder):
    """As a CSV header is: a JSON object keeps the last of two equal keys, and both "title" and "Title" name
    the title."""
    row = {"item_id": "i1", "image_path": "a.png", "title": "Vase", "category": "Ceramics", "price": 3,
           "currency": "EUR", "sold_at": "2024-02-02"}
    lines = [json.dumps(row | {"image_path": "b.png", "Title": "Urn"}),
             json.dumps(row | {"image_path": "c.png"})[:-1] + ', "price": 4, "PRICE ": 5}',
             json.dumps(row | {"image_path": "d.png", "Notes": "x", "notes": "y", "category": {"a": [{"b": 1}]}})]
    cat = read_catalogue(write(folder, "\n".join(lines) + "\n", "cat.jsonl"))
    assert {b.line: b.reason for b in cat.bad} == {
        1: "the keys name title more than once (keys are read without case or spaces): keep one of each",
        2: "the keys name price more than once (keys are read without case or spaces): keep one of each",
        3: 'category must be text; got {"a": [{"b": 1}]}'}  # keys the catalogue does not read may repeat


def test_unknown_format(folder):
    with pytest.raises(CatalogueError, match="use .csv or .jsonl"):
        read_catalogue(write(folder, "x", "cat.xlsx"))


def test_a_category_spelled_several_ways_is_listed_as_most_items_spell_it(folder):
    """Typed by several people over years, one category comes as "Ceramics", "ceramics" and "CERAMICS": listed
    three times on the page, and /assist's vote split between them. Items count, not photos; a tie goes to the
    spelling seen first; an item whose photos differ only in the spelling is not a disagreement."""
    for name in ("d.png", "e.png", "f.png"):
        draw_object(0, 0, 0, size=32).save(folder / name)
    cat = read_catalogue(write(folder, HEADER + "i1,a.png,Vase,ceramics,12,USD,2024-05-01\n"
                                                "i1,b.png,Vase,ceramics,12,USD,2024-05-01\n"
                                                "i1,c.png,Vase,Ceramics,12,USD,2024-05-01\n"
                                                "i2,d.png,Jug,Ceramics,5,USD,2024-05-01\n"
                                                "i3,e.png,Bowl,CERAMICS,5,USD,2024-05-01\n"
                                                "i4,f.png,Chair,Dining  chairs,5,USD,2024-05-01\n"))
    assert cat.bad == []
    assert [p.row.category for p in cat.photos] == ["Ceramics"] * 5 + ["Dining  chairs"]
    assert cat.respelled == {"ceramics": "Ceramics", "CERAMICS": "Ceramics"}
    tie = read_catalogue(write(folder, HEADER + "i1,a.png,Lamp,lighting,12,USD,2024-05-01\n"
                                                "i2,b.png,Lamp,Lighting,12,USD,2024-05-01\n"
                                                "i3,c.png,Chair,Dining chairs,5,USD,2024-05-01\n"
                                                "i4,d.png,Chair,dining  Chairs,5,USD,2024-05-01\n", "tie.csv"))
    assert tie.respelled == {"Lighting": "lighting", "dining  Chairs": "Dining chairs"}


def test_a_row_skipped_for_disagreeing_does_not_make_its_photo_a_duplicate(folder):
    """The photo of a row with a typo, listed again by a correct row of the item, is the item's photo."""
    cat = read_catalogue(write(folder, HEADER + "i1,a.png,Vase,Ceramics,1200000,USD,2024-05-01\n"
                                                "i1,b.png,Vase,Ceramics,12,USD,2024-05-01\n"
                                                "i1,c.png,Vase,Ceramics,12,USD,2024-05-01\n"
                                                "i1,a.png,Vase,Ceramics,12,USD,2024-05-01\n"
                                                "i2,a.png,Jug,Ceramics,5,USD,2024-05-01\n"))
    assert [p.line for p in cat.photos] == [3, 4, 5]
    reasons = {b.line: b.reason for b in cat.bad}
    assert reasons[2].startswith("item i1: price 1200000 here, 12 on lines 3, 4, 5;")
    assert reasons[6] == "duplicate photo: same image_path as line 5"
