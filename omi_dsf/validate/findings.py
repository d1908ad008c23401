"""One finding = one line: the file, the element, the rule it breaks, and what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Finding:
    file: str          # path inside the plugin (folder-relative or jar entry)
    element: str       # XML element / id / FHIR path, "" when the whole file
    rule: str          # short rule id, e.g. dsf-bpmn-version-tag
    message: str

    def render(self, prefix_root: Path | None = None) -> str:
        where = self.file if not self.element else f"{self.file} [{self.element}]"
        return f"{where}: {self.rule}: {self.message}"
