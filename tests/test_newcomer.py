""" A newcomer's path: the repository is self-contained, a missing extra is one line, the docs name real commands.

- No tracked file names a path outside the repository (a sibling folder, this or another machine's home), and every
  relative link in README.md and docs/ resolves inside it, anchors included.
- The demo's, the convergence benchmark's and the command line's missing-extra paths print one line on stderr and
  exit with status 2 (the module is blocked in a subprocess), and ``import timm_moejet`` imports no optional package.
- Every ``weights-tools`` command in the code blocks of README.md and docs/ is the installed script, names a real
  subcommand and parses with the command line's own parser; ``weights_tools`` is never written as a command.
- The README shows the two commands of a newcomer's set-up, the demo and the tests (the development install and the
  test command CI runs), and its offline example prints what the README shows.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
SUBCOMMANDS = ('calibrate', 'recycle', 'select', 'export', 'push', 'import-official', 'inspect', 'prune')

# a path outside the repository: a sibling folder reached with '..', or an absolute path of someone's machine
_OUTSIDE = re.compile(r'\.\./shared|(?<![\w.])/(?:work|home/\w|Users/\w|root/|mnt/)')
_TEXT_SUFFIXES = {'.py', '.md', '.sh', '.toml', '.cfg', '.txt', '.json', '.yaml', '.yml', '.cff', ''}


def _tracked_files():
    try:
        out = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file there
        files = [p for p in ROOT.rglob('*') if p.is_file() and '.git' not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in _TEXT_SUFFIXES]


def test_no_tracked_file_refers_outside_the_repository():
    files = _tracked_files()
    assert len(files) > 50, f'found only {len(files)} files: is {ROOT} the repository?'
    this = Path(__file__).resolve()
    hits = []
    for path in files:
        if path.resolve() == this:
            continue
        text = path.read_text(errors='replace')
        for n, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                hits.append(f'{path.relative_to(ROOT)}:{n}: {line.strip()}')
            # Path(__file__).parents[k] of a file d folders deep leaves the repository when k > d
            for k in re.findall(r'__file__\)\.resolve\(\)\.parents\[(\d+)\]', line):
                if int(k) >= len(path.relative_to(ROOT).parts):
                    hits.append(f'{path.relative_to(ROOT)}:{n}: parents[{k}] is outside the repository')
    assert not hits, 'paths outside the repository:\n' + '\n'.join(hits)


def test_the_official_fixture_is_inside_the_repository():
    sys.path.insert(0, str(ROOT / 'tests'))
    try:
        from paths import OFFICIAL_FIXTURE
    finally:
        sys.path.remove(str(ROOT / 'tests'))
    assert OFFICIAL_FIXTURE.resolve().is_relative_to(ROOT) and OFFICIAL_FIXTURE.is_file(), OFFICIAL_FIXTURE


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r'[`*_]|\[|\]\([^)]*\)', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(page: Path) -> set:
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r'^#+ (.+)$', text, flags=re.M)}


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(page):
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z]+:', target):  # https:, mailto:
            continue
        file, _, anchor = target.partition('#')
        dest = (page.parent / file).resolve() if file else page
        if not dest.resolve().is_relative_to(ROOT) or not dest.exists():
            bad.append(f'{target}: no such file in the repository')
        elif anchor and dest.suffix == '.md' and anchor not in _anchors(dest):
            bad.append(f'{target}: {dest.name} has no heading with anchor #{anchor}')
    assert not bad, f'{page.name}: ' + '; '.join(bad)


def _run_blocked(blocked: str, code: str, tmp_path: Path):
    """Run ``code`` in a fresh interpreter where importing ``blocked`` fails as if it were not installed."""
    prelude = f'import sys; sys.modules[{blocked!r}] = None\n'
    return subprocess.run([sys.executable, '-c', prelude + code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=_env())


def _env():
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    env['HF_HUB_OFFLINE'] = '1'
    return env


def _one_line_error(res, *says):
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    for s in says:
        assert s in err, err


_RUN_MODULE = 'import runpy; sys.argv = {argv!r}; runpy.run_module({module!r}, run_name="__main__", alter_sys=True)'


def test_demo_without_scikit_learn_is_one_line(tmp_path):
    res = _run_blocked('sklearn', _RUN_MODULE.format(argv=['demo', '--epochs', '1', '--donor-epochs', '1'],
                                                     module='benchmarks.digits.demo'), tmp_path)
    _one_line_error(res, 'python -m benchmarks.digits.demo: error:', 'scikit-learn', 'pip install')


def test_convergence_without_matplotlib_is_one_line_before_it_runs(tmp_path):
    res = _run_blocked('matplotlib', _RUN_MODULE.format(argv=['convergence', '--seeds', '0', '--epochs', '2'],
                                                        module='benchmarks.convergence'), tmp_path)
    _one_line_error(res, 'python -m benchmarks.convergence: error:', 'timm-moejet[plot]')
    assert not (tmp_path / 'benchmarks').exists(), 'it ran before checking the extra'


def test_command_line_without_matplotlib_is_one_line(tmp_path):
    code = ('from weights_tools.__main__ import main; sys.exit(main(["inspect", "moejet_vit_test", "--random-images", '
            '"1", "--plot", "routers.png"]))')
    res = _run_blocked('matplotlib', code, tmp_path)
    _one_line_error(res, 'weights-tools inspect: error:', 'timm-moejet[plot]')
    assert not (tmp_path / 'routers.png').exists()


def test_import_timm_moejet_imports_no_optional_package(tmp_path):
    code = ('import sys, timm_moejet, weights_tools.cli; weights_tools.cli.build_parser(); '
            'print(sorted(m for m in ("sklearn", "matplotlib", "pymetis", "onnx", "onnxruntime", "onnxscript") '
            'if m in sys.modules))')
    res = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == '[]', res.stdout


def _code_blocks(page: Path):
    return re.findall(r'```[a-z]*\n(.*?)```', page.read_text(), flags=re.S)


def _shell_commands(block: str):
    """The commands of a shell code block: continuation lines joined, comments dropped, split at ; && ||."""
    joined = re.sub(r'\\\n', ' ', block)
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command = []
        for word in words + [';']:
            if word in (';', '&&', '||', '|'):
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def _installed_scripts():
    import tomllib
    return tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']


def test_the_installed_script_is_the_command_line():
    scripts = _installed_scripts()
    assert scripts == {'weights-tools': 'weights_tools.__main__:main'}, scripts
    from weights_tools.cli import build_parser
    assert build_parser().prog == 'weights-tools'


def _weights_tools_commands():
    found = []
    for page in PAGES:
        for block in _code_blocks(page):
            for words in _shell_commands(block):
                while words and re.fullmatch(r'[A-Z_]+=\S*', words[0]):  # HF_HUB_OFFLINE=1 weights-tools ...
                    words = words[1:]
                if words and words[0] == 'weights-tools':
                    found.append((page.name, words))
    return found


def test_docs_write_weights_tools_as_the_installed_command():
    bad = []
    commands = '|'.join(SUBCOMMANDS)
    pattern = re.compile(rf'python -m weights_tools\s+[\w-]|(?<![\w/.-])weights_tools\s+(?:{commands})\b')
    for page in PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if pattern.search(line):
                bad.append(f'{page.name}:{n}: {line.strip()}')
    assert not bad, 'write the installed command, weights-tools:\n' + '\n'.join(bad)
    assert len(_weights_tools_commands()) >= 10, 'the docs show fewer weights-tools commands than expected'


@pytest.mark.parametrize('page, words', _weights_tools_commands(), ids=lambda x: x if isinstance(x, str) else '')
def test_each_weights_tools_command_in_the_docs_parses(page, words):
    from weights_tools.cli import build_parser
    assert words[1] in SUBCOMMANDS or words[1] == '--help', f'{page}: unknown command {" ".join(words)}'
    if '--help' in words:
        return
    args = build_parser().parse_args(words[1:])
    assert args.command == words[1]


def test_demo_conclusions_check_its_own_curves():
    from benchmarks.digits.demo import conclusions
    holds = '\n'.join(conclusions({'moe_jetpack': [10., 30., 40., 50.], 'moe_scratch': [10., 20., 25., 30.],
                                   'dense_donor': [10., 30., 35., 45.]}))
    assert 'from scratch last: yes' in holds and '(30.0%) at epoch 2 of 4' in holds and 'claims: yes' in holds, holds
    fails = '\n'.join(conclusions({'moe_jetpack': [10., 20., 25., 31.], 'moe_scratch': [10., 20., 25., 30.],
                                   'dense_donor': [10., 30., 35., 45.]}))
    assert 'from scratch last: no' in fails and 'at epoch 4 of 4' in fails and 'claims: no' in fails, fails
    never = '\n'.join(conclusions({'moe_jetpack': [10., 20.], 'moe_scratch': [10., 30.], 'dense_donor': [5., 6.]}))
    assert 'did not reach' in never and 'claims: no' in never, never


def _requirement_names(requirements):
    return {re.split(r'[<>=!~\[; ]', r, maxsplit=1)[0].lower().replace('_', '-') for r in requirements}


def test_the_first_install_command_brings_what_the_demo_imports():
    import tomllib
    first = _code_blocks(ROOT / 'README.md')[0].split('\n')
    assert first[:2] == ['pip install -e .', 'python -m benchmarks.digits.demo'], first
    base = _requirement_names(tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['dependencies'])
    # the demo's data set (scikit-learn) and the files it writes (safetensors), besides torch, timm and numpy
    assert {'scikit-learn', 'safetensors'} <= base, base


def test_ci_runs_what_contributing_says():
    setup = _code_blocks(ROOT / 'docs' / 'contributing.md')[0].strip().splitlines()
    ci = (ROOT / '.ci' / 'run').read_text()
    for line in setup[1:]:  # after creating the venv
        assert line in ci or line.replace('pip install', 'python -m pip install') in ci, f'.ci/run does not run {line}'


def _fenced_blocks(page: Path):
    """(language, text) of every fenced code block."""
    return re.findall(r'```([a-z]*)\n(.*?)```', page.read_text(), flags=re.S)


def test_the_readme_shows_the_development_install_and_the_test_command_ci_runs():
    ci = (ROOT / '.ci' / 'run').read_text()
    blocks = [text for _, text in _fenced_blocks(ROOT / 'README.md') if 'python -m pytest' in text]
    assert len(blocks) == 1, 'the README shows the test command once, in its own block'
    lines = blocks[0].strip().splitlines()
    assert any(line.startswith('pip install -e ".[test]"') for line in lines), lines
    for line in lines:
        assert line in ci or line.replace('pip install', 'python -m pip install') in ci, f'.ci/run does not run {line}'


def test_the_readme_offline_example_prints_what_the_readme_shows(tmp_path):
    """The example that recycles a local dense ViT runs from a fresh folder, offline, and prints (stdout and the
    logged warning) exactly the output block that follows it."""
    blocks = _fenced_blocks(ROOT / 'README.md')
    at = next(i for i, (lang, text) in enumerate(blocks)
              if lang == 'python' and "create_moejet_from('local-dir:" in text)
    code, (lang, shown) = blocks[at][1], blocks[at + 1]
    assert lang == '', 'the output block follows the example'
    res = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert res.stdout.strip().splitlines() == shown.strip().splitlines()
