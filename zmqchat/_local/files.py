"""File offers of a single broker (issue 24): in memory, kept in the SQLite store."""

from __future__ import annotations

import json

from zmqchat._core.files_state import FileOffer
from zmqchat._core.state import Op
from zmqchat._local.store import Store


class LocalFiles:
    """The FileIndex of files_state.py for one broker: every offer in memory, each change
    logged with the pass's other records (so it is durable before any reply says so)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.offers: dict[str, FileOffer] = {}
        for text in store.file_offers():
            offer = FileOffer.from_json(json.loads(text))
            self.offers[offer.id] = offer

    def find(self, fid: str) -> Op:
        return Op.ready(self.offers.get(fid))

    def listing(self, room: str | None, peer: str | None) -> Op:
        if room is not None:
            found = [o for o in self.offers.values() if o.room == room]
        else:
            found = [o for o in self.offers.values() if not o.room and peer in (o.sender, o.to_key)]
        return Op.ready(sorted(found, key=lambda o: o.ts))

    def add(self, offer: FileOffer) -> Op:
        return self.save(offer)

    def save(self, offer: FileOffer) -> Op:
        self.offers[offer.id] = offer
        self.store.save_file(offer.id, json.dumps(offer.to_json()))
        return Op.ready()

    def sent_since(self, owner: str, since: float) -> Op:
        return Op.ready(
            sum(o.size for o in self.offers.values() if o.owner == owner and o.ts >= since)
        )

    def refs(self, sha256: str) -> Op:
        return Op.ready(
            sum(1 for o in self.offers.values() if o.sha256 == sha256 and not o.removed_by)
        )
