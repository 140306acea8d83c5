"""Recent Responses API responses, kept in memory so clients can build on them.

OpenAI's Responses API stores a response unless asked not to (`store: false`), and clients rely on it:
the Vercel AI SDK sends an earlier assistant message back as an `item_reference` by its id, others
continue a conversation with `previous_response_id`. This store keeps what a later request needs for
that (each response's own input items, its output items, its body) for the life of the process,
least recently used first out once the store passes its size; an id it no longer holds is a 400
saying to send the items themselves.

A response continued with `previous_response_id` keeps only its own input and a link to the
previous one, so a long conversation costs its length once, not once per turn.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# JSON text of the kept responses, at most: ~200 qwen-code-sized first turns, far more follow-ups. Python
# holds JSON in several times its text's size (~9x for a `metadata` of many tiny keys, measured), so the
# cap stays small.
DEFAULT_MAX_BYTES = 16 << 20


@dataclass
class StoredResponse:
    """One kept response: what continuing it needs, and its body for GET /v1/responses/{id}."""

    previous_id: str | None
    input_items: list[dict[str, Any]]  # this request's own input (references resolved)
    output_items: list[dict[str, Any]]
    body: dict[str, Any]
    size: int


class ResponseStore:
    """Kept responses by id, and their output items by item id; least recently used leave first."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._items: dict[str, dict[str, Any]] = {}  # output item id -> the item
        self._bytes = 0

    def put(self, response_id: str, previous_id: str | None, input_items: list[dict[str, Any]],
            body: dict[str, Any]) -> None:  # fmt: skip
        """Keep a finished response (its body's `output` are its output items)."""
        output_items = list(body["output"])
        size = len(json.dumps([input_items, body], ensure_ascii=False))
        if size > self.max_bytes:
            return  # larger than the whole store: keeping it would evict everything else for one turn
        self._responses[response_id] = StoredResponse(previous_id, input_items, output_items, body, size)
        for item in output_items:
            self._items[item["id"]] = item
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._evict_oldest()

    def get(self, response_id: str) -> StoredResponse | None:
        """The kept response (now the most recently used), or None."""
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forget a response; False when it was not kept."""
        if response_id not in self._responses:
            return False
        self._drop(response_id)
        return True

    def item(self, item_id: str) -> dict[str, Any] | None:
        """A kept output item by its id (`msg_...`, `fc_...`), or None."""
        return self._items.get(item_id)

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """Every input and output item from the start of the conversation up to and including this
        response, oldest first; None when it, or a response it continued, is no longer kept."""
        chain: list[StoredResponse] = []
        current: str | None = response_id
        while current is not None:
            stored = self.get(current)  # touched: a conversation in use keeps its whole chain
            if stored is None:
                return None
            chain.append(stored)
            current = stored.previous_id
        return [item for stored in reversed(chain) for item in (*stored.input_items, *stored.output_items)]

    def _evict_oldest(self) -> None:
        self._drop(next(iter(self._responses)))

    def _drop(self, response_id: str) -> None:
        stored = self._responses.pop(response_id)
        self._bytes -= stored.size
        for item in stored.output_items:
            self._items.pop(item["id"], None)
