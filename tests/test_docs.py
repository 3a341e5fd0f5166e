"""The repository's documentation stands on its own.

* Docs, code, specs and tests cite only files of this repository: no notes kept outside it
  (design, vLLM, NIXL, peers or style notes by their file names, or a folder named ``shared``).
* Every relative link in the Markdown pages points to a file that exists here, and a link to a
  heading (``page.md#anchor``) to a heading that exists on that page.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Notes that live outside the repository; citing them leaves a reader with nothing to open.
#: (Spelled in lower case here so that this file does not cite them itself.)
OUTSIDE_NOTES = ("design", "vllm_semantics", "nixl", "peers", "vllm_cpu", "style")
_NAMES = "|".join(n.upper() for n in OUTSIDE_NOTES)
OUTSIDE_CITATION = re.compile(
    rf"\b(?:{_NAMES})(?:\.md\b|\s*§)"  # NAME.md, or NAME §3 without the suffix
    r"|(?<![\w.-])" + "shared" + r"/"  # a path into a folder named shared
)

TEXT_SUFFIXES = {
    ".py", ".md", ".layout", ".sh", ".toml", ".json", ".j2", ".lark", ".txt", ".cfg", ".ini",
    ".yml", ".yaml", ".in", ".pyi",
}  # fmt: skip
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__"}

#: Markdown pages whose relative links are checked.
PAGES = sorted(
    [ROOT / "README.md", ROOT / "NOTES-vllm.md", ROOT / "tests" / "vllm" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
)


def repo_files() -> list[Path]:
    """The repository's files: git's list when this is a checkout, else a walk of the tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [Path(folder) / n for n in names]
    return sorted(p for p in files if p.suffix in TEXT_SUFFIXES and p.is_file())


def test_outside_citation_pattern():
    def cited(text: str) -> bool:
        return OUTSIDE_CITATION.search(text) is not None

    for name in OUTSIDE_NOTES:
        assert cited(f"see {name.upper()}.md §4")
        assert cited(f"({name.upper()} §9)")
    assert cited("(`" + "shared" + "/notes.md` explains it)")
    assert cited("/work/" + "shared" + "/x")
    # the repository's own pages and ordinary words are fine
    assert not cited("docs/nixl.md §7, docs/design.md §3, docs/vllm-reference.md §6")
    assert not cited("VLLM_CPU_KVCACHE_SPACE=1, VLLM_CPU_OMP_THREADS_BIND=nobind")
    assert not cited("one page stride shared by both kinds; SHARED memory")


def test_no_citation_of_files_outside_the_repository():
    hits = []
    for path in repo_files():
        text = path.read_text("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_CITATION.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "citations of files outside the repository:\n" + "\n".join(hits)


# --- links ---------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]`]|`[^`]*`)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark[0] * len(mark)
            elif mark.startswith(fence):
                fence = None
            continue
        if fence is None:
            yield n, line


def _outside_code_spans(line: str, pos: int) -> bool:
    return line[:pos].count("`") % 2 == 0


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets dropped, lower case, punctuation removed,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(page.read_text("utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(page: Path):
    for n, line in _prose_lines(page.read_text("utf-8")):
        for m in LINK.finditer(line):
            if _outside_code_spans(line, m.start()):
                yield n, m.group(1)


def test_slug_follows_github():
    assert slug("8. Performance targets") == "8-performance-targets"
    assert slug("Strategies: zero-copy, staged, auto") == "strategies-zero-copy-staged-auto"
    assert slug("11. vLLM 0.32 on a CPU-only machine") == "11-vllm-032-on-a-cpu-only-machine"
    assert (
        slug("Hybrid attention + Mamba2 (`vllm_hybrid_mamba2.layout`)")
        == "hybrid-attention--mamba2-vllm_hybrid_mamba2layout"
    )


def test_pages_have_links():
    assert all(p.is_file() for p in PAGES)
    assert sum(1 for p in PAGES for _ in links(p)) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for n, target in links(page):
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{n}: {target}"
        if not dest.is_relative_to(ROOT):
            bad.append(f"{where} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not bad, "broken links:\n" + "\n".join(bad)
