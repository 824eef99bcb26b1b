"""The search page at /ui in a real browser (Debian's Chromium driven by Playwright) against a real server.

The pages forbid scripts from strings (query/pages.py), so every wait_for_function is given a function: a bare
expression Playwright polls with eval, which the page's Content-Security-Policy refuses."""

from __future__ import annotations

import base64
import csv
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from model_store.preprocess import UPLOAD_FORMAT_NAMES
from test_service import heic, noise_png, png

pytestmark = pytest.mark.slow
PHONE = {"width": 390, "height": 844}


def watch(pg, server) -> dict[str, list[str]]:
    """What goes wrong on page `pg` while the test runs: JavaScript errors, what the page's
    Content-Security-Policy refused (query/pages.py) and requests to anywhere but `server`."""
    seen: dict[str, list[str]] = {"JavaScript errors": [], "refused by the CSP": [], "requests elsewhere": []}
    pg.on("pageerror", lambda exc: seen["JavaScript errors"].append(str(exc)))
    pg.on("console", lambda m: "Content Security Policy" in m.text and seen["refused by the CSP"].append(m.text))
    pg.on("request", lambda r: r.url.split(":")[0] in ("http", "https") and not r.url.startswith(server.url + "/")
          and seen["requests elsewhere"].append(r.url))
    return seen


def open_search_page(page) -> None:
    """Open /ui (of the page's base_url) and wait until it shows the served index's version: it has read /index."""
    page.goto("/ui")
    page.wait_for_function("() => document.querySelector('#served-version').textContent.includes('image-index:')")


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport=PHONE, base_url=server.url)
    pg = context.new_page()
    seen = watch(pg, server)
    open_search_page(pg)
    yield pg
    context.close()
    assert not any(seen.values()), {what: found for what, found in seen.items() if found}


@pytest.fixture(scope="module")
def rows(demo_catalogue) -> list[dict]:
    with open(demo_catalogue) as f:
        return list(csv.DictReader(f))


def choose(page, path: Path | None = None, *, name: str = "photo.png", data: bytes | None = None,
           mime: str = "image/png") -> None:
    files = str(path) if path else {"name": name, "mimeType": mime, "buffer": data}
    page.set_input_files("#file-input", files)


def wait_for_results(page, n: int = 1) -> None:
    page.wait_for_function(f"() => document.querySelectorAll('#results .result').length >= {n}"
                           " && getComputedStyle(document.querySelector('#busy')).display === 'none'"
                           " || document.querySelector('#busy').hidden", timeout=60_000)
    page.wait_for_function("() => [...document.querySelectorAll('#results .result')].length > 0", timeout=60_000)


def photos_loaded(page) -> list[int]:
    """naturalWidth of every result photo, once each has finished loading (they load lazily: scroll to each)."""
    photos = page.locator("#results img.result-photo")
    for i in range(photos.count()):
        photos.nth(i).scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.querySelectorAll('#results img.result-photo')].every(i => i.complete)",
                           timeout=30_000)
    return page.eval_on_selector_all("#results img.result-photo", "imgs => imgs.map(i => i.naturalWidth)")


def test_a_photo_gives_result_photos_prices_and_an_expected_price(page, demo_catalogue, rows):
    row = rows[0]
    choose(page, demo_catalogue.parent / row["image_path"])
    wait_for_results(page)
    widths = photos_loaded(page)
    assert widths and all(w > 0 for w in widths), widths
    first = page.locator("#results .result").first
    assert first.get_attribute("data-item-id") == row["item_id"]
    assert row["title"] in first.locator(".result-title").inner_text()
    assert "$" in first.locator(".result-price").inner_text()
    assert "%" in first.locator(".result-score").inner_text()
    assert "$" in page.locator("#estimate-price").inner_text()
    assert "%" in page.locator("#estimate-confidence").inner_text()
    assert row["category"] in page.locator("#assist-category").inner_text()
    assert page.locator("#banner-random").is_hidden()
    # usable at phone width: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_the_expected_price_says_in_words_how_far_to_trust_it(page, server, demo_catalogue, rows):
    """The confidence is not a chance (docs/EVALUATION.md): the page puts it in the words of the bands measured
    there. Each search is answered with the service's own answer for its photo, only its confidence changed
    (Playwright's route.fetch would send the page's multipart body empty)."""
    from playwright.sync_api import expect

    def answering(answer):  # a handler of one argument: Playwright passes a second one the request
        return lambda route: route.fulfill(json=answer)

    bands = [(0.03, "Low confidence: a rough guess (3%)"), (0.096, "Medium confidence (10%)"),
             (0.25, "Medium confidence (25%)"), (0.62, "High confidence (62%)")]
    for row, (confidence, words) in zip(rows, bands):
        path = demo_catalogue.parent / row["image_path"]
        answer = server.http.post("/assist", files={"image": path.read_bytes()}).json()
        answer["estimate"]["confidence"] = confidence
        page.route("**/assist", answering(answer))
        with page.expect_response("**/assist"):
            choose(page, path)
        page.unroute("**/assist")
        expect(page.locator("#estimate-confidence")).to_have_text(words)
        expect(page.locator("#estimate-confidence-row")).to_be_visible()


