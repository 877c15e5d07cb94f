"""The docs site, built from the notebooks: Sphinx with MyST-NB over nbdev's processed notebooks (`bash tools/docs.sh`).

    python tools/docs.py sync [--check]  write nbs/sidebar.yml, nbs/llms.txt and nbs/nbdev.yml from the notebooks
                                         (--check: fail where they differ instead)
    python tools/docs.py build           _proc/ (nbdev's processing: show_doc's tables) -> build/docs-src/ -> _site/,
                                         then check the site
    python tools/docs.py check [SITE]    fail on a broken internal link or anchor, or a notebook missing from a
                                         page's navigation (default SITE: _site)

The navigation is made here, from the notebooks' numbers and titles: nothing lists the pages by hand."""
import json, re, shutil, subprocess, sys, tomllib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).parent / 'sphinx'))
from pandoc_ids import pandoc_slug

ROOT = Path(__file__).resolve().parents[1]
NBS, PROC, SRC, SITE = ROOT / 'nbs', ROOT / '_proc', ROOT / 'build' / 'docs-src', ROOT / '_site'
CONF = ROOT / 'tools' / 'sphinx'

# Reading order: the core, the paths, each optimizer, then training beyond one process, the tools and the imports.
# Notebooks 00-09 are the core except these, which are paths, or come after the optimizers.
PATHS = {'eightbit', 'fused', 'lowbit', 'lowprec', 'release'}
AFTER_OPTIMIZERS = {'distributed'}
SECTIONS = ('Core', 'Paths', 'Optimizers', 'Training and tools', 'Imports')


@dataclass(frozen=True)
class Notebook:
    path: Path
    title: str
    description: str

    @property
    def number(self) -> int: return int(self.path.stem.split('_')[0]) if self.path.stem[0].isdigit() else -1

    @property
    def page(self) -> str:
        "The page's name, as nbdev names it: the notebook's name without its number (`10_lion` -> `lion`)"
        return re.sub(r'^\d+[a-zA-Z0-9]*_', '', self.path.stem.lower())

    @property
    def section(self) -> str:
        if self.number < 10:
            return 'Paths' if self.page in PATHS else 'Training and tools' if self.page in AFTER_OPTIMIZERS else 'Core'
        return 'Optimizers' if self.number < 40 else 'Training and tools' if self.number < 90 else 'Imports'


