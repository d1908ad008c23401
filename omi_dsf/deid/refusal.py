"""Why one instance may not leave the site, said so that a reader can act on the line alone.

Every refusal names the file (its path, or "instance N" where paths may carry patient names),
the instance (its pseudonymized SOPInstanceUID once known: never an original UID), the
attribute (keyword and tag), the rule, and for a leak-check hit the kind of identifying value
that matched (never the value).
"""

from __future__ import annotations

# What one refused instance does to its study (site configuration `on_refused_instance`, CLI
# --on-refused-instance): stop the study, or leave the instance out and report it.
POLICIES = ("refuse-study", "send-rest")


class Refused(Exception):
    """One instance is refused. `reason` names attribute, rule (and kind); `locate` adds where."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
        self.file = ""
        self.instance = ""

    def locate(self, file: str, instance: str = "") -> "Refused":
        self.file = self.file or file
        self.instance = self.instance or instance
        return self

    def __str__(self) -> str:
        where = self.file
        if self.instance:
            where += f" (SOPInstanceUID {self.instance})" if where else f"SOPInstanceUID {self.instance}"
        return f"{where}: {self.reason}" if where else self.reason