def test_result_photos_of_any_shape_fill_the_same_square(page, demo_catalogue, rows):
    """Thumbnails keep their photo's shape (a shop photo is often portrait); the cards crop each to one
    square, so a portrait or panorama photo neither stretches its card nor breaks the grid's rows."""
    choose(page, demo_catalogue.parent / rows[0]["image_path"])
    wait_for_results(page, 3)
    photos_loaded(page)
    for i, (w, h) in enumerate([(120, 320), (320, 90)]):  # a portrait and a panorama thumbnail
        thumbnail = png(Image.new("RGB", (w, h), (200, 80, 40)))
        page.eval_on_selector_all("#results img.result-photo", "(imgs, [i, url]) => { imgs[i].src = url; }",
                                  [i, "data:image/png;base64," + base64.b64encode(thumbnail).decode()])
    page.wait_for_function("() => [...document.querySelectorAll('#results img.result-photo')].slice(0, 2)"
                           ".every(i => i.complete && i.naturalWidth > 0 && i.naturalWidth !== i.naturalHeight)")
    boxes = page.eval_on_selector_all("#results .result-photo", "els => els.map(e => { const r = "
                                      "e.getBoundingClientRect(); return [r.width, r.height]; })")
    assert all(abs(w - h) < 1.5 and abs(w - boxes[0][0]) < 1.5 for w, h in boxes), boxes


def choose_two_things(page, demo_catalogue, rows) -> dict:
    """Searches a photo of two items of different categories side by side; returns the right-hand one's row."""
    left, right = rows[0], next(r for r in rows if r["category"] != rows[0]["category"])
    a = Image.open(demo_catalogue.parent / left["image_path"]).convert("RGB")
    b = Image.open(demo_catalogue.parent / right["image_path"]).convert("RGB").resize(a.size)
    both = Image.new("RGB", (a.width * 2, a.height), "white")
    both.paste(a, (0, 0))
    both.paste(b, (a.width, 0))
    choose(page, data=png(both), name="two-things.png")
    wait_for_results(page)
    return right


def drag_over_the_right_half(page) -> None:
    """Drags the mouse over the right half of the photo above, from its top to its bottom right corner."""
    box = page.locator("#preview-img").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.52, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] - 2, steps=5)
    page.mouse.up()


def search_finds_first(page, item_id: str) -> None:
    """Presses Search; the first result is `item_id`."""
    with page.expect_response("**/assist") as answer:
        page.click("#search-button")
    assert answer.value.ok
    wait_for_results(page)
    assert page.locator("#results .result").first.get_attribute("data-item-id") == item_id


def test_cropping_searches_only_the_boxed_item(page, demo_catalogue, rows):
    right = choose_two_things(page, demo_catalogue, rows)
    drag_over_the_right_half(page)
    assert page.locator("#crop-box").is_visible()
    search_finds_first(page, right["item_id"])
    assert not accessibility_faults(page)  # the crop box drawn, and its "Clear crop" button
    page.click("#crop-clear")
    assert page.locator("#crop-box").is_hidden()


