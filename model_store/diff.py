"""How one index version differs from another: items and photos added and removed, recall, evaluation."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from model_store.index_artifact import ITEMS_FILE, IndexManifest


class IndexDiff(BaseModel):
    old: str
    new: str
    items_old: int
    items_new: int
    items_added: int
    items_removed: int
    photos_added: int
    photos_removed: int
    recall_old: float
    recall_new: float
    evaluation_old: dict[str, Any] | None = None
    evaluation_new: dict[str, Any] | None = None

    @property
    def lost_share(self) -> float:
        """The share of the old version's items the new one no longer has."""
        return self.items_removed / self.items_old if self.items_old else 0.0

    def lines(self) -> list[str]:
        out = [f"{self.new} against {self.old}:",
               f"  items   {self.items_old:,} -> {self.items_new:,} (+{self.items_added:,} -{self.items_removed:,}, "
               f"{self.lost_share:.1%} of the served items gone)",
               f"  photos  +{self.photos_added:,} -{self.photos_removed:,}",
               f"  recall@10 {self.recall_old:.3f} -> {self.recall_new:.3f}"]
        if self.evaluation_old or self.evaluation_new:
            def fmt(e: dict | None) -> str:
                return f"top1 {e['top1']} mAP {e['mAP']}" if e else "none"
            out.append(f"  evaluation {fmt(self.evaluation_old)} -> {fmt(self.evaluation_new)}")
        return out


def diff(old_tag: str, old: Path, new_tag: str, new: Path) -> IndexDiff:
    """Compare two artifact folders; set arithmetic runs inside SQLite, so a million rows take seconds."""
    m_old, m_new = IndexManifest.read(old), IndexManifest.read(new)
    conn = sqlite3.connect(f"file:{new / ITEMS_FILE}?mode=ro", uri=True)
    try:
        conn.execute("ATTACH DATABASE ? AS old", (f"file:{old / ITEMS_FILE}?mode=ro",))

        def count(sql: str) -> int:
            return conn.execute(sql).fetchone()[0]

        added = count("SELECT count(*) FROM main.items WHERE item_id NOT IN (SELECT item_id FROM old.items)")
        removed = count("SELECT count(*) FROM old.items WHERE item_id NOT IN (SELECT item_id FROM main.items)")
        # a photo is its content where both versions know it (format 3 records every photo's SHA-256; format 2
        # those with a thumbnail, whose key is it), else its path
        both = set.intersection(*({r[1] for r in conn.execute(f"PRAGMA {db}.table_info(photos)")}
                                  for db in ("main", "old")))
        photo = ("item_id, content" if "content" in both else
                 "item_id, coalesce(thumbnail, image_path)" if "thumbnail" in both else "item_id, image_path")
        photos_added = count(f"SELECT count(*) FROM (SELECT {photo} FROM main.photos EXCEPT "
                             f"SELECT {photo} FROM old.photos)")
        photos_removed = count(f"SELECT count(*) FROM (SELECT {photo} FROM old.photos EXCEPT "
                               f"SELECT {photo} FROM main.photos)")
    finally:
        conn.close()
    return IndexDiff(old=old_tag, new=new_tag, items_old=m_old.n_items, items_new=m_new.n_items, items_added=added,
                     items_removed=removed, photos_added=photos_added, photos_removed=photos_removed,
                     recall_old=m_old.ann_recall_at_10, recall_new=m_new.ann_recall_at_10,
                     evaluation_old=m_old.evaluation, evaluation_new=m_new.evaluation)
