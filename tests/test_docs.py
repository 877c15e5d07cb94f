"""The docs site (tools/docs.py, `bash tools/docs.sh`): the navigation holds every notebook in reading order; the
checks catch a broken link, a missing anchor, a page missing from the navigation and a docs address that is not ours;
and, where Chromium is installed and the site is built, the pages render in a real browser."""
import importlib.util, json, shutil, struct, subprocess, sys, zlib
from pathlib import Path
import pytest

pytestmark = pytest.mark.cpu_only  # about files and a browser, not tensors
ROOT = Path(__file__).parents[1]
SITE = ROOT / '_site'
spec = importlib.util.spec_from_file_location('docs', ROOT / 'tools' / 'docs.py')
docs = sys.modules['docs'] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(docs)
NOTEBOOKS = sorted(p.name for p in (ROOT / 'nbs').glob('[0-9]*.ipynb'))


def write_notebook(path: Path, title: str, cells=()):
    cells = [{'cell_type': 'markdown', 'id': 'title', 'metadata': {}, 'source': f'# {title}\n\n> About {title}.'},
             *cells]
    meta = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
            'language_info': {'name': 'python'}}
    path.write_text(json.dumps({'cells': cells, 'metadata': meta, 'nbformat': 4, 'nbformat_minor': 5}))


# --- the navigation ---

def test_navigation_holds_every_notebook_once_in_reading_order():
    order = [nb.path.name for nb in docs.notebooks()]
    assert sorted(order) == NOTEBOOKS
    assert order[:5] == ['00_base.ipynb', '00_core.ipynb', '07_declare.ipynb', '08_registry.ipynb', '09_factored.ipynb']
    assert order[5:10] == ['01_eightbit.ipynb', '02_fused.ipynb', '04_lowbit.ipynb', '05_lowprec.ipynb',
                           '06_release.ipynb']
    assert order[10] == '10_lion.ipynb' and order[order.index('29_prodigy.ipynb') + 1] == '03_distributed.ipynb'
    assert order[-1] == '90_all.ipynb'
    sidebar = (ROOT / 'nbs' / 'sidebar.yml').read_text()
    assert all(sidebar.count(f'- {name}\n') == 1 for name in NOTEBOOKS)
    assert not any(name in sidebar for name in ('llms.txt', 'nbdev.yml', 'sidebar.yml'))
    toctree = docs.toctree().split()
    assert all(toctree.count(nb.page) == 1 for nb in docs.notebooks())


def test_a_new_notebook_takes_its_place_from_its_number(tmp_path):
    for name, title in [('00_core', 'Core'), ('03_distributed', 'Distributed'), ('05_lowprec', 'Low precision'),
                        ('10_lion', 'Lion'), ('46_frameworks', 'Frameworks'), ('91_extra', 'Extra')]:
        write_notebook(tmp_path / f'{name}.ipynb', title)
    got = {s: [nb.path.stem for nb in members] for s, members in docs.sections(tmp_path).items()}
    assert got == {'Core': ['00_core'], 'Paths': ['05_lowprec'], 'Optimizers': ['10_lion'],
                   'Training and tools': ['03_distributed', '46_frameworks'], 'Imports': ['91_extra']}
    assert '- [Frameworks](frameworks.html): About Frameworks.' in docs.llms_txt(tmp_path)
    assert '      - section: "Training and tools"\n        contents:\n          - 03_distributed.ipynb\n' \
           '          - 46_frameworks.ipynb\n' in docs.sidebar_yml(tmp_path)


def test_generated_files_in_nbs_are_in_sync():
    "nbs/sidebar.yml, llms.txt and nbdev.yml are what tools/docs.py makes from the notebooks and pyproject.toml"
    assert docs.sync(check=True) == 0


# --- links ---

def test_pandoc_anchors():
    assert docs.pandoc_slug('FXOptimizer.check_group') == 'fxoptimizer.check_group'
    assert docs.pandoc_slug('local_lr in the state') == 'local_lr-in-the-state'
    assert docs.pandoc_slug("bitsandbytes' LAMB8bit takes Adam's step") == 'bitsandbytes-lamb8bit-takes-adams-step'
    assert docs.pandoc_slug('8-bit path') == 'bit-path'


def test_relink_makes_links_relative_and_drops_only_generated_anchors_that_do_not_exist():
    anchors = {'lion': {'lion', 'lion_step'}, 'core': {'fxoptimizer'}, 'distributed': set(), 'index': set()}
    md = ('[`Lion`](/lion.html#lion) [`helper`](/lion.html#_private) [core](core.html#gone) '
          '[d](03_distributed.ipynb) [paper](https://arxiv.org/abs/1) [here](#local)')
    assert docs.relink(md, anchors, '/') == ('[`Lion`](lion.html#lion) [`helper`](lion.html) [core](core.html#gone) '
                                             '[d](distributed.html) [paper](https://arxiv.org/abs/1) [here](#local)')