def test_a_crop_needs_no_dragging_two_taps_or_the_keyboard_make_one(page, demo_catalogue, rows):
    """WCAG 2.2's 2.5.7 (dragging movements) and 2.1.1 (keyboard): two taps on opposite corners draw the box
    a drag draws; with the photo focused, the arrow keys draw and move a box, Shift and the arrows resize it,
    Escape clears it."""
    right = choose_two_things(page, demo_catalogue, rows)
    photo = page.locator("#preview-img").bounding_box()
    page.mouse.click(photo["x"] + photo["width"] * 0.52, photo["y"] + 2)
    assert page.locator("#crop-box").is_hidden() and "opposite corner" in page.inner_text("#crop-hint")
    page.mouse.click(photo["x"] + photo["width"] - 2, photo["y"] + photo["height"] - 2)
    box = page.locator("#crop-box").bounding_box()
    assert abs(box["x"] - (photo["x"] + photo["width"] * 0.52)) < 4 and box["width"] > photo["width"] * 0.4
    search_finds_first(page, right["item_id"])

    def crop() -> list[float] | None:  # left, top, width, height as shares of the photo
        return page.evaluate("""() => { const s = document.querySelector('#crop-box');
            return s.hidden ? null : [s.style.left, s.style.top, s.style.width, s.style.height].map(parseFloat); }""")

    page.locator("#preview").focus()
    scrolled = page.evaluate("window.scrollY")
    page.keyboard.press("Escape")
    assert crop() is None
    page.keyboard.press("ArrowRight")  # no box yet: one of 80% in the middle
    assert crop() == pytest.approx([10, 10, 80, 80])
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    for _ in range(4):
        page.keyboard.press("Shift+ArrowLeft")
    assert crop() == pytest.approx([15, 15, 60, 80])
    for _ in range(30):  # the box stays on the photo
        page.keyboard.press("ArrowRight")
    assert crop() == pytest.approx([40, 15, 60, 80])
    assert page.evaluate("window.scrollY") == scrolled  # the arrows moved the box, not the page

    page.locator("#search-button").focus()  # then back to the photo with the keyboard: its keys are shown
    for _ in range(12):
        page.keyboard.press("Shift+Tab")
        if page.evaluate("document.activeElement.id") == "preview":
            break
    assert page.evaluate("document.activeElement.id") == "preview"
    assert page.locator("#crop-keys").bounding_box()["width"] > 100
    assert not accessibility_faults(page)  # the photo focused, its keys on screen
    page.keyboard.press("Escape")
    assert crop() is None


def test_a_phone_photo_is_sent_at_the_size_the_index_needs(page, server, demo_catalogue, rows):
    upload_px = server.http.get("/index").json()["upload_px"]
    photo = Image.open(demo_catalogue.parent / rows[0]["image_path"]).convert("RGB").resize((1600, 1200))
    jpeg = png(photo, "JPEG", quality=90)
    # Chromium does not show a test the files of a multipart body: the page's own fetch reports what it sends
    page.evaluate("""() => {
        const send = window.fetch;
        window.sentPhotos = [];
        window.fetch = async (url, init) => {
            const photo = init && init.body instanceof FormData && init.body.get('image');
            if (photo) {
                const bitmap = await createImageBitmap(photo);
                window.sentPhotos.push({bytes: photo.size, type: photo.type, w: bitmap.width, h: bitmap.height});
            }
            return send(url, init);
        };
    }""")
    choose(page, data=jpeg, name="phone.jpg", mime="image/jpeg")
    wait_for_results(page)
    sent = page.evaluate("window.sentPhotos")
    assert sent, "the page sent no photo"
    assert (min(sent[0]["w"], sent[0]["h"]), sent[0]["type"]) == (upload_px, "image/jpeg"), sent
    assert sent[0]["w"] > sent[0]["h"] and sent[0]["bytes"] < len(jpeg) / 3, sent
    assert page.locator("#results .result").first.get_attribute("data-item-id") == rows[0]["item_id"]


def test_an_iphone_photo_the_browser_cannot_show_is_still_searched(page, demo_catalogue, rows):
    """Chromium cannot decode HEIC (an iPhone's photos, copied to a computer): the page says it has no
    preview and sends the file as it is, and the service reads it."""
    photo = Image.open(demo_catalogue.parent / rows[0]["image_path"]).convert("RGB")
    choose(page, data=heic(photo, quality=80), name="IMG_0001.HEIC", mime="image/heic")
    wait_for_results(page)
    assert page.locator("#preview-fallback").is_visible() and page.locator("#error").is_hidden()
    assert page.locator("#results .result").first.get_attribute("data-item-id") == rows[0]["item_id"]
    assert "$" in page.locator("#estimate-price").inner_text()


