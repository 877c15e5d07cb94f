"Sphinx settings for the docs site that `bash tools/docs.sh` builds from the notebooks (see tools/docs.py)."
import sys
from pathlib import Path

project = 'fastxtend_optim'
html_title = 'fastxtend_optim'
sys.path.insert(0, str(Path(__file__).parent))
extensions = ['myst_nb', 'sphinx.ext.mathjax', 'pandoc_ids']
root_doc = 'index'
exclude_patterns = ['_build', '**.ipynb_checkpoints']

nb_execution_mode = 'off'  # the notebooks as they are, outputs included
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_all_links_external = True  # links stay as written; tools/docs.py checks each one, anchors included
suppress_warnings = ['myst.header']  # show_doc's headings skip levels, as on nbdev's Quarto pages


html_theme = 'furo'
html_static_path = ['_static']
html_css_files = ['site.css']
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
html_show_copyright = False
# MathJax from the site's own files (copied from the django-static-mathjax package), never a CDN
mathjax_path = 'mathjax/tex-chtml.js'
