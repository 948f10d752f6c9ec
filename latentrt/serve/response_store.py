"""The Responses API's store, in memory and opt-in (vLLM keeps it off by default too): a finished response whose
request did not say ``store: false`` is kept with its conversation, so a client can fetch it
(``GET /v1/responses/{id}``), delete it, and continue it by sending only the next turn with
``previous_response_id``. At most ``capacity`` responses are kept, the oldest dropped first; each server process
(each Ray replica) has its own.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict


class ResponseNotFound(LookupError):
    """A response id the store does not hold: a 404 of OpenAI's type for it."""

    kind = "invalid_request_error"


class ResponseStore:
    """Finished responses by id, each with its conversation (the chat messages up to and including its answer,
    without its instructions, which a next turn does not inherit: OpenAI's rule)."""

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"a response store holds at least one response, got capacity {capacity!r}")
        self.capacity = capacity
        self._kept: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()
        self._lock = threading.Lock()  # (routes run on the event loop, submissions on worker threads)

    def put(self, response: dict, conversation: list[dict]) -> None:
        with self._lock:
            self._kept[response["id"]] = (copy.deepcopy(response), copy.deepcopy(conversation))
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)

    def response(self, rid: str) -> dict:
        return copy.deepcopy(self._entry(rid)[0])

    def conversation(self, rid: str) -> list[dict]:
        return copy.deepcopy(self._entry(rid)[1])

    def delete(self, rid: str) -> None:
        with self._lock:
            if self._kept.pop(rid, None) is None:
                raise ResponseNotFound(f"response {rid!r:.100} not found")

    def _entry(self, rid: str) -> tuple[dict, list[dict]]:
        with self._lock:
            entry = self._kept.get(rid)
        if entry is None:
            raise ResponseNotFound(f"response {rid!r:.100} not found")
        return entry

    def __len__(self) -> int:
        return len(self._kept)