def test_other_sides_of_the_item_are_sent_with_its_photo(page, demo_catalogue, rows):
    """'Add another side': the photos go with the item's photo as more_images, show as thumbnails that can be
    removed (searching again), and a new photo starts a new item without them."""
    item = rows[30]["item_id"]
    with open(demo_catalogue.with_name("queries.csv")) as f:
        unseen = next(q["image_path"] for q in csv.DictReader(f) if q["item_id"] == item)
    sides = [demo_catalogue.parent / r["image_path"] for r in rows if r["item_id"] == item][:2]
    # Chromium does not show a test the files of a multipart body: the page's own fetch reports what it sends
    page.evaluate("""() => {
        const send = window.fetch;
        window.sentSides = [];
        window.fetch = (url, init) => {
            if (init && init.body instanceof FormData) window.sentSides.push(init.body.getAll('more_images').length);
            return send(url, init);
        };
    }""")

    def sent_after(action) -> int:
        before = page.evaluate("window.sentSides.length")
        with page.expect_response(lambda r: r.url.endswith("/assist")) as answer:
            action()
        assert answer.value.status == 200, answer.value.text()
        page.wait_for_function("() => document.querySelector('#busy').hidden")
        return page.evaluate(f"window.sentSides.slice({before})").pop()

    assert sent_after(lambda: choose(page, demo_catalogue.parent / unseen)) == 0
    assert sent_after(lambda: page.set_input_files("#sides-input", [str(p) for p in sides])) == 2
    assert page.locator("#sides-list .side img").count() == 2
    assert page.locator("#results .result").first.get_attribute("data-item-id") == item
    assert sent_after(lambda: page.locator("#sides-list .side-remove").first.click()) == 1
    assert page.locator("#sides-list .side").count() == 1
    assert sent_after(lambda: choose(page, demo_catalogue.parent / rows[0]["image_path"])) == 0
    assert page.locator("#sides-list .side").count() == 0


def test_any_side_of_the_item_can_be_cropped_and_is_sent_cropped(page, demo_catalogue, rows):
    """A side's thumbnail swaps it with the photo above, where it is cropped as the first one is; each photo
    keeps its own crop wherever it is, and each is sent cropped."""
    front = Image.open(demo_catalogue.parent / rows[0]["image_path"]).convert("RGB")
    other = Image.open(demo_catalogue.parent / rows[-1]["image_path"]).convert("RGB").resize(front.size)
    back = Image.new("RGB", (front.width * 2, front.height), "white")  # the item beside something else
    back.paste(other, (0, 0))
    back.paste(front, (front.width, 0))
    # Chromium does not show a test the files of a multipart body: the page's own fetch reports their sizes
    page.evaluate("""() => {
        const send = window.fetch;
        const size = async (f) => { const b = await createImageBitmap(f); return [b.width, b.height]; };
        window.sent = [];
        window.fetch = async (url, init) => {
            if (init && init.body instanceof FormData) {
                window.sent.push({image: await size(init.body.get('image')),
                                  more: await Promise.all(init.body.getAll('more_images').map(size))});
            }
            return send(url, init);
        };
    }""")

    def search(action=lambda: page.click("#search-button")) -> dict:
        with page.expect_response(lambda r: r.url.endswith("/assist")) as answer:
            action()
        assert answer.value.status == 200, answer.value.text()
        page.wait_for_function("() => document.querySelector('#busy').hidden")
        return page.evaluate("window.sent.at(-1)")

    choose(page, data=png(front), name="front.png")
    wait_for_results(page)
    sent = search(lambda: page.set_input_files("#sides-input", files={"name": "back.png", "mimeType": "image/png",
                                                                     "buffer": png(back)}))
    assert sent == {"image": list(front.size), "more": [list(back.size)]}

    page.click("#sides-list .side-show")  # the back photo goes above, the front one into the list
    assert page.locator("#crop-box").is_hidden() and "Other side 1 is shown above" in page.inner_text("#crop-hint")
    assert page.evaluate("window.sent.length") == 2  # swapping sends nothing: the item's photos are the same
    box = page.locator("#preview-img").bounding_box()
    assert box["width"] > box["height"] * 1.5  # the wide back photo is the one shown
    drag_over_the_right_half(page)
    sent = search()
    (w, h), more = sent["image"], sent["more"]
    assert w < back.width * 0.55 and h > back.height * 0.9 and more == [list(front.size)], sent

    page.click("#sides-list .side-show")  # the front photo back above, uncropped; the back one keeps its crop
    assert page.locator("#crop-box").is_hidden()
    assert page.locator("#sides-list .side-show.is-cropped").count() == 1
    assert "(cropped)" in page.locator("#sides-list .side-show").get_attribute("aria-label")
    assert search() == {"image": list(front.size), "more": [[w, h]]}
    assert not accessibility_faults(page)  # a cropped side in the list


