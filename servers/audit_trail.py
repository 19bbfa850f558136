"""One generation request's audit record: built from its finished row (:mod:`servers.audit`), returned in the
response when the client asked (``steering_audit: true``) and appended to the server's audit log when it keeps one.

The log line names the key (its policy name, never the key), the endpoint, the presets and every op with its
source, per layer the tokens it touched and its gate's score and decision, the detector that answered, the finish
reason and token counts; the prompt and response text only with ``audit_text``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from servers.jobs import Finished
from servers.state import ServerState
from servers.steering import Resolved


@dataclass
class AuditTrail:
    st: ServerState
    key: str
    endpoint: str
    request_id: str
    resolved: Resolved
    wanted: bool
    """The client asked for the record in its response."""
    prompt_text: str = ""
    response: dict[str, Any] | None = None
    """The record for the response, once finished (when wanted)."""

    @property
    def needed(self) -> bool:
        """Whether the engine builds the record for this request."""
        return self.wanted or self.st.audit_log is not None

    async def finish(self, fin: Finished) -> None:
        summary = {
            "presets": list(self.resolved.presets),
            "interventions": fin.audit or [],
            "detector": fin.refused_by,
        }
        if self.wanted:
            self.response = summary
        log = self.st.audit_log
        if log is None:
            return
        record = {
            "id": self.request_id,
            "key": self.key,
            "endpoint": self.endpoint,
            "model": self.st.model_name,
            "steered": self.resolved.config is not None,
            **summary,
            "finish_reason": fin.finish_reason,
            "error": fin.error,
            "prompt_tokens": fin.prompt_tokens,
            "completion_tokens": fin.completion_tokens,
        }
        if self.st.settings.audit_text:
            record |= {"prompt": self.prompt_text, "response": fin.text}
        await asyncio.to_thread(log.append, record)
