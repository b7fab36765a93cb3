""" ``python -m timm_moejet.run SCRIPT [ARGS...]`` on script files the tests write.

timm's own scripts are not on PyPI (neither in the wheel nor in the sdist), so CI runs the launcher on stand-ins that
do what they do: look a model up by name, read ``sys.argv``, check ``__name__``, import from their own folder and
exit with a status. ``tests/test_timm_scripts.py`` runs timm's real scripts when ``TIMM_SCRIPTS_DIR`` names them.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from timm_moejet.run import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ('train.py', 'validate.py', 'benchmark.py', 'inference.py', 'onnx_export.py', 'onnx_validate.py')

# what a timm script does with our models: the registry lookup happens before anything else, as in validate.py
STAND_IN = textwrap.dedent('''\
    import json
    import sys

    import timm
    import torch

    import sibling  # from the script's own folder, which must come first on sys.path

    registered = sorted(timm.list_models('moejet_vit_test*'))
    assert __name__ == '__main__', __name__
    model = timm.create_model(sys.argv[1], num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 64, 64))
    print(json.dumps(dict(argv=sys.argv, registered=registered, model=type(model).__name__,
                          shape=list(logits.shape), sibling=sibling.VALUE, file=__file__)))
    sys.exit(int(sys.argv[2]))
    ''')


@pytest.fixture()
def stand_in(tmp_path) -> Path:
    folder = tmp_path / 'timm scripts'  # a space in the path, as argv must carry it whole
    folder.mkdir()
    (folder / 'sibling.py').write_text('VALUE = "from the script folder"\n')
    script = folder / 'stand_in.py'
    script.write_text(STAND_IN)
    return script


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_script_runs_with_the_models_registered_and_its_arguments_and_status(stand_in, tmp_path):
    args = ['moejet_vit_test', '7', '--flag', 'two words', '--model-kwargs', 'a=1']
    proc = _python('-m', 'timm_moejet.run', str(stand_in), *args, cwd=tmp_path)
    assert proc.returncode == 7, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == dict(argv=[str(stand_in), *args], registered=['moejet_vit_test'], model='MoEVisionTransformer',
                       shape=[2, 3], sibling='from the script folder', file=str(stand_in))


def test_without_the_launcher_the_script_cannot_see_the_models(stand_in, tmp_path):
    # the same script run as "python script.py": timm does not know moejet_* (what validate.py etc. would hit)
    proc = _python(str(stand_in), 'moejet_vit_test', '0', cwd=tmp_path)
    assert proc.returncode == 1
    assert 'Unknown model (moejet_vit_test)' in proc.stderr


def test_exit_status_passes_through(tmp_path, capsys):
    for body, status in [('pass', 0), ('raise SystemExit(0)', 0), ('raise SystemExit(3)', 3),
                         ('raise SystemExit(None)', 0), ('raise SystemExit("failed: reason")', 1)]:
        script = tmp_path / 'status.py'
        script.write_text(body + '\n')
        assert main([str(script)]) == status, body
    assert capsys.readouterr().err == 'failed: reason\n'  # a message exit prints it, as Python does


def test_an_exception_in_the_script_propagates_as_with_python(tmp_path):
    script = tmp_path / 'boom.py'
    script.write_text('raise ValueError("bad value in the script")\n')
    with pytest.raises(ValueError, match='bad value in the script'):
        main([str(script)])


def test_argv_and_path_are_restored(tmp_path):
    script = tmp_path / 'noop.py'
    script.write_text('import sys\nassert sys.argv[1:] == ["x"]\nassert sys.path[0] == %r\n' % str(tmp_path))
    argv, path = sys.argv[:], sys.path[:]
    assert main([str(script), 'x']) == 0
    assert sys.argv == argv and sys.path == path


def test_help_explains_and_shows_each_script(capsys):
    assert main(['--help']) == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: python -m timm_moejet.run SCRIPT [ARGS...]')
    assert '--device-modules timm_moejet' in out and 'not in the timm package' in out
    for script in SCRIPTS:
        lines = [line for line in out.splitlines() if f'python -m timm_moejet.run $TIMM_REPO/{script}' in line]
        assert len(lines) == 1, script
    assert main(['-h']) == 0 and capsys.readouterr().out == out


def test_no_arguments_prints_the_help_and_fails(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err.startswith('usage: python -m timm_moejet.run SCRIPT')


@pytest.mark.parametrize('argv,message', [
    (['missing/validate.py', '--model', 'moejet_vit_test'], 'missing/validate.py does not exist; timm\'s scripts'),
    (['--model', 'moejet_vit_test'], 'unknown option --model; the first argument is the script to run'),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('python -m timm_moejet.run: error: ') and message in err


def test_a_folder_is_not_a_script(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f'python -m timm_moejet.run: error: {tmp_path} is not a file ' \
                                      f'(see python -m timm_moejet.run --help)\n'


def test_missing_script_from_the_command_line(tmp_path):
    proc = _python('-m', 'timm_moejet.run', 'validate.py', '--model', 'moejet_vit_test', cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.count('\n') == 1 and 'validate.py does not exist' in proc.stderr, proc.stderr


def test_a_timm_folder_in_the_working_folder_is_pointed_out(tmp_path, monkeypatch, capsys):
    # in the root of a clone of timm's repository, its timm/ folder shadows the installed timm
    import timm
    script = tmp_path / 'noop.py'
    script.write_text('')
    monkeypatch.chdir(tmp_path)
    assert main([str(script)]) == 0
    assert capsys.readouterr().err == ''
    monkeypatch.setattr(timm, '__file__', str(tmp_path / 'timm' / '__init__.py'))
    assert main([str(script)]) == 0
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'is imported from {tmp_path / "timm"} (the working folder)' in err


def test_the_launcher_refuses_an_unreadable_script(tmp_path, capsys, monkeypatch):
    from timm_moejet.run import main as run_main

    script = tmp_path / 'train.py'
    script.write_text('print("ran")\n')
    monkeypatch.setattr(os, 'access', lambda path, mode: False)
    assert run_main([str(script)]) == 2
    err = capsys.readouterr().err.strip()
    assert 'cannot be read' in err and str(script) in err and len(err.splitlines()) == 1