def test_show_more_adds_the_next_results_and_they_work_like_the_first(page, demo_catalogue, rows):
    """The page asks for 48 items and shows 12; 'Show 12 more' adds the next ones (the demo has 24 items) and
    goes away when all are shown; a card it added opens its own 'More like this'."""
    choose(page, demo_catalogue.parent / rows[0]["image_path"])
    wait_for_results(page)
    results, more = page.locator("#results .result"), page.locator("#show-more")
    assert results.count() == 12 and more.is_visible() and more.inner_text() == "Show 12 more"
    more.click()
    assert results.count() == 24 and more.is_hidden()
    assert len({results.nth(i).get_attribute("data-item-id") for i in range(24)}) == 24  # no item twice
    assert page.evaluate("document.activeElement.closest('.result').dataset.index") == "12"
    thirteenth = results.nth(12)
    title = thirteenth.locator(".result-title").inner_text()
    thirteenth.get_by_role("button", name=re.compile("More like this")).click()
    page.wait_for_function("() => document.querySelector('#results-title').textContent.includes('More like')")
    assert title in page.locator("#results-title").inner_text()


def test_filters_narrow_the_results(page, demo_catalogue, rows):
    row = rows[0]
    choose(page, demo_catalogue.parent / row["image_path"])
    wait_for_results(page)
    other = next(r["category"] for r in rows if r["category"] != row["category"])
    page.click("#filters-details summary")  # folded on a phone
    page.select_option("#filter-category", other)
    page.fill("#filter-max-price", "10000")
    with page.expect_response("**/assist") as answer:
        page.click("#search-button")
    assert answer.value.ok
    page.wait_for_function(f"() => [...document.querySelectorAll('#results .result-category')].length > 0 && "
                           f"[...document.querySelectorAll('#results .result-category')]"
                           f".every(e => e.textContent.includes({other!r}))", timeout=30_000)


def test_a_photo_nothing_sold_resembles_gets_a_plain_refusal_instead_of_a_price_or_a_category(page):
    with page.expect_response("**/assist") as answer:
        choose(page, data=noise_png(), name="noise.png")
    body = answer.value.json()
    assert answer.value.ok and body["estimate"]["price"] is None and body["category"]["suggested"] is None
    page.wait_for_function("() => document.querySelector('#estimate-price').textContent.length > 0")
    said = page.locator("#estimate-price").inner_text()
    assert re.fullmatch(r"No sold item is similar enough to price this photo: the closest is [\d.]+% similar, a price "
                        r"needs 70%; it needs a human appraisal\.", said), said
    assert page.locator("#estimate-confidence-row").is_hidden()
    category = page.locator("#assist-category").inner_text()
    assert re.fullmatch(r"Suggested category: none\. No sold item is similar enough to suggest a category: the "
                        r"closest is [\d.]+% similar, a suggestion needs 65%\.", category), category


def test_more_like_this_shows_the_items_neighbours(page, demo_catalogue, rows):
    choose(page, demo_catalogue.parent / rows[0]["image_path"])
    wait_for_results(page)
    first = page.locator("#results .result").first
    item = first.get_attribute("data-item-id")
    with page.expect_response(lambda r: "/similar/" in r.url) as answer:
        first.locator(".more-like-this").click()
    assert answer.value.ok
    page.wait_for_function("() => document.querySelector('#results-title').textContent.includes('More like')")
    wait_for_results(page)
    ids = page.eval_on_selector_all("#results .result", "els => els.map(e => e.dataset.itemId)")
    assert ids and item not in ids
    assert all(w > 0 for w in photos_loaded(page))


def test_a_non_image_gives_a_readable_error(page):
    choose(page, data=b"these are my notes, not a photo", name="notes.txt", mime="text/plain")
    alert = page.locator("#error")
    alert.wait_for(state="visible", timeout=30_000)
    text = alert.inner_text()
    assert UPLOAD_FORMAT_NAMES in text, text  # every format the service reads, as its own 415 names them
    assert "415" not in text and "{" not in text  # plain words, not a status code or a JSON dump
    assert page.locator("#busy").is_hidden()


