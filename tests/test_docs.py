"""The project's words are for its users: no process history in README, docs/, configs/ or jaxpref/ (dates,
"session", "outside the repo", commit hashes), a README short enough to read with a contents list, and
every relative link in README.md and docs/ pointing at a file (and heading) that exists."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("README.md", "docs", "configs", "jaxpref")
TEXT_SUFFIXES = {".py", ".md", ".json", ".txt", ".sh", ".ipynb"}
# The CLIP tokenizers' byte-pair tables: generated vocabulary, not prose.
TOKENIZER_TABLES = {"vocab.json", "merges.txt"}
README_MAX_LINES = 250
TEST_COMMAND = "pip install -e '.[test,tpu]' && pip install --no-deps image-reward==1.5 timm==0.6.13 && python -m pytest -q -n 2 --dist loadgroup"

DATE = re.compile(r"\b20\d\d-[01]\d(?:-[0-3]\d)?\b")
PHRASE = re.compile(r"outside the repo(?:sitory)?|next session", re.IGNORECASE)
SESSION = re.compile(r"\bsession\b", re.IGNORECASE)
# Library names that hold the word: requests.Session / tf.compat.v1.Session (an attribute), Session(...),
# pytest's scope="session". (aiohttp's ClientSession has no word boundary and never matches.)
SESSION_API = re.compile(r"\.Session\b|\bSession\(|scope\s*=\s*[\"']session[\"']")
# A git hash: 7-40 lowercase hex characters standing alone. A sha256 (64 characters, MANIFEST.json) is a
# longer token and never matches; "@" before it is a pinned hub revision (org/name@<rev>), not prose.
HEX_TOKEN = re.compile(r"(?<![\w@])[0-9a-f]{7,40}(?!\w)")


def process_words(line: str) -> list[str]:
    """The process words in one line of text: what a user should never read."""
    found = [m.group() for m in DATE.finditer(line)] + [m.group() for m in PHRASE.finditer(line)]
    found += [m.group() for m in SESSION.finditer(SESSION_API.sub("", line))]
    found += [m.group() for m in HEX_TOKEN.finditer(line)
              if re.search(r"[a-f]", m.group()) and re.search(r"[0-9]", m.group())]
    return found


def scanned_files() -> list[pathlib.Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p for p in candidates if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and "__pycache__" not in p.parts
                  and not (p.name in TOKENIZER_TABLES and "tokenizer" in p.parent.name)]
    return files


def test_detector_flags_process_words_and_spares_library_names():
    for text in ("measured 2026-12-05 on the development host", "as of 2026-11", "in the fourth session",
                 "Session 3 re-measured it", "a script outside the repo", "(next session, later)",
                 "at commit e03897a", "since 9d307d9", "clean clone of 24a0768b5e1f"):
        assert process_words(text), text
    for text in ("s = requests.Session()", "sess = tf.compat.v1.Session", '@pytest.fixture(scope="session")',
                 "OPENAI_CLIP_MEAN = (0.48145466, 0.4578275)", '"unet/config.json": "' + "81adbcc1" * 8 + '"',
                 "hub id org/name@1a2b3c4d", "a decade-old facade", "lr 2.048e-5, 2000 x 2048 pairs",
                 "Wallace et al. 2023", "seeds 1000000"):
        assert not process_words(text), (text, process_words(text))


def test_no_process_words_in_readme_docs_configs_and_code():
    files = scanned_files()
    assert any(p.name == "MANIFEST.json" for p in files)   # the sha256 assets are scanned, and pass
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            words = process_words(line)
            if words:
                found.append(f"{path.relative_to(ROOT)}:{number}: {words}: {line.strip()[:100]}")
    assert not found, "process words (state results with their command, not their history):\n" + "\n".join(found)


def _prose_lines(text: str):
    """(line number, line) of markdown outside fenced and indented code blocks, inline code removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            continue
        yield number, re.sub(r"`[^`]*`", "", line)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a markdown file's headings (lowercase, punctuation dropped, spaces to '-')."""
    anchors, seen = set(), {}
    for _, line in _prose_lines(text.replace("`", "")):
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_readme_is_short_with_a_contents_list_and_the_ci_command():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    start = next((i for i, line in enumerate(lines) if re.match(r"##\s+Contents\s*$", line)), None)
    assert start is not None, "README.md: no '## Contents' section"
    entries = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        entries += re.findall(r"^\s*[-*]\s+\[[^\]]+\]\(#([^)]+)\)", line)
    assert len(entries) >= 5, f"README.md: the contents list links {len(entries)} sections"
    missing = set(entries) - heading_anchors(text)
    assert not missing, f"README.md: contents entries without a heading: {sorted(missing)}"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in [line.strip() for line in lines] and TEST_COMMAND in ci_lines, (
        "README.md and .ci/run must both hold the test command exactly")


def test_relative_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for number, line in _prose_lines(text):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):   # http:, https:, mailto:
                    continue
                path, _, fragment = target.partition("#")
                resolved = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}:{number}: {target}"
                if not resolved.exists():
                    broken.append(f"{where}: no such file")
                    continue
                if ROOT not in resolved.parents and resolved != ROOT:
                    broken.append(f"{where}: outside the repository")
                elif fragment and resolved.suffix == ".md" and \
                        fragment not in heading_anchors(resolved.read_text(encoding="utf-8")):
                    broken.append(f"{where}: no heading #{fragment}")
    assert not broken, "broken links:\n" + "\n".join(broken)
