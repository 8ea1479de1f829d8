"""Sphinx configuration of mploader's documentation site (``make docs``).

Why Sphinx with MyST Markdown and the furo theme: the pages stay Markdown (as
README.md is, so sections move between README and the site unchanged), while
Sphinx's autodoc reads the API reference from the docstrings of the package
itself, and ``-W`` turns every broken reference into a failed build.  furo is
a readable, maintained theme with a light and a dark mode and no JavaScript
framework.  MkDocs with mkdocstrings would also do; Sphinx is what the
scientific Python projects mploader's users read (NumPy, MONAI, TorchIO)
are documented with.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # the package, from this checkout
sys.path.insert(0, os.path.join(HERE, "_ext"))

import mploader  # noqa: E402

project = "mploader"
author = "the mploader authors"
copyright = "the mploader authors"
release = version = mploader.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "matplotlib.sphinxext.plot_directive",   # the Performance page's figure, from results.json
    "mploader_docs",          # docs/_ext: the public API directive, the plot, the checks,
                              # and napoleon's reading of Google-style docstrings (Args:,
                              # Raises:), applied there: not to properties' docstrings
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports = ["tensorflow", "keras", "torch", "ray"]

html_theme = "furo"
html_title = f"mploader {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"navigation_with_keys": True}
html_show_copyright = False

# The figure of the Performance page is drawn when the site is built, from
# benchmarks/results/results.json (docs/_plots/bench.py): never a copy to keep in step.
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"font.size": 9}