def test_a_file_over_the_limit_gives_a_readable_error(page):
    # the server in tests takes at most 2,000,000 bytes per photo
    choose(page, data=b"\0" * 2_500_000, name="huge.jpg", mime="image/jpeg")
    alert = page.locator("#error")
    alert.wait_for(state="visible", timeout=30_000)
    assert "large" in alert.inner_text().lower(), alert.inner_text()


def test_the_page_is_keyboard_usable(page):
    """Every control is reachable with Tab."""
    reached = set()
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement && document.activeElement.id"))
    assert {"file-input", "camera-input", "search-button"} <= reached, reached


def test_the_api_page_loads_only_this_servers_files(browser, server):
    """The API's page at / is Swagger UI as BentoML serves it, without its Google Tag Manager (which would tell
    Google of every visit) or online validator badge; it and the search page forbid what they do not load."""
    pg = browser.new_page(base_url=server.url)
    seen = watch(pg, server)
    answer = pg.goto("/")
    pg.locator(".opblock").first.wait_for(timeout=30_000)
    pg.locator(".opblock-summary-path", has_text="/search").first.click()  # an endpoint's form opens
    pg.get_by_role("button", name="Try it out").first.wait_for()
    assert pg.evaluate("() => window.ui.getConfigs().validatorUrl") is None  # its badge skips only local addresses
    paths = server.http.get("/docs.json").json()["paths"]
    assert pg.locator(".opblock").count() == sum(method in ("get", "post") for ops in paths.values() for method in ops)
    pg.close()
    assert not any(seen.values()), {what: found for what, found in seen.items() if found}
    policies = {}
    for path in ("/", "/api-page.js", "/ui/", "/ui/app.js"):
        headers = server.http.get(path).headers
        policies[path] = policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, (path, policy)
        assert "script-src" not in policy and headers["x-content-type-options"] == "nosniff", (path, headers)
    assert answer.headers["content-security-policy"] == policies["/"] == policies["/ui/"].replace(
        "style-src 'self'", "style-src 'self' 'unsafe-inline'")  # the search page needs no inline styles


def try_it_out(pg, path: str, fields: dict[str, str], files: dict[str, str]) -> dict:
    """Fill an endpoint's form on the API page, press Execute and return the answer it shows."""
    block = pg.locator(".opblock-post", has=pg.locator(".opblock-summary-path", has_text=re.compile(f"^{path}$")))
    if not block.get_by_role("button", name="Execute").is_visible():
        block.locator(".opblock-summary").click()
        block.get_by_role("button", name="Try it out").click()
    for name, value in files.items():
        block.locator(f"tr[data-property-name='{name}'] input[type=file]").set_input_files(value)
    for name, value in fields.items():
        block.locator(f"tr[data-property-name='{name}'] input[type=text]").fill(value)
    with pg.expect_response(lambda r: r.url.endswith(path)) as answer:
        block.get_by_role("button", name="Execute").click()
    return {"status": answer.value.status, **answer.value.json()}


def test_the_api_pages_try_it_out_searches_with_the_fields_left_blank(browser, server, demo_catalogue, rows):
    """Swagger UI sends every field of a form, an empty text for each one left blank (and for a list of photos
    with none added), and had pre-filled "null" in each optional field: a search from the API page answered
    400 until the document dropped those defaults and the page left empty fields out."""
    pg = browser.new_page(base_url=server.url)
    pg.goto("/")
    pg.locator(".opblock").first.wait_for(timeout=30_000)
    photo = str(demo_catalogue.parent / rows[0]["image_path"])
    blank = try_it_out(pg, "/search", {}, {"image": photo})
    assert blank["status"] == 200 and blank["results"][0]["item_id"] == rows[0]["item_id"], blank
    other = next(r["category"] for r in rows if r["category"] != rows[0]["category"])
    filtered = try_it_out(pg, "/search", {"category": other, "k": "3"}, {})
    assert filtered["status"] == 200 and {m["category"] for m in filtered["results"]} == {other}, filtered
    assert len(filtered["results"]) == 3
    wrong = try_it_out(pg, "/search", {"category": "", "min_price": "-5"}, {})  # the API's own 400 still shows
    assert wrong["status"] == 400 and wrong["field"] == "min_price", wrong
    assert try_it_out(pg, "/estimate", {}, {"image": photo})["status"] == 200
    pg.close()


WCAG = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]