def read_notebook(path: Path) -> Notebook:
    "A notebook's title (its first `# ` heading) and description (the `> ` lines under it)"
    cells = json.loads(path.read_text())['cells']
    first = next(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    lines = first.splitlines()
    title = next(l[2:].strip() for l in lines if l.startswith('# '))
    description = ' '.join(l[2:].strip() for l in lines if l.startswith('> '))
    return Notebook(path, title, description)


def notebooks(nbs: Path = NBS) -> list[Notebook]:
    "The numbered notebooks in reading order: by section, then by number"
    found = [read_notebook(p) for p in sorted(nbs.glob('[0-9]*.ipynb'))]
    return sorted(found, key=lambda nb: (SECTIONS.index(nb.section), nb.number, nb.path.name))


def sections(nbs: Path = NBS) -> dict[str, list[Notebook]]:
    res = {s: [] for s in SECTIONS}
    for nb in notebooks(nbs): res[nb.section].append(nb)
    return {s: nbs_ for s, nbs_ in res.items() if nbs_}


# --- the files in nbs/ that describe the site to nbdev's Quarto route and to LLMs ---

def sidebar_yml(nbs: Path = NBS) -> str:
    "Quarto's sidebar, in the site's sections (pyproject sets custom_sidebar, so nbdev keeps it)"
    out = ['website:', '  sidebar:', '    contents:', '      - index.ipynb']
    for section, members in sections(nbs).items():
        out += [f'      - section: "{section}"', '        contents:']
        out += [f'          - {nb.path.name}' for nb in members]
    return '\n'.join(out) + '\n'


def project_description() -> str: return tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['description']


def llms_txt(nbs: Path = NBS) -> str:
    "llms.txt: one line per page, linked relative to the site's root, where the site copies this file"
    out = ['# fastxtend_optim', '', f'> {project_description()}', '',
           'Every page is a notebook of `nbs/`, rendered by `bash tools/docs.sh` into `_site/`; the links below are '
           'relative to that folder, where this file is copied. Start at [the overview](index.html).']
    for section, members in sections(nbs).items():
        out += ['', f'## {section}', '']
        out += [f'- [{nb.title}]({nb.page}.html): {nb.description}' for nb in members]
    return '\n'.join(out) + '\n'


def nbdev_yml() -> str:
    "nbs/nbdev.yml as nbdev's Quarto route writes it from pyproject.toml (`refresh_quarto_yml`)"
    from nbdev.config import get_config
    from nbdev.quarto import _nbdev_yml
    cfg = get_config(ROOT)
    vals = {k: cfg[k] for k in ['title', 'description', 'branch', 'git_url', 'doc_host', 'doc_baseurl']}
    return _nbdev_yml.format(doc_path=cfg.doc_path.name, **vals)


def sync(check: bool = False) -> int:
    "Write the generated files in nbs/, or with `check` name those that differ; the exit status"
    stale = []
    for path, text in ((NBS / 'sidebar.yml', sidebar_yml()), (NBS / 'llms.txt', llms_txt()),
                       (NBS / 'nbdev.yml', nbdev_yml())):
        if path.exists() and path.read_text() == text: continue
        stale.append(path.relative_to(ROOT))
        if not check: path.write_text(text)
    if check and stale: print(f'out of date: {", ".join(map(str, stale))}; run python tools/docs.py sync')
    return 1 if check and stale else 0


# --- staging nbdev's processed notebooks for Sphinx ---

SOURCE_LINK = re.compile(r'\[source\]\([^)]*\)\{[^}]*\}\n*')  # show_doc's link to a repository we do not publish
LINK = re.compile(r'\]\(([^)\s]+)\)')


def doc_prefix() -> str:
    "The address nbdev's doc links start with (`/` while pyproject.toml names no published site)"
    from fastxtend_optim._modidx import d
    return d['settings']['doc_host'] + d['settings']['doc_baseurl'].rstrip('/') + '/'


def relink(md: str, anchors: dict[str, set[str]], prefix: str) -> str:
    """Links to the site's pages, relative (`lion.html#anchor`), from each form the notebooks use: nbdev's doc links
    (`prefix`+`lion.html#lion`), a page (`fused.html`) or a notebook (`10_lion.ipynb`). `anchors` maps each page to
    its headings' anchors: a doc link to a symbol without a heading of its own (a private helper, an undocumented
    method) goes to its page's top, as no anchor would take it further; links the notebooks write keep theirs."""
    pages = {nb.path.stem: nb.page for nb in notebooks()} | {'index': 'index'}
    def fix(m):
        url, generated = m.group(1), m.group(1).startswith(prefix) and not m.group(1).startswith('//')
        if generated: url = url[len(prefix):]
        base, _, frag = url.partition('#')
        name = base[:-5] if base.endswith('.html') else pages.get(base[:-6]) if base.endswith('.ipynb') else None
        if name not in anchors: return m.group(0)
        if generated and frag not in anchors[name]: frag = ''
        return f']({name}.html' + (f'#{frag}' if frag else '') + ')'
    return LINK.sub(fix, md)


HEADING = re.compile(r'^#{2,6} +(.+?) *#*$', re.M)
FENCE = re.compile(r'^```.*?^```', re.M | re.S)


def heading_anchors(cells: list[dict]) -> set[str]:
    "The Pandoc anchors of a staged page's headings below its title"
    text = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    return {pandoc_slug(h) for h in HEADING.findall(FENCE.sub('', text))}


def directives(src: str) -> tuple[dict[str, str], str]:
    "nbdev's `#| key: value` lines of a code cell, and the code without them"
    lines = src.splitlines()
    n = next((i for i, l in enumerate(lines) if not l.startswith('#|')), len(lines))
    found = {}
    for line in lines[:n]:
        key, _, value = line[2:].strip().partition(':')
        found[key.strip()] = value.strip()
    return found, '\n'.join(lines[n:])


def markdown_cell(text: str, id: str) -> dict: return {'cell_type': 'markdown', 'id': id, 'metadata': {}, 'source': text}


def stage_cell(cell: dict) -> list[dict]:
    "A processed cell as MyST-NB reads it: asis output (show_doc's tables) becomes the page's own Markdown"
    if cell['cell_type'] == 'raw' or cell['cell_type'] == 'markdown' and 'AUTOGENERATED' in ''.join(cell['source']):
        return []
    if cell['cell_type'] == 'markdown': return [markdown_cell(''.join(cell['source']), cell['id'])]
    found, code = directives(''.join(cell['source']))
    if found.get('output') == 'asis':
        md = ''.join(''.join(o.get('data', {}).get('text/markdown', '')) for o in cell.get('outputs', []))
        md = SOURCE_LINK.sub('', md.removeprefix('---\n'))
        return [markdown_cell(md, cell['id'])] if md.strip() else []
    if not code.strip() and not cell.get('outputs'): return []
    tags = ['remove-input'] if found.get('echo') == 'false' else []
    return [dict(cell, source=code, metadata={'tags': tags}, outputs=cell.get('outputs', []))]


def staged_cells(nb: Notebook, processed: Path) -> list[dict]:
    "A page's cells: the notebook's title and whole description (nbdev's front matter cuts it), then its cells"
    head = f'# {nb.title}\n\n{nb.description}\n'
    return [markdown_cell(head, 'fxo-title')] + [new for cell in json.loads(processed.read_text())['cells']
                                                  for new in stage_cell(cell)]


def write_page(dest: Path, cells: list[dict], anchors: dict[str, set[str]], prefix: str):
    for cell in cells:
        if cell['cell_type'] == 'markdown': cell['source'] = relink(cell['source'], anchors, prefix)
    meta = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
            'language_info': {'name': 'python'}}
    dest.write_text(json.dumps({'cells': cells, 'metadata': meta, 'nbformat': 4, 'nbformat_minor': 5}, indent=1))