def fake_site(root: Path, pages: dict[str, str]) -> Path:
    "A site whose pages each have `body` and a Furo-like navigation of every page"
    nav = ''.join(f'<a href="{name}.html">{name}</a>' for name in pages)
    for name, body in pages.items():
        (root / f'{name}.html').write_text(f'<div class="sidebar-tree"><div>{nav}</div></div><main>{body}</main>')
    return root


def test_link_check_passes_a_sound_site_and_names_each_broken_link(tmp_path):
    site = fake_site(tmp_path, {'index': '<a href="lion.html#lion">Lion</a>',
                                'lion': '<h2 id="lion">Lion</h2><a href="#lion">top</a><img src="plot.png">'})
    (site / 'plot.png').write_bytes(b'png')
    assert docs.broken_links(site) == []
    fake_site(tmp_path, {'index': '<a href="lion.html#lion_step">step</a><a href="adam.html">Adam</a>',
                         'lion': '<h2 id="lion">Lion</h2><img src="gone.png">'})
    assert sorted(docs.broken_links(site)) == ['index.html: adam.html (no such file)',
                                               'index.html: lion.html#lion_step (no such anchor)',
                                               'lion.html: gone.png (no such file)']


def test_nav_check_names_a_notebook_missing_from_a_page(tmp_path):
    members = [docs.Notebook(Path('10_lion.ipynb'), 'Lion', ''), docs.Notebook(Path('11_adam.ipynb'), 'Adam', '')]
    site = fake_site(tmp_path, {'index': '', 'lion': '', 'adam': ''})
    assert docs.missing_from_nav(site, members) == []
    (site / 'lion.html').write_text('<div class="sidebar-tree"><a href="#">Lion</a></div>')
    assert docs.missing_from_nav(site, members) == ['lion.html: navigation lacks adam.html']
    (site / 'adam.html').unlink()
    assert '11_adam.ipynb: no page adam.html' in docs.missing_from_nav(site, members)


def test_repo_links_name_real_files_and_no_docs_site_but_ours(tmp_path):
    (tmp_path / 'nbs').mkdir()
    (tmp_path / 'nbs' / 'llms.txt').write_text('- [Lion](lion.html)\n')
    (tmp_path / 'pyproject.toml').write_text('[project]\nname = "x"\n')
    (tmp_path / 'README.md').write_text('[d](nbs/llms.txt) [e](https://arxiv.org/abs/1)')
    assert docs.repo_link_problems(tmp_path) == []
    (tmp_path / 'README.md').write_text('[d](nbs/03_gone.ipynb) [e](https://someone.github.io/x/lion.html)')
    assert docs.repo_link_problems(tmp_path) == ['README.md: nbs/03_gone.ipynb (no such file)',
                                                 'README.md: https://someone.github.io/x/lion.html (not our docs site)']


def test_the_repository_links_nothing_broken_and_no_docs_site_but_ours():
    assert docs.repo_link_problems() == []


# --- a real browser, on the built site ---

def need_site():
    if not (SITE / 'index.html').exists(): pytest.skip('the site is not built: run bash tools/docs.sh')
    built = (SITE / 'index.html').stat().st_mtime
    if any(p.stat().st_mtime > built for p in (ROOT / 'nbs').glob('*.ipynb')):
        pytest.skip('the site is older than the notebooks: run bash tools/docs.sh')


PAGE_FACTS = '''(() => {
  const nav = [...document.querySelectorAll('.sidebar-tree a')].map(a => a.getAttribute('href'));
  const maths = [...document.querySelectorAll('.math')];
  return {nav, math: maths.length, typeset: maths.filter(m => m.querySelector('mjx-container')).length,
          containers: document.querySelectorAll('mjx-container').length,
          text: document.querySelector('article').innerText,
          images: [...document.images].map(i => ({src: i.getAttribute('src'), width: i.naturalWidth}))};
})()'''


@pytest.fixture(scope='module')
def browser():
    from browser import Chromium, chromium_path
    if not chromium_path():
        pytest.skip("Chromium is not installed: `bash tools/docs.sh --check` installs Debian's chromium and runs this")
    with Chromium() as chromium: yield chromium


