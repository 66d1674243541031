"""Real English text that every machine already has: the Python standard library's own docs.

No download is possible at run time (DESIGN §9), so the real-text part of the bundled
corpus is the docstrings of a fixed list of stdlib modules (module, class, method and
function docstrings, via `inspect.getdoc`) plus the language-reference topics that ship in
`pydoc_data`. The walk is in sorted order and the result deduplicated, so the same Python
version always yields the same documents; the caller samples from them with its seed.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings

# Side-effect free, documentation-rich modules; sorted so the walk order is fixed.
MODULES = tuple(
    sorted(
        """abc argparse array ast asyncio base64 bisect builtins bz2 calendar cmath codecs collections
        collections.abc colorsys concurrent.futures configparser contextlib copy csv dataclasses datetime
        decimal difflib dis email email.message email.utils enum filecmp fnmatch fractions ftplib functools
        getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client http.cookiejar
        http.server imaplib importlib inspect io ipaddress itertools json logging logging.handlers lzma mailbox
        math mimetypes numbers operator optparse os os.path pathlib pickle pkgutil platform plistlib poplib
        pprint queue random re sched secrets selectors shelve shlex shutil smtplib socket socketserver sqlite3
        ssl statistics string struct subprocess sys tarfile tempfile textwrap threading time timeit tokenize
        trace traceback types typing unittest urllib.parse urllib.request uuid warnings wave weakref
        xml.dom.minidom xml.etree.ElementTree zipfile zlib zoneinfo""".split()
    )
)
MIN_WORDS = 8
"""Shorter docstrings ("Return self+value.") are boilerplate, not text worth learning."""
TOPIC_CHUNK_CHARS = 800
"""Reference topics are long; cut them at paragraph boundaries into documents of about this size."""


def stdlib_documents() -> list[str]:
    """Every usable, deduplicated stdlib document, in a fixed order.

    Walked in a fresh interpreter: modules grow attributes when other libraries touch them
    (concurrent.futures loads its executors lazily, for one), so the walk in a process that has
    imported Ray would differ from one in a process that has not.
    """
    import json
    import subprocess

    result = subprocess.run(
        [sys.executable, "-I", __file__], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "0"}
    )
    return json.loads(result.stdout)


def _walk() -> list[str]:
    seen: set[str] = set()
    documents: list[str] = []
    with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn when touched
        warnings.simplefilter("ignore")
        raw = [*_docstrings(), *_reference_topics()]
    for title, body in raw:
        body = normalise_whitespace(body)
        if len(body.split()) < MIN_WORDS or body in seen:
            continue
        seen.add(body)
        documents.append(f"{title}\n{body}")
    return documents


def normalise_whitespace(text: str) -> str:
    """Collapse runs of spaces inside lines and of blank lines; keep paragraph breaks."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _docstrings():
    """(qualified name, docstring) of each module, its public classes, their methods, its functions."""
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a module missing from this build (e.g. no _ssl): skip it
            continue
        yield module_name, _getdoc(module)
        package = module_name.split(".")[0]
        for name, obj in sorted(vars(module).items()):
            owner = getattr(obj, "__module__", None)
            if name.startswith("_") or not isinstance(owner, str) or not owner.startswith(package):
                continue  # private, or re-exported from elsewhere
            if inspect.isclass(obj):
                yield f"{module_name}.{name}", _getdoc(obj)
                for member_name, member in sorted(vars(obj).items()):
                    if not member_name.startswith("_") and (callable(member) or isinstance(member, property)):
                        yield f"{module_name}.{name}.{member_name}", _getdoc(member)
            elif inspect.isroutine(obj):
                yield f"{module_name}.{name}", _getdoc(obj)


def _reference_topics():
    """The language-reference topics that `help()` shows, cut at paragraph boundaries."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for key in sorted(topics):
        chunk: list[str] = []
        for paragraph in topics[key].split("\n\n"):
            chunk.append(paragraph)
            if sum(len(p) for p in chunk) >= TOPIC_CHUNK_CHARS:
                yield f"Python reference: {key}", "\n\n".join(chunk)
                chunk = []
        if chunk:
            yield f"Python reference: {key}", "\n\n".join(chunk)


def _getdoc(obj) -> str:
    try:
        return inspect.getdoc(obj) or ""
    except Exception:  # exotic descriptors can raise on attribute access
        return ""


def python_version() -> str:
    """Recorded in stats.json: the corpus is a function of the Python version."""
    return ".".join(map(str, sys.version_info[:3]))


if __name__ == "__main__":
    import json

    print(json.dumps(_walk()))
