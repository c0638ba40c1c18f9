"""The repository explains itself: its files cite only files it has, and docs/ is indexed.

What is scanned (nothing else is left out):

- every file git lists in the checkout (tracked, or new and not ignored), read as UTF-8 text;
  a file that is not text (a PNG) is skipped, and a source file that is not text fails;
- in each: no citation of design notes kept outside the repository (``DESIGN.md``,
  ``VARIANTS_SPEC.md``, ``DEVELOPERS.md``), of an issue number (``issue #8``) or of a path
  under ``/work/``; and every ``name.md`` it mentions (outside URLs, and not under a shell
  variable such as ``$OUT``) exists, relative to the file or to the repository root, or
  matches a file when it holds a ``*``;
- in the Markdown pages (``README.md``, ``bench/README.md``, ``docs/*.md``), in addition:
  every link target that is not a URL or an anchor exists, relative to the page; every code
  span that is a path from the repository root (it starts with a top-level file or
  directory) exists or matches, ``<placeholder>`` and ``*`` matching anything, or is ignored
  by git (a build output); every code span that is a bare file name (``rnn.py``) is the
  name of a file in the repository, or one its code names (a file the build writes);
- ``docs/README.md`` links every page of docs/.

A file that cites what the repository lacks sends its reader nowhere: point it at the
repository's own docs/ instead.
"""
import fnmatch
import functools
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Notes that live outside the repository: users never have them.
OUTSIDE_NOTES = ("DESIGN.md", "VARIANTS_SPEC.md", "DEVELOPERS.md")
STALE = re.compile(r"\bissues?\s*#\s*\d+|\bissue\s+\d+\b|(?<![\w.])/work/|"
                   + "|".join(re.escape(name) for name in OUTSIDE_NOTES), re.IGNORECASE)


URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
# A whole path token; one under a variable ("$OUT/summary.md") is output, not a citation.
MD_NAME = re.compile(r"(?<![\w./*$-])[\w./*-]*\w\.md\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FILE_NAME = re.compile(r"[\w-]+\.(?:py|h|cpp|cu|sh|md|txt|toml|json|png|in)")
SOURCE = re.compile(r"\.(?:py|md|h|cpp|cu|sh|txt|toml|json|in|cfg|ini|yml|yaml)$|(?:^|/)run$")


def _listed_files():
    """The checkout's files as git lists them, or [] outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted(name for name in out.decode().split("\0") if name and (ROOT / name).is_file())


FILES = _listed_files()
PAGES = [name for name in FILES if name.endswith(".md")
         and (name in ("README.md", "bench/README.md") or re.fullmatch(r"docs/[^/]+\.md", name))]
TOP_LEVEL = sorted({name.split("/")[0] for name in FILES})
BASENAMES = {name.rsplit("/", 1)[-1] for name in FILES}


def _generated(name: str) -> bool:
    """Whether a file name that no file of the checkout has is named in its code, not its
    prose (a file the build or the benchmark writes, e.g. a generated header)."""
    return any(name in (_text(f) or "") for f in FILES
               if not f.endswith(".md") and f != "tests/test_docs.py")


@functools.lru_cache(maxsize=None)
def _text(name):
    try:
        text = (ROOT / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def _matches(pattern: str) -> bool:
    """Whether a repository path (from the root; ``*`` and ``<...>`` match anything) names a
    file or directory of the checkout."""
    pattern = re.sub(r"<[^>]*>", "*", pattern).rstrip("/")
    if "*" not in pattern:
        return (ROOT / pattern).exists()
    return any(fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(name, pattern + "/*")
               for name in FILES)


def _ignored(path: str) -> bool:
    """A path git ignores: a build output such as fastrnn/_native_cpu*.so."""
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    return result.returncode == 0


def _resolves(name: str, relative_to: str) -> bool:
    """Whether ``name``, cited in the file ``relative_to``, names a file of the checkout,
    taken relative to that file or to the repository root."""
    for base in (os.path.dirname(relative_to), ""):
        path = os.path.normpath(os.path.join(base, name))
        if not path.startswith("..") and not os.path.isabs(path) and _matches(path):
            return True
    return False


needs_git = pytest.mark.skipif(not FILES, reason="not a git checkout: no file list to scan")


@needs_git
def test_scan_covers_the_repository():
    """The scan sees the files that matter (a broken listing would pass everything)."""
    for name in ("README.md", "docs/README.md", "fastrnn/ops.py", "tests/test_docs.py"):
        assert name in FILES, f"{name} is not in the scanned files"
    skipped = [name for name in FILES if _text(name) is None]
    sources = [name for name in skipped if SOURCE.search(name)]
    assert not sources, f"source files that are not UTF-8 text escape the scan: {sources}"


@needs_git
def test_no_citation_of_outside_notes_or_issue_numbers():
    found = {}
    for name in FILES:
        text = _text(name)
        if text is None or name == "tests/test_docs.py":   # this file names what it forbids
            continue
        hits = [m.group(0) for m in STALE.finditer(text)]
        if hits:
            found[name] = hits
    assert not found, ("these files cite notes outside the repository, issue numbers or "
                       f"/work paths; explain instead, or link docs/: {found}")


@needs_git
def test_cited_markdown_files_exist():
    missing = {}
    for name in FILES:
        text = _text(name)
        if text is None or name == "tests/test_docs.py":
            continue
        for match in MD_NAME.finditer(URL.sub(" ", text)):
            cited = match.group(0)
            if os.path.basename(cited) in OUTSIDE_NOTES:   # the test above judges those
                continue
            if not _resolves(cited, name):
                missing.setdefault(name, []).append(cited)
    assert not missing, f"these files cite Markdown files the repository lacks: {missing}"


@needs_git
@pytest.mark.parametrize("page", PAGES)
def test_page_cites_existing_files(page):
    text = _text(page)
    missing = []
    for target in LINK.findall(text):
        if URL.match(target) or target.startswith(("#", "mailto:")):
            continue
        path = target.split("#")[0]
        if path and not (ROOT / Path(page).parent / path).exists():
            missing.append(f"link {target}")
    prefix = re.compile(r"(?:\./)?(?:" + "|".join(re.escape(t) for t in TOP_LEVEL) + r")(?:/|$)")
    for span in CODE_SPAN.findall(text):
        if any(c.isspace() for c in span):
            continue
        path = re.split(r"::|:(?=[A-Za-z_])", span)[0]
        if prefix.match(path):
            path = path[2:] if path.startswith("./") else path
            if not _matches(path) and not _ignored(path):
                missing.append(f"path `{span}`")
        elif FILE_NAME.fullmatch(path) and path not in BASENAMES and not _generated(path) \
                and not _ignored(path):
            missing.append(f"file name `{span}`")
    assert not missing, f"{page} cites what the repository lacks: {missing}"


@needs_git
def test_docs_index_lists_every_page():
    index = _text("docs/README.md")
    linked = {target.split("#")[0] for target in LINK.findall(index)}
    pages = sorted(name[len("docs/"):] for name in FILES
                   if re.fullmatch(r"docs/[^/]+\.md", name) and name != "docs/README.md")
    assert pages, "no pages found under docs/"
    unlisted = [page for page in pages if page not in linked]
    assert not unlisted, f"docs/README.md does not link {unlisted}"
