"""Heading anchors as Pandoc writes them, beside docutils' own: the notebooks link `lars.html#local_lr-in-the-state`
and nbdev's doc links `core.html#fxoptimizer.check_group`, as on nbdev's Quarto pages."""
import re
from docutils import nodes


def pandoc_slug(title: str) -> str:
    "Lowercase; keep letters, digits, `_`, `-` and `.`; spaces to `-`; drop what precedes the first letter"
    slug = re.sub(r'[^\w\s.-]', '', title.lower()).strip()
    return re.sub(r'\s+', '-', slug).lstrip('0123456789.-_')


def add_pandoc_ids(app, doctree):
    "Each section below the page's title also answers to its Pandoc anchor (`-1`, `-2` on repeats, as Pandoc does)"
    seen = set()
    for section in list(doctree.findall(nodes.section))[1:]:
        slug = base = pandoc_slug(section[0].astext())
        n = 0
        while slug in seen: n += 1; slug = f'{base}-{n}'
        seen.add(slug)
        if slug and slug not in section['ids']: section['ids'].append(slug)


def setup(app):
    app.connect('doctree-read', add_pandoc_ids)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
