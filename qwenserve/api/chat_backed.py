"""What the endpoints served by the chat path (Responses, Anthropic Messages) share per request: the
engine request's lifetime, its tool-call parser and filter, and the log line. Each subclass turns the
parser's chat deltas into its own API's blocks and events."""

from __future__ import annotations

from typing import Any

from qwenserve.api.request_log import RequestTracker
from qwenserve.api.serving_chat import CallFilter, PreparedChat, TrackedRequest, parse_deltas
from qwenserve.api.state import ServerState

Event = tuple[str, dict[str, Any]]  # (event type, payload without its type)


class ChatBackedContext(TrackedRequest):
    """One request of an API served by the chat path, from submission to its last event."""

    def __init__(
        self, state: ServerState, model: str | None, prepared: PreparedChat, request_id: str,
        tracker: RequestTracker, parser: Any | None,
    ):  # fmt: skip
        super().__init__(state, request_id, tracker)
        self.prepared = prepared
        self.parser = parser  # None: the output is plain text
        self.calls = CallFilter(prepared.plan.callable_names, prepared.plan.one_call)
        self.model = state.model_name(model)

    def add_delta(self, delta: dict[str, Any]) -> list[Event]:
        """The API's events for one chat delta (content, or tool-call header / argument fragments)."""
        raise NotImplementedError

    def _feed(self, text: str, final: bool) -> list[Event]:
        """Parse the next piece of model output into the API's blocks and their events."""
        events: list[Event] = []
        for delta in parse_deltas(self.parser, text, final, self.calls):
            self.count_calls(delta)
            events += self.add_delta(delta)
        return events

    def _prefix(self) -> str:
        """The forced start of a call (tool_choice required / named), which the parser reads first."""
        return self.prepared.plan.forced_prefix if self.parser is not None else ""