def toctree(nbs: Path = NBS) -> str:
    "The site's navigation, one hidden toctree per section, for the index page"
    out = []
    for section, members in sections(nbs).items():
        out += ['', '```{toctree}', ':hidden:', f':caption: {section}', '']
        out += [nb.page for nb in members] + ['```']
    return '\n'.join(out) + '\n'


def copy_mathjax(static: Path):
    "MathJax's TeX-to-HTML build, its fonts and the extensions it loads on demand, from django-static-mathjax"
    import mathjax
    es5 = Path(mathjax.__file__).parent / 'static' / 'mathjax' / 'es5'
    dest = static / 'mathjax'
    dest.mkdir(parents=True)
    shutil.copy(es5 / 'tex-chtml.js', dest)
    for sub in ('output/chtml/fonts/woff-v2', 'input/tex/extensions', 'ui', 'a11y'):
        shutil.copytree(es5 / sub, dest / sub)


def stage(src: Path = SRC):
    "build/docs-src/: a page per notebook, named as nbdev names it, the configuration and MathJax"
    if src.exists(): shutil.rmtree(src)
    (src / '_static').mkdir(parents=True)
    for name in ('conf.py', 'pandoc_ids.py'): shutil.copy(CONF / name, src)
    shutil.copy(CONF / 'site.css', src / '_static')
    copy_mathjax(src / '_static')
    if (NBS / 'images').exists(): shutil.copytree(NBS / 'images', src / 'images')  # figures the notebooks' Markdown shows
    pages = {nb.page: staged_cells(nb, PROC / nb.path.name) for nb in notebooks()}
    index = read_notebook(NBS / 'index.ipynb')
    pages['index'] = staged_cells(index, PROC / 'index.ipynb') + [markdown_cell(toctree(), 'fxo-nav')]
    anchors = {name: heading_anchors(cells) for name, cells in pages.items()}
    for name, cells in pages.items(): write_page(src / f'{name}.ipynb', cells, anchors, doc_prefix())


def process_notebooks():
    "nbdev's own processing into _proc/ (show_doc's tables run), without the Quarto steps of `nbdev-proc-nbs`"
    import os
    from nbdev.serve import proc_nbs
    os.environ['PYTHONWARNINGS'] = 'ignore'  # nbdev's advice on cells that mix imports and code, in each worker
    proc_nbs(str(NBS), n_workers=2)


def readable(e: Exception) -> str:
    "An error from nbdev's worker processes, whose message arrives quoted"
    import ast
    try: return ast.literal_eval(str(e))
    except (ValueError, SyntaxError): return str(e)


def build() -> int:
    if SITE.exists(): shutil.rmtree(SITE)  # a failed build leaves no site that looks current
    try: process_notebooks()
    except Exception as e:  # nbdev runs each notebook's export, import and show_doc cells: a failing one stops it
        print(f'{readable(e)}\n\nnbdev could not process that notebook, so it does not render. nbdev '
              'runs only the cells it needs (exports, imports, show_doc): a cell that mixes an import with code using '
              'an earlier test cell\'s names fails here though nbdev-test passes; give the import a cell of its own')
        return 1
    stage()
    html = ROOT / 'build' / 'docs-html'  # MyST-NB writes its outputs' files beside it, into build/jupyter_execute
    done = subprocess.run([sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-W', '--keep-going', '-j', '2',
                           '-E', '-d', str(ROOT / 'build' / 'docs-doctrees'), str(SRC), str(html)])
    if done.returncode: print('sphinx failed: a notebook did not render (its warnings are above)'); return 1
    shutil.move(html, SITE)
    shutil.copy(NBS / 'llms.txt', SITE / 'llms.txt')
    return check_site(SITE, notebooks())


# --- checking the built site ---

