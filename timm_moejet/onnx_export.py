""" ONNX export of a model, checked against eager PyTorch in onnxruntime (``pip install "timm-moejet[onnx]"``).

:func:`export_onnx` writes the model with ``torch.onnx.export`` (a dynamic batch dimension) and, by default, runs
the file in onnxruntime on inputs of several batch sizes, none of them the one it was traced with, comparing with
the eager float32 output; :func:`onnx_max_abs_error` does that comparison on any inputs. The entmax-1.5 combine of
SpheroMoE has data-dependent control flow; how it exports exactly is in ``timm_moejet/layers/entmax.py``.

onnx, onnxruntime (and onnxscript, for the dynamo exporter) are imported when a function runs, never with the
package.
"""
import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .checkpoint_io import refuse_existing, write_file
from .checkpoint_io.names import PathLike
from .errors import ExportMismatch, InvalidArgument, NotFound
from .extras import require
from .modes import eval_mode
from .settings import boolean, integer, optional, real

__all__ = ['OnnxExport', 'export_onnx', 'onnx_max_abs_error']

INPUT_NAME, OUTPUT_NAME = 'input0', 'output0'  # the names timm's onnx_export.py gives its graphs
# check inputs: batch sizes besides the traced one (1 catches a batch size baked into a reshape)
CHECK_BATCH_SIZES = (1, 3, 5)
_PROTOBUF_LIMIT = 2 ** 31 - 2 ** 27  # headroom below the 2 GB protobuf limit: weights go to an external file


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and measured.

    Attributes:
        path: The ``.onnx`` file (weights of models over 2 GB in ``path`` + ``.data`` beside it).
        max_abs_error: Largest absolute difference between onnxruntime and eager float32 outputs over the check
            inputs (None when not checked).
        batch_sizes: Batch sizes of the check inputs.
    """
    path: Path
    max_abs_error: Optional[float]
    batch_sizes: Tuple[int, ...]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _ort_session(path: PathLike):
    ort = require('onnxruntime', 'onnx', 'running an ONNX model')
    return ort.InferenceSession(os.fspath(path), providers=['CPUExecutionProvider'])


def onnx_max_abs_error(onnx_file: PathLike, model: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference between onnxruntime and the eager model (eval mode, float32) over ``inputs``.

    Args:
        onnx_file: An ONNX file with one input and the model's output first.
        model: The model it was exported from.
        inputs: Input batches (any batch size the file accepts).

    Returns:
        The maximum over all inputs and output elements.
    """
    if not Path(onnx_file).is_file():
        raise NotFound(f'ONNX file {onnx_file} does not exist.')
    if not inputs:
        raise InvalidArgument('inputs must hold at least one tensor.')
    session = _ort_session(onnx_file)
    name = session.get_inputs()[0].name
    device = _device(model)
    worst = 0.
    with eval_mode(model):
        for x in inputs:
            with torch.no_grad():
                expected = model(x.to(device=device, dtype=torch.float32)).float().cpu()
            got = torch.from_numpy(session.run(None, {name: x.float().cpu().numpy()})[0])
            if got.shape != expected.shape:
                raise ExportMismatch(f'{onnx_file}: onnxruntime output shape {tuple(got.shape)} for input '
                                     f'{tuple(x.shape)}, eager {tuple(expected.shape)}.')
            worst = max(worst, float((got - expected).abs().max()))
    return worst


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        if 'input_size' not in cfg:
            raise InvalidArgument('the model has no pretrained_cfg input_size; pass input_size=(C, H, W).')
        input_size = cfg['input_size']
    if len(input_size) != 3 or not all(isinstance(v, int) and v >= 1 for v in input_size):
        raise InvalidArgument(f'input_size must be (C, H, W) of ints >= 1, got {tuple(input_size)!r}.')
    return tuple(input_size)


def _check_output(output: Path, overwrite: bool) -> Path:
    """A ``.onnx`` file in an existing folder, free unless ``overwrite``: refused before the export's slow work."""
    if output.suffix != '.onnx':
        raise InvalidArgument(f'output must name a .onnx file, got {output}.')
    refuse_existing(output, overwrite, how='overwrite=True')
    if not output.parent.is_dir():
        raise NotFound(f'the folder of {output} does not exist.')
    return output