@pytest.mark.parametrize('page', ['index', 'lion', 'bench'])
def test_page_renders_in_chromium(browser, page):
    "Math typeset by MathJax from the site's own files, every notebook in the navigation, every image loaded"
    need_site()
    opened = browser.open((SITE / f'{page}.html').as_uri())
    facts = opened.evaluate(PAGE_FACTS)
    assert opened.screenshot(SITE / '_screenshots' / f'{page}.png') > 10_000
    assert facts['typeset'] == facts['math'] and '$$' not in facts['text'] and '\\[' not in facts['text']
    if page == 'lion': assert facts['math'] >= 10 and facts['containers'] >= facts['math']
    nav = {href.split('#')[0] or f'{page}.html' for href in facts['nav']}
    assert {f'{nb.page}.html' for nb in docs.notebooks()} <= nav
    assert all(img['width'] > 0 for img in facts['images']), facts['images']
    if page == 'bench': assert any('bench-train' in img['src'] for img in facts['images'])  # the benchmark plot
    assert all(url.startswith(('file:', 'data:')) for url in opened.requests), 'a request left the site'
    assert not opened.failed, opened.failed


def test_every_page_typesets_all_its_math(browser):
    "No page is left with a formula MathJax did not typeset, or a `$` outside code in its visible text"
    need_site()
    untypeset = {}
    for nb in docs.notebooks():
        facts = browser.open((SITE / f'{nb.page}.html').as_uri()).evaluate(VISIBLE_MATH)
        if facts['typeset'] != facts['math'] or '$' in facts['prose']: untypeset[nb.page] = facts
    assert not untypeset, untypeset


VISIBLE_MATH = '''(() => {
  const prose = document.querySelector('article').cloneNode(true);
  prose.querySelectorAll('pre, code, mjx-container').forEach(e => e.remove());
  return {math: document.querySelectorAll('.math').length,
          typeset: document.querySelectorAll('.math mjx-container').length, prose: prose.innerText};
})()'''


SEARCH_HITS = '''new Promise(done => {  // the pages Sphinx's search lists once it reports that it has finished
  const t0 = Date.now();
  const poll = () => {
    const status = (document.querySelector('.search-summary, #search-progress') || {}).textContent || '';
    const hits = [...document.querySelectorAll('#search-results li a')].map(a => a.getAttribute('href'));
    if (/finished|found/i.test(status) || Date.now() - t0 > 15000) done({status, hits}); else setTimeout(poll, 100);
  };
  poll();
})'''


def test_search_finds_the_page_about_a_word(browser):
    "The search runs from file:// with no server: 'Kahan' finds the low-precision page, which explains it"
    need_site()
    opened = browser.open((SITE / 'search.html').as_uri() + '?q=Kahan')
    found = opened.evaluate(SEARCH_HITS)
    opened.screenshot(SITE / '_screenshots' / 'search.png')
    assert 'lowprec.html' in {hit.split('#')[0] for hit in found['hits']}, found


def png(width: int, height: int) -> bytes:
    "A grey PNG, made by hand"
    chunk = lambda kind, data: struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    rows = b''.join(b'\0' + b'\x80' * width for _ in range(height))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def build_fixture(root: Path, cells: list[dict]) -> subprocess.CompletedProcess:
    "Sphinx, configured as the site is, over one notebook of `cells`, into root/html"
    src = root / 'src'
    (src / '_static').mkdir(parents=True)
    for name in ('conf.py', 'pandoc_ids.py'): shutil.copy(docs.CONF / name, src)
    shutil.copy(docs.CONF / 'site.css', src / '_static')
    write_notebook(src / 'index.ipynb', 'Fixture', cells)
    return subprocess.run([sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-W', str(src), str(root / 'html')],
                          capture_output=True, text=True)


def test_a_notebook_that_does_not_parse_fails_the_build(tmp_path):
    bad = {'cell_type': 'markdown', 'id': 'bad', 'metadata': {}, 'source': '```{no-such-directive}\nx\n```'}
    done = build_fixture(tmp_path, [bad])
    assert done.returncode != 0 and 'no-such-directive' in done.stderr


def test_an_image_output_is_an_image_that_loads(browser, tmp_path):
    "A notebook's plot output (as a benchmark cell's) becomes an <img> on its page, with its real size"
    import base64
    plot = {'cell_type': 'code', 'id': 'plot', 'metadata': {}, 'execution_count': 1, 'source': 'plot()',
            'outputs': [{'output_type': 'display_data', 'metadata': {},
                         'data': {'image/png': base64.b64encode(png(64, 48)).decode(), 'text/plain': 'plot'}}]}
    done = build_fixture(tmp_path, [plot])
    assert done.returncode == 0, done.stderr
    facts = browser.open((tmp_path / 'html' / 'index.html').as_uri()).evaluate(PAGE_FACTS)
    assert [img['width'] for img in facts['images']] == [64]
