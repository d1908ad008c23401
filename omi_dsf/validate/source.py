"""A plugin to validate, read the same way whether it is a folder or a jar.

Recognised layouts: this project's (bpmn/, fhir_profiles/), a plugin jar (bpe/, fhir/), and any
DSF plugin source tree (…/src/main/resources/{bpe,fhir}). BPMN models are found by extension,
FHIR resources as *.xml / *.json below a folder named fhir/ or fhir_profiles/.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

# No DTDs, no entity expansion, no network: plugin files are untrusted input.
XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, remove_comments=False)

DEFINITION_SERVICES = {
    "META-INF/services/dev.dsf.bpe.v1.ProcessPluginDefinition": "v1",
    "META-INF/services/dev.dsf.bpe.v2.ProcessPluginDefinition": "v2",
}


class SourceError(Exception):
    pass


@dataclass
class PluginSource:
    name: str
    files: dict[str, bytes] = field(default_factory=dict)   # relative path -> content
    is_jar: bool = False

    @property
    def bpmn_files(self) -> list[str]:
        return sorted(p for p in self.files if p.endswith(".bpmn"))

    @property
    def fhir_files(self) -> list[str]:
        return sorted(p for p in self.files
                      if p.endswith((".xml", ".json")) and _fhir_dir(p) and not _is_example(p))

    @property
    def example_files(self) -> list[str]:
        return sorted(p for p in self.files if p.endswith((".xml", ".json")) and _fhir_dir(p) and _is_example(p))

    def parse_xml(self, path: str) -> etree._Element:
        return etree.fromstring(self.files[path], XML_PARSER)


def _fhir_dir(path: str) -> bool:
    parts = path.split("/")
    return "fhir" in parts[:-1] or "fhir_profiles" in parts[:-1]


def _is_example(path: str) -> bool:
    return "examples" in path.split("/")[:-1]


def load_source(path: Path) -> PluginSource:
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_dir():
        files = {}
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if p.is_file() and not any(part in ("target", ".git", "node_modules") for part in rel.split("/")[:-1]):
                if p.suffix in (".bpmn", ".xml", ".json", ".properties") or "META-INF/services" in rel:
                    files[rel] = p.read_bytes()
        return PluginSource(path.name, files, is_jar=False)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n) for n in z.namelist()
                     if not n.endswith("/") and (n.endswith((".bpmn", ".xml", ".json", ".properties", ".class"))
                                                 or n.startswith("META-INF/services/"))}
        return PluginSource(path.name, files, is_jar=True)
    raise SourceError(f"{path}: neither a folder nor a jar (zip) file")