def _check_float32(model: nn.Module) -> None:
    other = sorted({str(p.dtype).replace('torch.', '') for p in model.parameters() if p.dtype != torch.float32})
    if other:
        raise InvalidArgument(f'export_onnx needs a float32 model; {type(model).__name__} holds {", ".join(other)} '
                              f'parameters (cast_experts keeps the experts in another dtype): undo it with '
                              f'cast_experts(model, torch.float32), or model.float(), before exporting.')


def _export(model: nn.Module, x: torch.Tensor, path: Path, opset: Optional[int], dynamo: bool) -> None:
    if dynamo:
        big = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) >= _PROTOBUF_LIMIT
        # a batch of 1 would be specialised by torch.export: trace with >= 2 (export_onnx's default)
        torch.onnx.export(model, (x,), os.fspath(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=True, dynamic_shapes=({0: 'batch'},), external_data=big)
    else:
        torch.onnx.export(model, (x,), os.fspath(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}})


def export_onnx(
        model: nn.Module,
        output: PathLike,
        input_size: Optional[Sequence[int]] = None,
        batch_size: int = 2,
        opset: Optional[int] = None,
        dynamo: bool = False,
        check: bool = True,
        atol: float = 1e-4,
        overwrite: bool = False,
) -> OnnxExport:
    """Export ``model`` (in eval mode) to ONNX with a dynamic batch dimension and check it in onnxruntime.

    The file (and the external weights file of a model over 2 GB, ``output`` + ``.data``) is written atomically and
    moved into place only once it passed the ONNX checker and (with ``check``) the comparison, so a failed export
    leaves no file.

    Args:
        model: The model (float32).
        output: The ``.onnx`` file to write.
        input_size: (C, H, W) of the input; default the model's ``pretrained_cfg['input_size']``.
        batch_size: Batch size of the traced example input (>= 2 for ``dynamo``: torch.export specialises 1).
        opset: ONNX opset; default the exporter's.
        dynamo: Use torch's ``torch.export``-based exporter (needs onnxscript) instead of the TorchScript one
            (what timm's onnx_export.py uses unless given ``--dynamo``).
        check: Compare onnxruntime with eager on random inputs of the batch sizes ``CHECK_BATCH_SIZES`` and
            ``batch_size + 4``, other than ``batch_size``.
        atol: Largest absolute output difference the check accepts.
        overwrite: Replace an existing ``output``.

    Returns:
        The path, the measured maximum absolute error and the check batch sizes.

    Raises:
        OutputExists: If ``output`` exists and not ``overwrite``.
        MissingExtra: If onnx/onnxruntime (or onnxscript for ``dynamo``) is not installed.
        RuntimeError: If onnxruntime differs from eager by more than ``atol``.
    """
    onnx = require('onnx', 'onnx', 'ONNX export')
    if check:
        require('onnxruntime', 'onnx', 'the onnxruntime check of an ONNX export')
    dynamo, check, overwrite = (boolean()(n, v) for n, v in (('dynamo', dynamo), ('check', check),
                                                             ('overwrite', overwrite)))
    if dynamo:
        require('onnxscript', 'onnx', 'the dynamo ONNX exporter (dynamo=True)')
    batch_size = integer(2 if dynamo else 1)('batch_size', batch_size)
    opset = optional(integer(7))('opset', opset)
    atol = real(0.)('atol', atol)
    size = _input_size(model, input_size)
    output = _check_output(Path(output), overwrite)
    _check_float32(model)
    device = _device(model)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, *size, generator=gen).to(device)
    batch_sizes = tuple(sorted({*CHECK_BATCH_SIZES, batch_size + 4} - {batch_size})) if check else ()
    errors = []

    def export_and_check(path: Path) -> None:
        _export(model, example, path, opset, dynamo)
        onnx.checker.check_model(os.fspath(path), full_check=True)
        if check:
            inputs = [torch.randn(b, *size, generator=gen) for b in batch_sizes]
            errors.append(onnx_max_abs_error(path, model, inputs))
            if not errors[-1] <= atol:
                raise ExportMismatch(f'{output.name}: onnxruntime differs from eager PyTorch by {errors[-1]:.3g} '
                                     f'(more than atol={atol:g}); the file was not written.')

    with eval_mode(model):
        write_file(output, export_and_check, overwrite)
    return OnnxExport(output, errors[-1] if errors else None, batch_sizes)
