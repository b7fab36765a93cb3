""" timm's own scripts through ``python -m timm_moejet.run`` on moejet_vit_test and the digits (opt-in, CPU).

OPT-IN, NOT RUN IN CI: timm's scripts (train.py, validate.py, benchmark.py, inference.py, onnx_export.py,
onnx_validate.py) are only in timm's GitHub repository, not in its wheel or sdist, and CI reaches PyPI only. Set
``TIMM_SCRIPTS_DIR`` to a folder holding them (a clone of https://github.com/huggingface/pytorch-image-models) to
run this file; without it every test here is skipped. inference.py also needs pandas. Measured on 2 cores: 80 s
(7 min 52 s while other jobs shared the CPU), most of it train.py; ``pytest -s`` prints the figures.

train.py fits the model for a few epochs; the other scripts then read its checkpoint, and their figures are checked
against one another: validate.py's accuracy (``--results-file`` JSON), the accuracy of inference.py's predictions
file (the class is the image's folder), and onnx_validate.py's accuracy on onnx_export.py's graph must agree.
"""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_moejet  # noqa: F401  (registers the models for the in-process check of the ONNX file)
from benchmarks.digits.data import write_digits_image_folder
from timm_moejet.onnx_export import onnx_max_abs_error

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR')
pytestmark = pytest.mark.skipif(
    not SCRIPTS_DIR, reason='opt-in: set TIMM_SCRIPTS_DIR to a folder holding timm\'s scripts (not on PyPI)')

EPOCHS = 10
LOGITS_ATOL = 1e-4


def run_script(script: str, *args: str, cwd: Path) -> str:
    """``python -m timm_moejet.run SCRIPTS_DIR/script args...`` (outside the scripts' folder, so the installed
    timm is imported); returns stdout + stderr and fails the test on a non-zero status."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    cmd = [sys.executable, '-m', 'timm_moejet.run', str(Path(SCRIPTS_DIR) / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{script} exited with {proc.returncode}:\n{out[-4000:]}'
    return out


@pytest.fixture(scope='module')
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp('timm_scripts')
    write_digits_image_folder(str(work / 'digits64'), image_size=64, val_fraction=0.2, seed=0)
    return work


@pytest.fixture(scope='module')
def checkpoint(work) -> Path:
    run_script('train.py', '--data-dir', 'digits64', '--model', 'moejet_vit_test', '--num-classes', '10',
               '--input-size', '3', '64', '64', '--batch-size', '64', '--opt', 'adamw', '--lr', '2e-3',
               '--weight-decay', '0.05', '--warmup-epochs', '1', '--epochs', str(EPOCHS), '--device', 'cpu',
               '--workers', '2', '--output', 'runs', '--experiment', 'digits', cwd=work)
    path = work / 'runs' / 'digits' / 'model_best.pth.tar'
    assert path.is_file()
    return path


@pytest.fixture(scope='module')
def validate_top1(work, checkpoint) -> float:
    run_script('validate.py', 'digits64', '--model', 'moejet_vit_test', '--num-classes', '10', '--checkpoint',
               str(checkpoint), '--device', 'cpu', '--workers', '2', '--results-file', 'validate.json',
               '--results-format', 'json', cwd=work)
    results = json.loads((work / 'validate.json').read_text())
    assert results['model'] == 'moejet_vit_test' and results['img_size'] == 64
    assert 0. <= results['top1'] <= results['top5'] <= 100.
    print(f"validate.py: top1 {results['top1']}, top5 {results['top5']}")
    return results['top1']


def test_validate_accuracy_beats_chance(validate_top1):
    assert validate_top1 > 20., validate_top1  # 10 classes: chance is 10%


def test_benchmark_measures_inference_and_training(work):
    out = run_script('benchmark.py', '--model', 'moejet_vit_test', '--bench', 'both', '--device', 'cpu',
                     '--batch-size', '32', '--num-bench-iter', '5', '--num-warm-iter', '1', '--results-file',
                     'benchmark.json', '--results-format', 'json', cwd=work)
    assert re.search(r'Inference benchmark of moejet_vit_test done\. [\d.]+ samples/sec', out), out[-3000:]
    assert re.search(r'Train benchmark of moejet_vit_test done\. [\d.]+ samples/sec', out), out[-3000:]
    results = json.loads((work / 'benchmark.json').read_text())
    assert results['infer_samples_per_sec'] > 0 and results['train_samples_per_sec'] > 0, results
    print(f"benchmark.py: {results['infer_samples_per_sec']} samples/s inference, "
          f"{results['train_samples_per_sec']} samples/s train")


def test_inference_predictions_agree_with_validate(work, checkpoint, validate_top1):
    pytest.importorskip('pandas', reason="timm's inference.py writes its results with pandas")
    run_script('inference.py', 'digits64', '--model', 'moejet_vit_test', '--num-classes', '10', '--checkpoint',
               str(checkpoint), '--device', 'cpu', '--workers', '2', '--results-dir', 'predictions',
               '--results-format', 'csv', '--topk', '1', '--fullname', '--include-index', '--no-console-results',
               cwd=work)
    with open(work / 'predictions' / 'moejet_vit_test-64.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((work / 'digits64' / 'validation').glob('*/*.png')))
    correct = sum(int(r['index']) == int(r['filename'].split('/')[0]) for r in rows)
    assert 100. * correct / len(rows) == pytest.approx(validate_top1, abs=1e-3)
    print(f'inference.py: {len(rows)} predictions, top1 {100. * correct / len(rows):.4f}')


def test_onnx_export_and_onnx_validate_agree_with_eager(work, checkpoint, validate_top1):
    run_script('onnx_export.py', 'model.onnx', '--model', 'moejet_vit_test', '--num-classes', '10', '--checkpoint',
               str(checkpoint), '--check-forward', cwd=work)
    model = timm.create_model('moejet_vit_test', num_classes=10, checkpoint_path=str(checkpoint))
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, 3, 64, 64, generator=gen) for b in (1, 4, 9)]  # exported with a batch of 1
    error = onnx_max_abs_error(work / 'model.onnx', model, inputs)
    assert error <= LOGITS_ATOL
    out = run_script('onnx_validate.py', 'digits64/validation', '--onnx-input', 'model.onnx', '--batch-size', '64',
                     '--img-size', '64', '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5', '--crop-pct',
                     '0.9', '--interpolation', 'bicubic', '--workers', '2', cwd=work)
    top1 = float(re.search(r'\* Prec@1 ([\d.]+)', out).group(1))
    assert top1 == pytest.approx(validate_top1, abs=1e-3)
    print(f'onnx_export.py: max abs error {error:.3g} against eager; onnx_validate.py: Prec@1 {top1}')