class PageLinks(HTMLParser):
    "A page's ids, its links and sources, and the pages its navigation (Furo's sidebar tree) lists"
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.nav, self._in_nav = set(), [], set(), 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and 'name' in a: self.ids.add(a['name'])
        if tag == 'div' and 'sidebar-tree' in (a.get('class') or '').split(): self._in_nav = 1
        elif self._in_nav and tag == 'div': self._in_nav += 1
        for key in ('href', 'src'):
            if a.get(key): self.links.append(a[key])
        if self._in_nav and tag == 'a' and a.get('href'): self.nav.add(urlsplit(a['href']).path.split('/')[-1])

    def handle_endtag(self, tag):
        if self._in_nav and tag == 'div': self._in_nav -= 1


def parse_page(path: Path) -> PageLinks:
    parser = PageLinks()
    parser.feed(path.read_text(errors='replace'))
    return parser


def internal(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and not url.startswith(('mailto:', 'data:', 'javascript:'))


def broken_links(site: Path) -> list[str]:
    "Every internal href/src of every page that names a missing file, or an anchor the target page lacks"
    pages = {p: parse_page(p) for p in site.rglob('*.html')}
    broken = []
    for page, parsed in pages.items():
        for url in parsed.links:
            if not internal(url): continue
            parts = urlsplit(url)
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.exists(): broken.append(f'{page.relative_to(site)}: {url} (no such file)')
            elif parts.fragment and target.suffix == '.html':
                ids = pages[target].ids if target in pages else parse_page(target).ids
                if unquote(parts.fragment) not in ids: broken.append(f'{page.relative_to(site)}: {url} (no such anchor)')
    llms = site / 'llms.txt'
    if llms.exists():
        for url in LINK.findall(llms.read_text()):
            if internal(url) and not (site / urlsplit(url).path).exists(): broken.append(f'llms.txt: {url} (no such file)')
    return broken


def missing_from_nav(site: Path, members: list[Notebook]) -> list[str]:
    "Notebooks without a page, or absent from the navigation of a page"
    missing = [f'{nb.path.name}: no page {nb.page}.html' for nb in members if not (site / f'{nb.page}.html').exists()]
    for page in [site / 'index.html', *(site / f'{nb.page}.html' for nb in members)]:
        if not page.exists(): continue
        nav = {name or page.name for name in parse_page(page).nav}  # the page's own entry links to itself, '#'
        missing += [f'{page.name}: navigation lacks {nb.page}.html' for nb in members if f'{nb.page}.html' not in nav]
    return missing


DOCS_ADDRESS = re.compile(r'https?://[\w.-]+\.github\.io[^\s)"\'>]*')


def module_docstrings() -> dict[Path, str]:
    import ast
    return {p: ast.get_docstring(ast.parse(p.read_text())) or '' for p in sorted((ROOT / 'fastxtend_optim').glob('*.py'))}


def repo_link_problems(root: Path = ROOT) -> list[str]:
    """README's relative links name files of the repository, and neither it, pyproject.toml, llms.txt nor a module's
    docstring points at a docs site other than pyproject's `Documentation` (none while we publish none)"""
    readme = (root / 'README.md').read_text()
    problems = [f'README.md: {url} (no such file)' for url in LINK.findall(readme)
                if internal(url) and not (root / unquote(urlsplit(url).path)).exists()]
    ours = tomllib.loads((root / 'pyproject.toml').read_text())['project'].get('urls', {}).get('Documentation')
    texts = {root / 'README.md': readme, root / 'pyproject.toml': (root / 'pyproject.toml').read_text(),
             root / 'nbs' / 'llms.txt': (root / 'nbs' / 'llms.txt').read_text()}
    if root == ROOT: texts |= module_docstrings()
    for path, text in texts.items():
        problems += [f'{path.relative_to(root)}: {a} (not our docs site)' for a in DOCS_ADDRESS.findall(text)
                     if not (ours and a.startswith(ours))]
    return problems


def check_site(site: Path, members: list[Notebook]) -> int:
    problems = broken_links(site) + missing_from_nav(site, members) + repo_link_problems()
    for p in problems: print(p)
    if problems: print(f'{len(problems)} problems in {site}'); return 1
    print(f'{site.relative_to(ROOT) if site.is_relative_to(ROOT) else site}: {len(members) + 1} pages, links and '
          'navigation checked')
    return 0


if __name__ == '__main__':
    cmd, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ('build', [])
    if cmd == 'sync': sys.exit(sync(check='--check' in args))
    if cmd == 'build': sys.exit(build())
    if cmd == 'check': sys.exit(check_site(Path(args[0]) if args else SITE, notebooks()))
    sys.exit(__doc__)