def accessibility_faults(page) -> list[str]:
    """What axe-core (the rules of WCAG 2.2 AA and Deque's best practices) finds wrong on the page as it is, once
    its transitions have ended: the results fade back from 60% opacity in 0.15 s after a search, and axe-core
    measured the contrast of their text mid-fade once (a CI run, 2026-12-05)."""
    from axe_playwright_python.sync_playwright import Axe

    page.wait_for_function("() => document.getAnimations().every(a => a.effect.getTiming().iterations === Infinity)")
    found = Axe().run(page, options={"runOnly": {"type": "tag", "values": WCAG}, "resultTypes": ["violations"]})
    return [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes'][:3]]}"
            for v in found.response["violations"]]


@pytest.mark.parametrize("viewport", [PHONE, {"width": 1280, "height": 900}], ids=["phone", "desktop"])
def test_the_page_meets_wcag_2_2_aa_in_every_state(browser, server, demo_catalogue, rows, viewport):
    """Checked by axe-core in Chromium, at phone and desktop widths: the page as it opens, with results, an
    expected price and cataloguing help, with another side added and the filters open, with all results shown,
    on 'More like this', and with an error. The crop box, a service not ready and the random-weights banner
    are checked in their own tests."""
    context = browser.new_context(viewport=viewport, base_url=server.url)
    page = context.new_page()
    open_search_page(page)
    faults = {"opened": accessibility_faults(page)}
    choose(page, demo_catalogue.parent / rows[0]["image_path"])
    wait_for_results(page)
    page.wait_for_function("() => document.querySelector('#busy').hidden")
    faults["results"] = accessibility_faults(page)
    with page.expect_response(lambda r: r.url.endswith("/assist")):
        page.set_input_files("#sides-input", str(demo_catalogue.parent / rows[1]["image_path"]))
    page.wait_for_function("() => document.querySelector('#busy').hidden")
    page.locator("#filters-details summary").click()
    faults["a side added, filters open"] = accessibility_faults(page)
    page.locator("#show-more").click()
    faults["all results"] = accessibility_faults(page)
    page.locator("#results .result").first.get_by_role("button", name=re.compile("More like this")).click()
    page.wait_for_function("() => document.querySelector('#results-title').textContent.includes('More like')")
    faults["more like this"] = accessibility_faults(page)
    choose(page, data=b"not a photo", name="notes.png")
    page.locator("#error").wait_for(state="visible", timeout=30_000)
    faults["an error"] = accessibility_faults(page)
    context.close()
    assert not any(faults.values()), {state: found for state, found in faults.items() if found}


def test_not_ready_then_random_weights_are_said_plainly(browser, demo_catalogue, tmp_path):
    """A service with nothing promoted answers 503: the page says so in words. Once it serves an index whose
    embedder has random weights, the page carries the banner."""
    from conftest import Server
    from index_builder.build import build
    from model_store import stages

    server = Server(tmp_path / "stages", tmp_path / "serve.log", IMAGESEARCH_FOLLOW_STAGE_S="0")
    try:
        server.wait("/livez")
        context = browser.new_context(viewport=PHONE, base_url=server.url)
        page = context.new_page()
        page.goto("/ui")
        alert = page.locator("#error")
        alert.wait_for(state="visible", timeout=30_000)
        assert "starting or unavailable" in alert.inner_text(), alert.inner_text()
        assert not accessibility_faults(page)
        s = build(demo_catalogue, backbone="efficientnet-lite0", weights="random", image_size=64, pca_dim=0,
                  progress=False, workers=0)
        old = os.environ["IMAGESEARCH_STAGES_DIR"]
        os.environ["IMAGESEARCH_STAGES_DIR"] = str(tmp_path / "stages")
        stages.get_settings.cache_clear()
        try:
            stages.promote(s.tag, "production", force=True)
        finally:
            os.environ["IMAGESEARCH_STAGES_DIR"] = old
            stages.get_settings.cache_clear()
        server.stop()  # the embedder loads its model at start: a new embedder needs a restart
        server = Server(tmp_path / "stages", tmp_path / "serve2.log", IMAGESEARCH_FOLLOW_STAGE_S="0").wait()
        page = context.new_page()
        page.goto(f"{server.url}/ui")
        banner = page.locator("#banner-random")
        banner.wait_for(state="visible", timeout=30_000)
        assert "RANDOM" in banner.inner_text()
        assert not accessibility_faults(page)
        context.close()
    finally:
        server.stop()
