""" Ctrl-C in every command: one line on stderr and exit status 130, during the heavy imports too.

Each command runs in a real interpreter (``python -m ...`` or the installed ``weights-tools`` script) that receives
a real SIGINT at a chosen moment: when a given module is first imported (a ``sitecustomize`` on ``PYTHONPATH``
installs the import hook; ``torch`` is the first of the seconds-long imports), or from the script that
``python -m timm_moejet.run`` runs. A program that merely imports ``timm_moejet`` keeps its KeyboardInterrupt.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SITECUSTOMIZE = '''
import os, signal, sys

class _InterruptOnImport:
    """Send this process SIGINT when the module named by INTERRUPT_ON_IMPORT is first imported."""
    def find_spec(self, name, path=None, target=None):
        if name == os.environ['INTERRUPT_ON_IMPORT']:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

if os.environ.get('INTERRUPT_ON_IMPORT'):
    sys.meta_path.insert(0, _InterruptOnImport())
'''


def _run(argv, tmp_path: Path, on_import: str = ''):
    hook = tmp_path / 'hook'
    hook.mkdir(exist_ok=True)
    (hook / 'sitecustomize.py').write_text(_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(ROOT), os.environ.get('PYTHONPATH', '')]),
               INTERRUPT_ON_IMPORT=on_import, HF_HUB_OFFLINE='1')
    # The child starts with Ctrl-C's default action, as from a terminal: a runner launched in the background
    # (nohup, `&`) passes SIGINT on ignored, and Python then installs no KeyboardInterrupt at all.
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_default_ctrl_c)


def _default_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted(result, prog: str) -> None:
    prog = 'weights-tools' if prog == 'python -m weights_tools' else prog  # as all its messages name it
    assert result.returncode == 130, (result.returncode, result.stderr[-3000:])
    assert result.stderr.strip() == f'{prog}: interrupted', result.stderr[-3000:]


COMMANDS = [
    ('timm_moejet.train', ['--help']),
    ('timm_moejet.sharded_checkpoint', ['--help']),
    ('timm_moejet.run', ['--help']),
    ('weights_tools', ['--help']),
    ('benchmarks.digits.demo', ['--help']),
    ('benchmarks.digits.data', ['--help']),
    ('benchmarks.convergence', ['--help']),
    ('benchmarks.throughput', ['--help']),
]


@pytest.mark.parametrize('module, args', COMMANDS, ids=[m for m, _ in COMMANDS])
@pytest.mark.parametrize('on_import', ['torch', 'timm'])
def test_ctrl_c_while_a_command_imports_is_one_line_and_status_130(tmp_path, module, args, on_import):
    _interrupted(_run([sys.executable, '-m', module, *args], tmp_path, on_import), f'python -m {module}')


@pytest.mark.parametrize('module, on_import', [('timm_moejet.train', 'timm_moejet.training.trainer'),
                                               ('timm_moejet.sharded_checkpoint', 'timm_moejet.training.checkpoint'),
                                               ('weights_tools', 'weights_tools.cli')])
def test_ctrl_c_in_an_entry_modules_own_imports_is_one_line_and_status_130(tmp_path, module, on_import):
    _interrupted(_run([sys.executable, '-m', module, '--help'], tmp_path, on_import), f'python -m {module}')


def test_ctrl_c_that_an_extension_module_swallows_still_ends_the_command(tmp_path):
    """torch's C module imports numpy itself and drops the KeyboardInterrupt of that import: the command used to go on
    (and write its output, status 0) or fail later on the half-imported numpy (status 1)."""
    result = _run([sys.executable, '-m', 'weights_tools', 'export', 'moejet_vit_test', '--output', 'out'], tmp_path,
                  'numpy')
    _interrupted(result, 'weights-tools')
    assert not (tmp_path / 'out').exists()


def test_ctrl_c_in_the_installed_weights_tools_script_is_one_line_and_status_130(tmp_path):
    script = Path(sys.executable).with_name('weights-tools')
    if not script.is_file():
        pytest.skip('weights-tools is not installed beside this interpreter')
    for on_import in ('torch', 'weights_tools.cli'):
        _interrupted(_run([str(script), '--help'], tmp_path, on_import), 'weights-tools')


def test_ctrl_c_in_a_script_the_launcher_runs_is_one_line_and_status_130(tmp_path):
    (tmp_path / 'script.py').write_text('import os, signal, time\n'
                                        'os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(60)\n')
    _interrupted(_run([sys.executable, '-m', 'timm_moejet.run', 'script.py'], tmp_path), 'python -m timm_moejet.run')


def test_a_program_that_imports_the_package_keeps_its_keyboard_interrupt(tmp_path):
    result = _run([sys.executable, '-c', 'import timm_moejet'], tmp_path, 'torch')
    assert result.returncode == -signal.SIGINT and 'KeyboardInterrupt' in result.stderr, result.stderr[-3000:]
    caught = _run([sys.executable, '-c', 'try:\n    import timm_moejet\nexcept KeyboardInterrupt:\n    print("mine")'],
                  tmp_path, 'torch')
    assert caught.returncode == 0 and caught.stdout.strip() == 'mine', caught.stderr[-3000:]


@pytest.mark.parametrize('argv, module', [(['-X', 'utf8', '-m', 'timm_moejet.train'], 'timm_moejet.train'),
                                          (['-Im', 'weights_tools'], 'weights_tools'),
                                          (['-mbenchmarks.convergence'], 'benchmarks.convergence'),
                                          (['-W', 'ignore', '-c', 'pass'], None),
                                          (['script.py', '-m', 'timm_moejet.train'], None),
                                          (['-m', 'pytest'], 'pytest')])
def test_the_module_a_python_command_line_runs_is_read_from_it(argv, module):
    from timm_moejet.interrupt import _main_module

    assert _main_module(['python', *argv]) == module
