"""The package's metadata says what the repository holds."""

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Read by line, not tomllib: the package supports Python 3.10, which lacks it.
PYPROJECT = (ROOT / "pyproject.toml").read_text("utf-8")
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, the text as the
# Apache Software Foundation publishes it.
APACHE_2_0 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_the_license_file_is_the_license_the_metadata_names():
    assert re.search(r'^license = "Apache-2.0"$', PYPROJECT, re.MULTILINE)
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0
    assert b"Apache License\n                           Version 2.0" in text


def test_the_docs_extra_formats_signatures():
    # mkdocstrings formats signatures with Black or Ruff, and warns without.
    (docs,) = re.findall(r"^docs = \[(.*)\]$", PYPROJECT, re.MULTILINE)
    assert re.search(r'"ruff[>=<~]', docs), docs
